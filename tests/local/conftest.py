"""Fixtures for full local runs: the real operator runs the real trainer through the session's two node agents.

One operator and one namespace per test module; the namespace's claims are directories of the agents' root,
filled here as a cluster admin would fill a volume: a tiny random-initialised Llama with its tokenizer, and
datasets. The helpers of the operator and trainer tiers are reused.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubetune_dev.cluster import LocalCluster, free_port
from kubetune_dev.nodeagent.testing import LocalNode

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
def ns(crd_cluster: LocalCluster, local_nodes: list[LocalNode]) -> Iterator[str]:
    """A namespace with the four claims; the model claim holds the tiny model, the dataset claim good rows."""
    name = f"ktl-{uuid.uuid4().hex[:8]}"
    crd_cluster.create_namespace_with_claims(name, CLAIMS)
    node = local_nodes[0]
    trainer_assets.make_model_dir(node.claim_dir(name, "models") / MODEL, "llama")
    rows = trainer_assets.rows(160, "prompt_completion")
    trainer_assets.write_jsonl(node.claim_dir(name, "datasets") / "train.jsonl", rows)
    yield name
    crd_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def operator(crd_cluster: LocalCluster, ns: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """The operator for the module's namespace. Free rendezvous and metrics ports: other sessions on this machine
    may train at the same time, and pods of different agent roots can get the same loopback address."""
    op = Operator(crd_cluster, tmp_path_factory.mktemp("operator"), [ns])
    settings = yaml.safe_load(op.settings_path.read_text())
    settings.update(masterPort=free_port(), trainerMetricsPort=free_port())
    op.settings_path.write_text(yaml.safe_dump(settings))
    op.start()
    yield op
    op.stop()
