"""`kubectl finetune logs` reads real worker containers (on the session's real nodes) through the API server's pod
log endpoint, which asks their kubelet. The workers are an Indexed Job named and labelled as the operator names an
attempt's."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import cli_helpers as h
import pytest
from cli_helpers import EXECUTABLE, Cli, error, ok
from kubetune_dev.cluster import LocalCluster
from kubetune_dev.realnodes import RealNodes
from kubetune_operator.names import COMPLETION_INDEX_LABEL, LABEL_ATTEMPT, LABEL_JOB, LABEL_RUN, attempt_name

pytestmark = pytest.mark.e2e


@pytest.fixture
def signal_claim(real_nodes: RealNodes, namespace: str) -> Iterator[str]:
    """A claim the workers and the test share: the test's go-ahead is a file on it."""
    real_nodes.create_claims(namespace, ["signal"])
    yield "signal"
    real_nodes.delete_claims(namespace)


# Rank 0 logs, then waits for the test's go-ahead on a shared claim, so `logs -f` must really follow it.
WORKER = """
import os, time
rank = os.environ["JOB_COMPLETION_INDEX"]
print(f"rank {rank}: loaded 2 shards", flush=True)
if rank == "0":
    while not os.path.exists("/signal/go"):
        time.sleep(0.1)
print(f"rank {rank}: step 10 loss 1.5000", flush=True)
"""


def attempt_job(job: str, attempt: int, *, workers: int, image: str, placement: dict[str, object]) -> dict[str, object]:
    labels = {LABEL_JOB: job, LABEL_RUN: "1", LABEL_ATTEMPT: str(attempt)}
    container = {
        "name": "trainer",
        "image": image,
        "command": ["python", "-c", WORKER],
        "volumeMounts": [{"name": "signal", "mountPath": "/signal"}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": attempt_name(job, 1, attempt), "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": workers,
            "parallelism": workers,
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    **placement,
                    "containers": [container],
                    "volumes": [{"name": "signal", "persistentVolumeClaim": {"claimName": "signal"}}],
                },
            },
        },
    }


def wait_for_phase(
    cluster: LocalCluster, namespace: str, rank: int, phase: str, timeout: float = 30, job: str = "support-bot"
) -> None:
    """Until the worker of `rank` (of the only attempt with such a worker) is in `phase`."""
    selector = f"{LABEL_JOB}={job},{COMPLETION_INDEX_LABEL}={rank}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout)
        if pods["items"] and pods["items"][0].get("status", {}).get("phase") == phase:
            return
        time.sleep(0.2)
    raise AssertionError(f"worker {rank} not {phase} after {timeout}s")


def test_logs_of_each_rank_followed_live_and_by_attempt(
    cli: Cli, crd_cluster: LocalCluster, namespace: str, real_nodes: RealNodes, signal_claim: str
) -> None:
    node, image = real_nodes.nodes[0], real_nodes.image("operator")  # the small image: Python is all they need
    h.apply(crd_cluster, namespace, h.manifest("support-bot"))
    assert error(cli("logs", "support-bot", "-n", namespace)) == (
        'FineTuneJob "support-bot" has not started any workers yet: `kubectl finetune watch support-bot` follows it'
    )
    h.set_status(crd_cluster, namespace, "support-bot", h.training(10))
    first = attempt_job("support-bot", 1, workers=2, image=image, placement=real_nodes.placement)
    h.apply(crd_cluster, namespace, first)
    wait_for_phase(crd_cluster, namespace, 0, "Running")

    follow = subprocess.Popen(
        [str(EXECUTABLE), "logs", "support-bot", "-n", namespace, "--follow"],
        env=crd_cluster.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follow.stdout is not None and follow.stdout.readline() == "rank 0: loaded 2 shards\n"
        (real_nodes.claim_dir(namespace, signal_claim) / "go").touch()
        assert follow.stdout.read() == "rank 0: step 10 loss 1.5000\n"
        assert follow.wait(timeout=20) == 0
    finally:
        follow.kill()
        follow.wait()

    wait_for_phase(crd_cluster, namespace, 1, "Succeeded")
    assert ok(cli("logs", "support-bot", "-n", namespace, "--rank", "1")) == (
        "rank 1: loaded 2 shards\nrank 1: step 10 loss 1.5000\n"
    )
    assert error(cli("logs", "support-bot", "-n", namespace, "--rank", "2")) == (
        "no worker of rank 2 in run 1 attempt 1 of support-bot: it has ranks 0, 1"
    )

    # Earlier attempts stay readable while their pods exist.
    assert ok(cli("logs", "support-bot", "-n", namespace, "--attempt", "1")) == (
        "rank 0: loaded 2 shards\nrank 0: step 10 loss 1.5000\n"
    )
    assert error(cli("logs", "support-bot", "-n", namespace, "--attempt", "3")) == (
        "no worker of rank 0 in run 1 attempt 3 of support-bot: it has no worker pods now"
    )

    # Attempt 2's worker cannot be scheduled until the node gets a label: it has no log yet, and `logs -f` waits.
    h.set_status(crd_cluster, namespace, "support-bot", h.training(10, attempt=2))
    gate = "kubetune.io/cli-test-gate"
    gated = {**node.placement, "nodeSelector": {**node.node_selector, gate: namespace}}  # unique to this test
    h.apply(crd_cluster, namespace, attempt_job("support-bot", 2, workers=1, image=image, placement=gated))
    pending = error(cli("logs", "support-bot", "-n", namespace))
    assert pending.startswith("worker support-bot-r1-a2-0-")
    assert pending.endswith(" has not started yet: add --follow to wait for its log")
    waiting = subprocess.Popen(
        [str(EXECUTABLE), "logs", "support-bot", "-n", namespace, "-f"],
        env=crd_cluster.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1)
        assert waiting.poll() is None
        crd_cluster.kubectl("label", "node", node.name, f"{gate}={namespace}", "--overwrite")
        out, err = waiting.communicate(timeout=30)
    finally:
        waiting.kill()
        waiting.wait()
        crd_cluster.kubectl("label", "node", node.name, f"{gate}-")  # the nodes serve the whole session
    assert (waiting.returncode, out, err) == (0, "rank 0: loaded 2 shards\nrank 0: step 10 loss 1.5000\n", "")


# Rank 0 of a finished run leaves its samples in its log as the trainer logs them (kubetune_trainer.samples).
ANSWERING_WORKER = """
import json
rows = [
    {"row": "/kubetune/sources/samples/prompts.jsonl row 1", "prompt": "What do bees make?", "reference": "Honey.",
     "base": "Bees make a sweet substance called nectar, which they collect", "tuned": "Honey.",
     "truncated": {"base": True, "tuned": False}},
]
print("2026-12-05 10:00:00,000 [rank 0] INFO kubetune_trainer.train: step 10/10 | loss 1.2")
for r in rows:
    print("2026-12-05 10:00:01,000 [rank 0] INFO kubetune_trainer.samples: kubetune-sample " + json.dumps(r))
"""


def test_samples_of_a_finished_run_side_by_side_from_rank_0s_log(
    cli: Cli, crd_cluster: LocalCluster, namespace: str, real_nodes: RealNodes, tmp_path: Path
) -> None:
    samples = {"evaluation": {"samples": {"source": "pvc://datasets/prompts.jsonl"}}}
    h.apply(crd_cluster, namespace, h.manifest("answers", **samples))
    h.apply(crd_cluster, namespace, h.manifest("no-prompts"))
    h.set_status(crd_cluster, namespace, "no-prompts", h.succeeded())
    assert error(cli("samples", "no-prompts", "-n", namespace)) == (
        'FineTuneJob "no-prompts" has no spec.evaluation.samples: give it prompts to answer'
    )
    h.set_status(crd_cluster, namespace, "answers", h.succeeded())
    job = attempt_job("answers", 1, workers=1, image=real_nodes.image("operator"), placement=real_nodes.placement)
    job["spec"]["template"]["spec"]["containers"][0]["command"] = ["python", "-c", ANSWERING_WORKER]  # type: ignore[index]
    job["spec"]["template"]["spec"]["volumes"] = []  # type: ignore[index]
    job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = []  # type: ignore[index]
    h.apply(crd_cluster, namespace, job)
    wait_for_phase(crd_cluster, namespace, 0, "Succeeded", job="answers")
    assert ok(cli("samples", "answers", "-n", namespace, "--width", "80")).splitlines() == [
        "[1] /kubetune/sources/samples/prompts.jsonl row 1",
        "  prompt:    What do bees make?",
        "  reference: Honey.",
        "  BASE                                  | TUNED",
        "  Bees make a sweet substance called    | Honey.",
        "  nectar, which they collect [...]      |",
    ]
    # the same from an output directory's samples.jsonl
    (tmp_path / "samples.jsonl").write_text(json.dumps({"row": "r", "prompt": "p", "base": "b", "tuned": "t"}) + "\n")
    assert ok(cli("samples", "--from-dir", str(tmp_path), "--width", "40")).splitlines() == [
        "[1] r",
        "  prompt:    p",
        "  BASE                 | TUNED",
        "  b                    | t",
    ]
