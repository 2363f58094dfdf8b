"""What must survive faults and re-creation, against a real API server, controller-manager and kwok: the next
attempt never runs beside the previous one's workers, an output outlives its job, a job deleted and applied again
under its name starts afresh, and a slow setup is not a stall while a stuck one is. (Real training for the same
cases: tests/local.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_support import (
    TIMEOUT,
    Api,
    FakeTrainer,
    Operator,
    condition,
    free_port,
    hanging,
    running_pods,
    spec,
    wait_events,
    wait_for,
    wait_phase,
)
from kubetune_dev.cluster import LocalCluster
from kubetune_trainer.config import TrainerConfig

pytestmark = pytest.mark.e2e

TRAINER_PORT = free_port()
HOLD = "kubetune.io/test-hold"  # a finalizer: the pod stays, terminating, as on a node that does not answer
TEMPLATE = {"spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}


@pytest.fixture(scope="module")
def operator(crd_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    settings = {"progressPollIntervalSeconds": 1, "trainerMetricsPort": TRAINER_PORT}
    op = Operator(crd_cluster, tmp_path_factory.mktemp("operator"), ["kto-*"], settings=settings).start()
    yield op
    op.stop()


@pytest.fixture
def trainer() -> Iterator[FakeTrainer]:
    fake = FakeTrainer(TRAINER_PORT)
    yield fake
    fake.close()


def hold(api: Api, ns: str, pod: str, held: bool) -> None:
    api.core.patch_namespaced_pod(pod, ns, {"metadata": {"finalizers": [HOLD] if held else None}})


def uid(api: Api, ns: str, name: str) -> str:
    return str(api.ftj(ns, name)["metadata"]["uid"])


def trainer_config(api: Api, ns: str, name: str, run: int = 1, attempt: int = 1) -> TrainerConfig:
    cm = api.core.read_namespaced_config_map(f"{name}-r{run}-a{attempt}", ns)
    return TrainerConfig.model_validate_json(cm.data["config.json"])


def claim_of(api: Api, ns: str, name: str) -> Any:
    found = api.core.list_namespaced_persistent_volume_claim(ns, field_selector=f"metadata.name={name}").items
    return found[0] if found else None


# ----------------------------------------------------------------------------------------------
# overlapping attempts
# ----------------------------------------------------------------------------------------------


def test_the_next_attempt_waits_for_the_previous_attempts_workers_to_be_gone(
    api: Api, operator: Operator, ns: str
) -> None:
    api.apply(ns, "overlap", hanging(runPolicy={"maxRestarts": 1, "backoffSeconds": 1, "maxBackoffSeconds": 1}))
    first = running_pods(api, ns, "overlap", 1)
    stuck = first[0].metadata.name
    hold(api, ns, stuck, True)
    api.end_pod(ns, first[1].metadata.name, 137, reason="OOMKilled")

    # Well past the 1 s backoff, attempt 1's worker still terminates: nothing of attempt 2 may exist.
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        assert api.pods(ns, "kubetune.io/job=overlap,kubetune.io/attempt=2") == []
        assert [j.metadata.name for j in api.jobs(ns, "overlap")] == ["overlap-r1-a1"]
        time.sleep(0.25)
    assert api.core.read_namespaced_pod(stuck, ns).metadata.deletion_timestamp is not None
    status = api.status(ns, "overlap")
    assert status["attempt"] == 1
    reconciling = condition(status, "Reconciling")
    assert reconciling["reason"] in ("WaitingForWorkers", "WorkersNotStopping")
    assert reconciling["message"].startswith(
        "attempt 2 of run 1 starts when the workers of earlier attempts have stopped"
    )
    assert stuck in reconciling["message"]

    hold(api, ns, stuck, False)  # the worker is gone at last
    running_pods(api, ns, "overlap", 2)
    status = api.status(ns, "overlap")
    assert [a.get("reason") for a in status["attempts"]] == ["OOMKilled", None]
    assert api.pods(ns, "kubetune.io/job=overlap,kubetune.io/attempt=1") == []
    api.delete_ftj(ns, "overlap")


# ----------------------------------------------------------------------------------------------
# outputs outlive their job
# ----------------------------------------------------------------------------------------------


def test_deleting_a_job_keeps_the_claim_that_holds_its_output_and_a_new_job_of_its_name_uses_it(
    api: Api, operator: Operator, ns: str
) -> None:
    api.apply(ns, "keep", spec(checkpoint={"claimName": None, "volumeClaimTemplate": TEMPLATE}))
    # The control: the same template with the outputs on another claim is the job's own, and goes with it.
    api.apply(
        ns,
        "scratch",
        spec(checkpoint={"claimName": None, "volumeClaimTemplate": TEMPLATE}, output={"claimName": "ft-models"}),
    )
    status = wait_phase(api, operator, ns, "keep", "Succeeded")
    claim = claim_of(api, ns, "keep-checkpoints")
    assert not claim.metadata.owner_references and claim.metadata.labels["kubetune.io/job"] == "keep"
    first = uid(api, ns, "keep")
    assert status["output"]["path"] == f"pvc://keep-checkpoints/{ns}/keep/{first}/runs/1"
    wait_phase(api, operator, ns, "scratch", "Succeeded")
    assert claim_of(api, ns, "scratch-checkpoints").metadata.owner_references[0].uid == uid(api, ns, "scratch")

    api.delete_ftj(ns, "keep")
    api.delete_ftj(ns, "scratch")
    wait_for(lambda: claim_of(api, ns, "scratch-checkpoints") is None, TIMEOUT, "the owned claim to be collected")
    wait_for(lambda: api.jobs(ns, "keep") == [], TIMEOUT, "the job's workers to be collected")
    kept = claim_of(api, ns, "keep-checkpoints")
    assert kept is not None and kept.metadata.deletion_timestamp is None
    assert kept.metadata.uid == claim.metadata.uid

    # Applied again under the same name: the kept claim serves the new object, under the new object's uid.
    api.apply(ns, "keep", spec(checkpoint={"claimName": None, "volumeClaimTemplate": TEMPLATE}))
    status = wait_phase(api, operator, ns, "keep", "Succeeded")
    second = uid(api, ns, "keep")
    assert second != first
    assert status["output"]["path"] == f"pvc://keep-checkpoints/{ns}/keep/{second}/runs/1"
    assert claim_of(api, ns, "keep-checkpoints").metadata.uid == claim.metadata.uid


# ----------------------------------------------------------------------------------------------
# delete and apply again under the same name
# ----------------------------------------------------------------------------------------------


def test_a_job_applied_again_under_its_name_gets_directories_of_its_own(api: Api, operator: Operator, ns: str) -> None:
    api.apply(ns, "again", hanging())
    running_pods(api, ns, "again", 1)
    old = trainer_config(api, ns, "again")
    api.delete_ftj(ns, "again")
    wait_for(lambda: not api.pods(ns, "kubetune.io/job=again"), TIMEOUT, "the old workers to go")
    api.apply(ns, "again", hanging(dataset={"source": "pvc://datasets/support/v4.jsonl"}))
    running_pods(api, ns, "again", 1)
    new = trainer_config(api, ns, "again")
    assert new.identity.uid == uid(api, ns, "again") != old.identity.uid
    assert new.identity.spec_fingerprint != old.identity.spec_fingerprint
    # Nothing of the old object's is where the new one reads or writes.
    for directory in ("checkpoint", "output"):
        old_dir, new_dir = getattr(old, directory).dir, getattr(new, directory).dir
        assert old_dir != new_dir and not new_dir.startswith(old_dir) and not old_dir.startswith(new_dir)
    assert new.checkpoint.dir == f"/kubetune/job/{new.identity.uid}/runs/1/checkpoints"
    api.delete_ftj(ns, "again")


# ----------------------------------------------------------------------------------------------
# the stall clock judges progress
# ----------------------------------------------------------------------------------------------


def test_a_download_slower_than_the_stall_timeout_is_no_stall_and_a_stuck_one_is(
    api: Api, operator: Operator, ns: str, trainer: FakeTrainer
) -> None:
    api.apply(ns, "slow", hanging(runPolicy={"maxRestarts": 1, "backoffSeconds": 1, "stallTimeoutSeconds": 5}))
    total = 4 << 30
    trainer.set_up("downloading", 0, total, "bytes")
    pods = running_pods(api, ns, "slow", 1)
    api.set_pod_ip(ns, pods[0].metadata.name, trainer.host)
    # 15 s of download, three stall timeouts, always a little further.
    started = time.monotonic()
    done = 0
    while time.monotonic() - started < 15:
        done += total // 20
        trainer.set_up("downloading", done, total, "bytes")
        time.sleep(1)
        status = api.status(ns, "slow")
        assert [a.get("reason") for a in status["attempts"]] == [None], status["attempts"]
    setup = (api.status(ns, "slow").get("progress") or {}).get("setup")
    assert setup is not None and setup["stage"] == "downloading" and 0 < setup["done"] <= total
    assert "setting up: downloading" in condition(api.status(ns, "slow"), "Running")["message"]

    # The download stops moving; the trainer still answers with fresh reports: that is a stall.
    stalled_at = time.monotonic()

    def stalled() -> dict[str, Any]:
        trainer.set_up("downloading", done, total, "bytes")
        attempts = api.status(ns, "slow")["attempts"]
        return attempts[0] if attempts[0].get("reason") else {}

    first = wait_for(stalled, 30, "attempt 1 to stall", operator.tail, every=0.5)
    assert time.monotonic() - stalled_at >= 4
    assert first["reason"] == "Stalled"
    assert first["message"].startswith("no setup progress for ")
    assert "(loading: downloading " in first["message"] and "runPolicy.stallTimeoutSeconds is 5" in first["message"]
    wait_events(api, ns, "slow", {"Stalled"})
    api.delete_ftj(ns, "slow")


def test_checkpoints_rank_0_left_alone_are_named_in_the_status(
    api: Api, operator: Operator, ns: str, trainer: FakeTrainer
) -> None:
    api.apply(ns, "strangers", hanging())
    root = f"/kubetune/job/{uid(api, ns, 'strangers')}/runs/1/checkpoints"
    trainer.train(10, total=100, loss=2.0)
    trainer.ignored([{"path": f"{root}/step-00000050", "reason": "written by another FineTuneJob object"}])
    pods = running_pods(api, ns, "strangers", 1)
    api.set_pod_ip(ns, pods[0].metadata.name, trainer.host)

    def named() -> dict[str, Any]:
        status = api.status(ns, "strangers")
        return next((c for c in status.get("conditions") or [] if c["type"] == "CheckpointsIgnored"), {})

    found = wait_for(named, TIMEOUT, "the CheckpointsIgnored condition", operator.tail)
    where = f"pvc://ft-checkpoints/{ns}/strangers/{uid(api, ns, 'strangers')}/runs/1/checkpoints/step-00000050"
    assert found["status"] == "True" and where in found["message"]
    assert api.status(ns, "strangers")["checkpoint"]["ignored"] == [
        {"path": where, "reason": "written by another FineTuneJob object"}
    ]
    wait_events(api, ns, "strangers", {"CheckpointsIgnored"})
    api.delete_ftj(ns, "strangers")
