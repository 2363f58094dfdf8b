"""The FineTuneJob CRD on a real API server: examples accepted, defaults stored, status subresource, printer
columns, field selectors and `kubectl explain`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune_dev.cluster import LocalCluster
from kubetune_operator.api import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from kubetune_operator.api.spec import RunPolicy
from kubetune_operator.render import DEFAULT_CHECKPOINT_MINUTES, checkpoint_frequency
from kubetune_trainer.config import LoraSettings, TrainingConfig

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
MINIMAL: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "minimal"},
    "spec": {
        "model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
        "dataset": {"source": "pvc://datasets/support/v3.jsonl"},
        "method": {"type": "lora", "lora": {}},
        "checkpoint": {"claimName": "ft-checkpoints", "everySteps": 100},
    },
}


def wire(model: Any) -> Any:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def assert_contains(outer: Any, inner: Any, path: str = "spec") -> None:
    """Every key of `inner` is in `outer` with an equal value (recursively for objects)."""
    if isinstance(inner, dict):
        assert isinstance(outer, dict), f"{path}: {outer!r} is not an object"
        for key, value in inner.items():
            assert key in outer, f"{path}.{key} is missing"
            assert_contains(outer[key], value, f"{path}.{key}")
    else:
        assert outer == inner, f"{path}: {outer!r} != {inner!r}"


def apply(cluster: LocalCluster, manifest: dict[str, Any], namespace: str) -> dict[str, Any]:
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    return get(cluster, manifest["metadata"]["name"], namespace)


def get(cluster: LocalCluster, name: str, namespace: str) -> dict[str, Any]:
    out = cluster.kubectl("get", "finetunejob", name, "-n", namespace, "-o", "json").stdout
    return json.loads(out)  # type: ignore[no-any-return]


def table(cluster: LocalCluster, *args: str) -> list[list[str]]:
    return [line.split() for line in cluster.kubectl("get", "ftj", *args).stdout.splitlines()]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_accepted_and_round_trips(crd_cluster: LocalCluster, namespace: str, path: Path) -> None:
    # kubectl parses the file itself, as it would for a user.
    crd_cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", str(path))
    written = yaml.safe_load(path.read_text())
    stored = get(crd_cluster, written["metadata"]["name"], namespace)
    check_round_trip(crd_cluster, written, stored, namespace)


def test_gitops_example_is_accepted_and_round_trips(crd_cluster: LocalCluster, namespace: str) -> None:
    rendered = yaml.safe_load(crd_cluster.kubectl("kustomize", str(REPO / "examples" / "gitops")).stdout)
    assert rendered["metadata"]["namespace"] == "ml-training"
    rendered["metadata"]["namespace"] = namespace
    stored = apply(crd_cluster, rendered, namespace)
    check_round_trip(crd_cluster, rendered, stored, namespace)


def check_round_trip(cluster: LocalCluster, written: dict[str, Any], stored: dict[str, Any], namespace: str) -> None:
    assert_contains(stored["spec"], written["spec"])  # nothing the user wrote was dropped or changed
    job = FineTuneJob.model_validate(stored)  # the operator can read it
    # What the server filled in is what the models default to: operator, trainer and API agree.
    assert_contains(wire(job.spec), stored["spec"])
    # Applying the same file again changes nothing: no field flaps between client and server defaults.
    again = apply(cluster, {**written, "metadata": {**written["metadata"], "namespace": namespace}}, namespace)
    assert again["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"]
    assert again["metadata"]["generation"] == 1


def test_defaults_appear_on_the_stored_object(crd_cluster: LocalCluster, namespace: str) -> None:
    spec = apply(crd_cluster, MINIMAL, namespace)["spec"]
    assert spec["method"] == {"type": "lora", "lora": wire(LoraSettings())}
    assert spec["method"]["lora"]["targetModules"] == ["all-linear"]
    assert spec["runPolicy"] == wire(RunPolicy())
    # epochs=1 when neither epochs nor maxSteps is set is the trainer's rule, not a schema default.
    assert spec["training"] == {k: v for k, v in wire(TrainingConfig()).items() if k != "epochs"}
    assert spec["resources"] == {"numNodes": 1, "gpusPerNode": 1}
    assert spec["dataset"] == {
        "source": "pvc://datasets/support/v3.jsonl",
        "format": "text",
        "evalSplit": 0,
        "maxSeqLength": 2048,
        "packing": True,
        "shuffle": True,
    }
    assert spec["checkpoint"] == {"claimName": "ft-checkpoints", "everySteps": 100, "keepLast": 3}
    assert spec["output"] == {"mergeAdapter": False}
    assert spec["model"]["trustRemoteCode"] is False
    assert "budget" not in spec and "evaluation" not in spec
    assert FineTuneJobSpec.model_validate(spec) == FineTuneJobSpec.model_validate(MINIMAL["spec"])


def test_a_checkpoint_claim_alone_is_accepted_and_saves_every_30_minutes(
    crd_cluster: LocalCluster, namespace: str
) -> None:
    manifest = {**MINIMAL, "metadata": {"name": "claim-only"}}
    manifest["spec"] = {**MINIMAL["spec"], "checkpoint": {"claimName": "ft-checkpoints"}}
    stored = apply(crd_cluster, manifest, namespace)["spec"]
    assert stored["checkpoint"] == {"claimName": "ft-checkpoints", "keepLast": 3}
    spec = FineTuneJobSpec.model_validate(stored)
    assert checkpoint_frequency(spec) == (None, DEFAULT_CHECKPOINT_MINUTES) == (None, 30)


def test_status_subresource_stores_the_full_status_model(
    crd_cluster: LocalCluster, namespace: str, full_status: FineTuneJobStatus
) -> None:
    apply(crd_cluster, MINIMAL, namespace)
    crd_cluster.kubectl(
        "patch",
        "ftj",
        "minimal",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": wire(full_status)}),
    )
    stored = get(crd_cluster, "minimal", namespace)
    assert FineTuneJobStatus.model_validate(stored["status"]) == full_status
    assert stored["metadata"]["generation"] == 1  # status writes never bump the generation

    columns = table(crd_cluster, "minimal", "-n", namespace)
    assert columns[0] == ["NAME", "PHASE", "PROGRESS%", "LOSS", "ETA", "COST", "AGE"]
    assert columns[1][:6] == ["minimal", "Running", "30", "1.2345", "1h12m", "102.5"]
    wide = table(crd_cluster, "minimal", "-n", namespace, "-o", "wide")
    assert wide[0][7:] == ["RUN", "ATTEMPT", "METHOD", "MODEL", "REASON"]
    assert wide[1][7:] == ["2", "2", "lora", "hf://Qwen/Qwen2.5-0.5B-Instruct", "Training"]

    # The status endpoint ignores spec changes, and the main endpoint ignores status changes.
    crd_cluster.kubectl(
        "patch", "ftj", "minimal", "-n", namespace, "--type=merge", "-p", json.dumps({"status": {"phase": "Failed"}})
    )
    assert get(crd_cluster, "minimal", namespace)["status"]["phase"] == "Running"


def test_field_selectors_on_method_and_phase(crd_cluster: LocalCluster, namespace: str) -> None:
    apply(crd_cluster, MINIMAL, namespace)
    prompt = {**MINIMAL, "metadata": {"name": "prompt"}, "spec": {**MINIMAL["spec"], "method": {"type": "prompt"}}}
    apply(crd_cluster, prompt, namespace)
    status = json.dumps({"status": {"phase": "Running"}})
    crd_cluster.kubectl(
        "patch", "ftj", "minimal", "-n", namespace, "--subresource=status", "--type=merge", "-p", status
    )

    def names(selector: str) -> list[str]:
        return [row[0] for row in table(crd_cluster, "-n", namespace, "--field-selector", selector, "--no-headers")]

    assert names("spec.method.type=prompt") == ["prompt"]
    assert names("status.phase=Running") == ["minimal"]


def test_kubectl_explain_teaches_the_fields(crd_cluster: LocalCluster) -> None:
    # The OpenAPI document that explain reads is published a moment after the CRD is established.
    deadline = time.monotonic() + 30
    while (result := crd_cluster.kubectl("explain", "ftj.spec.method.lora.r", check=False)).returncode != 0:
        assert time.monotonic() < deadline, result.stderr
        time.sleep(0.5)
    text = " ".join(result.stdout.split())
    assert "LoRA rank: the inner dimension of the low-rank update." in text
    assert "<integer>" in text
    source = " ".join(crd_cluster.kubectl("explain", "ftj.spec.model.source").stdout.split())
    assert "hf://<org>/<name> (Hugging Face Hub), pvc://<claim>/<path>" in source
    eta = " ".join(crd_cluster.kubectl("explain", "ftj.status.progress.eta").stdout.split())
    assert "Estimated time left, for humans (e.g. 1h12m)." in eta
    kind = " ".join(crd_cluster.kubectl("explain", "finetunejobs").stdout.split())
    assert "FineTuneJob fine-tunes a large language model" in kind
