"""Fixtures for full local runs: the real operator runs the real trainer on the session's two real nodes (kubelet +
containerd + runc, the trainer image built from this checkout).

One operator and one namespace per test module; the namespace's claims are hostPath volumes, filled here as a
cluster admin would fill a volume: a tiny random-initialised Llama with its tokenizer, and datasets. The operator
runs as a host process (its log at hand for failures; it reaches rank 0 by pod IP); `make demo` runs it in-cluster.
The helpers of the operator, trainer and chart tiers are reused.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubetune_dev.cluster import LocalCluster
from kubetune_dev.realnodes import RealNodes, readable_by_pods

TESTS = Path(__file__).resolve().parents[1]
# Not packages: their directories go on the path as pytest puts them there for their own tests.
for helpers in ("operator", "trainer", "chart"):
    if str(TESTS / helpers) not in sys.path:
        sys.path.insert(0, str(TESTS / helpers))

import trainer_assets  # noqa: E402
from e2e_support import Api, Operator  # noqa: E402

CLAIMS = ("models", "datasets", "ft-checkpoints", "ft-models")
MODEL = "tiny-llama"  # the test jobs' pvc://models/tiny-llama


@pytest.fixture(scope="session")
def api(crd_cluster: LocalCluster) -> Api:
    return Api(crd_cluster)


@pytest.fixture(scope="module")
def ns(crd_cluster: LocalCluster, real_nodes: RealNodes) -> Iterator[str]:
    """A namespace with the four claims; the model claim holds the tiny model, the dataset claim good rows."""
    name = f"ktl-{uuid.uuid4().hex[:8]}"
    real_nodes.create_claims(name, CLAIMS)
    trainer_assets.make_model_dir(real_nodes.claim_dir(name, "models") / MODEL, "llama")
    rows = trainer_assets.rows(160, "prompt_completion")
    trainer_assets.write_jsonl(real_nodes.claim_dir(name, "datasets") / "train.jsonl", rows)
    readable_by_pods(real_nodes.claim_dir(name, "models"))
    yield name
    crd_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
    real_nodes.delete_claims(name)


@pytest.fixture(scope="module")
def operator(
    crd_cluster: LocalCluster, real_nodes: RealNodes, ns: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    """The operator for the module's namespace, its workers running this checkout's trainer image."""
    op = Operator(crd_cluster, tmp_path_factory.mktemp("operator"), [ns], settings=real_nodes.operator_settings())
    op.start()
    yield op
    op.stop()
