"""FineTuneJobs whose model and data live in S3, trained for real: the operator gives the workers the keys from a
Secret (secretKeyRef env) and the store's endpoint (trainer config), the session's two real nodes run them, and
the trainer downloads from an S3-compatible server on the host (moto, s3_server.py, on the first node's bridge
address, which pods of both nodes reach) into the job's cache on the checkpoint claim, once for both nodes."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import obstore
import pytest
import trainer_assets
from e2e_support import Api, Operator, condition, wait_phase
from kubetune_dev.cluster import LocalCluster
from kubetune_dev.realnodes import NODE_SELECTOR, NODE_TOLERATION, RealNodes
from s3_server import BUCKET, S3Server, s3_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = f"s3://{BUCKET}/models/tiny-llama"
TRAIN = f"s3://{BUCKET}/data/train.jsonl"
RUN_TIMEOUT = 300  # a job from apply to its end, on 2 busy cores


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, real_nodes: RealNodes) -> Iterator[S3Server]:
    tmp = tmp_path_factory.mktemp("s3")
    assert real_nodes.slot is not None
    with s3_server(tmp, host=real_nodes.slot.gateway(0)) as server:
        server.put_dir("models/tiny-llama", trainer_assets.make_model_dir(tmp / "model", "llama"))
        rows = trainer_assets.rows(120, "prompt_completion")
        obstore.put(server.store(), "data/train.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
        yield server


def secret(cluster: LocalCluster, ns: str, name: str, keys: dict[str, str]) -> None:
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns}, "stringData": keys}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(body))


def spec(s3: S3Server, keys: str) -> dict[str, Any]:
    """LoRA on the tiny model from the bucket, 2 nodes x 1 CPU process."""
    return {
        "model": {"source": MODEL},
        "dataset": {"source": TRAIN, "format": "prompt_completion", "maxSeqLength": 128},
        "storage": {"s3": {"endpointUrl": s3.url, "region": "us-east-1", "credentialsSecretRef": {"name": keys}}},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "training": {"maxSteps": 6, "batchSizePerDevice": 2, "precision": "fp32", "logEverySteps": 3},
        "resources": {
            "numNodes": 2,
            "gpusPerNode": 0,
            "nodeSelector": NODE_SELECTOR,
            "tolerations": [NODE_TOLERATION],
        },
        "checkpoint": {"claimName": "ft-checkpoints", "everySteps": 3},
        "output": {"claimName": "ft-models"},
        "runPolicy": {"maxRestarts": 1, "backoffSeconds": 1, "maxBackoffSeconds": 2},
    }


def test_trains_from_s3_with_keys_from_a_secret_and_one_download_for_both_nodes(
    crd_cluster: LocalCluster, api: Api, ns: str, operator: Operator, real_nodes: RealNodes, s3: S3Server
) -> None:
    secret(crd_cluster, ns, "s3-keys", s3.credentials())
    before = s3.downloads()
    name = f"s3-{uuid.uuid4().hex[:6]}"
    api.apply(ns, name, spec(s3, "s3-keys"))
    status = wait_phase(api, operator, ns, name, "Succeeded", timeout=RUN_TIMEOUT)

    claim, _, path = status["output"]["path"].removeprefix("pvc://").partition("/")
    manifest = json.loads((real_nodes.claim_dir(ns, claim) / path / "manifest.json").read_text())
    assert manifest["worldSize"] == 2 and manifest["finalMetrics"]["steps"] == 6
    model_etags = s3.etags("models/tiny-llama")
    assert {o["key"]: o["etag"] for o in manifest["sources"]["model"]["objects"]} == model_etags
    assert manifest["sources"]["dataset"]["objects"][0]["etag"] == s3.etags("data")["data/train.jsonl"]
    # Two nodes, one download of each object, into the job's cache on the checkpoint claim.
    assert s3.downloads_since(before) == {**dict.fromkeys(model_etags, 1), "data/train.jsonl": 1}
    cache = real_nodes.claim_dir(ns, "ft-checkpoints") / ns / name / "cache" / "sources"
    assert sorted(p.name[:3] for p in cache.iterdir()) == ["s3-", "s3-"]
    # The keys reached the workers only through the Secret: not the run's ConfigMap, the status or the events.
    config_maps = crd_cluster.kubectl("get", "configmaps", "-n", ns, "-o", "json").stdout
    recorded = config_maps + json.dumps(status) + json.dumps(api.events(ns, name), default=str)
    assert s3.secret not in recorded and s3.key_id not in recorded


def test_wrong_keys_fail_the_job_at_once_with_a_reason_naming_the_source(
    crd_cluster: LocalCluster, api: Api, ns: str, operator: Operator, s3: S3Server
) -> None:
    secret(crd_cluster, ns, "s3-wrong", s3.credentials(secret="not-the-secret"))
    name = f"s3-bad-{uuid.uuid4().hex[:6]}"
    api.apply(ns, name, spec(s3, "s3-wrong"))
    status = wait_phase(api, operator, ns, name, "Failed", timeout=RUN_TIMEOUT)
    message = condition(status, "Failed")["message"]
    assert f"model source {MODEL}: access denied" in message, message
    assert status["attempt"] == 1  # a permanent error: no restart spent on it
