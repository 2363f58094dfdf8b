"""The operator under the failures it must survive: SIGKILL while creating children, and a second replica
racing the first. Each test runs its own operators on its own namespace pattern."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import Api, Operator, make_namespace, spec, wait_for
from kubetune_dev.cluster import LocalCluster

pytestmark = pytest.mark.e2e

TIMEOUT = 120


@pytest.fixture
def cleanup(crd_cluster: LocalCluster) -> Iterator[list[Any]]:
    """Operators and namespaces to stop and delete after the test, whatever happens."""
    things: list[Any] = []
    yield things
    for thing in things:
        if isinstance(thing, Operator):
            print(f"{thing.log_path.name} summary: {json.dumps(thing.stop())}")
        else:
            crd_cluster.kubectl("delete", "namespace", thing, "--wait=false", check=False)


def terminal(api: Api, ns: str, names: list[str]) -> dict[str, dict]:
    statuses = {n: api.status(ns, n) for n in names}
    return statuses if all(s.get("phase") in ("Succeeded", "Failed") for s in statuses.values()) else {}


def test_sigkill_while_creating_children_then_restart_duplicates_nothing(
    api: Api, crd_cluster: LocalCluster, tmp_path: Path, cleanup: list[Any]
) -> None:
    ns = make_namespace(crd_cluster, "ktk-")
    cleanup.append(ns)
    names = [f"job-{i}" for i in range(12)]
    one_gpu = {"numNodes": 1, "gpusPerNode": 1, "podAnnotations": {"kwok.kubetune.io/run-for": "2s"}}
    for name in names:
        api.apply(ns, name, spec(resources=one_gpu))
    first = Operator(crd_cluster, tmp_path, ["ktk-*"], name="killed").start(wait=False)
    cleanup.append(first)

    # The operator finds twelve new jobs at once. Kill it the moment the first rendezvous Service exists: that
    # job has its ConfigMap and Service, perhaps not its Job; the others are between nothing and everything.
    managed = "app.kubernetes.io/managed-by=kubetune-operator"
    wait_for(lambda: api.core.list_namespaced_service(ns, label_selector=managed).items, 60, "a Service", every=0.01)
    first.kill()
    before = {j.metadata.name: j.metadata.uid for j in api.batch.list_namespaced_job(ns).items}
    opened = [n for n in names if api.status(ns, n).get("attempt")]
    assert len(before) < len(names), "the operator finished before it was killed; the test proves nothing"
    print(f"killed with {len(opened)} attempts opened and {len(before)} of {len(names)} Jobs created")

    second = Operator(crd_cluster, tmp_path, ["ktk-*"], name="restarted").start()
    cleanup.append(second)
    statuses = wait_for(lambda: terminal(api, ns, names), TIMEOUT, "every job to finish", second.tail)

    jobs = api.batch.list_namespaced_job(ns).items
    assert sorted(j.metadata.name for j in jobs) == sorted(f"{n}-r1-a1" for n in names)
    for job in jobs:
        # A Job that existed before the kill is the same object: it was never deleted and re-created.
        assert before.get(job.metadata.name, job.metadata.uid) == job.metadata.uid
        assert (job.status.succeeded, job.status.failed or 0) == (1, 0)
    for name, status in statuses.items():
        assert status["phase"] == "Succeeded", name
        assert [a["reason"] for a in status["attempts"]] == ["Completed"], name
        assert len(status["runs"]) == 1, name
    assert len(api.pods(ns, managed)) == len(names)
    for kind, lister in (
        ("ConfigMap", api.core.list_namespaced_config_map),
        ("Service", api.core.list_namespaced_service),
    ):
        found = Counter(o.metadata.name for o in lister(ns, label_selector=managed).items)
        assert all(count == 1 for count in found.values()), (kind, found)


def test_two_replicas_at_once_create_nothing_twice(
    api: Api, crd_cluster: LocalCluster, tmp_path: Path, cleanup: list[Any]
) -> None:
    replicas = [Operator(crd_cluster, tmp_path, ["ktr-*"], name=f"replica-{i}").start() for i in range(2)]
    cleanup.extend(replicas)
    ns = make_namespace(crd_cluster, "ktr-")
    cleanup.append(ns)
    one_gpu = {"numNodes": 1, "gpusPerNode": 1}
    fail = {"kwok.kubetune.io/outcome": "fail", "kwok.kubetune.io/exit-code": "1"}
    succeeding = [f"ok-{i}" for i in range(4)]
    failing = [f"bad-{i}" for i in range(2)]
    for name in succeeding:
        api.apply(ns, name, spec(resources=one_gpu))
    for name in failing:
        api.apply(ns, name, spec(resources={**one_gpu, "podAnnotations": fail}, runPolicy={"maxRestarts": 1}))
    statuses = wait_for(lambda: terminal(api, ns, succeeding + failing), TIMEOUT, "every job to finish")
    time.sleep(2)  # let a slower replica act on anything it still sees, and the events be posted

    for name in succeeding:
        status = api.status(ns, name)
        assert [a["reason"] for a in status["attempts"]] == ["Completed"], name
        assert [j.metadata.name for j in api.jobs(ns, name)] == [f"{name}-r1-a1"]
    for name in failing:
        assert statuses[name]["phase"] == "Failed"
        assert [a["reason"] for a in api.status(ns, name)["attempts"]] == ["Error", "Error"], name
    # Every transition was written once, so each was announced once.
    for name in succeeding + failing:
        reasons = Counter(e.reason for e in api.events(ns, name))
        attempts = len(api.status(ns, name)["attempts"])
        assert (reasons["RunStarted"], reasons["AttemptStarted"]) == (1, attempts - 1), (name, reasons)
    summaries = [r.stop() for r in replicas]
    assert all(s["reconciles"] > 0 for s in summaries), summaries
