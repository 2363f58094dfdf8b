"""Fixtures for the kubectl-finetune tests: the CRD on the local cluster and the real executable.

The node agent's fixtures are imported so that `logs` reads the output of real processes through the API
server, as it would a kubelet's.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from kubetune_dev.cluster import LocalCluster
from kubetune_dev.nodeagent.testing import local_nodes, node_agent
from kubetune_operator.api import CRD_NAME

__all__ = ["cli", "crd", "local_nodes", "node_agent"]

REPO = Path(__file__).resolve().parents[2]
# The console script pip installed from pyproject.toml: exactly what `kubectl finetune` runs.
EXECUTABLE = Path(sys.executable).with_name("kubectl-finetune")

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def crd(cluster: LocalCluster) -> LocalCluster:
    """The cluster with the committed FineTuneJob CRD installed and served."""
    crd_file = REPO / "crds" / f"{CRD_NAME}.yaml"
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=kubetune-cli-tests", "-f", str(crd_file)
    )
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
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
