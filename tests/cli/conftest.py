"""Fixtures for the kubectl-finetune tests: the CRD on the local cluster and the real executable."""

from __future__ import annotations

import subprocess

import pytest
from cli_helpers import EXECUTABLE, REPO, Cli
from kubetune_dev.cluster import LocalCluster
from kubetune_operator.api import CRD_NAME


@pytest.fixture(scope="session")
def crd(cluster: LocalCluster) -> LocalCluster:
    """The cluster with the committed FineTuneJob CRD installed and served."""
    crd_file = REPO / "crds" / f"{CRD_NAME}.yaml"
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=kubetune-cli-tests", "-f", str(crd_file)
    )
    cluster.wait_established(CRD_NAME)
    return cluster


@pytest.fixture
def cli(crd: LocalCluster) -> Cli:
    """Run kubectl-finetune against the local cluster (KUBECONFIG set, as a user's shell has it)."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(EXECUTABLE), *args],
            env={**crd.env(), **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run
