"""Process layout: rank, world size, device, and the process groups the trainer talks over.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. Without them the trainer runs as one process. GPU runs use
NCCL for tensors; a second, gloo group carries the small per-step control values (token counts, stop flags)
so that agreeing on them never waits for the GPU.

A pod that asked for GPUs (KUBETUNE_GPUS_PER_NODE > 0, the job's resources.gpusPerNode) and cannot use them
stops with a PermanentError naming what it saw (GPU count, driver and CUDA versions), instead of training on
the CPU at a hundredth of the speed: a driver too old for the image's CUDA, a GPU this torch build has no
kernels for, or fewer GPUs than processes do not get better on a retry.
"""

from __future__ import annotations

import ctypes
import datetime
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import PermanentError

GPUS_ENV = "KUBETUNE_GPUS_PER_NODE"


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control_group: Any = None  # gloo group for CPU-side agreement; None when single-process

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.control_group)

    def sum_(self, values: list[float]) -> list[float]:
        """Sum small host-side values over every rank (a no-op for one process)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.control_group)
        return t.tolist()

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control_group)
        return out


@dataclass(frozen=True)
class GpuFacts:
    """What this process can tell about its GPUs without using one."""

    torch_version: str
    torch_cuda: str | None  # the CUDA version torch was built with; None for a CPU-only build
    usable: int  # GPUs torch can use (0 when CUDA cannot initialise)
    device_files: int  # /dev/nvidia<N>: GPUs the container was given, usable or not
    driver: str | None  # kernel driver version, e.g. 550.54.15
    driver_cuda: str | None  # newest CUDA the driver supports, e.g. 12.4
    capability: tuple[int, int] | None = None  # of the first usable GPU
    arch_list: tuple[str, ...] = ()  # what torch has kernels for: sm_XY (binaries), compute_XY (PTX)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:2])


def arch_supported(capability: tuple[int, int], arch_list: tuple[str, ...]) -> bool:
    """A GPU runs a binary built for its major version and an equal or lower minor, or PTX of any lower version."""
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit():
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return not arch_list  # an empty list: torch does not say, so do not guess


def gpu_problem(expected: int, processes: int, f: GpuFacts) -> str | None:
    """Why a pod that asked for `expected` GPUs and runs `processes` workers cannot train on them, or None."""
    if expected <= 0:
        return None
    seen = (
        f"{f.usable} usable GPU(s), {f.device_files} NVIDIA device file(s), driver {f.driver or 'not loaded'} "
        f"(CUDA {f.driver_cuda or 'unknown'}), torch {f.torch_version} built for CUDA {f.torch_cuda or 'none'}"
    )
    asked = f"resources.gpusPerNode is {expected} but this worker sees {seen}"
    if f.torch_cuda is None:
        return f"{asked}: this trainer image's torch has no CUDA support; use a CUDA trainer image"
    if f.usable == 0:
        if f.device_files == 0:
            why = "no GPU was given to the container (is the NVIDIA device plugin / container runtime set up?)"
        elif f.driver_cuda and _version_tuple(f.driver_cuda) < _version_tuple(f.torch_cuda):
            why = (
                f"the node's driver is too old for CUDA {f.torch_cuda}; update it or use an image built for CUDA "
                f"{f.driver_cuda}"
            )
        else:
            why = "CUDA cannot initialise (see the worker log for the CUDA error)"
        return f"{asked}: {why}"
    if f.usable < processes:
        return f"{asked}: fewer GPUs than the {processes} worker processes of this pod"
    if f.capability and not arch_supported(f.capability, f.arch_list):
        cap = f"sm_{f.capability[0]}{f.capability[1]}"
        return f"{asked}: this torch build has no kernels for the GPU's {cap} (it has {', '.join(f.arch_list)})"
    return None


def driver_version(proc_text: str) -> str | None:
    """The version in /proc/driver/nvidia/version ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15 ...")."""
    m = re.search(r"NVRM version:.*?\s(\d+\.\d+(?:\.\d+)?)\s", proc_text)
    return m.group(1) if m else None


def driver_cuda_version() -> str | None:
    """The newest CUDA the installed driver supports, asked of libcuda itself (torch may fail to load it)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def gpu_facts() -> GpuFacts:
    try:
        proc_text: str | None = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        proc_text = None
    usable = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return GpuFacts(
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        usable=usable,
        device_files=len(glob.glob("/dev/nvidia[0-9]*")),
        driver=driver_version(proc_text) if proc_text else None,
        driver_cuda=driver_cuda_version(),
        capability=torch.cuda.get_device_capability(0) if usable else None,
        arch_list=tuple(torch.cuda.get_arch_list()) if usable else (),
    )


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of handing them back to the kernel.

    A training step allocates and frees the same activation-sized blocks (MiBs each) over and over; by default
    glibc unmaps or trims them on free, so every step faults hundreds of MiB of fresh pages in again, which on
    a CPU run cost ~8% of the step. Returns whether the allocator took the settings (False off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def init_runtime(timeout_seconds: float = 1800) -> Runtime:
    keep_freed_memory()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    expected = int(os.environ.get(GPUS_ENV) or 0)
    if expected > 0:
        problem = gpu_problem(expected, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), gpu_facts())
        if problem:
            raise PermanentError(problem)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world == 1:
        return Runtime(rank, world, local_rank, device)
    timeout = datetime.timedelta(seconds=timeout_seconds)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timeout, device_id=device if backend == "nccl" else None)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
    return Runtime(rank, world, local_rank, device, control)


def shutdown_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()
