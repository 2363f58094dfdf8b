"""Pure parts of the CLI besides the views: error explanations, the manifest from flags, loss curves, and which
worker's log to read."""

from __future__ import annotations

import json
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import png_size
from kubetune_operator.cli import manifest, plot, workers
from kubetune_operator.cli.errors import CliError, explain_api_error, explain_connection_error
from kubetune_operator.cli.main import parser

# Bodies exactly as kube-apiserver v1.34.4 sends them (captured from the local control plane).
NOT_SERVED = "404 page not found\n"
JOB_NOT_FOUND = (
    '{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"finetunejobs.kubetune.io '
    '\\"nope\\" not found","reason":"NotFound","details":{"name":"nope","group":"kubetune.io","kind":"finetunejobs"},'
    '"code":404}\n'
)
FORBIDDEN_LIST = (
    '{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"finetunejobs.kubetune.io is '
    'forbidden: User \\"system:serviceaccount:default:viewer\\" cannot list resource \\"finetunejobs\\" in API group '
    '\\"kubetune.io\\" in the namespace \\"default\\"","reason":"Forbidden","details":{"group":"kubetune.io",'
    '"kind":"finetunejobs"},"code":403}\n'
)
FORBIDDEN_LOG = (
    '{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"pods \\"p\\" is forbidden: User '
    '\\"system:serviceaccount:default:viewer\\" cannot get resource \\"pods/log\\" in API group \\"\\" in the '
    'namespace \\"default\\"","reason":"Forbidden","details":{"name":"p","kind":"pods"},"code":403}\n'
)
ALREADY_EXISTS = (
    '{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"finetunejobs.kubetune.io '
    '\\"demo\\" already exists","reason":"AlreadyExists","details":{"name":"demo","group":"kubetune.io",'
    '"kind":"finetunejobs"},"code":409}\n'
)
INVALID = json.dumps(
    {
        "kind": "Status",
        "status": "Failure",
        "message": 'FineTuneJob.kubetune.io "bad" is invalid: [spec.checkpoint: Required value: spec.checkpoint '
        "needs everySteps, everyMinutes or both: how often to save,\nspec.resources.gpuProduct: Forbidden: ...]",
        "reason": "Invalid",
        "code": 422,
    }
)


def test_missing_crd_and_missing_job_are_told_apart() -> None:
    assert explain_api_error(404, "Not Found", NOT_SERVED, namespace="default") == (
        "the FineTuneJob API (finetunejobs.kubetune.io/v1alpha1) is not installed in this cluster: install the "
        "kubetune CRDs first (helm install kubetune charts/kubetune, or kubectl apply -f crds/)"
    )
    assert explain_api_error(404, "Not Found", JOB_NOT_FOUND, namespace="default") == (
        'FineTuneJob "nope" not found in namespace "default": `kubectl finetune list -A` shows the jobs you can see'
    )


def test_forbidden_says_what_is_missing_and_how_to_check() -> None:
    assert explain_api_error(403, "Forbidden", FORBIDDEN_LIST, namespace="default") == (
        'no permission: finetunejobs.kubetune.io is forbidden: User "system:serviceaccount:default:viewer" cannot '
        'list resource "finetunejobs" in API group "kubetune.io" in the namespace "default". Ask a cluster admin for '
        "a Role that allows it (check with: kubectl auth can-i list finetunejobs.kubetune.io -n default)"
    )
    assert explain_api_error(403, "Forbidden", FORBIDDEN_LOG, namespace="default").endswith(
        "(check with: kubectl auth can-i get pods/log -n default)"
    )
    assert explain_api_error(403, "Forbidden", FORBIDDEN_LIST, namespace=None).endswith(
        "kubectl auth can-i list finetunejobs.kubetune.io -A)"
    )


def test_other_api_errors_are_one_line() -> None:
    assert explain_api_error(409, "Conflict", ALREADY_EXISTS, namespace="ml") == (
        'FineTuneJob "demo" already exists in namespace "ml": edit it, or start a new run of it with '
        "`kubectl finetune rerun demo`"
    )
    invalid = explain_api_error(422, "Unprocessable Entity", INVALID, namespace="ml")
    assert "\n" not in invalid
    assert invalid.startswith('FineTuneJob.kubetune.io "bad" is invalid: [spec.checkpoint: Required value')
    assert explain_api_error(401, "Unauthorized", None, namespace="ml").startswith(
        "the API server rejected your credentials (401 Unauthorized)"
    )
    assert explain_api_error(500, "Internal Server Error", "oops", namespace="ml") == (
        "the API server answered 500: Internal Server Error"
    )


def test_connection_errors() -> None:
    server = "https://127.0.0.1:1"
    refused = explain_connection_error(server, ConnectionRefusedError(111, "Connection refused"))
    assert refused == (
        "cannot reach the Kubernetes API server at https://127.0.0.1:1 (connection refused): is the cluster running? "
        "Check KUBECONFIG, --kubeconfig and --context"
    )
    assert "(unknown host)" in explain_connection_error(server, OSError("Name or service not known"))
    assert "(timed out)" in explain_connection_error(server, TimeoutError("timed out"))
    tls = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    assert explain_connection_error(server, tls) == (
        "cannot talk to the API server at https://127.0.0.1:1: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
        "failed. Check the cluster's CA and --context / --kubeconfig"
    )


# ----------------------------------------------------------------------------------------------
# create


def create_args(*flags: str) -> dict[str, Any]:
    return vars(parser().parse_args(["create", "demo", *flags]))


REQUIRED = ("--model", "hf://Qwen/Qwen2.5-0.5B", "--dataset", "pvc://datasets/chat.jsonl", "--checkpoint-claim", "ckpt")


def test_manifest_holds_only_what_was_given() -> None:
    body = manifest.build("demo", None, create_args(*REQUIRED, "--gpus", "2", "--lr", "1e-4", "--merge-adapter"))
    assert body == {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo"},
        "spec": {
            "model": {"source": "hf://Qwen/Qwen2.5-0.5B"},
            "dataset": {"source": "pvc://datasets/chat.jsonl"},
            "training": {"learningRate": 1e-4},
            "resources": {"gpusPerNode": 2},
            # A job must say how often to checkpoint; the CLI picks a schedule when no flag does.
            "checkpoint": {"claimName": "ckpt", "everySteps": 200},
            "output": {"mergeAdapter": True},
        },
    }
    minutes = manifest.build("demo", "ml", create_args(*REQUIRED, "--every-minutes", "20"))
    assert minutes["metadata"] == {"name": "demo", "namespace": "ml"}
    assert minutes["spec"]["checkpoint"] == {"claimName": "ckpt", "everyMinutes": 20}


def test_every_flag_sets_a_real_spec_field() -> None:
    values = {
        "--revision": "main",
        "--hf-token-secret": "hf",
        "--format": "messages",
        "--eval-split": "0.05",
        "--max-seq-length": "4096",
        "--method": "qlora",
        "--lora-r": "8",
        "--lora-alpha": "16",
        "--epochs": "2",
        "--max-steps": "500",
        "--lr": "2e-4",
        "--batch-size": "4",
        "--grad-accum": "2",
        "--precision": "bf16",
        "--nodes": "2",
        "--gpus": "8",
        "--gpu-product": "NVIDIA-H100-80GB-HBM3",
        "--queue": "team-a",
        "--every-steps": "100",
        "--every-minutes": "30",
        "--keep-last": "2",
        "--output-claim": "models",
        "--max-restarts": "5",
        "--max-cost": "250",
    }
    flags = [*REQUIRED, "--merge-adapter", "--suspend"]
    for option, value in values.items():
        flags += [option, value]
    every_option = {*REQUIRED[::2], "--merge-adapter", "--suspend", "--eval-dataset", *values}
    assert {f.option for f in manifest.FLAGS} == every_option
    body = manifest.build("everything", None, create_args(*flags))  # validated by the API models
    assert body["spec"]["resources"] == {
        "numNodes": 2,
        "gpusPerNode": 8,
        "gpuProduct": "NVIDIA-H100-80GB-HBM3",
        "queueName": "team-a",
    }
    assert body["spec"]["budget"] == {"maxCostUSD": 250}
    assert isinstance(body["spec"]["budget"]["maxCostUSD"], int)  # `maxCostUSD: 250` in YAML, not 250.0
    assert body["spec"]["training"]["learningRate"] == 2e-4
    assert body["spec"]["runPolicy"] == {"maxRestarts": 5, "suspend": True}
    assert body["spec"]["model"] == {
        "source": "hf://Qwen/Qwen2.5-0.5B",
        "revision": "main",
        "tokenSecretRef": {"name": "hf"},
    }
    # Exclusive with --eval-split (a CEL rule the API server checks).
    held_out = manifest.build("held-out", None, create_args(*REQUIRED, "--eval-dataset", "pvc://datasets/eval.jsonl"))
    assert held_out["spec"]["dataset"] == {
        "source": "pvc://datasets/chat.jsonl",
        "evalSource": "pvc://datasets/eval.jsonl",
    }


def test_invalid_values_are_named_by_their_flag() -> None:
    with pytest.raises(CliError) as bad:
        manifest.build("demo", None, create_args(*REQUIRED, "--lr", "3", "--nodes", "0"))
    assert str(bad.value) == (
        "invalid FineTuneJob: --lr: Input should be less than or equal to 1; "
        "--nodes: Input should be greater than or equal to 1"
    )


# ----------------------------------------------------------------------------------------------
# plot


def test_curves_from_history_or_metrics_records() -> None:
    records: list[dict[str, Any]] = [
        {"step": 10, "loss": 2.0},
        {"step": 20, "loss": 1.5, "evalLoss": 1.7},
        {"step": 20, "loss": 1.4},  # logged again after a resume: the later record wins
        {"step": 30, "loss": float("nan")},
        {"loss": 9.9},
        {"step": 30, "evalLoss": 1.3, "evalPerplexity": 3.7},
    ]
    assert plot.curves(records) == ([(10, 2.0), (20, 1.4)], [(20, 1.7), (30, 1.3)])


def test_metrics_file_and_rendering(tmp_path: Path) -> None:
    lines = [json.dumps({"step": s, "loss": 3.0 / s}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')  # cut short by a kill
    train, evaluation = plot.curves(plot.read_metrics(tmp_path))
    assert [s for s, _ in train] == [1, 2, 3, 4, 5]
    out = tmp_path / "loss.png"
    plot.render(train, evaluation, "demo", out)
    assert png_size(out) == (800, 450)
    with pytest.raises(CliError, match="no loss values to plot yet"):
        plot.render([], [], "demo", out)
    with pytest.raises(CliError, match=r"cannot read .*/nowhere/metrics.jsonl \(No such file or directory\)"):
        plot.read_metrics(tmp_path / "nowhere")


def test_plot_without_matplotlib_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(CliError, match=r"^plot needs matplotlib: pip install matplotlib$"):
        plot.render([(1, 2.0)], [], "demo", tmp_path / "loss.png")


# ----------------------------------------------------------------------------------------------
# logs


def pod(
    name: str, rank: int | None, created: str, *, label: bool = True, containers: tuple[str, ...] = ("trainer",)
) -> dict[str, Any]:
    index = {"batch.kubernetes.io/job-completion-index": str(rank)} if rank is not None else {}
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": created,
            "labels": index if label else {},
            "annotations": {} if label else index,
        },
        "spec": {"containers": [{"name": c} for c in containers]},
    }


def test_worker_by_rank() -> None:
    pods = [
        pod("a-0-old", 0, "2026-11-27T09:00:00Z"),
        pod("a-0-new", 0, "2026-11-27T09:05:00Z"),
        pod("a-1", 1, "2026-11-27T09:00:00Z", label=False),  # only the annotation (before Kubernetes 1.28)
    ]
    assert workers.pick_worker(pods, 0, where="run 1 attempt 1 of a")["metadata"]["name"] == "a-0-new"
    assert workers.pick_worker(pods, 1, where="run 1 attempt 1 of a")["metadata"]["name"] == "a-1"
    with pytest.raises(CliError) as missing:
        workers.pick_worker(pods, 3, where="run 1 attempt 1 of a")
    assert str(missing.value) == "no worker of rank 3 in run 1 attempt 1 of a: it has ranks 0, 1"
    with pytest.raises(CliError, match="it has no worker pods now"):
        workers.pick_worker([], 0, where="run 1 attempt 2 of a")


def test_log_container() -> None:
    assert workers.log_container(pod("p", 0, "", containers=("trainer",))) == "trainer"
    sidecar_first = pod("p", 0, "", containers=("istio-proxy", "trainer"))
    sidecar_first["metadata"]["annotations"] = {"kubectl.kubernetes.io/default-container": "trainer"}
    assert workers.log_container(sidecar_first) == "trainer"
