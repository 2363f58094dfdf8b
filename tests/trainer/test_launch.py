"""kubetune-launch: the environment contract, waiting for rank 0, and exit codes through torchrun."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trainer_assets as assets
from kubetune_trainer import checkpoint
from kubetune_trainer.errors import PermanentError, most_telling
from kubetune_trainer.launch import (
    LaunchSpec,
    outcome,
    spec_from_env,
    torchrun_command,
    wait_for_address,
    worker_env,
)

pytestmark = pytest.mark.trainer


def test_spec_from_env_defaults_and_values() -> None:
    assert spec_from_env({}) == LaunchSpec(
        config="/etc/kubetune/config.json",
        nnodes=1,
        nproc_per_node=1,
        node_rank=0,
        master_addr="127.0.0.1",
        master_port=29500,
        rdzv_timeout=600,
        shutdown_timeout=120,
    )
    env = {
        "KUBETUNE_CONFIG": "/cfg/c.json",
        "KUBETUNE_NNODES": "4",
        "KUBETUNE_NPROC_PER_NODE": "8",
        "JOB_COMPLETION_INDEX": "3",
        "KUBETUNE_MASTER_ADDR": "ft-0.ft-svc",
        "KUBETUNE_MASTER_PORT": "29400",
        "KUBETUNE_RDZV_TIMEOUT_SECONDS": "90",
        "KUBETUNE_SHUTDOWN_TIMEOUT_SECONDS": "45",
    }
    spec = spec_from_env(env)
    assert torchrun_command(spec, python="py") == [
        "py",
        "-m",
        "torch.distributed.run",
        "--nnodes=4",
        "--nproc-per-node=8",
        "--node-rank=3",
        "--master-addr=ft-0.ft-svc",
        "--master-port=29400",
        "--rdzv-conf=timeout=90",
        "--max-restarts=0",
        "--shutdown-timeout=45",
        "-m",
        "kubetune_trainer",
        "--config",
        "/cfg/c.json",
    ]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KUBETUNE_NNODES": "2"}, "KUBETUNE_MASTER_ADDR is required"),
        ({"KUBETUNE_NNODES": "two"}, "KUBETUNE_NNODES='two' is not an integer"),
        ({"KUBETUNE_NNODES": "2", "JOB_COMPLETION_INDEX": "2", "KUBETUNE_MASTER_ADDR": "a"}, "is not below"),
        ({"KUBETUNE_NPROC_PER_NODE": "0"}, "must be at least 1"),
        ({"KUBETUNE_MASTER_PORT": "70000"}, "is not a port"),
    ],
)
def test_bad_environment_is_permanent(env: dict[str, str], message: str) -> None:
    with pytest.raises(PermanentError, match=message):
        spec_from_env(env)


def test_wait_for_address_retries_then_times_out() -> None:
    now = [0.0]
    calls: list[str] = []

    def resolve(host: str) -> object:
        calls.append(host)
        if len(calls) < 4:
            raise socket.gaierror(-2, "Name or service not known")
        return []

    def sleep(s: float) -> None:
        now[0] += s

    assert wait_for_address("ft-0.svc", 60, resolve, lambda: now[0], sleep) == 0.5 + 1 + 2
    assert calls == ["ft-0.svc"] * 4

    def never(host: str) -> object:
        raise socket.gaierror(-2, "Name or service not known")

    now[0] = 0.0
    with pytest.raises(TimeoutError, match=r"rank-0 address ft-0.svc did not resolve within 20s"):
        wait_for_address("ft-0.svc", 20, never, lambda: now[0], sleep)
    assert now[0] == 20


def test_outcome_prefers_the_workers_reason() -> None:
    assert outcome(0, []) == (0, None)
    final = '{"finalMetrics":{"steps":12,"evalLoss":1.3}}'
    assert outcome(0, [], final) == (0, final)  # success: rank 0's final figures are the message
    assert outcome(1, [(1, "RuntimeError: boom")], final) == (1, "RuntimeError: boom")
    assert outcome(1, [(143, "stopped"), (78, "dataset row 3"), (1, "crash")]) == (78, "dataset row 3")
    assert outcome(1, [(143, "stopped"), (1, "RuntimeError: boom")]) == (1, "RuntimeError: boom")
    assert outcome(1, [(143, "stopped by SIGTERM")]) == (143, "stopped by SIGTERM")
    code, reason = outcome(-9, [])
    assert code == 137 and reason is not None and "before any worker reported a reason" in reason
    assert most_telling([(0, "")]) is None


def test_workers_get_a_fixed_malloc_mmap_threshold_unless_the_pod_sets_one(tmp_path: Path) -> None:
    env = worker_env({"PATH": "/bin"}, tmp_path)
    assert env == {"PATH": "/bin", "MALLOC_MMAP_THRESHOLD_": "1048576", "KUBETUNE_EXIT_STATUS_DIR": str(tmp_path)}
    assert worker_env({"MALLOC_MMAP_THRESHOLD_": "65536"}, tmp_path)["MALLOC_MMAP_THRESHOLD_"] == "65536"


def launcher_env(tmp: Path, config: Path, **extra: str) -> dict[str, str]:
    return assets.worker_env(
        KUBETUNE_CONFIG=str(config),
        KUBETUNE_MASTER_PORT=str(assets.free_port()),
        KUBETUNE_TERMINATION_LOG=str(tmp / "termination-log"),
        KUBETUNE_RDZV_TIMEOUT_SECONDS="60",
        **extra,
    )


def launcher() -> list[str]:
    exe = shutil.which("kubetune-launch", path=str(Path(sys.executable).parent))
    assert exe, "the kubetune-launch console script is not installed in this environment"
    return [exe]


def test_config_error_exits_78_before_torchrun(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model": {"source": "x"}}))
    done = subprocess.run(launcher(), env=launcher_env(tmp_path, cfg), capture_output=True, text=True, timeout=60)
    assert done.returncode == 78
    reason = (tmp_path / "termination-log").read_text()
    assert reason == f"config {cfg}: dataset: Field required (and 2 more errors)\n"
    assert "torch.distributed.run" not in done.stderr


def test_bad_dataset_row_exits_78_through_torchrun(tmp_path: Path, llama_dir: Path) -> None:
    items = assets.rows(20, "prompt_completion")
    del items[16]["completion"]
    data = assets.write_jsonl(tmp_path / "train.jsonl", items)
    cfg = assets.write_config(tmp_path, assets.trainer_config(tmp_path, llama_dir, data))
    done = subprocess.run(launcher(), env=launcher_env(tmp_path, cfg), capture_output=True, text=True, timeout=180)
    assert done.returncode == 78, done.stderr[-3000:]
    assert (tmp_path / "termination-log").read_text() == f'dataset {data} row 17: field "completion" is missing\n'


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path: Path, llama_dir: Path, train_jsonl: Path) -> None:
    port = assets.free_port()
    cfg = assets.write_config(
        tmp_path,
        assets.trainer_config(
            tmp_path,
            llama_dir,
            train_jsonl,
            training={"maxSteps": 100_000, "logEverySteps": 2},
            checkpoint={"everySteps": 100_000},
            metrics={"port": port},
        ),
    )
    proc = subprocess.Popen(launcher(), env=launcher_env(tmp_path, cfg, POD_IP="127.0.0.1"), stderr=subprocess.PIPE)
    progress: dict[str, Any] = {}
    deadline = time.monotonic() + 180
    while not (progress.get("state") == "training" and progress.get("loss") is not None):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
        try:
            progress = get_json(f"http://127.0.0.1:{port}/progress")
        except OSError:
            continue
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert "kubetune_train_total_steps 100000.0" in metrics
    assert progress["totalSteps"] == 100_000 and progress["step"] >= 2 and progress["history"]
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 143, stderr.decode()[-3000:]
    reason = (tmp_path / "termination-log").read_text()
    assert reason.startswith("stopped by SIGTERM; checkpoint saved at step ")
    step = int(reason.split("step ")[1].split(" ")[0])
    assert step >= progress["step"]
    saved = assets.checkpoint_at(tmp_path / "ckpt", step)
    assert checkpoint.problems(saved) is None
    assert json.loads((saved / "trainer_state.json").read_text())["step"] == step
