"""Training progress from rank 0's `/progress` document into the FineTuneJob status.

`ProgressPoller` polls the rank 0 of each running attempt in the background, one task per job, every 0.75-1.5
times the operator's poll interval (15-30 s by default; `poll_interval` spreads jobs over that range), at most
POLL_CONCURRENCY requests at a time, each bounded by POLL_TIMEOUT: a hung trainer holds up nobody. Reconciles
never wait for it; they read its latest report (`watch`). A report with news (a first one, a new state,
evaluation or checkpoint) wakes the job's reconcile; new steps wait for its periodic one. The poller also notes
when the trainer last advanced (`TrainerView.advanced_at`: a new step, state, evaluation, checkpoint, or setup
stage or amount), which the stall policy judges: progress, not the mere freshness of a report.
`parse_report` and `to_status` turn the document into status.progress and status.checkpoint; they are pure and
accept whatever a trainer sends without failing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import posixpath
import zlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import aiohttp
from kubetune_trainer.config import MAX_EVAL_SETS
from kubetune_trainer.progress import thin
from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from kubetune_operator.api.status import (
    MAX_PINNED,
    MAX_PROGRESS_HISTORY,
    CheckpointStatus,
    DataReportSummary,
    EvalSetResult,
    HistoryPoint,
    PinnedSource,
    Progress,
    SetupProgress,
    format_eta,
    progress_percent,
)

log = logging.getLogger(__name__)

POLL_TIMEOUT = 5.0
POLL_CONCURRENCY = 32
FINAL_POLL_SECONDS = 1.0
K = TypeVar("K", bound=Hashable)


async def fetch_progress(session: aiohttp.ClientSession, url: str, timeout: float) -> dict[str, Any] | None:
    """GET the trainer's progress document. None when it cannot be had: connection refused, DNS not resolving
    yet, timeout, an HTTP error, or a body that is not a JSON object. Never raises for those (cancellation
    still propagates): a missing report is normal while pods start or restart."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                log.debug("progress %s: HTTP %d", url, response.status)
                return None
            doc = await response.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
        log.debug("progress %s: %s: %s", url, type(e).__name__, e)
        return None
    if not isinstance(doc, dict):
        log.debug("progress %s: not a JSON object", url)
        return None
    return doc


def poll_interval(key: str, low: float, high: float) -> float:
    """A job's polling interval in [low, high]: stable for the job, different across jobs, so hundreds of jobs
    created together are not polled in the same second."""
    return low + (high - low) * (zlib.crc32(key.encode()) % 1000) / 999


@dataclass(frozen=True)
class TrainerView:
    """What the poller knows about the rank 0 of one attempt."""

    run: int
    attempt: int
    # When this operator started polling it: a restarted operator gives a trainer a full stall timeout.
    watching_since: datetime
    report: TrainerReport | None
    # When the poller first saw the report as it is now (`advanced`): the trainer's last progress.
    advanced_at: datetime | None = None


@dataclass
class _Target:
    url: str
    run: int
    attempt: int
    since: datetime
    report: TrainerReport | None = None
    advanced_at: datetime | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def view(self) -> TrainerView:
        return TrainerView(self.run, self.attempt, self.since, self.report, self.advanced_at)


class ProgressPoller(Generic[K]):
    """Background polling of rank 0 per job. `watch` (called by each reconcile) names the current rank 0 and
    returns what is known about it; `wake(key)` is called when a report brings news."""

    def __init__(
        self,
        interval: float,
        wake: Callable[[K], None],
        *,
        timeout: float = POLL_TIMEOUT,
        concurrency: int = POLL_CONCURRENCY,
    ) -> None:
        self._low, self._high = 0.75 * interval, 1.5 * interval
        self._wake = wake
        self._timeout = min(timeout, self._low)
        self._slots = asyncio.Semaphore(concurrency)
        self._targets: dict[K, _Target] = {}
        self._session: aiohttp.ClientSession | None = None

    def watch(self, key: K, url: str, run: int, attempt: int, now: datetime) -> TrainerView:
        target = self._targets.get(key)
        if target is None or (target.url, target.run, target.attempt) != (url, run, attempt):
            self.unwatch(key)
            target = self._targets[key] = _Target(url, run, attempt, since=now)
            target.task = asyncio.create_task(self._poll(key, target), name=f"progress {key}")
        return target.view()

    def unwatch(self, key: K) -> None:
        target = self._targets.pop(key, None)
        if target is not None and target.task is not None:
            target.task.cancel()

    async def stop(self) -> None:
        tasks = [t.task for t in self._targets.values() if t.task is not None]
        self._targets.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _poll(self, key: K, target: _Target) -> None:
        interval = poll_interval(str(key), self._low, self._high)
        while True:
            async with self._slots:
                if self._session is None:
                    self._session = aiohttp.ClientSession()
                doc = await fetch_progress(self._session, target.url, self._timeout)
            report = parse_report(doc) if doc is not None else None
            if report is not None and report != target.report:
                news = _news(target.report, report)
                if target.report is None or advanced(target.report, report):
                    target.advanced_at = datetime.now(UTC)
                target.report = report
                if news:
                    self._wake(key)
            # After the last step the trainer runs its final evaluation, then exports and exits: poll every second
            # meanwhile, so the final figures (what the evaluation gate judges) are seen before rank 0 is gone.
            ending = target.report is not None and target.report.finishing
            await asyncio.sleep(min(FINAL_POLL_SECONDS, interval) if ending else interval)


def _news(old: TrainerReport | None, new: TrainerReport) -> bool:
    """What is worth a reconcile now: a first report, a new state, evaluation or checkpoint. New steps alone
    wait for the job's next periodic reconcile (status writes stay at one per interval per job)."""
    if old is None:
        return True
    return (old.state, old.eval_loss, old.eval_sets, old.checkpoint) != (
        new.state,
        new.eval_loss,
        new.eval_sets,
        new.checkpoint,
    )


def advanced(old: TrainerReport, new: TrainerReport) -> bool:
    """Whether the trainer made progress between two reports: a new step, state, evaluation or checkpoint, or its
    setup moved on (another stage, or more of it done). A fresher timestamp alone is no progress."""
    return _progress_mark(old) != _progress_mark(new)


def _progress_mark(r: TrainerReport) -> tuple[Any, ...]:
    setup = (r.setup.stage, r.setup.done) if r.setup else None
    return (r.state, r.step, r.eval_loss, r.eval_sets, r.checkpoint.step if r.checkpoint else None, setup)


# ----------------------------------------------------------------------------------------------
# the document
# ----------------------------------------------------------------------------------------------


class _Doc(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class ReportedCheckpoint(_Doc):
    step: int
    path: str
    saved_at: AwareDatetime


class ReportedSetup(_Doc):
    stage: str
    done: int | None = None
    total: int | None = None
    unit: str | None = None


class ReportedPin(_Doc):
    role: str
    source: str
    revision: str | None = None
    commit: str


class ReportedIgnored(_Doc):
    path: str
    reason: str


class ReportedSet(_Doc):
    loss: float | None = None
    perplexity: float | None = None
    base_loss: float | None = None
    change: float | None = None


class TrainerReport(_Doc):
    """The fields of the trainer's /progress document the status uses (the trainer's progress module has the rest).
    History points stay raw here: one odd point must not cost the whole report."""

    state: str | None = None
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    base_eval_loss: float | None = None
    eval_sets: dict[str, ReportedSet] = {}
    # Kept raw: a summary this operator cannot read is no summary, not a lost report.
    data_report: dict[str, Any] | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    eta_seconds: float | None = None
    checkpoint: ReportedCheckpoint | None = None
    resumed_from_step: int | None = None
    updated_at: AwareDatetime | None = None
    # While state is "loading": what rank 0 sets up, and how far it got.
    setup: ReportedSetup | None = None
    # Files in the checkpoint directory that are not this training's (another object, run or spec).
    ignored_checkpoints: list[ReportedIgnored] = []
    # The commits hf:// sources were resolved to when the run started.
    pinned: list[ReportedPin] = []
    history: list[Any] = []

    @property
    def finishing(self) -> bool:
        """Past the last step: evaluating for the last time, exporting, or done."""
        last = self.total_steps is not None and 0 < self.total_steps <= self.step
        return last or self.state in ("exporting", "sampling", "done")


def parse_report(doc: dict[str, Any]) -> TrainerReport | None:
    """The document as a report, or None when it does not have the documented shape."""
    try:
        return TrainerReport.model_validate(doc)
    except ValidationError as e:
        log.debug("progress document rejected: %s", e)
        return None


def finite(value: float | None, low: float = -math.inf, high: float = math.inf) -> float | None:
    """The figure as status can hold it: NaN/inf cannot be written into a Kubernetes object (JSON has no such
    numbers), and one outside [low, high] is broken; either is no figure."""
    return value if value is not None and math.isfinite(value) and low <= value <= high else None


def to_status(
    report: TrainerReport,
    *,
    previous_checkpoint: CheckpointStatus | None,
    checkpoint_root: str,
    checkpoint_uri: str,
) -> tuple[Progress, CheckpointStatus | None]:
    """status.progress and status.checkpoint from a report.

    The checkpoint is the newer of the reported one and `previous_checkpoint` (a restarted trainer reports none
    until it has loaded one). A path under `checkpoint_root`, where the worker mounts the job's directory of the
    checkpoint claim, is given as `checkpoint_uri` + the rest, so the status says where it is outside the pod.
    """
    step = max(0, report.step)
    total = report.total_steps if report.total_steps is not None and report.total_steps > 0 else None
    done = report.state == "done"
    eta = 0.0 if done else finite(report.eta_seconds, low=0)
    progress = Progress(
        step=step,
        total_steps=total,
        percent=progress_percent(step, total) if total is not None else None,
        epoch=finite(report.epoch, low=0),
        loss=finite(report.loss),
        eval_loss=finite(report.eval_loss),
        base_eval_loss=finite(report.base_eval_loss),
        eval_sets=eval_set_results(report.eval_sets) or None,
        data_report=data_summary(report.data_report),
        tokens_per_second=finite(report.tokens_per_second, low=0),
        mfu=finite(report.mfu, low=0, high=1),
        eta=format_eta(eta) if eta is not None else None,
        eta_seconds=round(eta) if eta is not None else None,
        updated_at=report.updated_at,
        setup=_setup(report.setup) if report.state == "loading" else None,
        pinned=[
            PinnedSource(
                role=p.role[:32],
                source=p.source[:4096],
                revision=p.revision[:256] if p.revision else None,
                commit=p.commit[:64],
            )
            for p in report.pinned[:MAX_PINNED]
        ],
        history=thin_history(_points(report.history)),
    )
    reported = report.checkpoint
    if reported is None or (previous_checkpoint is not None and (previous_checkpoint.step or 0) > reported.step):
        return progress, previous_checkpoint
    ignored = previous_checkpoint.ignored if previous_checkpoint else []
    return progress, CheckpointStatus(
        latest=in_claim(reported.path, checkpoint_root, checkpoint_uri),
        step=max(0, reported.step),
        saved_at=reported.saved_at,
        ignored=ignored,
    )


def in_claim(path: str, root: str, uri: str) -> str:
    """A path inside a worker, under `root` (where the claim directory `uri` is mounted), as the claim URI;
    any other path as it is."""
    root = root.rstrip("/")
    if not (path + "/").startswith(root + "/"):
        return path
    inside = posixpath.relpath(path, root)
    return uri if inside == "." else f"{uri}/{inside}"


def _setup(reported: ReportedSetup | None) -> SetupProgress | None:
    if reported is None:
        return None
    unit = reported.unit[:16] if reported.unit else None
    done = reported.done if reported.done is not None and reported.done >= 0 else None
    total = reported.total if reported.total is not None and reported.total >= 0 else None
    return SetupProgress(stage=reported.stage[:64], done=done, total=total, unit=unit)


def eval_set_results(reported: dict[str, ReportedSet]) -> list[EvalSetResult]:
    """status.progress.evalSets from the reported figures, by name; names the API would refuse, and sets past the
    API's bound, left out."""
    results: list[EvalSetResult] = []
    for name, f in sorted(reported.items()):
        if not name or len(name) > 32 or len(results) == MAX_EVAL_SETS:
            continue
        results.append(
            EvalSetResult(
                name=name,
                loss=finite(f.loss),
                perplexity=finite(f.perplexity, low=0),
                base_loss=finite(f.base_loss),
                change=finite(f.change),
            )
        )
    return results


def data_summary(raw: dict[str, Any] | None) -> DataReportSummary | None:
    try:
        return DataReportSummary.model_validate(raw) if raw else None
    except ValidationError:
        return None


def _point_sets(raw: dict[str, float] | None) -> dict[str, float] | None:
    kept = {k: v for k, v in (raw or {}).items() if finite(v) is not None and 0 < len(k) <= 32}
    return dict(sorted(kept.items())[:MAX_EVAL_SETS]) or None


def _points(raw: list[Any]) -> list[HistoryPoint]:
    points = []
    for item in raw:
        try:
            point = HistoryPoint.model_validate(item)
        except ValidationError:
            continue
        loss, eval_loss, sets = finite(point.loss), finite(point.eval_loss), _point_sets(point.eval_sets)
        if loss is not None or eval_loss is not None or sets:
            points.append(HistoryPoint(step=point.step, loss=loss, eval_loss=eval_loss, eval_sets=sets))
    return points


def evaluated(point: HistoryPoint) -> bool:
    return point.eval_loss is not None or bool(point.eval_sets)


def thin_history(points: Sequence[HistoryPoint], limit: int = MAX_PROGRESS_HISTORY) -> list[HistoryPoint]:
    """At most `limit` points spread over the run, as the trainer thins its own history (one algorithm for both)."""
    return thin(points, limit, step=lambda p: p.step, evaluated=evaluated)
