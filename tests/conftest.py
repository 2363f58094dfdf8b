"""Shared pytest wiring: test tiers, the local control plane, real nodes, and the rule that nothing is skipped.

Tiers (markers): unit (pure, fast), trainer (real torch on CPU), e2e (a real kube-apiserver), slow.
The `cluster` fixture starts one local control plane per session, or reuses the one whose state
directory KUBETUNE_TEST_CLUSTER names (started with `make cluster-up`).

`real_nodes` (session) adds two real nodes to that cluster: kubelet v1.34 + containerd + runc, pod networking,
cluster DNS, running this checkout's images (`make images`, built on first use; cached by content). Its interface
(kubetune_dev.realnodes.RealNodes) for tests that need real pods:

    real_nodes.placement                      # pod spec fields for any real node (nodeSelector + toleration);
    real_nodes.nodes[i].placement             #   or for one node (real-node-0, real-node-1)
    real_nodes.image("trainer")               # this checkout's images: "trainer", "operator"
    real_nodes.create_claims(ns, ["data"])    # namespace + RWX claims on hostPath volumes, roots owned by uid 1000
    real_nodes.claim_dir(ns, "data")          # the host directory behind a claim (read and write it directly)
    real_nodes.kill(ns, pod, "trainer")       # SIGKILL (or sig=) every process of a container, as a crash would
    real_nodes.container_pids(ns, pod, "trainer")
    real_nodes.pod_logs(ns, pod)              # `kubectl logs`
    real_nodes.operator_settings()            # settings for an operator whose workers run the trainer image
    real_nodes.install_operator([ns])         # the operator from its image as a pod, installed with the chart

The operator for such tests runs either as a host process (tests/operator/e2e_support.Operator with
settings=real_nodes.operator_settings(); it reaches pods by their IPs) or in-cluster (install_operator).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubetune_dev import realnodes
from kubetune_dev.cluster import LocalCluster, running_cluster, stop_processes
from kubetune_dev.images import ensure_images
from kubetune_dev.realnodes import RealNodes
from kubetune_operator.api import CRD_NAME

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Every test belongs to a tier; a test without an explicit one is a unit test.
    tiers = {"unit", "trainer", "e2e"}
    for item in items:
        if not tiers & {m.name for m in item.iter_markers()}:
            item.add_marker(pytest.mark.unit)


def pytest_collection_finish(session: pytest.Session) -> None:
    # The images the real nodes run, built (or found) before any test starts: a cold build takes longer than the
    # per-test timeout would allow the first test using them.
    if any("real_nodes" in getattr(item, "fixturenames", ()) for item in session.items):
        ensure_images(pause=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A skipped test proves nothing. Only tests that need a GPU may skip on a machine without one.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    bad = [r for r in reporter.stats.get("skipped", []) if "gpu" not in getattr(r, "keywords", {})]
    if bad and session.exitstatus == 0:
        reporter.write_line(f"FAILED: {len(bad)} test(s) skipped without needing a GPU:", red=True)
        for r in bad:
            reporter.write_line(f"  {r.nodeid}: {r.longrepr[-1] if isinstance(r.longrepr, tuple) else r.longrepr}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _reap_abandoned_test_clusters() -> None:
    """Stop clusters left by test sessions that died without tearing down (their pid is gone), their real nodes
    first; then clean the host state of real nodes whose processes all died (any checkout's)."""
    for state in (REPO / ".cache").glob("test-cluster-*"):
        owner = int(state.name.rsplit("-", 1)[1])
        if not Path(f"/proc/{owner}").exists():
            realnodes.stop_for_cluster(state)
            stop_processes(state)
            shutil.rmtree(state, ignore_errors=True)
    realnodes.reap()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    given = os.environ.get("KUBETUNE_TEST_CLUSTER")
    if given:
        existing = running_cluster(Path(given))
        if existing is None:
            raise RuntimeError(f"KUBETUNE_TEST_CLUSTER={given} names no running cluster (make cluster-up?)")
        yield existing
        return
    _reap_abandoned_test_clusters()
    c = LocalCluster(state_dir=REPO / ".cache" / f"test-cluster-{os.getpid()}").start()
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def real_nodes(crd_cluster: LocalCluster) -> Iterator[RealNodes]:
    """Two real nodes in the session's cluster (see the module docstring). The first use in a session takes about
    a minute (the nodes pull the images), more when `make images` has something to build."""
    nodes = RealNodes(crd_cluster)
    try:
        yield nodes.start()
    finally:
        nodes.stop()


@pytest.fixture(scope="session")
def crd_cluster(cluster: LocalCluster) -> LocalCluster:
    """The cluster with the committed FineTuneJob CRD installed and served."""
    crd_file = REPO / "crds" / f"{CRD_NAME}.yaml"
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=kubetune-tests", "-f", str(crd_file)
    )
    cluster.wait_established(CRD_NAME)
    return cluster


@pytest.fixture
def namespace(cluster: LocalCluster) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("wait", "--for=create", "serviceaccount/default", "-n", name, "--timeout=60s")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
