"""FineTuneJobs trained for real: the operator (a subprocess) renders the workers, the session's two real nodes run
them from the trainer image (launcher -> torchrun -> trainer, gloo on CPU, one pod per node), the claims are
hostPath volumes read here from the host.

A tiny random-initialised Llama keeps each run to seconds of training; what takes time is starting the
workers (torch imports). The tests share one operator, one namespace and the session's two nodes, and run
one job at a time: the four claims of the namespace hold every job's model, data, checkpoints and outputs.
Each real training costs about a minute on 2 cores, so each test checks all it can of the runs it makes.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trainer_assets
from e2e_support import Api, Operator, attempt_pods, wait_for
from kubetune_dev.realnodes import NODE_SELECTOR, NODE_TOLERATION, RealNodes
from kubetune_dev.toolchain import toolchain_bin
from kubetune_trainer.files import sha256_file

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RUN_TIMEOUT = 300  # a job from apply to its end, on 2 busy cores
MODEL = "tiny-llama"  # on the models claim (conftest.py)


def spec(**overrides: dict[str, Any]) -> dict[str, Any]:
    """LoRA on the tiny model, 2 nodes x 1 CPU process; `overrides` are merged into the top-level groups."""
    base: dict[str, Any] = {
        "model": {"source": f"pvc://models/{MODEL}"},
        "dataset": {"source": "pvc://datasets/train.jsonl", "format": "prompt_completion", "maxSeqLength": 128},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "training": {
            "maxSteps": 30,
            "learningRate": 3e-3,
            "batchSizePerDevice": 2,
            "precision": "fp32",
            "logEverySteps": 5,
            "seed": 7,
        },
        "resources": {
            "numNodes": 2,
            "gpusPerNode": 0,
            "nodeSelector": NODE_SELECTOR,
            "tolerations": [NODE_TOLERATION],
        },
        "checkpoint": {"claimName": "ft-checkpoints", "everySteps": 10, "keepLast": 2},
        "output": {"claimName": "ft-models"},
        "runPolicy": {"maxRestarts": 1, "backoffSeconds": 1, "maxBackoffSeconds": 2},
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value}
    return base


def unique(prefix: str) -> str:
    # Unique names, so that a worker process found on this machine by its job name is this test's.
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def wait_for_phase(api: Api, ns: str, name: str, phase: str, op: Operator, timeout: float = RUN_TIMEOUT) -> dict:
    def reached() -> dict[str, Any] | None:
        status = api.status(ns, name)
        if status.get("phase") == phase:
            return status
        assert status.get("phase") not in {"Succeeded", "Failed"} - {phase}, json.dumps(status, indent=1)
        return None

    return wait_for(reached, timeout, f"{name} {phase}", op.tail, every=1)


def output_dir(nodes: RealNodes, ns: str, status: dict[str, Any]) -> Path:
    claim, _, path = status["output"]["path"].removeprefix("pvc://").partition("/")
    return nodes.claim_dir(ns, claim) / path


def checkpoint_steps(api: Api, nodes: RealNodes, ns: str, name: str) -> list[int]:
    """Steps of the run's finished checkpoints (step-<step>-<lineage> directories), oldest first."""
    uid = api.ftj(ns, name)["metadata"]["uid"]
    root = nodes.claim_dir(ns, "ft-checkpoints") / ns / name / uid / "runs" / "1" / "checkpoints"
    found = (re.fullmatch(r"step-(\d{8})-\w+", p.name) for p in root.iterdir()) if root.exists() else ()
    return sorted(int(m.group(1)) for m in found if m)


def worker_pod(api: Api, ns: str, name: str, attempt: int, rank: int = 0) -> str | None:
    """The name of the attempt's pod of `rank`, once it runs."""
    for pod in attempt_pods(api, ns, name, attempt):
        index = pod.metadata.labels.get("batch.kubernetes.io/job-completion-index")
        if index == str(rank) and pod.status.phase == "Running":
            return str(pod.metadata.name)
    return None


@contextmanager
def followed_log(api: Api, nodes: RealNodes, ns: str, name: str, attempt: int) -> Iterator[Path]:
    """Rank 0's trainer log of an attempt, followed into a file from when it runs (`kubectl logs -f`): the
    whole log stays readable after the operator deletes the attempt's pods."""
    pod = wait_for(lambda: worker_pod(api, ns, name, attempt), RUN_TIMEOUT, f"rank 0 of attempt {attempt} running")
    path = nodes.state_dir / f"{ns}-{pod}.log"
    with open(path, "wb") as out:
        kubectl = [str(toolchain_bin() / "kubectl"), f"--kubeconfig={nodes.cluster.kubeconfig}"]
        follow = subprocess.Popen([*kubectl, "logs", "-f", pod, "-n", ns, "-c", "trainer"], stdout=out)
    try:
        yield path
    finally:
        follow.kill()
        follow.wait()


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_trained(nodes: RealNodes, ns: str, out: Path) -> None:
    """A 30-step run's output: its manifest and loss curve, a falling loss, and an adapter that changes the model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finalMetrics"]["steps"] == 30 and manifest["worldSize"] == 2
    assert manifest.get("resumedFromStep") in (None, 0), manifest  # from step 0
    assert (out / "loss.png").stat().st_size > 0
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0], losses  # it trained all 30 steps itself

    tokenizer = trainer_assets.make_tokenizer()
    inputs = tokenizer("repeat apple 3 times: ", return_tensors="pt")
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(nodes.claim_dir(ns, "models") / MODEL).eval()
        before = base(**inputs).logits
        after = PeftModel.from_pretrained(base, out).eval()(**inputs).logits
    assert (after - before).abs().max().item() > 1e-2


def test_status_progress_matches_the_trainer_metrics_up_to_every_step_done(
    api: Api, ns: str, operator: Operator, real_nodes: RealNodes
) -> None:
    name = unique("progress")
    api.apply(ns, name, spec(training={"maxSteps": 100}))
    seen: list[dict[str, Any]] = []

    def finished() -> dict[str, Any] | None:
        status = api.status(ns, name)
        if status.get("progress") and status["progress"] not in seen:
            seen.append(status["progress"])
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = wait_for(finished, RUN_TIMEOUT, f"{name} finished", operator.tail, every=0.5)
    assert status["phase"] == "Succeeded", status
    logged = {r["step"]: r["loss"] for r in metrics(output_dir(real_nodes, ns, status)) if "loss" in r}

    assert any(0 < p.get("step", 0) < 100 for p in seen), seen  # followed while training, not only at the end
    for progress in seen:
        assert progress.get("totalSteps") == 100 or progress["step"] == 0, progress  # unknown while loading
        if progress.get("loss") is not None:
            # rank 0 reports the loss of its latest log step (every 5 steps), as metrics.jsonl records it; a log
            # step is counted done before its loss is reduced over the ranks, so the one before may still show
            earlier = sorted(step for step in logged if step <= progress["step"])[-2:]
            # status keeps 4 decimals
            assert progress["loss"] in [round(logged[step], 4) for step in earlier], (progress, logged)
        for point in progress.get("history", []):
            assert point["loss"] == round(logged[point["step"]], 4), (point, logged)
    # A succeeded run shows every step done.
    progress = status.get("progress") or {}
    assert (progress.get("step"), progress.get("percent"), progress.get("etaSeconds")) == (100, 100, 0), progress


def test_a_killed_worker_restarts_the_gang_from_the_checkpoint(
    api: Api, ns: str, operator: Operator, real_nodes: RealNodes
) -> None:
    name = unique("kill")
    api.apply(ns, name, spec(training={"maxSteps": 100}))
    wait_for(
        lambda: max(checkpoint_steps(api, real_nodes, ns, name), default=0) >= 20,
        RUN_TIMEOUT,
        "checkpoint 20",
        operator.tail,
    )
    rank1 = wait_for(lambda: worker_pod(api, ns, name, attempt=1, rank=1), 30, "the rank-1 worker")
    assert real_nodes.kill(ns, rank1, "trainer")  # as a crash or the OOM killer would

    status = wait_for(
        lambda: (s := api.status(ns, name)).get("attempt") == 2 and s, RUN_TIMEOUT, "attempt 2", operator.tail
    )
    first = status["attempts"][0]
    assert first["reason"] == "Error", first
    # Every save needs both ranks, so attempt 1 wrote nothing after the kill: attempt 2 must resume from here.
    latest = checkpoint_steps(api, real_nodes, ns, name)[-1]
    assert 20 <= latest < 100

    with followed_log(api, real_nodes, ns, name, attempt=2) as log:
        status = wait_for_phase(api, ns, name, "Succeeded", operator)
        assert status["attempt"] == 2
        manifest = json.loads((output_dir(real_nodes, ns, status) / "manifest.json").read_text())
        assert manifest["resumedFromStep"] == latest
        assert manifest["finalMetrics"]["steps"] == 100
        wait_for(lambda: f"at step {latest}/100" in log.read_text(errors="replace"), 30, "the resume in the log")


def test_suspend_checkpoints_and_unsuspend_resumes_from_it(
    api: Api, ns: str, operator: Operator, real_nodes: RealNodes
) -> None:
    name = unique("pause")
    # No periodic checkpoints: the only one before the end is the one written on SIGTERM.
    api.apply(ns, name, spec(training={"maxSteps": 100}, checkpoint={"everySteps": 1000}))
    with followed_log(api, real_nodes, ns, name, attempt=1) as log:
        wait_for(lambda: " step 5/100 " in log.read_text(errors="replace"), RUN_TIMEOUT, "step 5", operator.tail)
        api.patch_spec(ns, name, {"runPolicy": {"suspend": True}})

        status = wait_for_phase(api, ns, name, "Suspended", operator)
        wait_for(lambda: not api.pods(ns, f"kubetune.io/job={name}"), 60, "the workers gone")
        steps = checkpoint_steps(api, real_nodes, ns, name)
        assert len(steps) == 1 and 5 <= steps[0] < 100, steps
        saved = steps[0]
        assert f"checkpoint step {saved} saved" in log.read_text(errors="replace")
        assert status["attempts"][0]["reason"] == "Suspended", status["attempts"]

    api.patch_spec(ns, name, {"runPolicy": {"suspend": False}})
    status = wait_for_phase(api, ns, name, "Succeeded", operator)
    manifest = json.loads((output_dir(real_nodes, ns, status) / "manifest.json").read_text())
    assert manifest["resumedFromStep"] == saved
    assert manifest["finalMetrics"]["steps"] == 100


def test_a_bad_dataset_row_fails_the_job_with_a_reason_naming_the_row(
    api: Api, ns: str, operator: Operator, real_nodes: RealNodes
) -> None:
    rows: list[Any] = trainer_assets.rows(20, "prompt_completion")
    rows[6] = {"prompt": "repeat apple 2 times: "}  # line 7: no completion
    trainer_assets.write_jsonl(real_nodes.claim_dir(ns, "datasets") / "bad.jsonl", rows)
    name = unique("bad")
    api.apply(ns, name, spec(dataset={"source": "pvc://datasets/bad.jsonl"}))

    status = wait_for_phase(api, ns, name, "Failed", operator)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert "bad.jsonl row 7" in failed["message"] and 'field "completion" is missing' in failed["message"], failed
    assert status["attempt"] == 1  # a permanent error: no restart spent on it


def files_under(root: Path) -> dict[str, str]:
    """Every file under `root` with its sha256."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_trains_to_succeeded_and_a_job_deleted_and_applied_again_with_other_data_trains_anew_leaving_the_old_files(
    api: Api, ns: str, operator: Operator, real_nodes: RealNodes
) -> None:
    name = unique("replace")
    api.apply(ns, name, spec())
    old = wait_for_phase(api, ns, name, "Succeeded", operator)
    old_output = output_dir(real_nodes, ns, old)
    assert_trained(real_nodes, ns, old_output)
    old_uid = api.ftj(ns, name)["metadata"]["uid"]
    old_checkpoints = real_nodes.claim_dir(ns, "ft-checkpoints") / ns / name / old_uid
    before = {**files_under(old_checkpoints), **{f"out/{k}": v for k, v in files_under(old_output).items()}}
    assert any(k.startswith("runs/1/checkpoints/") for k in before) and "out/manifest.json" in before

    # kubectl delete + apply (what an Argo CD or Flux re-create does), with the next version of the data.
    api.delete_ftj(ns, name)
    wait_for(lambda: not api.pods(ns, f"kubetune.io/job={name}"), 60, "the old workers gone")
    rows = trainer_assets.rows(160, "prompt_completion", seed=11)
    trainer_assets.write_jsonl(real_nodes.claim_dir(ns, "datasets") / f"{name}-v2.jsonl", rows)
    api.apply(ns, name, spec(dataset={"source": f"pvc://datasets/{name}-v2.jsonl"}))
    new = wait_for_phase(api, ns, name, "Succeeded", operator)

    new_output = output_dir(real_nodes, ns, new)
    assert new["output"]["path"] != old["output"]["path"]
    assert_trained(real_nodes, ns, new_output)  # from step 0: nothing of the old job's
    after = {**files_under(old_checkpoints), **{f"out/{k}": v for k, v in files_under(old_output).items()}}
    assert after == before  # the old object's checkpoints and output: untouched
