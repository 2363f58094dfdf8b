"""Fixtures for the kubectl-finetune tests: the CRD on the local cluster and the real executable."""

from __future__ import annotations

import subprocess

import pytest
from cli_helpers import EXECUTABLE, Cli
from kubetune_dev.cluster import LocalCluster


@pytest.fixture
def cli(crd_cluster: LocalCluster) -> Cli:
    """Run kubectl-finetune against the local cluster (KUBECONFIG set, as a user's shell has it)."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(EXECUTABLE), *args],
            env={**crd_cluster.env(), **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run
