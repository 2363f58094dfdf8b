"""Exit codes and failure reasons: how a worker tells the launcher (and the operator) why it stopped.

Exit codes (of the worker and, propagated, of `kubetune-launch`):

- 0: training finished and the outputs are written.
- 78 (EX_CONFIG): a permanent error that retrying cannot fix: an invalid config, a bad dataset row, QLoRA
  without a GPU, a model source that does not exist. The operator fails the job without retrying.
- 143 (128 + SIGTERM): the process was asked to stop and saved a checkpoint first (or had nothing to save yet).
- anything else (normally 1): a crash; the operator retries from the latest checkpoint.

The reason is one line. Without the launcher the worker writes it to the Kubernetes termination log itself
(`KUBETUNE_TERMINATION_LOG`, default /dev/termination-log, skipped silently when not writable). Under the
launcher, torchrun turns every worker failure into its own exit code 1, so each worker also writes
`{"code", "reason"}` to `$KUBETUNE_EXIT_STATUS_DIR/rank-<RANK>.json`; the launcher picks the most telling
one, writes the termination log and exits with that code.

On success rank 0 leaves its final figures instead (`final_message`: one compact JSON line, far below the
kubelet's 4 KiB limit), the same way: in `$KUBETUNE_EXIT_STATUS_DIR/final.json` for the launcher, which writes it
to the termination log when it exits 0, or in the termination log itself. The operator reads it from the pod's
`state.terminated.message`, so the final evaluation loss reaches it even when the run ended between two polls of
`/progress`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78
EXIT_TERMINATED = 143

TERMINATION_LOG_ENV = "KUBETUNE_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
EXIT_STATUS_DIR_ENV = "KUBETUNE_EXIT_STATUS_DIR"
FINAL_FILE = "final.json"
MESSAGE_LIMIT = 1000


class PermanentError(Exception):
    """An error that a retry cannot fix; the message is the one-line reason shown to the user."""


class Terminated(Exception):
    """SIGTERM (or SIGINT) stopped the worker; the message says whether a checkpoint was saved."""


class Stopped(Terminated):
    """Training stopped on request after saving a checkpoint at `step`."""

    def __init__(self, step: int, path: Path) -> None:
        super().__init__(f"stopped by SIGTERM; checkpoint saved at step {step} ({path})")
        self.step = step


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """Kubernetes shows the termination message as-is; keep it one bounded line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def write_termination_log(reason: str) -> None:
    path = os.environ.get(TERMINATION_LOG_ENV, DEFAULT_TERMINATION_LOG)
    try:
        with open(path, "w") as f:
            f.write(one_line(reason) + "\n")
    except OSError:
        pass  # not in a pod, or not writable: the logs still carry the reason


def report_exit(code: int, reason: str) -> None:
    """Record why this worker exits, for the launcher if there is one, else for Kubernetes."""
    status_dir = os.environ.get(EXIT_STATUS_DIR_ENV)
    if not status_dir:
        write_termination_log(reason)
        return
    rank = os.environ.get("RANK", "0")
    target = Path(status_dir) / f"rank-{rank}.json"
    tmp = target.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps({"code": code, "reason": one_line(reason)}))
        tmp.replace(target)
    except OSError:
        write_termination_log(reason)


def _json_value(value: Any) -> Any:
    # JSON has no NaN or infinity (a diverged loss): null says "no figure".
    return None if isinstance(value, float) and not math.isfinite(value) else value


def final_message(final_metrics: dict[str, Any], output: str) -> str:
    """Rank 0's termination message on success: {"finalMetrics": {...}, "output": dir} as one compact line.
    `final_metrics` are the run's figures as in the manifest (steps, trainLoss, evalLoss, evalPerplexity,
    tokensTotal, tokensPerSecond, epochs, ...). An output path so long that the line would pass MESSAGE_LIMIT is
    left out (the operator knows where the output is anyway)."""
    figures = {key: _json_value(value) for key, value in final_metrics.items()}
    text = json.dumps({"finalMetrics": figures, "output": output}, separators=(",", ":"))
    return text if len(text) <= MESSAGE_LIMIT else json.dumps({"finalMetrics": figures}, separators=(",", ":"))


def report_final(message: str) -> None:
    """Record rank 0's final figures, for the launcher if there is one, else for Kubernetes."""
    status_dir = os.environ.get(EXIT_STATUS_DIR_ENV)
    if not status_dir:
        write_termination_log(message)
        return
    target = Path(status_dir) / FINAL_FILE
    tmp = target.with_suffix(".tmp")
    try:
        tmp.write_text(message)
        tmp.replace(target)
    except OSError:
        write_termination_log(message)


def read_final(status_dir: Path) -> str | None:
    """Rank 0's final message, if it left one."""
    try:
        return (status_dir / FINAL_FILE).read_text() or None
    except OSError:
        return None


def read_exit_statuses(status_dir: Path) -> list[tuple[int, str]]:
    """The (code, reason) pairs the workers left, unreadable files ignored."""
    found = []
    for path in sorted(status_dir.glob("rank-*.json")):
        try:
            data = json.loads(path.read_text())
            found.append((int(data["code"]), str(data["reason"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def most_telling(statuses: list[tuple[int, str]]) -> tuple[int, str] | None:
    """A permanent error beats a crash, a crash beats a clean stop on SIGTERM; success says nothing."""

    def rank(code: int) -> int:
        if code == EXIT_CONFIG:
            return 0
        if code == EXIT_TERMINATED:
            return 2
        return 1

    failures = [s for s in statuses if s[0] != EXIT_OK]
    return min(failures, key=lambda s: rank(s[0])) if failures else None
