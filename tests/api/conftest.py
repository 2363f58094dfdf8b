"""Fixtures for the FineTuneJob API tests: the committed CRD installed on the local control plane."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubetune_dev.cluster import LocalCluster
from kubetune_operator.api import CRD_NAME

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / f"{CRD_NAME}.yaml"


@pytest.fixture(scope="session")
def ftj_cluster(cluster: LocalCluster) -> LocalCluster:
    """The cluster with the committed FineTuneJob CRD installed and served."""
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=kubetune-api-tests", "-f", str(CRD_FILE)
    )
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    return cluster
