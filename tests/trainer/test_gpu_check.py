"""A pod that asked for GPUs and cannot use them stops at once with exit 78 and says what it saw."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trainer_assets as assets
from kubetune_trainer.runtime import GpuFacts, arch_supported, driver_version, gpu_facts, gpu_problem

pytestmark = pytest.mark.trainer

H100 = GpuFacts(
    torch_version="2.9.0+cu130",
    torch_cuda="13.0",
    usable=8,
    device_files=8,
    driver="580.65.06",
    driver_cuda="13.0",
    capability=(9, 0),
    arch_list=("sm_80", "sm_90", "sm_100", "sm_120", "compute_120"),
)


def test_a_usable_gpu_node_and_a_cpu_job_pass() -> None:
    assert gpu_problem(8, 8, H100) is None
    assert gpu_problem(0, 1, dataclasses.replace(H100, usable=0, torch_cuda=None)) is None


@pytest.mark.parametrize(
    ("change", "processes", "says"),
    [
        (
            {"usable": 0, "driver": "535.104.05", "driver_cuda": "12.2"},
            8,
            "the node's driver is too old for CUDA 13.0; update it or use an image built for CUDA 12.2",
        ),
        (
            {"usable": 0, "device_files": 0, "driver": None, "driver_cuda": None},
            8,
            "no GPU was given to the container",
        ),
        ({"usable": 0}, 8, "CUDA cannot initialise"),
        ({"torch_cuda": None, "torch_version": "2.9.0+cpu"}, 8, "torch has no CUDA support"),
        ({"usable": 4}, 8, "fewer GPUs than the 8 worker processes of this pod"),
        ({"capability": (7, 0)}, 8, "no kernels for the GPU's sm_70 (it has sm_80, sm_90, sm_100"),
    ],
)
def test_each_unusable_gpu_is_named_with_what_was_seen(change: dict[str, object], processes: int, says: str) -> None:
    facts = dataclasses.replace(H100, **change)  # type: ignore[arg-type]
    problem = gpu_problem(8, processes, facts)
    assert problem is not None and says in problem
    assert problem.startswith(f"resources.gpusPerNode is 8 but this worker sees {facts.usable} usable GPU(s), ")
    assert f"driver {facts.driver or 'not loaded'} (CUDA {facts.driver_cuda or 'unknown'})" in problem
    assert f"torch {facts.torch_version} built for CUDA {facts.torch_cuda or 'none'}" in problem


def test_binary_and_ptx_compatibility() -> None:
    assert arch_supported((8, 6), ("sm_80",))  # same major, higher minor
    assert not arch_supported((8, 0), ("sm_86",))
    assert not arch_supported((9, 0), ("sm_80",))  # a binary never runs on another major
    assert arch_supported((9, 0), ("sm_80", "compute_80"))  # PTX is compiled for newer GPUs
    assert not arch_supported((7, 5), ("sm_80", "compute_80"))


def test_driver_version_from_proc() -> None:
    closed = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\nGCC version: 12"
    opened = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder)\n"
    assert driver_version(closed) == "535.104.05"
    assert driver_version(opened) == "580.65.06"
    assert driver_version("garbage") is None


def test_a_gpu_job_without_a_usable_gpu_exits_78_through_torchrun(
    tmp_path: Path, llama_dir: Path, train_jsonl: Path
) -> None:
    cfg = assets.write_config(tmp_path, assets.trainer_config(tmp_path, llama_dir, train_jsonl))
    done = assets.run_launcher(tmp_path, cfg, timeout=180, KUBETUNE_GPUS_PER_NODE="2")
    assert done.returncode == 78, done.stderr[-3000:]
    reason = (tmp_path / "termination-log").read_text()
    # The test environment hides every GPU (CUDA_VISIBLE_DEVICES=""): whatever this machine has, none is usable.
    here = gpu_facts()
    assert reason.startswith("resources.gpusPerNode is 2 but this worker sees 0 usable GPU(s), "), reason
    assert f"torch {torch.__version__} built for CUDA {torch.version.cuda or 'none'}" in reason
    assert f"driver {here.driver or 'not loaded'}" in reason
    assert not (tmp_path / "ckpt").exists()  # stopped before anything else


def gpu_check(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    repo = Path(__file__).resolve().parents[2]
    environment = assets.worker_env(PYTHON=sys.executable, MASTER_PORT=str(assets.free_port()), **env)
    return subprocess.run(
        [str(repo / "hack" / "gpu-check.sh"), *args], cwd=repo, env=environment, capture_output=True, text=True
    )


def test_the_gpu_check_refuses_a_machine_without_a_gpu_and_unknown_checks() -> None:
    done = gpu_check()
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr
    done = gpu_check("--only", "fsdp2,warp")
    assert done.returncode == 2 and "unknown check(s) warp" in done.stderr


@pytest.mark.slow
def test_the_gpu_check_dry_run_trains_fsdp2_loaded_the_sharded_way_like_the_whole_model() -> None:
    done = gpu_check("--dry-run", "--only", "fsdp2")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("PASS fsdp2-full: losses") for line in lines), done.stdout
    assert any(line.startswith("PASS fsdp2-lora: losses") for line in lines), done.stdout
