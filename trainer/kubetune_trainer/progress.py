"""What rank 0 publishes while it trains: Prometheus `/metrics` and a JSON `/progress` document.

Both are served on `metrics.port` (bound to $POD_IP when set, else 0.0.0.0) by a small threaded HTTP server;
a request only copies an in-memory snapshot, so polling is cheap.

Prometheus metrics (no labels; the scrape target adds namespace and name):

    kubetune_train_loss                      gauge      mean training loss over the last log interval
    kubetune_train_eval_loss                 gauge      latest eval loss
    kubetune_train_eval_set_loss{set}        gauge      latest loss on each named evaluation set
    kubetune_train_eval_set_base_loss{set}   gauge      the base model's loss on it (step 0)
    kubetune_train_eval_set_change_ratio{set}  gauge    (loss - base loss) / base loss: > 0 is worse than the base
    kubetune_train_learning_rate             gauge
    kubetune_train_grad_norm                 gauge      gradient norm before clipping (latest step)
    kubetune_train_global_step               gauge      optimizer steps done
    kubetune_train_total_steps               gauge
    kubetune_train_tokens_total              counter    real (non-padding) tokens trained on, all ranks
    kubetune_train_step_duration_seconds     histogram  wall time per optimizer step
    kubetune_train_mfu_ratio                 gauge      model FLOPs utilisation, 0-1 (0 on CPU)
    kubetune_train_gpu_memory_peak_bytes     gauge      peak CUDA memory allocated on rank 0 (0 on CPU)
    kubetune_train_checkpoint_duration_seconds         gauge  duration of the latest checkpoint save
    kubetune_train_last_checkpoint_timestamp_seconds   gauge  unix time of the latest checkpoint
    kubetune_train_estimated_completion_timestamp_seconds  gauge  unix time training is expected to end

`/progress` (camelCase JSON):

    {
      "state": "loading|training|evaluating|checkpointing|exporting|sampling|done|failed",
      "reason": str | null,             # why it failed
      "step": int, "totalSteps": int | null, "epoch": float,
      "loss": float | null, "evalLoss": float | null, "evalPerplexity": float | null,
      "baseEvalLoss": float | null,     # the base model's eval loss (step 0)
      "evalSets": {name: {"loss", "perplexity", "baseLoss", "change"}},   # latest evaluation of each named set
      "dataReport": {"rows", "tokens", "lengthP50", "lengthP99", "lengthMax", "truncatedRows", "skippedRows",
                     "exactDuplicateRows", "nearDuplicateRows", "evaluationRows", "leakedRows"} | null,
      "learningRate": float | null, "gradNorm": float | null,
      "tokensTotal": int, "tokensPerSecond": float | null, "mfu": float | null,
      "etaSeconds": float | null, "worldSize": int,
      "checkpoint": {"step": int, "path": str, "savedAt": RFC3339} | null,   # latest valid checkpoint
      "resumedFromStep": int | null,
      "setup": {"stage": str, "done": int | null, "total": int | null, "unit": "bytes" | "rows" | null} | null,
      "ignoredCheckpoints": [{"path": str, "reason": str}, ...],
      "pinned": [{"role": "model|dataset|evalDataset", "source": str, "revision": str | null, "commit": str}, ...],
      "startedAt": RFC3339, "updatedAt": RFC3339,
      "history": [{"step": int, "loss": float, "evalLoss": float, "evalSets": {name: loss}}, ...]
                                        # evalLoss and evalSets only where evaluated (step 0: the base model)
    }

`setup` says what rank 0 is doing while `state` is "loading", and how far it got; it is null once training starts.
Stages, in order (each may be skipped): "downloading" (s3:// and hf:// sources into the cache; bytes for s3://,
done/total null for the Hub), "reading data" (rows read and rendered; total null), "tokenising" (rows),
"checking data" (the data report; no counts), "loading model" (no counts), "verifying checkpoints" (hashing this
training's checkpoints; no counts), "loading checkpoint" (no counts). `done` only grows within a stage: a change of
`stage` or of `done` is progress.

`ignoredCheckpoints` lists the checkpoints in the run's checkpoint directory that this training did not resume
from and will never rotate: another FineTuneJob object's (another uid), another run's, another spec's or dataset's,
ones from before checkpoints recorded who wrote them, and own ones that failed verification (moved to corrupt-...).
At most 20 entries; the logs have them all.

`pinned` names the commit each hf:// source was resolved to when the run started (every rank reads that commit,
whatever the branch or tag does meanwhile).

`history` holds at most 500 points evenly spread over the run: past that, the resolution of the training points
halves (one point per 2, 4, 8... steps). Evaluations are few and make the eval curve: they are thinned separately,
only when they alone take more than half the points.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

STATES = ("loading", "training", "evaluating", "checkpointing", "exporting", "sampling", "done", "failed")
MAX_HISTORY = 500
P = TypeVar("P")
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


# (stage, done, total, unit): what the setup is doing and how far it got; Progress.setup is one.
Report = Callable[[str, int | None, int | None, str | None], None]


def no_report(stage: str, done: int | None = None, total: int | None = None, unit: str | None = None) -> None:
    """A Report that tells nobody."""


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _thin(points: list[P], limit: int, step: Callable[[P], int]) -> list[P]:
    """At most `limit` points evenly spread over the steps: the earliest point of each step bucket, for the
    narrowest power-of-two bucket width that fits, plus the newest point. Buckets only ever merge pairwise as the
    run grows, so a point dropped once would be dropped at any later length too: thinning as the history grows
    gives the same spacing as thinning the whole history at the end."""
    if len(points) <= limit or limit < 2:
        return points if len(points) <= limit else points[len(points) - limit :]
    width = 1
    while True:
        kept: dict[int, P] = {}
        for point in points[:-1]:
            kept.setdefault(step(point) // width, point)
        thinned = [*kept.values(), points[-1]]
        if len(thinned) <= limit:
            return thinned
        width *= 2


def thin(points: Sequence[P], limit: int, step: Callable[[P], int], evaluated: Callable[[P], bool]) -> list[P]:
    """At most `limit` points spanning the whole run, oldest first (points sorted by step, one per step).
    Evaluations and training points are thinned separately: evaluations keep up to half the points (more when
    training points leave room), so the eval curve keeps every evaluation of a run of normal length, and spans the
    run when there are more. The one thinning of loss curves: the trainer's /progress history and the operator's
    status.progress.history both use it."""
    if len(points) <= limit:
        return list(points)
    evals = [p for p in points if evaluated(p)]
    train = [p for p in points if not evaluated(p)]
    evals = _thin(evals, max(limit // 2, limit - len(train)), step)
    train = _thin(train, limit - len(evals), step)
    return sorted(evals + train, key=step)


def downsample(points: list[dict[str, Any]], limit: int = MAX_HISTORY) -> list[dict[str, Any]]:
    """`thin` for the history points of /progress."""
    return thin(points, limit, step=lambda p: p["step"], evaluated=lambda p: "evalLoss" in p or "evalSets" in p)


class Progress:
    """Thread-safe training state, written by the loop and read by the HTTP server."""

    def __init__(self, world_size: int) -> None:
        self._lock = threading.Lock()
        now = time.time()
        self._doc: dict[str, Any] = {
            "state": "loading",
            "reason": None,
            "step": 0,
            "totalSteps": None,
            "epoch": 0.0,
            "loss": None,
            "evalLoss": None,
            "evalPerplexity": None,
            "baseEvalLoss": None,
            "evalSets": {},
            "dataReport": None,
            "learningRate": None,
            "gradNorm": None,
            "tokensTotal": 0,
            "tokensPerSecond": None,
            "mfu": None,
            "etaSeconds": None,
            "worldSize": world_size,
            "checkpoint": None,
            "resumedFromStep": None,
            "setup": None,
            "ignoredCheckpoints": [],
            "pinned": [],
            "startedAt": rfc3339(now),
            "updatedAt": rfc3339(now),
        }
        self._history: list[dict[str, Any]] = []
        r = self.registry = CollectorRegistry()
        p = "kubetune_train_"
        self.loss = Gauge(p + "loss", "Mean training loss over the last log interval.", registry=r)
        self.eval_loss = Gauge(p + "eval_loss", "Latest loss on the evaluation split.", registry=r)
        self.set_loss = Gauge(p + "eval_set_loss", "Latest loss on a named evaluation set.", ["set"], registry=r)
        self.set_base_loss = Gauge(
            p + "eval_set_base_loss", "The base model's loss on a named evaluation set.", ["set"], registry=r
        )
        self.set_change = Gauge(
            p + "eval_set_change_ratio",
            "Relative change of a named evaluation set's loss against the base model's (0.1: 10% higher).",
            ["set"],
            registry=r,
        )
        self.learning_rate = Gauge(p + "learning_rate", "Current learning rate.", registry=r)
        self.grad_norm = Gauge(p + "grad_norm", "Gradient norm before clipping at the latest step.", registry=r)
        self.global_step = Gauge(p + "global_step", "Optimizer steps done.", registry=r)
        self.total_steps = Gauge(p + "total_steps", "Optimizer steps the run will take.", registry=r)
        self.tokens = Counter(p + "tokens", "Real (non-padding) tokens trained on, over all ranks.", registry=r)
        self.step_duration = Histogram(
            p + "step_duration_seconds", "Wall time of one optimizer step.", buckets=STEP_BUCKETS, registry=r
        )
        self.mfu = Gauge(p + "mfu_ratio", "Model FLOPs utilisation (0-1) against the dense bf16 peak.", registry=r)
        self.gpu_memory_peak = Gauge(p + "gpu_memory_peak_bytes", "Peak CUDA memory allocated on rank 0.", registry=r)
        self.checkpoint_duration = Gauge(
            p + "checkpoint_duration_seconds", "Duration of the latest checkpoint save.", registry=r
        )
        self.last_checkpoint = Gauge(
            p + "last_checkpoint_timestamp_seconds", "Unix time of the latest checkpoint.", registry=r
        )
        self.completion = Gauge(
            p + "estimated_completion_timestamp_seconds", "Unix time training is expected to finish.", registry=r
        )

    def _update(self, **fields: Any) -> None:
        with self._lock:
            self._doc.update(fields)
            self._doc["updatedAt"] = rfc3339(time.time())

    def set_state(self, state: str, reason: str | None = None) -> None:
        assert state in STATES, state
        if state == "loading":
            self._update(state=state, reason=reason)
        else:
            self._update(state=state, reason=reason, setup=None)

    def setup(self, stage: str, done: int | None = None, total: int | None = None, unit: str | None = None) -> None:
        """Where the setup is (state "loading"): a stage, and for stages that can count, how far it got."""
        self._update(state="loading", setup={"stage": stage, "done": done, "total": total, "unit": unit})

    def ignored(self, checkpoints: list[dict[str, str]]) -> None:
        self._update(ignoredCheckpoints=checkpoints)

    def pinned(self, records: dict[str, dict[str, Any]]) -> None:
        """The commits hf:// sources were resolved to (sources.Resolved.records: role -> record)."""
        pins = [
            {"role": role, "source": r["source"], "revision": r.get("revision"), "commit": r["commit"]}
            for role, r in records.items()
            if "commit" in r
        ]
        self._update(pinned=pins)

    def set_plan(self, total_steps: int) -> None:
        self.total_steps.set(total_steps)
        self._update(totalSteps=total_steps)

    def resumed(
        self, step: int, tokens_total: int, history: list[dict[str, Any]], checkpoint: dict[str, Any] | None
    ) -> None:
        self.global_step.set(step)
        self.tokens.inc(tokens_total)
        with self._lock:
            self._history = downsample(list(history))
        last_eval = next((h["evalLoss"] for h in reversed(history) if "evalLoss" in h), None)
        if last_eval is not None:
            self.eval_loss.set(last_eval)
        self._update(
            resumedFromStep=step, step=step, tokensTotal=tokens_total, evalLoss=last_eval, checkpoint=checkpoint
        )

    def resumed_evaluation(
        self, eval_loss: float | None, base_eval_loss: float | None, sets: dict[str, dict[str, float | None]]
    ) -> None:
        """The latest evaluation a resumed training found in its checkpoint."""
        self._set_gauges(eval_loss, sets)
        self._update(
            evalLoss=eval_loss,
            evalPerplexity=None,
            baseEvalLoss=base_eval_loss,
            evalSets=sets,
        )

    def step_done(self, step: int, epoch: float, duration: float, tokens: int) -> None:
        self.step_duration.observe(duration)
        self.global_step.set(step)
        self.tokens.inc(tokens)
        with self._lock:
            self._doc["tokensTotal"] += tokens
        self._update(step=step, epoch=round(epoch, 4))

    def logged(
        self,
        *,
        loss: float,
        learning_rate: float,
        grad_norm: float,
        tokens_per_second: float,
        mfu: float,
        eta_seconds: float,
        gpu_memory_peak: int,
    ) -> None:
        self.loss.set(loss)
        self.learning_rate.set(learning_rate)
        self.grad_norm.set(grad_norm)
        self.mfu.set(mfu)
        self.gpu_memory_peak.set(gpu_memory_peak)
        self.completion.set(time.time() + eta_seconds)
        with self._lock:
            self._history = downsample([*self._history, {"step": self._doc["step"], "loss": loss}])
        self._update(
            loss=loss,
            learningRate=learning_rate,
            gradNorm=grad_norm,
            tokensPerSecond=tokens_per_second,
            mfu=mfu,
            etaSeconds=eta_seconds,
        )

    def _set_gauges(self, eval_loss: float | None, sets: dict[str, dict[str, float | None]]) -> None:
        if eval_loss is not None:
            self.eval_loss.set(eval_loss)
        for name, f in sets.items():
            for gauge, key in ((self.set_loss, "loss"), (self.set_base_loss, "baseLoss"), (self.set_change, "change")):
                value = f.get(key)
                if value is not None:
                    gauge.labels(set=name).set(value)

    def evaluated(
        self,
        step: int,
        eval_loss: float | None,
        perplexity: float | None,
        sets: dict[str, dict[str, float | None]] | None = None,
        base_eval_loss: float | None = None,
    ) -> None:
        """An evaluation at `step` (0: the base model): the split's loss and each named set's figures
        (evalsets.figures)."""
        sets = sets or {}
        self._set_gauges(eval_loss, sets)
        point: dict[str, Any] = {}
        if eval_loss is not None:
            point["evalLoss"] = eval_loss
        if sets:
            point["evalSets"] = {name: f["loss"] for name, f in sets.items()}
        with self._lock:
            if self._history and self._history[-1]["step"] == step:
                self._history[-1] = {**self._history[-1], **point}
            elif point:
                self._history = downsample([*self._history, {"step": step, **point}])
        self._update(evalLoss=eval_loss, evalPerplexity=perplexity, baseEvalLoss=base_eval_loss, evalSets=sets)

    def data_report(self, summary: dict[str, Any]) -> None:
        """The data report's summary (datareport.summary), measured before training."""
        self._update(dataReport=summary)

    def checkpointed(self, step: int, path: str, saved_at: float, duration: float) -> None:
        self.checkpoint_duration.set(duration)
        self.last_checkpoint.set(saved_at)
        self._update(checkpoint={"step": step, "path": path, "savedAt": rfc3339(saved_at)})

    def history(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(h) for h in self._history]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self._doc, "history": [dict(h) for h in self._history]}


def _handler(progress: Progress) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, ctype = generate_latest(progress.registry), CONTENT_TYPE_LATEST
            elif path == "/progress":
                body, ctype = json.dumps(progress.snapshot()).encode(), "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # scrapes every 15 s are not news
            pass

    return Handler


def serve(progress: Progress, host: str, port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), _handler(progress))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="kubetune-metrics", daemon=True).start()
    log.info("serving /metrics and /progress on %s:%d", host, server.server_address[1])
    return server
