"""Helpers for the chart's e2e tests: a release installed with helm, the operator run from what the release
rendered (its settings ConfigMap, its ServiceAccount's token), and requests judged by the RBAC authorizer."""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chart_support import CHART, helm
from e2e_support import Api, Operator, free_port, wait_for
from kubetune_dev.cluster import LocalCluster
from kubetune_operator.api import CRD_NAME

TIMEOUT = 60


@dataclass
class Release:
    name: str
    namespace: str
    notes: str
    token_kubeconfig: Path

    @property
    def fullname(self) -> str:
        return f"{self.name}-kubetune"

    @property
    def service_account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.fullname}"


def release_names(prefix: str) -> tuple[str, str]:
    """A unique (release, namespace): cluster-scoped objects are named after the release."""
    suffix = uuid.uuid4().hex[:6]
    return f"{prefix}-{suffix}", f"{prefix}-sys-{suffix}"


def install(cluster: LocalCluster, tmp: Path, name: str, namespace: str, *values: str) -> Release:
    """helm install into a new namespace, then a token of the chart's ServiceAccount in a kubeconfig of its own."""
    cluster.kubectl("create", "namespace", namespace)
    result = helm("install", name, str(CHART), "--namespace", namespace, *values, kubeconfig=cluster.kubeconfig)
    release = Release(name, namespace, result.stdout, tmp / f"{name}.kubeconfig")
    token = cluster.kubectl("create", "token", release.fullname, "-n", namespace, "--duration=2h").stdout.strip()
    cluster.token_kubeconfig(token, release.token_kubeconfig)
    return release


def uninstall(cluster: LocalCluster, release: Release) -> str:
    out = helm("uninstall", release.name, "--namespace", release.namespace, kubeconfig=cluster.kubeconfig)
    return out.stdout + out.stderr


def adopt_crd_if_present(cluster: LocalCluster, name: str, namespace: str) -> None:
    """Other suites apply the CRD with kubectl. Helm takes over an existing object only when it carries the
    release's ownership metadata (charts/kubetune/README.md, "The CRD is already installed")."""
    if cluster.kubectl("get", "crd", CRD_NAME, check=False).returncode != 0:
        return
    cluster.kubectl("label", "crd", CRD_NAME, "app.kubernetes.io/managed-by=Helm", "--overwrite")
    cluster.kubectl(
        "annotate",
        "crd",
        CRD_NAME,
        f"meta.helm.sh/release-name={name}",
        f"meta.helm.sh/release-namespace={namespace}",
        "--overwrite",
    )


class TokenCluster:
    """The cluster as the operator's pod sees it: a kubeconfig holding nothing but the ServiceAccount's token. The
    ports come from the environment only because this machine is shared (in the pod they are the chart's)."""

    def __init__(self, kubeconfig: Path, health_port: int) -> None:
        self.kubeconfig = kubeconfig
        self.health_port = health_port

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KUBETUNE_HEALTH_PORT": str(self.health_port),
            "KUBETUNE_METRICS_PORT": str(free_port()),
        }


def chart_operator(cluster: LocalCluster, release: Release, workdir: Path) -> Operator:
    """The operator as the chart's Deployment runs it: no flags, the settings file from the release's ConfigMap
    (watched namespaces included), and only the ServiceAccount's credentials."""
    settings = cluster.kubectl(
        "get",
        "configmap",
        f"{release.fullname}-settings",
        "-n",
        release.namespace,
        "-o",
        "jsonpath={.data.settings\\.yaml}",
    ).stdout
    op = Operator(cluster, workdir, namespaces=[], name=release.name)
    op.settings_path = workdir / f"{release.name}-settings-from-chart.yaml"
    op.settings_path.write_text(settings)
    op.cluster = TokenCluster(release.token_kubeconfig, op.health_port)  # type: ignore[assignment]
    return op


def can_i(cluster: LocalCluster, release: Release, *args: str) -> bool:
    """`kubectl auth can-i ... --as=<the ServiceAccount>`."""
    out = cluster.kubectl("auth", "can-i", *args, f"--as={release.service_account}", check=False)
    assert out.stdout.strip() in ("yes", "no"), out.stderr
    return out.stdout.strip() == "yes"


def as_operator(cluster: LocalCluster, release: Release, *args: str) -> Any:
    """A real request with the ServiceAccount's token."""
    return cluster.kubectl(*args, kubeconfig=release.token_kubeconfig, check=False)


def forbidden(result: Any) -> bool:
    return bool(result.returncode != 0 and "forbidden" in result.stderr.lower())


def wait_phase(api: Api, op: Operator, ns: str, name: str, phase: str) -> dict[str, Any]:
    def reached() -> dict[str, Any]:
        status = api.status(ns, name)
        return status if status.get("phase") == phase else {}

    status: dict[str, Any] = wait_for(reached, TIMEOUT, f"{name} {phase}", op.tail)
    return status


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def assert_no_rbac_errors(op: Operator) -> None:
    """No request of the operator was refused by the RBAC authorizer ("... is forbidden: User ... cannot ..."), and
    kopf never fell back for want of a permission ("Not enough permissions to list namespaces ...")."""
    log = op.log_path.read_text(errors="replace")
    denials = re.findall(r"forbidden: User \S+ cannot [^\n]*|Not enough permissions [^\n]*", log)
    assert denials == [], "\n".join(denials)


def capture(obj: dict[str, Any], name: str) -> None:
    """With KUBETUNE_CAPTURE_HEALTH_FIXTURES=<dir>, keep a FineTuneJob seen by an e2e test as a fixture for the
    health-check tests (tests/chart/testdata/health/)."""
    target = os.environ.get("KUBETUNE_CAPTURE_HEALTH_FIXTURES")
    if target:
        kept = {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k != "managedFields"}}
        Path(target).mkdir(parents=True, exist_ok=True)
        (Path(target) / f"{name}.json").write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n")
