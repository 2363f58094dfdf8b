"""Every object the chart renders, with the default values and with every option set (namespaced and cluster
mode), is accepted by the real API server: server-side apply in dry-run mode, strict field validation, the
monitoring objects checked against the Prometheus Operator's own CRDs. The operator pod passes the Pod
Security "restricted" profile as the API server enforces it."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_support import FULL_VALUES, Manifest, one, render
from kubetune_dev.cluster import LocalCluster

pytestmark = pytest.mark.e2e


def create_namespace(cluster: LocalCluster, prefix: str, labels: dict[str, str] | None = None) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(ns))
    return name


def dry_run(cluster: LocalCluster, docs: list[Manifest], tmp: Path) -> str:
    path = tmp / f"rendered-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    result = cluster.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--force-conflicts",
        "--field-manager=kubetune-chart-dry-run",
        "--validate=strict",
        "-f",
        str(path),
        check=False,
    )
    assert result.returncode == 0, f"the API server rejected the chart's objects:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def namespaces(cluster: LocalCluster) -> dict[str, str]:
    """Where a release goes, two namespaces it watches, and Grafana's; made once for the module."""
    made = {key: create_namespace(cluster, f"kcs-{key}") for key in ("release", "team-a", "team-b", "grafana")}
    yield made  # type: ignore[misc]
    for name in made.values():
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def full_values_in(namespaces: dict[str, str], *, cluster_mode: bool) -> dict[str, Any]:
    """full-values.yaml's namespaces replaced with this test's."""
    watched = [namespaces["team-a"], namespaces["team-b"]]
    return {
        "watchNamespaces": [] if cluster_mode else watched,
        "grafana": {"dashboards": {"namespace": namespaces["grafana"]}},
        "networkPolicy": {"trainerNamespaces": watched},
    }


@pytest.mark.parametrize("scenario", ["defaults", "every option, namespaced mode", "every option, cluster mode"])
def test_every_rendered_object_is_accepted_by_the_api_server(
    monitoring_crds: LocalCluster, namespaces: dict[str, str], tmp_path: Path, scenario: str
) -> None:
    cluster = monitoring_crds
    values: list[Path | dict[str, Any]] = []
    if scenario != "defaults":
        values = [FULL_VALUES, full_values_in(namespaces, cluster_mode="cluster mode" in scenario)]
    docs = render(values, tmp=tmp_path, release=f"kcs-{uuid.uuid4().hex[:6]}", namespace=namespaces["release"])
    out = dry_run(cluster, docs, tmp_path)
    accepted = [line for line in out.splitlines() if line.endswith("(server dry run)")]
    assert len(accepted) == len(docs), out
    kinds = {d["kind"] for d in docs}
    if scenario != "defaults":
        assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "NetworkPolicy"} <= kinds


def test_the_operator_pod_passes_the_restricted_pod_security_profile(
    cluster: LocalCluster, namespaces: dict[str, str], tmp_path: Path
) -> None:
    """The Deployment's pod template as a Pod, in a namespace that enforces "restricted": admitted. The same pod
    without the container's security context: rejected, so the check is live."""
    restricted = create_namespace(cluster, "kcs-restricted", {"pod-security.kubernetes.io/enforce": "restricted"})
    cluster.kubectl("wait", "--for=create", "serviceaccount/default", "-n", restricted, "--timeout=60s")
    try:
        for values in ([], [FULL_VALUES, full_values_in(namespaces, cluster_mode=False)]):
            template = one(render(values, tmp=tmp_path, namespace=restricted), "Deployment")["spec"]["template"]
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "kubetune-operator",
                    "namespace": restricted,
                    "labels": template["metadata"]["labels"],
                },
                "spec": {**template["spec"], "serviceAccountName": "default"},
            }
            ok = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False)
            assert ok.returncode == 0, ok.stderr
            assert "would violate" not in ok.stderr

            weakened = copy.deepcopy(pod)
            del weakened["spec"]["containers"][0]["securityContext"]
            bad = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(weakened), check=False)
            assert bad.returncode != 0 and 'violates PodSecurity "restricted' in bad.stderr, bad.stderr
    finally:
        cluster.kubectl("delete", "namespace", restricted, "--wait=false", check=False)
