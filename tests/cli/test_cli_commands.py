"""Every subcommand of the real kubectl-finetune executable against the local control plane.

No operator runs here: statuses are written through the status subresource, as the operator would write them,
and events through the API, as kopf posts them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cli_helpers as h
import pytest
import yaml
from cli_helpers import EXECUTABLE, REPO, Cli, error, ok, png_size
from kubetune_dev import pki
from kubetune_dev.cluster import LocalCluster, free_port
from kubetune_dev.toolchain import toolchain_bin
from kubetune_operator.api import RERUN_ANNOTATION
from kubetune_operator.api.status import AttemptRecord, CheckpointStatus, HistoryPoint
from kubetune_operator.cli.errors import explain_api_error
from kubetune_operator.kube import ApiError, Connection, Kube

pytestmark = pytest.mark.e2e

REQUIRED = ("--model", "hf://Qwen/Qwen2.5-0.5B-Instruct", "--dataset", "pvc://datasets/support/v3.jsonl")
CREATE = (
    *REQUIRED,
    "--format",
    "messages",
    "--checkpoint-claim",
    "ft-checkpoints",
    "--gpus",
    "1",
    "--max-steps",
    "400",
)
AGE = r"\d+[smhd]\w*"


@pytest.fixture
def other_namespace(cluster: LocalCluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


# ----------------------------------------------------------------------------------------------
# create


def test_create_dry_run_yaml_is_a_manifest_the_api_server_accepts(
    cli: Cli, crd_cluster: LocalCluster, namespace: str
) -> None:
    out = ok(cli("create", "support-bot", *CREATE, "--max-cost", "50", "--dry-run", "-o", "yaml"))
    assert yaml.safe_load(out) == {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "support-bot"},
        "spec": {
            "model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "dataset": {"source": "pvc://datasets/support/v3.jsonl", "format": "messages"},
            "training": {"maxSteps": 400},
            "resources": {"gpusPerNode": 1},
            "checkpoint": {"claimName": "ft-checkpoints", "everySteps": 200},
            "budget": {"maxCostUSD": 50.0},
        },
    }
    assert "  maxCostUSD: 50\n" in out  # whole numbers stay whole in the manifest
    applied = crd_cluster.kubectl("apply", "-n", namespace, "--dry-run=server", "-f", "-", input=out)
    assert applied.stdout == "finetunejob.kubetune.io/support-bot created (server dry run)\n"
    assert crd_cluster.kubectl("get", "ftj", "-n", namespace, "-o", "name").stdout == ""  # nothing was created

    # --dry-run=server runs the CEL rules the client cannot: a GPU model for a CPU-only job is refused.
    cpu = ("--checkpoint-claim", "c", "--gpus", "0", "--gpu-product", "NVIDIA-H100-80GB-HBM3", "--dry-run=server")
    assert error(cli("create", "cpu", "-n", namespace, *REQUIRED, *cpu)) == (
        'FineTuneJob.kubetune.io "cpu" is invalid: spec.resources.gpuProduct: Forbidden: spec.resources.gpuProduct '
        "needs spec.resources.gpusPerNode >= 1 (a CPU-only job has no GPU to choose)"
    )
    # Values the API models reject never reach the server.
    assert error(cli("create", "x", *CREATE, "--lr", "2", "--dry-run")) == (
        "invalid FineTuneJob: --lr: Input should be less than or equal to 1"
    )


def test_create_list_describe_and_output_formats(cli: Cli, crd_cluster: LocalCluster, namespace: str) -> None:
    assert ok(cli("create", "support-bot", "-n", namespace, *CREATE)) == "finetunejob.kubetune.io/support-bot created\n"
    assert error(cli("create", "support-bot", "-n", namespace, *CREATE)) == (
        f'FineTuneJob "support-bot" already exists in namespace "{namespace}": edit it, or start a new run of it '
        "with `kubectl finetune rerun support-bot`"
    )
    crd_cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "lora-single-gpu.yaml"))
    h.set_status(
        crd_cluster,
        namespace,
        "support-bot",
        h.training(120, loss=1.23456, eval_loss=1.31, tokens_per_second=48210.5, eta_seconds=4320, usd=10.25),
    )
    h.set_status(crd_cluster, namespace, "support-bot-lora", h.succeeded())

    table = ok(cli("list", "-n", namespace)).splitlines()
    assert table[0] == "NAME               PHASE       PROGRESS         LOSS     ETA     COST      AGE"
    assert re.fullmatch(
        rf"support-bot        Running     120/400 \(30%\)    1\.2346   1h12m   \$10\.25    {AGE}", table[1]
    )
    assert re.fullmatch(
        rf"support-bot-lora   Succeeded   400/400 \(100%\)   0\.8123   -       \$195\.20   {AGE}", table[2]
    )
    assert len(table) == 3

    wide = ok(cli("list", "-n", namespace, "-o", "wide")).splitlines()
    assert wide[0].endswith("AGE   EVAL LOSS   RUN   ATTEMPT   METHOD   GPUS   PROJECTED   MODEL")
    assert wide[1].endswith("1.3100      1     1         lora     1x1    $34.17      hf://Qwen/Qwen2.5-0.5B-Instruct")

    as_json = json.loads(ok(cli("list", "-n", namespace, "-o", "json")))
    assert (as_json["kind"], [j["metadata"]["name"] for j in as_json["items"]]) == (
        "List",
        ["support-bot", "support-bot-lora"],
    )
    assert as_json["items"][0]["status"]["progress"]["step"] == 120
    assert "managedFields" not in as_json["items"][0]["metadata"]
    as_yaml = yaml.safe_load(ok(cli("list", "-n", namespace, "-o", "yaml")))
    assert as_yaml["items"][1]["spec"]["method"]["lora"]["targetModules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]

    empty = cli("list", "-n", f"{namespace}-empty")
    assert (empty.returncode, empty.stdout, empty.stderr) == (
        0,
        "",
        f"No FineTuneJobs found in namespace {namespace}-empty.\n",
    )


def test_list_all_namespaces_and_cost_totals(
    cli: Cli, crd_cluster: LocalCluster, namespace: str, other_namespace: str
) -> None:
    for ns, name, status in (
        (namespace, "a", h.training(100, usd=40.0)),
        (namespace, "b", h.succeeded(usd=60.5)),
        (other_namespace, "c", h.training(200, usd=12.0)),
    ):
        h.apply(crd_cluster, ns, h.manifest(name))
        h.set_status(crd_cluster, ns, name, status)

    listed = ok(cli("list", "-A")).splitlines()
    assert listed[0].split()[:3] == ["NAMESPACE", "NAME", "PHASE"]
    ours = [line.split()[:3] for line in listed[1:] if line.split()[0] in (namespace, other_namespace)]
    assert ours == sorted(
        [[namespace, "a", "Running"], [namespace, "b", "Succeeded"], [other_namespace, "c", "Running"]]
    )

    assert ok(cli("cost", "-n", namespace)).splitlines() == [
        "NAME   PHASE       GPUS   GPU-HOURS   COST     PROJECTED   BUDGET    RUNS   ALL RUNS",
        "a      Running     2x8    16.0        $40.00   $160.00     $250.00   1      $40.00",
        "b      Succeeded   2x8    78.1        $60.50   $60.50      $250.00   1      $60.50",
        "",
        f"{'NAMESPACE':<{len(namespace)}}   JOBS   GPU-HOURS   COST      PROJECTED   ALL RUNS",
        f"{namespace}   2      94.1        $100.50   $220.50     $100.50",
    ]
    everywhere = ok(cli("cost", "-A")).splitlines()
    totals = everywhere[everywhere.index("") + 1 :]
    assert f"{other_namespace}   1      4.8         $12.00    $24.00      $12.00" in totals
    assert totals[-1].startswith("TOTAL")


def test_describe_shows_spec_status_and_this_jobs_events(cli: Cli, crd_cluster: LocalCluster, namespace: str) -> None:
    h.apply(crd_cluster, namespace, h.manifest("support-bot"))
    status = h.training(300, loss=0.95, eval_loss=1.02, tokens_per_second=51000, eta_seconds=900, usd=150, attempt=2)
    status.attempts[0] = AttemptRecord(
        attempt=1, start_time=h.T0, reason="OOMKilled", message="worker 1 was OOMKilled", exit_code=137
    )
    status.checkpoint = CheckpointStatus(latest="default/support-bot/runs/1/step-200", step=200, saved_at=h.T0)
    h.set_status(crd_cluster, namespace, "support-bot", status)
    uid = h.get(crd_cluster, namespace, "ftj", "support-bot")["metadata"]["uid"]

    def event(name: str, reason: str, message: str, uid: str, kind: str = "Normal") -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name},
            "involvedObject": {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "name": "support-bot",
                "namespace": namespace,
                "uid": uid,
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "source": {"component": "kubetune-operator"},
            "firstTimestamp": "2026-11-27T09:00:00Z",
            "lastTimestamp": "2026-11-27T09:00:00Z" if reason == "RunStarted" else "2026-11-27T09:50:00Z",
            "count": 1,
        }

    h.apply(crd_cluster, namespace, event("e1", "RunStarted", "run 1 started for generation 1", uid))
    h.apply(
        crd_cluster, namespace, event("e2", "AttemptFailed", "attempt 1 failed: worker 1 was OOMKilled", uid, "Warning")
    )
    h.apply(crd_cluster, namespace, event("e3", "RunStarted", "an earlier job of the same name", "another-uid"))

    lines = ok(cli("describe", "support-bot", "-n", namespace)).splitlines()
    assert lines[:4] == [
        "Name:        support-bot",
        f"Namespace:   {namespace}",
        lines[2],
        "Phase:       Running (run 1, attempt 2)",
    ]
    assert "Resources:   2 nodes x 8 GPUs (NVIDIA-H100-80GB-HBM3) = 16 GPUs" in lines
    assert "Checkpoints: claim ft-checkpoints, every 200 steps, keep 3" in lines  # keepLast defaulted by the server
    assert "Run policy:  max 3 restarts, stall timeout 30m" in lines
    assert "Cost:        60.0 GPU-hours, $150.00 so far, $200.00 projected, 60% of the $250.00 budget" in lines
    assert re.fullmatch(
        rf"Checkpoint:  default/support-bot/runs/1/step-200 \(step 200, saved {AGE} ago\)",
        lines[lines.index("Workers:     2 active, 2 ready, 0 succeeded, 0 failed") + 1],
    )
    attempts = lines[lines.index("Attempts of run 1:") + 1 :][:3]
    assert attempts[0].split() == ["ATTEMPT", "STARTED", "DURATION", "REASON", "EXIT", "MESSAGE"]
    assert attempts[1].split()[3:] == ["-", "OOMKilled", "137", "worker", "1", "was", "OOMKilled"]  # 1 <age> ago
    assert attempts[2].split()[4:] == ["Running", "-"]
    events = lines[lines.index("Events:") + 1 :]
    assert [e.split()[:2] for e in events] == [
        ["TYPE", "REASON"],
        ["Normal", "RunStarted"],
        ["Warning", "AttemptFailed"],
    ]
    assert events[1].endswith("kubetune-operator   run 1 started for generation 1")

    assert error(cli("describe", "nope", "-n", namespace)) == (
        f'FineTuneJob "nope" not found in namespace "{namespace}": '
        "`kubectl finetune list -A` shows the jobs you can see"
    )


def test_suspend_resume_and_rerun_change_the_object(cli: Cli, crd_cluster: LocalCluster, namespace: str) -> None:
    h.apply(crd_cluster, namespace, h.manifest("support-bot"))

    def suspended() -> bool | None:
        return h.get(crd_cluster, namespace, "ftj", "support-bot")["spec"]["runPolicy"].get("suspend")

    assert ok(cli("suspend", "support-bot", "-n", namespace)) == "finetunejob.kubetune.io/support-bot suspended\n"
    assert suspended() is True
    assert (
        ok(cli("suspend", "support-bot", "-n", namespace))
        == "finetunejob.kubetune.io/support-bot is already suspended\n"
    )
    assert ok(cli("resume", "support-bot", "-n", namespace)) == "finetunejob.kubetune.io/support-bot resumed\n"
    assert suspended() is False
    assert ok(cli("resume", "support-bot", "-n", namespace)) == (
        "finetunejob.kubetune.io/support-bot is already running (not suspended)\n"
    )

    first = ok(cli("rerun", "support-bot", "-n", namespace))
    token = h.get(crd_cluster, namespace, "ftj", "support-bot")["metadata"]["annotations"][RERUN_ANNOTATION]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", token)
    assert first == f"finetunejob.kubetune.io/support-bot rerun requested ({RERUN_ANNOTATION}={token})\n"
    ok(cli("rerun", "support-bot", "-n", namespace, "--token", "dataset-v4"))
    assert (
        h.get(crd_cluster, namespace, "ftj", "support-bot")["metadata"]["annotations"][RERUN_ANNOTATION] == "dataset-v4"
    )
    assert error(cli("suspend", "nope", "-n", namespace)).startswith('FineTuneJob "nope" not found')


def test_plot_from_an_output_directory_or_the_status(
    cli: Cli, crd_cluster: LocalCluster, namespace: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "ft-checkpoints" / namespace / "support-bot" / "runs" / "1"
    run_dir.mkdir(parents=True)
    records = [{"step": s, "loss": 2.5 - s / 100, "learningRate": 2e-4} for s in range(10, 110, 10)]
    records += [{"step": 50, "evalLoss": 2.1, "evalPerplexity": 8.2}, {"step": 100, "evalLoss": 1.7}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "curve.png"
    assert ok(cli("plot", "--from-dir", str(run_dir), "-o", str(out))) == (
        f"wrote {out}: 10 train loss and 2 eval loss points\n"
    )
    assert png_size(out) == (800, 450)

    h.apply(crd_cluster, namespace, h.manifest("support-bot"))
    h.set_status(crd_cluster, namespace, "support-bot", h.training(100, loss=1.5))
    assert error(cli("plot", "support-bot", "-n", namespace)) == (
        'FineTuneJob "support-bot" has no loss history in its status yet: plot a run\'s output with --from-dir DIR '
        "(the directory holding its metrics.jsonl)"
    )
    assert error(cli("plot", "--from-dir", str(tmp_path))) == (
        f"cannot read {tmp_path}/metrics.jsonl (No such file or directory): --from-dir takes a run's output directory"
    )


def test_plot_from_the_loss_history_the_operator_keeps_in_the_status(
    cli: Cli, crd_cluster: LocalCluster, namespace: str, tmp_path: Path
) -> None:
    status = h.training(100, loss=1.5)
    assert status.progress is not None
    status.progress.history = [
        HistoryPoint(step=s, loss=2.5 - s / 100, eval_loss=2.6 - s / 100 if s % 50 == 0 else None)
        for s in range(10, 110, 10)
    ]
    h.apply(crd_cluster, namespace, h.manifest("support-bot"))
    h.set_status(crd_cluster, namespace, "support-bot", status)  # through the CRD schema, as the operator writes it
    out = tmp_path / "support-bot.png"
    assert ok(cli("plot", "support-bot", "-n", namespace, "-o", str(out))) == (
        f"wrote {out}: 10 train loss and 2 eval loss points\n"
    )
    assert png_size(out) == (800, 450)


# ----------------------------------------------------------------------------------------------
# kubectl plugin conventions


def test_runs_as_a_kubectl_plugin_with_the_contexts_namespace(
    cli: Cli, crd_cluster: LocalCluster, namespace: str, tmp_path: Path
) -> None:
    h.apply(crd_cluster, namespace, h.manifest("support-bot"))
    path = f"{EXECUTABLE.parent}{os.pathsep}{os.environ['PATH']}"
    found = subprocess.run(
        [str(toolchain_bin() / "kubectl"), "finetune", "list", "-n", namespace],
        env={**crd_cluster.env(), "PATH": path},
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0 and found.stdout.splitlines()[1].startswith("support-bot   -"), found

    # A second context with this namespace as its default; the current context points at a dead server.
    config = json.loads(crd_cluster.kubeconfig.read_text())
    config["clusters"].append(
        {"name": "dead", "cluster": {**config["clusters"][0]["cluster"], "server": f"https://127.0.0.1:{free_port()}"}}
    )
    config["contexts"] = [
        {"name": "dead", "context": {"cluster": "dead", "user": "admin"}},
        {"name": "work", "context": {"cluster": "kubetune-local", "user": "admin", "namespace": namespace}},
    ]
    config["current-context"] = "dead"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(config))

    listed = ok(cli("list", "--kubeconfig", str(kubeconfig), "--context", "work")).splitlines()
    assert [line.split()[0] for line in listed] == ["NAME", "support-bot"]
    # Flags before the subcommand work too, and KUBECONFIG is honoured like --kubeconfig.
    again = ok(cli("--context", "work", "list", env={"KUBECONFIG": str(kubeconfig)})).splitlines()
    assert [line.split()[0] for line in again] == ["NAME", "support-bot"]
    server = config["clusters"][1]["cluster"]["server"]
    assert error(cli("list", "--kubeconfig", str(kubeconfig))) == (
        f"cannot reach the Kubernetes API server at {server} (connection refused): is the cluster running? Check "
        "KUBECONFIG, --kubeconfig and --context"
    )
    assert error(cli("list", "--kubeconfig", str(kubeconfig), "--context", "nope")) == (
        f'context "nope" is not in {kubeconfig} (it has: dead, work)'
    )
    missing = tmp_path / "absent"
    assert error(cli("list", "--kubeconfig", str(missing))).startswith(f"cannot load a kubeconfig from {missing}")


# ----------------------------------------------------------------------------------------------
# errors that need a cluster


def test_no_permission_is_one_line_with_what_to_ask_for(
    cli: Cli, crd_cluster: LocalCluster, namespace: str, tmp_path: Path
) -> None:
    crd_cluster.kubectl("create", "serviceaccount", "viewer", "-n", namespace)
    token = crd_cluster.kubectl("create", "token", "viewer", "-n", namespace).stdout.strip()
    kubeconfig = crd_cluster.token_kubeconfig(token, tmp_path / "viewer.kubeconfig")
    assert error(cli("list", "-n", namespace, "--kubeconfig", str(kubeconfig))) == (
        f'no permission: finetunejobs.kubetune.io is forbidden: User "system:serviceaccount:{namespace}:viewer" '
        f'cannot list resource "finetunejobs" in API group "kubetune.io" in the namespace "{namespace}". Ask a '
        "cluster admin for a Role that allows it "
        f"(check with: kubectl auth can-i list finetunejobs.kubetune.io -n {namespace})"
    )
    assert error(cli("watch", "x", "-n", namespace, "--kubeconfig", str(kubeconfig))).startswith(
        f'no permission: finetunejobs.kubetune.io "x" is forbidden: User "system:serviceaccount:{namespace}:viewer" '
        'cannot get resource "finetunejobs"'
    )


def test_a_resource_the_server_does_not_serve_reads_as_a_missing_crd(crd_cluster: LocalCluster, namespace: str) -> None:
    """The CRD cannot be removed from the shared cluster, so ask the same server for a kind it does not serve:
    its answer is exactly what a cluster without the CRD sends, and the CLI's explanation is built from it."""
    kube = Kube(Connection.load(str(crd_cluster.kubeconfig)))
    with pytest.raises(ApiError) as unserved:
        kube.request("GET", f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobz")
    e = unserved.value
    assert explain_api_error(e.status, e.reason, e.body, namespace=namespace).startswith(
        "the FineTuneJob API (finetunejobs.kubetune.io/v1alpha1) is not installed in this cluster"
    )


def test_a_server_certificate_the_kubeconfig_does_not_trust_is_one_line(
    cli: Cli, crd_cluster: LocalCluster, tmp_path: Path
) -> None:
    config = json.loads(crd_cluster.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["certificate-authority"] = str(pki.CertificateAuthority(tmp_path).pair.cert)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(config))
    assert error(cli("list", "--kubeconfig", str(kubeconfig))).startswith(
        f"cannot talk to the API server at {crd_cluster.server}: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
        "failed"
    )
