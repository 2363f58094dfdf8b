"""`kubectl finetune watch` while the test drives the job's status: in a pseudo-terminal (a redrawn progress
bar) and with output to a pipe (one line per change)."""

from __future__ import annotations

import queue
import subprocess
import threading

import cli_helpers as h
import pexpect
import pytest
from cli_helpers import EXECUTABLE
from kubetune_dev.cluster import LocalCluster

pytestmark = pytest.mark.e2e

REDRAW = "\r\x1b[2K"  # carriage return, erase the line


def env(cluster: LocalCluster) -> dict[str, str]:
    # The terminal's own size must decide the bar's width, not a COLUMNS inherited from the test runner.
    return {k: v for k, v in cluster.env().items() if k not in ("COLUMNS", "LINES")}


def test_watch_in_a_terminal_redraws_a_progress_bar_and_ends_with_the_result(
    crd_cluster: LocalCluster, namespace: str
) -> None:
    h.apply(crd_cluster, namespace, h.manifest("support-bot"))
    child = pexpect.spawn(
        str(EXECUTABLE),
        ["watch", "support-bot", "-n", namespace],
        env=env(crd_cluster),
        dimensions=(24, 120),
        encoding="utf-8",
        timeout=20,
    )
    try:
        child.expect_exact(f"{REDRAW}Pending (waiting for the operator)")
        h.set_status(
            crd_cluster,
            namespace,
            "support-bot",
            h.training(100, loss=1.8, tokens_per_second=48210, eta_seconds=3000, usd=20),
        )
        child.expect_exact(
            f"{REDRAW}Running [#######.......................] 100/400 25%  loss 1.8000  48.2k tok/s  ETA 50m  $20.00"
        )
        h.set_status(
            crd_cluster,
            namespace,
            "support-bot",
            h.training(300, loss=1.1, eval_loss=1.25, tokens_per_second=50110, eta_seconds=1000, usd=60, attempt=2),
        )
        child.expect_exact(
            f"{REDRAW}Running attempt 2 [#####################.......] 300/400 75%  loss 1.1000  eval 1.2500  "
            "50.1k tok/s  ETA 16m40s  $60.00"
        )
        h.set_status(crd_cluster, namespace, "support-bot", h.succeeded())
        child.expect_exact(
            "\r\nSucceeded: run 1 finished in 1h5m: loss 0.8123, eval loss 0.9001, 78.1 GPU-hours, $195.20; "
            "output pvc://ft-checkpoints/default/support-bot/runs/1\r\n"
        )
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_watch_into_a_pipe_prints_each_change_once_and_fails_with_the_job(
    crd_cluster: LocalCluster, namespace: str
) -> None:
    h.apply(crd_cluster, namespace, h.manifest("support-bot"))
    process = subprocess.Popen(
        [str(EXECUTABLE), "watch", "support-bot", "-n", namespace],
        env=env(crd_cluster),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    stdout = process.stdout
    assert stdout is not None

    def pump() -> None:
        for line in stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()

    def next_line() -> str:
        return lines.get(timeout=20).rstrip("\n")

    try:
        assert next_line() == "Pending (waiting for the operator)"
        running = h.training(100, loss=1.8, tokens_per_second=48210, eta_seconds=3000, usd=20)
        h.set_status(crd_cluster, namespace, "support-bot", running)
        assert next_line() == "Running  step 100/400 (25%)  loss 1.8000  48.2k tok/s  ETA 50m  $20.00"
        # A status write that changes nothing shown (the workers) prints nothing.
        h.set_status(crd_cluster, namespace, "support-bot", {"workers": {"active": 1, "ready": 1}})
        over = "projected cost $320.80 exceeds the budget of $250.00"
        h.set_status(crd_cluster, namespace, "support-bot", h.failed("BudgetExceeded", over))
        assert next_line() == "Failed  step 150/400 (37%)  loss 1.4000  $120.30"
        assert next_line() == (
            f"Failed: run 1 after 1 attempt (BudgetExceeded: {over}); loss 1.4000, 48.1 GPU-hours, $120.30"
        )
        assert process.wait(timeout=20) == 1
        assert lines.empty()
        assert process.stderr is not None and process.stderr.read() == ""
    finally:
        process.kill()
        process.wait()


def test_watch_reports_a_deleted_job(crd_cluster: LocalCluster, namespace: str) -> None:
    h.apply(crd_cluster, namespace, h.manifest("support-bot"))
    process = subprocess.Popen(
        [str(EXECUTABLE), "watch", "support-bot", "-n", namespace],
        env={**env(crd_cluster), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "Pending (waiting for the operator)\n"
        crd_cluster.kubectl("delete", "ftj", "support-bot", "-n", namespace)
        assert process.wait(timeout=20) == 1
        assert process.stderr is not None
        assert process.stderr.read() == 'error: FineTuneJob "support-bot" was deleted while watching it\n'
    finally:
        process.kill()
        process.wait()
