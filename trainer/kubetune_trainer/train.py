"""The training run: load, resume, train, evaluate, checkpoint, export.

One optimizer step on every rank:

1. take this rank's micro-batches for the step (a pure function of the step, packing.Plan);
2. agree over the gloo control group on the step's total target tokens and real tokens, whether a stop was
   requested (SIGTERM on any rank) and whether a time-based checkpoint is due (rank 0's clock);
3. forward/backward each micro-batch; each loss is sum(token losses) x world_size / (target tokens in the
   whole global batch), so the averaged gradient is exactly the mean over every target token of the step,
   whatever the split over ranks, micro-batches and packed rows;
4. clip, step the optimizer and the schedule.

On SIGTERM the loop saves a checkpoint at the next step boundary and raises `Stopped` (exit 143).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from . import checkpoint, datareport, evalsets, export, mfu, samples, sources
from .config import TrainerConfig
from .data import PreparedData, Samples, prepare, prepare_once_per_node
from .errors import PermanentError, Stopped, Terminated
from .loss import accepts_logits_to_keep, cross_entropy_sum
from .modeling import Prepared, build, check_supported, compute_dtype, load_tokenizer, peak_rss_bytes
from .optim import make_optimizer, make_scheduler
from .packing import (
    Batch,
    Plan,
    collate_packed,
    collate_padded,
    eval_micro_batches,
    pack_bins,
    single_bins,
    total_steps,
)
from .progress import Progress, rfc3339, serve
from .runtime import Runtime

log = logging.getLogger(__name__)


class StopSignal:
    """SIGTERM/SIGINT: before training starts there is nothing to save, so stop at once; later, finish the
    step and checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        self.armed = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if not self.armed:
            raise Terminated(f"stopped by {signal.Signals(signum).name} before training started")
        self.requested = True

    def install(self) -> dict[int, Any]:
        return {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy over target tokens, in fp32 (loss.py). Either logits of every position, (B, T', V)
    for labels (B, T) (prompt tuning prepends virtual tokens to the output), or those of the kept target positions
    only, (..., N, V) for their N labels."""
    if labels.dim() > 1:
        logits = logits[:, -labels.shape[1] :]
    return cross_entropy_sum(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: the loss on the evaluation split (dataset.evalSplit or evalSource) and on each named set."""

    loss: float | None
    sets: dict[str, float]

    @property
    def perplexity(self) -> float | None:
        return evalsets.perplexity(self.loss) if self.loss is not None else None

    def state(self) -> dict[str, Any]:
        return {"evalLoss": self.loss, "sets": self.sets}

    @staticmethod
    def from_state(state: dict[str, Any] | None) -> EvalResult | None:
        return EvalResult(state["evalLoss"], dict(state["sets"])) if state else None


@dataclass
class Interval:
    """Accumulators between two log lines."""

    start: float
    steps: int = 0
    tokens: int = 0
    targets: int = 0
    sum_squared: int = 0
    loss_sum: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None


class Run:
    def __init__(self, cfg: TrainerConfig, rt: Runtime, progress: Progress) -> None:
        self.cfg = cfg
        self.rt = rt
        self.progress = progress
        self.stop = StopSignal()
        self.out_dir = Path(cfg.output.dir)
        self.ckpt = checkpoint.CheckpointManager(cfg.checkpoint, cfg.identity, rt, cfg.method.is_peft)
        self.dtype = compute_dtype(cfg.training.precision)

    # -- setup -------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, rt = self.cfg, self.rt
        check_supported(cfg, rt.device)
        # First the fence (late writers of older attempts stop writing), then the output directory: both before
        # the long part of the setup, so that a run that cannot write its output fails at once.
        self.ckpt.enter()
        self.claim_output()
        # s3:// sources and hf:// datasets become local copies (rank 0 downloads them, the others wait); self.cfg
        # keeps the sources as given, for the manifest.
        self.sources = sources.resolve(cfg, rt, self.progress.setup)
        self.progress.pinned(self.sources.records)
        cfg = self.sources.config
        self.packed = cfg.dataset.packing and cfg.method.type not in ("prefix", "prompt")
        if cfg.dataset.packing and not self.packed:
            log.info("packing is off for %s tuning: its virtual tokens belong to every sample", cfg.method.type)
        self.tokenizer = load_tokenizer(cfg.model)
        dataset, seed = cfg.dataset, cfg.training.seed
        self.data: PreparedData = prepare_once_per_node(
            rt, lambda: prepare(dataset, self.tokenizer, seed, self.progress.setup)
        )
        self.ckpt.bind(self._dataset_digests())
        lengths = self.data.train.lengths()
        self.bins = self._bins(self.data.train)
        self.eval_bins = self._bins(self.data.eval)
        self.eval_sets = evalsets.load(cfg.evaluation.sets, cfg.dataset, self.tokenizer)
        self.set_bins = {s.name: self._bins(s.samples) for s in self.eval_sets}
        self.data_summary = self.check_data()
        self.check_samples()
        if self.packed:
            log.info(
                "packed %d samples into %d sequences of up to %d tokens (%.1f%% full)",
                len(lengths),
                len(self.bins),
                cfg.dataset.max_seq_length,
                100 * lengths.sum() / (len(self.bins) * cfg.dataset.max_seq_length),
            )
        t = cfg.training
        bins_per_step = rt.world_size * t.gradient_accumulation_steps * t.batch_size_per_device
        self.plan = Plan(
            num_bins=len(self.bins),
            world_size=rt.world_size,
            accumulation=t.gradient_accumulation_steps,
            batch_size=t.batch_size_per_device,
            seed=t.seed,
            shuffle=cfg.dataset.shuffle,
            total_steps=total_steps(len(self.bins), bins_per_step, t.epochs, t.max_steps),
        )
        self.progress.set_plan(self.plan.total_steps)
        # Same seed on every rank before the adapter exists: identical initial weights everywhere.
        self.progress.setup("loading model")
        torch.manual_seed(t.seed)
        self.prepared: Prepared = build(cfg, self.tokenizer, rt, self.packed)
        # Logits of the target positions only (virtual tokens of prefix/prompt tuning shift the positions).
        self.only_targets = cfg.method.type not in ("prefix", "prompt") and accepts_logits_to_keep(self.prepared.model)
        torch.manual_seed(t.seed + rt.rank)  # dropout differs per rank
        self.optimizer = make_optimizer(self.prepared.model, t, rt.device)
        self.scheduler = make_scheduler(self.optimizer, t, self.plan.total_steps)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=t.precision == "fp16")
        self.params = [p for p in self.prepared.model.parameters() if p.requires_grad]
        self.peak = mfu.peak_flops(torch.cuda.get_device_name(rt.device)) if rt.device.type == "cuda" else None

    def check_data(self) -> dict[str, Any] | None:
        """Collective: rank 0 writes the data report (datareport.py) into the output directory and judges
        evaluation.dataChecks; a failed check stops every rank (PermanentError naming the rows). Returns the
        report's summary (rank 0) or None."""
        ev = self.cfg.evaluation
        checks = ev.data_checks
        wanted = ev.data_report or checks != type(checks)()
        if not wanted:
            return None
        summary, problems = None, None
        if self.rt.is_main:
            self.progress.setup("checking data")
            cfg = self.sources.config
            train, evaluation = datareport.read(cfg.dataset, cfg.evaluation.sets, self.tokenizer, cfg.training.seed)
            report = datareport.build(train, evaluation, cfg.dataset.max_seq_length)
            export.write_json(self.out_dir / datareport.REPORT_FILE, report)
            summary = datareport.summary(report)
            self.progress.data_report(summary)
            log.info("data report: %s", ", ".join(f"{k} {v}" for k, v in summary.items()))
            problems = datareport.problems(report, checks)
        problems = self.rt.gather_objects(problems)[0]
        if problems:
            reasons = "; ".join(problems)
            raise PermanentError(f"the data fails evaluation.dataChecks (see {datareport.REPORT_FILE}): {reasons}")
        return summary

    def check_samples(self) -> None:
        """Rank 0: a prompts source that cannot be read fails now, not after training."""
        if self.cfg.evaluation.samples is not None and self.rt.is_main:
            config = self.sources.config
            assert config.evaluation.samples is not None
            samples.read_prompts(config.evaluation.samples, config.dataset.format, self.tokenizer)

    def answer_samples(self) -> None:
        """Rank 0, once the outputs are written: the base and the fine-tuned model answer the prompts."""
        if self.cfg.evaluation.samples is None:
            return
        if self.prepared.sharded:
            log.warning("samples skipped: the model was sharded over the ranks, and they answer on one device")
            return
        self.progress.set_state("sampling")
        found = samples.generate(self.sources.config, self.out_dir, self.tokenizer, self.rt.device)
        log.info(
            "samples: %d prompts answered by the base and the fine-tuned model (%s)", len(found), samples.SAMPLES_FILE
        )

    def claim_output(self) -> None:
        """Collective: make sure the output directory is empty or this training's own (PermanentError if not)."""
        problem = export.claim_output(self.out_dir, self.cfg.identity, self.ckpt.root) if self.rt.is_main else None
        problem = self.rt.gather_objects(problem)[0]
        if problem:
            raise PermanentError(problem)

    def _bins(self, samples: Samples | None) -> list[list[int]]:
        if samples is None:
            return []
        lengths = samples.lengths()
        return pack_bins(lengths, self.cfg.dataset.max_seq_length) if self.packed else single_bins(len(lengths))

    def collate(self, samples: Samples, bins: list[list[int]]) -> Batch:
        if self.packed:
            batch = collate_packed(samples, bins, self.only_targets)
        else:
            batch = collate_padded(samples, bins, self.tokenizer.pad_token_id, self.only_targets)
        backend = self.prepared.packed_attention
        return batch.to(self.rt.device, bounds_on_device=backend is None or backend.bounds_on_device)

    # -- state -------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from this training's newest valid checkpoint, if it has one; others' are left alone."""
        self.step = 0
        self.tokens_total = 0
        self.train_seconds = 0.0
        self.resumed_from: int | None = None
        self.last_loss: float | None = None
        self.last_eval: EvalResult | None = None
        # The base model's figures, measured at step 0 (kept in checkpoints: later attempts compare against them).
        self.base_eval: EvalResult | None = None
        self.progress.setup("verifying checkpoints")
        path = self.ckpt.resume_point()
        self.progress.ignored(self.ckpt.ignored_report())
        if path is None:
            if self.rt.is_main:
                export.keep_metrics_until(self.out_dir, 0)
            return
        self.progress.setup("loading checkpoint")
        restored = self.ckpt.load(path, self.prepared.model, self.optimizer)
        state = restored["trainer"]
        self.scheduler.load_state_dict(restored["extra"]["scheduler"])
        self.scaler.load_state_dict(restored["extra"]["scaler"])
        self.step = self.resumed_from = state["step"]
        self.tokens_total = state["tokensTotal"]
        self.train_seconds = state["trainSeconds"]
        self.last_loss = state["lastLoss"]
        self.last_eval = EvalResult.from_state(state.get("lastEvalResult"))
        self.base_eval = EvalResult.from_state(state.get("baseEval"))
        if state["worldSize"] != self.rt.world_size:
            log.warning(
                "checkpoint was written by %d processes, this run has %d: resuming, but the data order differs "
                "from an uninterrupted run",
                state["worldSize"],
                self.rt.world_size,
            )
        self.progress.resumed(self.step, self.tokens_total, state["history"], self._checkpoint_info(path, state))
        if self.last_eval is not None:
            self.progress.resumed_evaluation(
                self.last_eval.loss,
                self.base_eval.loss if self.base_eval else None,
                self.set_figures(self.last_eval),
            )
        if self.rt.is_main:
            export.keep_metrics_until(self.out_dir, self.step)
        log.info("resumed from %s at step %d/%d", path, self.step, self.plan.total_steps)

    def _dataset_digests(self) -> list[str]:
        return [f.sha256 for f in self.data.files + self.data.eval_files]

    @staticmethod
    def _checkpoint_info(path: Path, state: dict[str, Any]) -> dict[str, Any]:
        return {"step": state["step"], "path": str(path), "savedAt": rfc3339(state["savedAt"])}

    def _trainer_state(self, saved_at: float) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.plan.epoch_of(self.step),
            "tokensTotal": self.tokens_total,
            "trainSeconds": self.train_seconds,
            "worldSize": self.rt.world_size,
            "totalSteps": self.plan.total_steps,
            "lastLoss": self.last_loss,
            "lastEvalResult": self.last_eval.state() if self.last_eval else None,
            "baseEval": self.base_eval.state() if self.base_eval else None,
            "history": self.progress.history(),
            "savedAt": saved_at,
            "datasetSha256": self._dataset_digests(),
        }

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step (collective); a step that has a valid checkpoint is not saved again."""
        known = self.ckpt.saved_at(self.step)
        if known is not None:
            return known
        self.progress.set_state("checkpointing")
        started = time.time()
        path = self.ckpt.save(
            self.step,
            self.prepared.train_module if self.prepared.sharded else self.prepared.model,
            self.optimizer,
            {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()},
            self._trainer_state(started),
        )
        duration = time.time() - started
        self.progress.checkpointed(self.step, str(path), started, duration)
        log.info("checkpoint step %d saved to %s in %.1fs", self.step, path, duration)
        self.progress.set_state("training")
        return path

    # -- steps -------------------------------------------------------------------------------------

    def train_step(self, batches: list[Batch], global_targets: float, interval: Interval) -> None:
        module = self.prepared.train_module
        ddp = self.rt.distributed and not self.prepared.sharded
        last = len(batches) - 1
        scale = self.rt.world_size / global_targets
        for m, batch in enumerate(batches):
            if self.prepared.sharded:
                module.set_requires_gradient_sync(m == last)  # type: ignore[operator]
            sync = nullcontext() if (not ddp or m == last) else module.no_sync()  # type: ignore[operator]
            with sync:
                with torch.autocast(self.rt.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                    logits = module(**batch.model_inputs()).logits
                loss_sum = token_loss_sum(logits, batch.loss_labels)
                del logits  # the loss keeps its own gradient; the logits need not outlive the forward
                self.scaler.scale(loss_sum * scale).backward()
            detached = loss_sum.detach()
            interval.loss_sum = detached if interval.loss_sum is None else interval.loss_sum + detached
        self.scaler.unscale_(self.optimizer)
        limit = self.cfg.training.max_grad_norm or math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, limit)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        interval.grad_norm = norm.detach()
        self.lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def evaluates(self) -> bool:
        return bool(self.eval_bins) or bool(self.eval_sets)

    @torch.no_grad()
    def measure(self, samples: Samples, sample_bins: list[list[int]]) -> float:
        """Mean loss over every target token of the samples (collective: every rank takes its share)."""
        module = self.prepared.train_module
        loss = torch.zeros((), dtype=torch.float64)
        count = 0
        for bins, real in eval_micro_batches(
            len(sample_bins), self.rt.world_size, self.rt.rank, self.cfg.training.batch_size_per_device
        ):
            batch = self.collate(samples, [sample_bins[b] for b in bins])
            with torch.autocast(self.rt.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                logits = module(**batch.model_inputs()).logits
            if real:
                loss += token_loss_sum(logits, batch.loss_labels).double().cpu()
                count += batch.num_targets
        total, n = self.rt.sum_([loss.item(), float(count)])
        return total / n

    def evaluate(self) -> EvalResult | None:
        """Measure the evaluation split and every evaluation set (collective); at step 0 these are the base
        model's figures."""
        if not self.evaluates:
            return None
        self.progress.set_state("evaluating")
        module = self.prepared.train_module
        module.eval()
        loss = self.measure(self.data.eval, self.eval_bins) if self.data.eval is not None and self.eval_bins else None
        sets = {s.name: self.measure(s.samples, self.set_bins[s.name]) for s in self.eval_sets}
        module.train()
        result = EvalResult(loss, sets)
        if self.step == 0:
            self.base_eval = result
        base = self.base_eval
        figures = evalsets.figures(sets, base.sets if base else None)
        self.progress.evaluated(
            self.step, loss, result.perplexity, sets=figures, base_eval_loss=base.loss if base else None
        )
        self.progress.set_state("training")
        what = "base model" if self.step == 0 else f"step {self.step}/{self.plan.total_steps}"
        if loss is not None:
            log.info("eval %s | eval loss %.4f | perplexity %.3f", what, loss, result.perplexity)
        for name, f in figures.items():
            vs = f" | {100 * f['change']:+.1f}% against the base model" if f["change"] is not None else ""
            log.info("eval %s | set %s | loss %.4f | perplexity %.3f%s", what, name, f["loss"], f["perplexity"], vs)
        return result

    def log_interval(self, interval: Interval, now: float) -> float:
        """Publish one log line's worth of figures; return the training loss of the interval."""
        assert interval.loss_sum is not None and interval.grad_norm is not None
        (loss_sum,) = self.rt.sum_([interval.loss_sum.item()])
        loss = loss_sum / interval.targets
        elapsed = max(now - interval.start, 1e-9)
        tps = interval.tokens / elapsed
        span = interval.sum_squared / max(interval.tokens, 1)
        c = self.prepared.counts
        fpt = mfu.flops_per_token(
            c.matmul, c.layers, c.attention_width, span, peft=self.cfg.method.is_peft, adapter_params=c.trainable
        )
        ratio = mfu.mfu(fpt, tps / self.rt.world_size, self.peak)
        eta = (self.plan.total_steps - self.step) * elapsed / interval.steps
        lr = float(self.lr)
        grad_norm = float(interval.grad_norm.item())
        memory = torch.cuda.max_memory_allocated(self.rt.device) if self.rt.device.type == "cuda" else 0
        self.progress.logged(
            loss=loss,
            learning_rate=lr,
            grad_norm=grad_norm,
            tokens_per_second=tps,
            mfu=ratio,
            eta_seconds=eta,
            gpu_memory_peak=memory,
        )
        epoch = self.plan.epoch_of(self.step)
        log.info(
            "step %d/%d | epoch %.2f | loss %.4f | lr %.3g | grad norm %.3f | %s tok/s | mfu %.1f%% | eta %s",
            self.step,
            self.plan.total_steps,
            epoch,
            loss,
            lr,
            grad_norm,
            f"{tps:,.0f}",
            100 * ratio,
            format_duration(eta),
        )
        self.append_metrics(
            {
                "step": self.step,
                "epoch": round(epoch, 4),
                "loss": loss,
                "learningRate": lr,
                "gradNorm": grad_norm,
                "tokensPerSecond": tps,
                "tokensTotal": self.tokens_total,
                "mfu": ratio,
                "gpuMemoryPeakBytes": memory,
                "time": time.time(),
            }
        )
        return loss

    def record_eval(self, result: EvalResult) -> None:
        self.last_eval = result
        record: dict[str, Any] = {"step": self.step}
        if result.loss is not None:
            record |= {"evalLoss": result.loss, "evalPerplexity": result.perplexity}
        if result.sets:
            record["evalSets"] = self.set_figures(result)
        self.append_metrics(record | {"time": time.time()})

    def set_figures(self, result: EvalResult) -> dict[str, dict[str, float | None]]:
        return evalsets.figures(result.sets, self.base_eval.sets if self.base_eval else None)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Rank 0 appends to the output's metrics log, unless a newer attempt took over (it then stops at its next
        checkpoint)."""
        if self.rt.is_main and not self.ckpt.superseded():
            export.append_metrics(self.out_dir, record)

    def loop(self) -> None:
        cfg, rt, plan = self.cfg, self.rt, self.plan
        t = cfg.training
        self.stop.armed = True
        self.progress.set_state("training")
        self.prepared.train_module.train()
        if self.step == 0 and self.evaluates:  # the base model, what every later evaluation is compared with
            self.record_eval(self.evaluate())  # type: ignore[arg-type]
        interval = Interval(start=time.time())
        while self.step < plan.total_steps:
            step_start = time.time()
            micro = plan.micro_batches(self.step, rt.rank)
            batches = [self.collate(self.data.train, [self.bins[b] for b in m]) for m in micro]
            targets, tokens, sum_sq, stop, time_due = rt.sum_(
                [
                    sum(b.num_targets for b in batches),
                    sum(b.num_tokens for b in batches),
                    sum(b.sum_squared_lengths for b in batches),
                    float(self.stop.requested),
                    float(self.ckpt.time_due(self.step)),
                ]
            )
            if stop:
                raise Stopped(self.step, self.save_checkpoint())
            if time_due:
                self.save_checkpoint()
            self.train_step(batches, targets, interval)
            self.step += 1
            now = time.time()
            self.tokens_total += int(tokens)
            self.train_seconds += now - step_start
            interval.steps += 1
            interval.tokens += int(tokens)
            interval.targets += int(targets)
            interval.sum_squared += int(sum_sq)
            self.progress.step_done(self.step, plan.epoch_of(self.step), now - step_start, int(tokens))
            eval_due = bool(t.eval_every_steps) and self.step % t.eval_every_steps == 0
            final = self.step == plan.total_steps
            if self.step % t.log_every_steps == 0 or eval_due or final:
                self.last_loss = self.log_interval(interval, now)
                interval = Interval(start=time.time())
            if eval_due or (final and self.evaluates):
                result = self.evaluate()
                if result:
                    self.record_eval(result)
                interval.start = time.time()
            if self.ckpt.step_due(self.step, final):
                self.save_checkpoint()
                interval.start = time.time()
        if self.stop.requested:  # arrived during the last steps: the final checkpoint is there
            raise Stopped(self.step, self.save_checkpoint())

    # -- outputs -----------------------------------------------------------------------------------

    def replica_digests(self) -> list[str] | None:
        """A checksum of the trained weights on every rank (collective). DDP replicas must agree exactly;
        FSDP shards are not replicas, so there is nothing to compare."""
        if self.prepared.sharded:
            return None
        with torch.no_grad():
            sums = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in self.params])
        digests = self.rt.gather_objects(hashlib.sha256(sums.cpu().numpy().tobytes()).hexdigest())
        if len(set(digests)) != 1:
            raise RuntimeError(f"the ranks ended with different weights: {digests}")
        return digests

    def finish(self) -> dict[str, Any]:
        cfg, rt = self.cfg, self.rt
        digests = self.replica_digests()
        trained = peak_rss_bytes()
        if self.last_eval is None and self.evaluates:
            result = self.evaluate()
            if result:
                self.record_eval(result)
        self.ckpt.check_fence()  # a superseded attempt exports nothing
        self.progress.set_state("exporting")
        export.save_model(self.prepared.model, cfg, self.out_dir, self.prepared.sharded, rt.is_main)
        # Exporting a sharded full fine-tune gathers the whole model on rank 0 (on the CPU): a peak of its own.
        memory = rt.gather_objects(
            {**self.prepared.loaded, "peakRssBytesTrained": trained, "peakRssBytesExported": peak_rss_bytes()}
        )
        final = {
            "steps": self.step,
            "trainLoss": self.last_loss,
            "evalLoss": self.last_eval.loss if self.last_eval else None,
            "evalPerplexity": self.last_eval.perplexity if self.last_eval else None,
            "baseEvalLoss": self.base_eval.loss if self.base_eval else None,
            "tokensTotal": self.tokens_total,
            "trainSeconds": round(self.train_seconds, 3),
            "tokensPerSecond": self.tokens_total / self.train_seconds if self.train_seconds else None,
            "epochs": round(self.plan.epoch_of(self.step), 4),
        }
        if self.last_eval is not None and self.last_eval.sets:
            final["evalSets"] = self.set_figures(self.last_eval)
        if self.data_summary is not None:
            final["dataReport"] = self.data_summary
        self.ckpt.check_fence()
        if rt.is_main:
            self.tokenizer.save_pretrained(self.out_dir)
            if cfg.output.merge_adapter and cfg.method.is_peft:
                export.merge_adapter(self.sources.config, self.out_dir, self.tokenizer)
            self.answer_samples()
            records = export.read_metrics(self.out_dir)
            export.plot_loss(records, self.out_dir / export.LOSS_PLOT, f"{cfg.method.type} fine-tuning")
            c = self.prepared.counts
            export.write_manifest(
                self.out_dir,
                cfg,
                files=self.data.files,
                eval_files=self.data.eval_files,
                sources=self.sources.records,
                final_metrics=final,
                world_size=rt.world_size,
                parameters={"total": c.total, "trainable": c.trainable, "matmul": c.matmul},
                resumed_from_step=self.resumed_from,
                replica_digests=digests,
                memory=memory,
                checkpoint_dir=self.ckpt.root,
            )
            log.info("outputs written to %s", self.out_dir)
        rt.barrier()
        self.progress.set_state("done")
        return final


def run(cfg: TrainerConfig, rt: Runtime) -> dict[str, Any]:
    """Train to the end (resuming from the latest valid checkpoint) and write the outputs."""
    progress = Progress(rt.world_size)
    server = None
    if rt.is_main and cfg.metrics.port:
        server = serve(progress, os.environ.get("POD_IP") or "0.0.0.0", cfg.metrics.port)
    r = Run(cfg, rt, progress)
    previous = r.stop.install()
    try:
        r.setup()
        r.resume()
        r.loop()
        return r.finish()
    except Exception as e:
        if not isinstance(e, Terminated):
            progress.set_state("failed", str(e))
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.shutdown()
            server.server_close()
