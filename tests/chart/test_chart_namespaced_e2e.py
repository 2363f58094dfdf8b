"""The chart in namespaced mode (watchNamespaces: [a, b]; the CRD managed outside the release): the operator,
with only the chart's ServiceAccount token and rendered settings, runs jobs in the listed namespaces, ignores
every other namespace, and cannot read or touch anything there."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from chart_e2e import (
    Release,
    as_operator,
    assert_no_rbac_errors,
    can_i,
    chart_operator,
    forbidden,
    install,
    release_names,
    uninstall,
    wait_phase,
)
from chart_support import REPO
from e2e_support import Api, Operator, make_namespace, spec
from kubetune_dev.cluster import LocalCluster
from kubetune_operator.api import CRD_NAME

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def namespaces(cluster: LocalCluster) -> Iterator[tuple[str, str, str]]:
    """Two watched namespaces and one that is not, each with the claims the test jobs use."""
    created = tuple(make_namespace(cluster, prefix) for prefix in ("kcn-a-", "kcn-b-", "kcn-other-"))
    yield created  # type: ignore[misc]
    for name in created:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def release(
    cluster: LocalCluster, namespaces: tuple[str, str, str], tmp_path_factory: pytest.TempPathFactory
) -> Release:
    # The CRD comes from the repository's crds/, as `kubectl apply --server-side` installs it (crds.install=false).
    crd = REPO / "crds" / f"{CRD_NAME}.yaml"
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=kubetune-chart-tests", "-f", str(crd)
    )
    cluster.wait_established(CRD_NAME)
    a, b, _ = namespaces
    name, namespace = release_names("kcn")
    tmp = tmp_path_factory.mktemp("chart-namespaced-mode")
    return install(
        cluster, tmp, name, namespace, "--set", "crds.install=false", "--set", f"watchNamespaces={{{a},{b}}}"
    )


@pytest.fixture(scope="module")
def operator(cluster: LocalCluster, release: Release, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    op = chart_operator(cluster, release, tmp_path_factory.mktemp("chart-operator-namespaced")).start()
    yield op
    op.stop()


@pytest.fixture(scope="module")
def api(cluster: LocalCluster) -> Api:
    return Api(cluster)


def test_rbac_objects_exist_only_in_the_watched_namespaces(
    cluster: LocalCluster, release: Release, namespaces: tuple[str, str, str]
) -> None:
    a, b, other = namespaces
    for ns in (a, b):
        cluster.kubectl("get", "role", release.fullname, "-n", ns)
        cluster.kubectl("get", "rolebinding", release.fullname, "-n", ns)
    assert cluster.kubectl("get", "role", release.fullname, "-n", other, check=False).returncode != 0
    # No cluster-wide rights on workloads; only the cluster-scoped reads.
    assert cluster.kubectl("get", "clusterrole", release.fullname, check=False).returncode != 0
    cluster.kubectl("get", "clusterrole", f"{release.fullname}-cluster-reads")
    assert f"The operator watches FineTuneJobs in: {a}, {b} (namespaced mode)." in release.notes


def test_jobs_run_in_the_watched_namespaces_and_nowhere_else(
    api: Api, operator: Operator, namespaces: tuple[str, str, str]
) -> None:
    a, b, other = namespaces
    for ns in (a, b, other):
        api.apply(ns, "scoped", spec())
    for ns in (a, b):
        wait_phase(api, operator, ns, "scoped", "Succeeded")
    time.sleep(2)  # the operator had every chance to see the third one: it reconciled the other two meanwhile
    assert api.status(other, "scoped") == {}
    assert api.jobs(other, "scoped") == []
    assert_no_rbac_errors(operator)


def test_the_service_account_cannot_touch_other_namespaces(
    cluster: LocalCluster, release: Release, namespaces: tuple[str, str, str]
) -> None:
    a, _, other = namespaces
    assert can_i(cluster, release, "create", "jobs.batch", "-n", a)
    assert can_i(cluster, release, "patch", "finetunejobs.kubetune.io", "--subresource=status", "-n", a)
    for verb, resource in (
        ("list", "finetunejobs.kubetune.io"),
        ("create", "jobs.batch"),
        ("create", "configmaps"),
        ("delete", "services"),
        ("list", "pods"),
    ):
        assert not can_i(cluster, release, verb, resource, "-n", other), (verb, resource)
    assert not can_i(cluster, release, "list", "finetunejobs.kubetune.io", "--all-namespaces")
    assert not can_i(cluster, release, "list", "secrets", "-n", a)
    # cluster-wide it reads node labels (prices) only: kopf's scanning is off, so no namespace or CRD reads
    assert can_i(cluster, release, "watch", "nodes")
    assert not can_i(cluster, release, "list", "namespaces")
    assert not can_i(cluster, release, "watch", "customresourcedefinitions.apiextensions.k8s.io")
    assert not can_i(cluster, release, "delete", "persistentvolumeclaims", "-n", a)

    assert forbidden(as_operator(cluster, release, "get", "finetunejobs", "-n", other))
    assert forbidden(as_operator(cluster, release, "create", "configmap", "intruder", "-n", other))
    assert forbidden(as_operator(cluster, release, "get", "finetunejobs", "--all-namespaces"))
    assert forbidden(as_operator(cluster, release, "get", "secrets", "-n", a))
    assert forbidden(as_operator(cluster, release, "delete", "pvc", "ft-checkpoints", "-n", a, "--wait=false"))


def test_uninstall_removes_the_roles_and_keeps_the_jobs(
    cluster: LocalCluster, release: Release, operator: Operator, api: Api, namespaces: tuple[str, str, str]
) -> None:
    a, b, _ = namespaces
    operator.stop()
    uninstall(cluster, release)
    for ns in (a, b):
        assert cluster.kubectl("get", "role", release.fullname, "-n", ns, check=False).returncode != 0
        assert api.status(ns, "scoped")["phase"] == "Succeeded"
        assert api.core.read_namespaced_persistent_volume_claim("ft-checkpoints", ns)
