"""The operator against a real API server, controller-manager, scheduler and kwok GPU nodes: one operator
subprocess serves the module; each test gets its own kto-* namespace."""

from __future__ import annotations

import pytest
from e2e_support import (
    TIMEOUT,
    Api,
    Operator,
    condition,
    hanging,
    make_namespace,
    running_pods,
    spec,
    wait_events,
    wait_for,
    wait_phase,
)
from kubetune_dev.cluster import LocalCluster
from kubetune_operator.api.spec import FineTuneJobSpec
from kubetune_trainer.config import TrainerConfig

pytestmark = pytest.mark.e2e


def test_children_have_the_expected_shape_and_workers_land_on_gpu_nodes(api: Api, operator: Operator, ns: str) -> None:
    api.apply(ns, "shape", hanging())
    pods = running_pods(api, ns, "shape", 1)
    assert {p.spec.node_name for p in pods} <= {"gpu-node-0", "gpu-node-1"}
    assert [p.spec.hostname for p in pods] == ["shape-r1-a1-0", "shape-r1-a1-1"]
    assert {p.spec.subdomain for p in pods} == {"shape-r1-a1"}

    svc = api.core.read_namespaced_service("shape-r1-a1", ns)
    assert svc.spec.cluster_ip == "None" and svc.spec.publish_not_ready_addresses is True
    assert svc.spec.selector == {"kubetune.io/job": "shape", "kubetune.io/run": "1", "kubetune.io/attempt": "1"}

    uid = api.ftj(ns, "shape")["metadata"]["uid"]
    cm = api.core.read_namespaced_config_map("shape-r1-a1", ns)
    config = TrainerConfig.model_validate_json(cm.data["config.json"])
    assert config.checkpoint.dir == f"/kubetune/job/{uid}/runs/1/checkpoints"
    identity = config.identity
    assert (identity.namespace, identity.name, identity.uid, identity.run, identity.attempt) == (ns, "shape", uid, 1, 1)
    assert FineTuneJobSpec.model_validate_json(cm.data["spec.json"]) == FineTuneJobSpec.model_validate(hanging())

    [job] = api.jobs(ns, "shape")
    assert (job.spec.completion_mode, job.spec.completions, job.spec.parallelism, job.spec.backoff_limit) == (
        "Indexed",
        2,
        2,
        0,
    )
    assert job.metadata.owner_references[0].kind == "FineTuneJob"
    worker = pods[1].spec
    container = worker.containers[0]
    env = {e.name: e.value for e in container.env}
    assert container.command == ["kubetune-launch"]
    assert env["KUBETUNE_MASTER_ADDR"] == "shape-r1-a1-0.shape-r1-a1"
    assert env["KUBETUNE_NNODES"] == "2" and env["KUBETUNE_NPROC_PER_NODE"] == "1"
    assert next(e for e in container.env if e.name == "HF_TOKEN").value_from.secret_key_ref.name == "hf"
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert worker.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert worker.automount_service_account_token is False
    assert worker.security_context.run_as_non_root is True
    assert container.security_context.read_only_root_filesystem is True
    mounts = {m.mount_path: m.sub_path for m in container.volume_mounts}
    assert mounts["/kubetune/job"] == f"{ns}/shape"
    assert mounts["/kubetune/sources/dataset/v3.jsonl"] == "support/v3.jsonl"

    status = wait_phase(api, operator, ns, "shape", "Running")
    assert condition(status, "Running")["status"] == "True"
    assert status["workers"] == {"active": 2, "ready": 2, "succeeded": 0, "failed": 0}
    assert status["observedGeneration"] == 1
    wait_events(api, ns, "shape", {"RunStarted"})
    api.delete_ftj(ns, "shape")


def test_a_completed_job_succeeds_with_its_times(api: Api, operator: Operator, ns: str) -> None:
    api.apply(ns, "done", spec())
    status = wait_phase(api, operator, ns, "done", "Succeeded")
    assert status["startTime"] <= status["completionTime"]
    [run] = status["runs"]
    assert (run["result"], run["attempts"]) == ("Succeeded", 1)
    uid = api.ftj(ns, "done")["metadata"]["uid"]
    assert status["output"] == {"path": f"pvc://ft-checkpoints/{ns}/done/{uid}/runs/1", "promoted": True}
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "Reconciling")["status"] == "False"
    # The finished Job stays (its pods hold the logs); nothing else of the attempt does.
    [job] = api.jobs(ns, "done")
    assert job.status.succeeded == 2
    services = lambda: api.core.list_namespaced_service(ns, label_selector="kubetune.io/job=done").items  # noqa: E731
    wait_for(lambda: services() == [], TIMEOUT, "the rendezvous Service to go")
    wait_events(api, ns, "done", {"Succeeded"})


def test_a_preempted_worker_restarts_the_attempt_in_the_same_run(api: Api, operator: Operator, ns: str) -> None:
    api.apply(ns, "preempt", hanging(runPolicy={"maxRestarts": 1, "backoffSeconds": 1}))
    pods = running_pods(api, ns, "preempt", 1)
    api.end_pod(ns, pods[1].metadata.name, 143, disruption="PreemptionByScheduler")

    second = running_pods(api, ns, "preempt", 2)
    status = api.status(ns, "preempt")
    assert (status["run"], status["attempt"]) == (1, 2)
    first = status["attempts"][0]
    assert (first["reason"], first["exitCode"]) == ("Preempted", 143)
    assert pods[1].metadata.name in first["message"]
    only_second = lambda: [j.metadata.name for j in api.jobs(ns, "preempt")] == ["preempt-r1-a2"]  # noqa: E731
    wait_for(only_second, TIMEOUT, "attempt 1's Job to go")

    for pod in second:
        api.end_pod(ns, pod.metadata.name, 0, reason="Completed")
    status = wait_phase(api, operator, ns, "preempt", "Succeeded")
    assert [a.get("reason") for a in status["attempts"]] == ["Preempted", "Completed"]
    assert len(status["runs"]) == 1


def test_restarts_exhausted_fail_the_job_with_the_reason(api: Api, operator: Operator, ns: str) -> None:
    oom = {
        "kwok.kubetune.io/outcome": "fail",
        "kwok.kubetune.io/exit-code": "137",
        "kwok.kubetune.io/reason": "OOMKilled",
    }
    api.apply(ns, "oom", spec(resources={"podAnnotations": oom}, runPolicy={"maxRestarts": 1}))
    status = wait_phase(api, operator, ns, "oom", "Failed")
    assert [a["reason"] for a in status["attempts"]] == ["OOMKilled", "OOMKilled"]
    failed = condition(status, "Failed")
    assert failed["reason"] == "OOMKilled"
    assert "no restarts left (runPolicy.maxRestarts=1)" in failed["message"]
    assert condition(status, "Stalled")["status"] == "True"
    wait_for(lambda: api.jobs(ns, "oom") == [], TIMEOUT, "the failed attempt's Job to go")


def test_exit_code_78_fails_at_once_with_the_trainers_message(api: Api, operator: Operator, ns: str) -> None:
    api.apply(ns, "bad-data", hanging(runPolicy={"maxRestarts": 3}))
    pods = running_pods(api, ns, "bad-data", 1)
    why = "dataset /kubetune/sources/dataset/v3.jsonl row 3: 'messages' must be a list"
    api.end_pod(ns, pods[0].metadata.name, 78, message=why)
    status = wait_phase(api, operator, ns, "bad-data", "Failed")
    failed = condition(status, "Failed")
    assert (failed["reason"], failed["message"]) == ("PermanentError", why)
    assert len(status["attempts"]) == 1


def test_suspend_stops_the_workers_and_resume_continues_the_run(api: Api, operator: Operator, ns: str) -> None:
    api.apply(ns, "pause", hanging(runPolicy={"maxRestarts": 0}))
    running_pods(api, ns, "pause", 1)
    api.patch_spec(ns, "pause", {"runPolicy": {"suspend": True}})
    status = wait_phase(api, operator, ns, "pause", "Suspended")
    wait_for(lambda: not api.pods(ns, "kubetune.io/job=pause"), TIMEOUT, "the workers to go")
    wait_for(lambda: condition(api.status(ns, "pause"), "Reconciling")["status"] == "False", TIMEOUT, "settled")
    assert status["attempts"][0]["reason"] == "Suspended"
    assert api.jobs(ns, "pause") == []

    api.patch_spec(ns, "pause", {"runPolicy": {"suspend": False}})
    running_pods(api, ns, "pause", 2)
    status = wait_phase(api, operator, ns, "pause", "Running")
    assert (status["run"], status["attempt"], status["observedGeneration"]) == (1, 2, 3)
    wait_events(api, ns, "pause", {"Resumed"})
    api.delete_ftj(ns, "pause")


def test_a_spec_change_with_restart_starts_a_new_run(api: Api, operator: Operator, ns: str) -> None:
    api.apply(ns, "edit", hanging())
    running_pods(api, ns, "edit", 1)
    api.patch_spec(ns, "edit", {"training": {"learningRate": 1e-4}})
    wait_for(lambda: api.status(ns, "edit").get("run") == 2, TIMEOUT, "run 2", operator.tail)
    wait_for(lambda: [j.metadata.name for j in api.jobs(ns, "edit")] == ["edit-r2-a1"], TIMEOUT, "only run 2's Job")
    status = api.status(ns, "edit")
    assert [(r["run"], r.get("result"), r.get("reason")) for r in status["runs"]] == [
        (1, "Cancelled", "SpecChanged"),
        (2, None, None),
    ]
    assert status["runs"][1]["generation"] == 2
    api.delete_ftj(ns, "edit")


def test_a_spec_change_with_queue_waits_for_the_run(api: Api, operator: Operator, ns: str) -> None:
    api.apply(ns, "queued", hanging(runPolicy={"onSpecChange": "Queue"}))
    pods = running_pods(api, ns, "queued", 1)
    api.patch_spec(ns, "queued", {"training": {"learningRate": 1e-4}})
    wait_for(lambda: "is queued" in condition(api.status(ns, "queued"), "Running")["message"], TIMEOUT, "queued note")
    assert api.status(ns, "queued")["run"] == 1
    for pod in pods:
        api.end_pod(ns, pod.metadata.name, 0, reason="Completed")
    wait_for(lambda: api.status(ns, "queued").get("run") == 2, TIMEOUT, "run 2 after run 1", operator.tail)
    runs = api.status(ns, "queued")["runs"]
    assert [(r["run"], r.get("result")) for r in runs] == [(1, "Succeeded"), (2, None)]
    api.delete_ftj(ns, "queued")


def test_a_new_rerun_token_trains_again(api: Api, operator: Operator, ns: str) -> None:
    api.apply(ns, "again", spec())
    wait_phase(api, operator, ns, "again", "Succeeded")
    api.annotate(ns, "again", {"kubetune.io/rerun": "2026-11-27"})
    wait_for(lambda: api.status(ns, "again").get("run") == 2, TIMEOUT, "run 2")
    status = wait_phase(api, operator, ns, "again", "Succeeded")
    assert [(r["run"], r["result"]) for r in status["runs"]] == [(1, "Succeeded"), (2, "Succeeded")]
    assert status["runs"][1]["rerunToken"] == "2026-11-27"
    assert status["output"]["path"].endswith(f"/again/{api.ftj(ns, 'again')['metadata']['uid']}/runs/2")


def test_the_deadline_stops_the_run(api: Api, operator: Operator, ns: str) -> None:
    api.apply(ns, "late", hanging(runPolicy={"activeDeadlineSeconds": 4}))
    status = wait_phase(api, operator, ns, "late", "Failed", timeout=30)
    assert condition(status, "Failed")["reason"] == "DeadlineExceeded"
    wait_for(lambda: api.jobs(ns, "late") == [], TIMEOUT, "the Job to go")


def test_ttl_after_finished_removes_the_workers_and_keeps_the_job(api: Api, operator: Operator, ns: str) -> None:
    api.apply(ns, "brief", spec(runPolicy={"ttlSecondsAfterFinished": 2}))
    wait_phase(api, operator, ns, "brief", "Succeeded")
    wait_for(lambda: api.jobs(ns, "brief") == [], 30, "the Job to be cleaned up", operator.tail)
    wait_for(
        lambda: not api.core.list_namespaced_config_map(ns, label_selector="kubetune.io/job=brief").items,
        30,
        "the ConfigMap to be cleaned up",
    )
    status = api.status(ns, "brief")
    assert status["phase"] == "Succeeded" and status["runs"][0]["result"] == "Succeeded"
    assert api.core.read_namespaced_persistent_volume_claim("ft-checkpoints", ns)
    wait_events(api, ns, "brief", {"CleanedUp"})


def test_deleting_a_job_removes_its_children_and_keeps_user_claims(api: Api, operator: Operator, ns: str) -> None:
    template = {"spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}
    api.apply(
        ns,
        "gone",
        hanging(checkpoint={"claimName": None, "volumeClaimTemplate": template}, output={"claimName": "ft-models"}),
    )
    running_pods(api, ns, "gone", 1)
    assert api.core.read_namespaced_persistent_volume_claim("gone-checkpoints", ns)
    api.delete_ftj(ns, "gone")

    def children() -> list[str]:
        found = [f"Job/{j.metadata.name}" for j in api.jobs(ns, "gone")]
        found += [f"Pod/{p.metadata.name}" for p in api.pods(ns, "kubetune.io/job=gone")]
        for kind, lister in (
            ("Service", api.core.list_namespaced_service),
            ("ConfigMap", api.core.list_namespaced_config_map),
            ("PVC", api.core.list_namespaced_persistent_volume_claim),
        ):
            found += [f"{kind}/{o.metadata.name}" for o in lister(ns, label_selector="kubetune.io/job=gone").items]
        return found

    wait_for(lambda: children() == [], TIMEOUT, "every child to be garbage-collected", lambda: str(children()))
    claims = {c.metadata.name for c in api.core.list_namespaced_persistent_volume_claim(ns).items}
    assert claims == {"ft-checkpoints", "datasets", "ft-models"}


def test_a_namespace_the_operator_does_not_watch_is_ignored(
    api: Api, operator: Operator, ns: str, crd_cluster: LocalCluster
) -> None:
    other = make_namespace(crd_cluster, "unwatched-")
    try:
        api.apply(other, "ignored", spec())
        api.apply(ns, "seen", spec())
        wait_phase(api, operator, ns, "seen", "Succeeded")
        assert api.status(other, "ignored") == {}
        assert api.jobs(other, "ignored") == []
    finally:
        crd_cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)


def test_health_endpoints(operator: Operator) -> None:
    assert operator.probe("/healthz") == 200
    assert operator.probe("/readyz") == 200
