"""Fixtures for the operator's e2e tests: the CRD on the local control plane, one operator per test module,
a kto-* namespace per test."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from e2e_support import Api, Operator, make_namespace
from kubetune_dev.cluster import LocalCluster


@pytest.fixture(scope="session")
def api(crd_cluster: LocalCluster) -> Api:
    return Api(crd_cluster)


@pytest.fixture(scope="module")
def operator(crd_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """One operator for a test module, watching the kto-* namespaces."""
    op = Operator(crd_cluster, tmp_path_factory.mktemp("operator"), ["kto-*"]).start()
    yield op
    summary = op.stop()
    print(f"\noperator summary: {json.dumps(summary)}")


@pytest.fixture
def ns(crd_cluster: LocalCluster, operator: Operator) -> Iterator[str]:
    name = make_namespace(crd_cluster, "kto-")
    yield name
    crd_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
