"""Training progress from rank 0's `/progress` document into the FineTuneJob status.

The operator polls each running job's rank 0 (`fetch_progress`) at most every 15-30 s, at a per-job interval
that spreads the polls of many jobs over time (`poll_interval`, `poll_due`), with a timeout so a hung trainer
never holds up other jobs. `parse_report` and `to_status` turn the document into status.progress and
status.checkpoint; they are pure and accept whatever a trainer sends without failing.
"""

from __future__ import annotations

import logging
import math
import posixpath
import zlib
from typing import Any

import aiohttp
from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from kubetune_operator.api.status import CheckpointStatus, Progress, format_eta, progress_percent

log = logging.getLogger(__name__)

MIN_POLL_SECONDS = 15.0
MAX_POLL_SECONDS = 30.0


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


def poll_interval(key: str, low: float = MIN_POLL_SECONDS, high: float = MAX_POLL_SECONDS) -> float:
    """A job's polling interval in [low, high]: stable for the job (key: e.g. its uid), different across jobs, so
    hundreds of jobs created together are not polled in the same second."""
    return low + (high - low) * (zlib.crc32(key.encode()) % 1000) / 999


def poll_due(last_polled: float | None, now: float, interval: float) -> bool:
    """Whether to poll now (monotonic seconds); a job never polled is due at once."""
    return last_polled is None or now - last_polled >= interval


# ----------------------------------------------------------------------------------------------
# the document
# ----------------------------------------------------------------------------------------------


class _Doc(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class ReportedCheckpoint(_Doc):
    step: int
    path: str
    saved_at: AwareDatetime


class TrainerReport(_Doc):
    """The fields of the trainer's /progress document the status uses (the trainer's progress module has the rest)."""

    state: str | None = None
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    eta_seconds: float | None = None
    checkpoint: ReportedCheckpoint | None = None
    updated_at: AwareDatetime | None = None


def parse_report(doc: dict[str, Any]) -> TrainerReport | None:
    """The document as a report, or None when it does not have the documented shape."""
    try:
        return TrainerReport.model_validate(doc)
    except ValidationError as e:
        log.debug("progress document rejected: %s", e)
        return None


def _finite(value: float | None, low: float = -math.inf, high: float = math.inf) -> float | None:
    # NaN/inf cannot be written into a Kubernetes object (JSON has no such numbers); out-of-range means broken.
    return value if value is not None and math.isfinite(value) and low <= value <= high else None


def to_status(
    report: TrainerReport,
    *,
    previous_checkpoint: CheckpointStatus | None,
    checkpoint_root: str | None,
) -> tuple[Progress, CheckpointStatus | None]:
    """status.progress and status.checkpoint from a report.

    The checkpoint is the newer of the reported one and `previous_checkpoint` (a restarted trainer reports none
    until it has loaded one). Its path is made relative to `checkpoint_root`, where the worker mounts the
    checkpoint claim, so the status names the path inside the claim.
    """
    step = max(0, report.step)
    total = report.total_steps if report.total_steps is not None and report.total_steps > 0 else None
    done = report.state == "done"
    eta = 0.0 if done else _finite(report.eta_seconds, low=0)
    progress = Progress(
        step=step,
        total_steps=total,
        percent=progress_percent(step, total) if total is not None else None,
        epoch=_finite(report.epoch, low=0),
        loss=_finite(report.loss),
        eval_loss=_finite(report.eval_loss),
        tokens_per_second=_finite(report.tokens_per_second, low=0),
        mfu=_finite(report.mfu, low=0, high=1),
        eta=format_eta(eta) if eta is not None else None,
        eta_seconds=round(eta) if eta is not None else None,
        updated_at=report.updated_at,
    )
    reported = report.checkpoint
    if reported is None or (previous_checkpoint is not None and (previous_checkpoint.step or 0) > reported.step):
        return progress, previous_checkpoint
    path = reported.path
    if checkpoint_root is not None and (path + "/").startswith(checkpoint_root.rstrip("/") + "/"):
        path = posixpath.relpath(path, checkpoint_root)
    return progress, CheckpointStatus(latest=path, step=max(0, reported.step), saved_at=reported.saved_at)
