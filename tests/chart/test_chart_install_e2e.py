"""The chart installed into the local control plane (RBAC authorizer on), in cluster mode: the operator runs as a
local process with ONLY the chart's ServiceAccount token and the settings file the chart rendered, and drives
FineTuneJobs on kwok GPU nodes through their phases. That proves the chart's RBAC is enough; the denial tests
prove it is not more than it should be. `helm uninstall` then leaves the CRD, the jobs and their volumes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from chart_e2e import (
    TIMEOUT,
    Release,
    adopt_crd_if_present,
    as_operator,
    assert_no_rbac_errors,
    can_i,
    capture,
    chart_operator,
    condition,
    forbidden,
    install,
    release_names,
    uninstall,
    wait_phase,
)
from chart_support import CHART, argocd_health, helm
from e2e_support import Api, Operator, hanging, make_namespace, spec, wait_for
from kubetune_dev.cluster import LocalCluster
from kubetune_operator.api import CRD_NAME
from kubetune_operator.settings import OperatorSettings

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def release(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Release:
    name, namespace = release_names("kch")
    adopt_crd_if_present(cluster, name, namespace)
    release = install(cluster, tmp_path_factory.mktemp("chart-cluster-mode"), name, namespace)
    cluster.wait_established(CRD_NAME)
    return release


@pytest.fixture(scope="module")
def operator(cluster: LocalCluster, release: Release, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    op = chart_operator(cluster, release, tmp_path_factory.mktemp("chart-operator")).start()
    yield op
    op.stop()


@pytest.fixture(scope="module")
def api(cluster: LocalCluster) -> Api:
    return Api(cluster)


@pytest.fixture(scope="module")
def ns(cluster: LocalCluster, operator: Operator) -> Iterator[str]:
    name = make_namespace(cluster, "kch-")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def health(api: Api, ns: str, name: str, fixture: str) -> tuple[str, str]:
    obj: dict[str, Any] = api.ftj(ns, name)
    capture(obj, fixture)
    return argocd_health(obj)


def test_install_prints_what_to_do_next(release: Release) -> None:
    assert f"kubectl -n {release.namespace} rollout status deployment/{release.fullname}" in release.notes
    assert "kubectl finetune watch" in release.notes
    assert "grafana_dashboard" in release.notes
    assert "every namespace (cluster mode)" in release.notes


def test_a_job_succeeds_with_only_the_charts_service_account(api: Api, operator: Operator, ns: str) -> None:
    # A checkpoint claim from a template, so the operator creates a PVC too.
    claim = {"spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}
    checkpoint = {"claimName": None, "volumeClaimTemplate": claim}
    api.apply(ns, "chart-lora", spec(checkpoint=checkpoint, output={"claimName": "ft-models"}))
    status = wait_phase(api, operator, ns, "chart-lora", "Succeeded")
    assert api.core.read_namespaced_persistent_volume_claim("chart-lora-checkpoints", ns)
    assert condition(status, "Ready")["status"] == "True"
    assert status["observedGeneration"] == 1
    assert health(api, ns, "chart-lora", "succeeded") == ("Healthy", "run 1 succeeded")
    # Events go out in the background, after the transition: the chart lets the operator create them.
    wait_for(lambda: api.events(ns, "chart-lora"), 10, "events for chart-lora")
    assert_no_rbac_errors(operator)


def test_argocd_health_follows_a_job_through_its_phases(api: Api, operator: Operator, ns: str) -> None:
    # No node has this GPU: the workers stay Pending (Unschedulable), and so does the job.
    api.apply(ns, "chart-wait", spec(resources={"gpuProduct": "NVIDIA-B200"}))
    unschedulable = lambda: "Unschedulable" in condition(api.status(ns, "chart-wait"), "Reconciling")["message"]  # noqa: E731
    wait_for(lambda: api.status(ns, "chart-wait").get("conditions") and unschedulable(), TIMEOUT, "unschedulable")
    status, message = health(api, ns, "chart-wait", "pending")
    assert (status, message) == ("Progressing", condition(api.status(ns, "chart-wait"), "Reconciling")["message"])
    api.delete_ftj(ns, "chart-wait")

    api.apply(ns, "chart-run", hanging(runPolicy={"maxRestarts": 0}))
    wait_phase(api, operator, ns, "chart-run", "Running")
    assert health(api, ns, "chart-run", "running") == ("Progressing", "all 2 workers running")

    api.patch_spec(ns, "chart-run", {"runPolicy": {"suspend": True}})
    wait_phase(api, operator, ns, "chart-run", "Suspended")
    settled = lambda: condition(api.status(ns, "chart-run"), "Reconciling")["status"] == "False"  # noqa: E731
    wait_for(settled, TIMEOUT, "the workers to stop", operator.tail)
    assert health(api, ns, "chart-run", "suspended")[0] == "Suspended"

    oom = {
        "kwok.kubetune.io/outcome": "fail",
        "kwok.kubetune.io/exit-code": "137",
        "kwok.kubetune.io/reason": "OOMKilled",
    }
    api.apply(ns, "chart-oom", spec(resources={"podAnnotations": oom}, runPolicy={"maxRestarts": 0}))
    status = wait_phase(api, operator, ns, "chart-oom", "Failed")
    assert health(api, ns, "chart-oom", "failed") == ("Degraded", condition(status, "Failed")["message"])

    # A spec change the operator has not acted on yet: health must not report the previous run's result.
    operator.stop()
    try:
        api.patch_spec(ns, "chart-lora", {"training": {"learningRate": 1e-4}})
        assert health(api, ns, "chart-lora", "generation-not-observed")[0] == "Progressing"
    finally:
        operator.start()
    wait_for(lambda: api.status(ns, "chart-lora").get("run") == 2, TIMEOUT, "run 2 of chart-lora", operator.tail)
    assert_no_rbac_errors(operator)


def test_upgrade_changes_the_settings_and_rolls_the_operator(cluster: LocalCluster, release: Release) -> None:
    def current() -> tuple[dict[str, Any], str]:
        get = ("-n", release.namespace, "-o", "json")
        settings = json.loads(cluster.kubectl("get", "configmap", f"{release.fullname}-settings", *get).stdout)
        deployment = json.loads(cluster.kubectl("get", "deployment", release.fullname, *get).stdout)
        checksum = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/settings"]
        return yaml.safe_load(settings["data"]["settings.yaml"]), checksum

    before, checksum = current()
    assert OperatorSettings.model_validate(before).pricing.default_usd_per_gpu_hour != 2.5
    helm(
        "upgrade",
        release.name,
        str(CHART),
        "--namespace",
        release.namespace,
        "--reuse-values",
        "--set",
        "settings.pricing.defaultUsdPerGpuHour=2.5",
        kubeconfig=cluster.kubeconfig,
    )
    after, new_checksum = current()
    assert OperatorSettings.model_validate(after).pricing.default_usd_per_gpu_hour == 2.5
    assert new_checksum != checksum
    crd = json.loads(cluster.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == release.name
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_the_service_account_is_denied_what_it_should_not_have(
    cluster: LocalCluster, release: Release, api: Api, ns: str
) -> None:
    # What the operator needs, it has...
    assert can_i(cluster, release, "create", "jobs.batch", "-n", ns)
    assert can_i(cluster, release, "patch", "finetunejobs.kubetune.io", "--subresource=status", "-n", ns)
    assert can_i(cluster, release, "list", "nodes")
    # ...and nothing more.
    assert not can_i(cluster, release, "get", "secrets", "--all-namespaces")
    assert not can_i(cluster, release, "list", "secrets", "-n", ns)
    assert not can_i(cluster, release, "get", "secrets", "-n", release.namespace)
    assert not can_i(cluster, release, "delete", "persistentvolumeclaims", "-n", ns)
    assert not can_i(cluster, release, "update", "finetunejobs.kubetune.io", "-n", ns)
    assert not can_i(cluster, release, "delete", "finetunejobs.kubetune.io", "-n", ns)
    assert not can_i(cluster, release, "create", "pods", "-n", ns)
    assert not can_i(cluster, release, "create", "clusterrolebindings")
    assert not can_i(cluster, release, "patch", "nodes")

    # Real requests with the token, judged by the RBAC authorizer.
    assert forbidden(as_operator(cluster, release, "get", "secrets", "--all-namespaces"))
    assert forbidden(as_operator(cluster, release, "delete", "pvc", "ft-checkpoints", "-n", ns, "--wait=false"))
    assert api.core.read_namespaced_persistent_volume_claim("ft-checkpoints", ns).metadata.deletion_timestamp is None
    allowed = as_operator(cluster, release, "get", "jobs.batch", "-n", ns)
    assert allowed.returncode == 0, allowed.stderr


def test_uninstall_keeps_the_crd_the_jobs_and_their_volumes(
    cluster: LocalCluster, release: Release, operator: Operator, api: Api, ns: str
) -> None:
    operator.stop()
    out = uninstall(cluster, release)
    assert "kept due to the resource policy" in out
    assert cluster.kubectl("get", "crd", CRD_NAME, check=False).returncode == 0
    assert api.ftj(ns, "chart-lora")["status"]["runs"][0]["result"] == "Succeeded"
    for claim in ("ft-models", "chart-lora-checkpoints"):
        assert api.core.read_namespaced_persistent_volume_claim(claim, ns).metadata.deletion_timestamp is None
    for kind in ("clusterrole", "clusterrolebinding"):
        gone = cluster.kubectl("get", kind, release.fullname, check=False)
        assert gone.returncode != 0 and "NotFound" in gone.stderr

    # The ServiceAccount went with the release, and its token with it: Unauthorized once the API server's cache
    # of authenticated tokens (10 s) forgets it, Forbidden until then (the bindings are gone).
    def token_rejected() -> bool:
        result = as_operator(cluster, release, "get", "finetunejobs", "-n", ns)
        assert result.returncode != 0, result.stdout
        return "Unauthorized" in result.stderr

    wait_for(token_rejected, 30, "the token to be rejected")
