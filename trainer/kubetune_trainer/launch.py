"""`kubetune-launch`: the container entry point of every training pod.

It reads the environment the operator renders, checks the trainer config, waits until the rank-0 address
resolves (pods of an Indexed Job start before the headless Service has their DNS records), then runs torchrun
with a static rendezvous and reports how the workers ended.

Environment:

    KUBETUNE_CONFIG                     trainer config JSON (default /etc/kubetune/config.json)
    KUBETUNE_NNODES                     number of pods (default 1)
    KUBETUNE_NPROC_PER_NODE             worker processes per pod, normally the GPUs per pod (default 1)
    KUBETUNE_GPUS_PER_NODE              GPUs the pod asked for; the workers stop with exit 78 when they cannot use
                                        them (runtime.py; default 0: no check)
    JOB_COMPLETION_INDEX                this pod's node rank (set by the Indexed Job; default 0)
    KUBETUNE_MASTER_ADDR                rank 0's address, e.g. <job>-0.<service> (required when NNODES > 1;
                                        default 127.0.0.1)
    KUBETUNE_MASTER_PORT                rendezvous port on rank 0 (default 29500)
    KUBETUNE_RDZV_TIMEOUT_SECONDS       how long to wait for the address to resolve and for every node to join
                                        the rendezvous (default 600)
    KUBETUNE_SHUTDOWN_TIMEOUT_SECONDS   after SIGTERM, how long torchrun lets workers save a checkpoint before
                                        it kills them (default 120; keep it below the pod's grace period)
    KUBETUNE_TERMINATION_LOG            where the one-line failure reason goes (default /dev/termination-log)
    POD_IP, HF_TOKEN                    passed through to the workers (metrics bind address, hub token)
    MALLOC_MMAP_THRESHOLD_              glibc: memory blocks from this size up get their own mappings (default for
                                        the workers 1048576; see worker_env)

Exit code: torchrun exits 1 whenever any worker fails, whatever the worker's own code. So the launcher
stays torchrun's parent (it does not exec it): it forwards SIGTERM/SIGINT to torchrun (which forwards them
to the workers), and afterwards exits with the most telling code a worker reported through
$KUBETUNE_EXIT_STATUS_DIR (see errors.py): 78 for a permanent error, 143 after a SIGTERM checkpoint, the
worker's code for a crash; torchrun's own code when no worker reported anything (e.g. one was OOM-killed).
It writes the matching reason to the termination log; on success, rank 0's final figures (errors.py). A config
or environment error exits 78 before torchrun starts; an address that never resolves exits 1 (retryable: DNS may
just be slow).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from .config import load_config
from .errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_STATUS_DIR_ENV,
    EXIT_TERMINATED,
    PermanentError,
    Terminated,
    most_telling,
    read_exit_statuses,
    read_final,
    write_termination_log,
)

log = logging.getLogger("kubetune_launch")

DEFAULT_CONFIG = "/etc/kubetune/config.json"


@dataclass(frozen=True)
class LaunchSpec:
    config: str
    nnodes: int
    nproc_per_node: int
    node_rank: int
    master_addr: str
    master_port: int
    rdzv_timeout: int
    shutdown_timeout: int


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise PermanentError(f"environment {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise PermanentError(f"environment {name}={value} must be at least {minimum}")
    return value


def spec_from_env(env: Mapping[str, str]) -> LaunchSpec:
    nnodes = _int(env, "KUBETUNE_NNODES", 1, 1)
    node_rank = _int(env, "JOB_COMPLETION_INDEX", 0, 0)
    if node_rank >= nnodes:
        raise PermanentError(f"JOB_COMPLETION_INDEX={node_rank} is not below KUBETUNE_NNODES={nnodes}")
    addr = env.get("KUBETUNE_MASTER_ADDR", "").strip()
    if not addr:
        if nnodes > 1:
            raise PermanentError("KUBETUNE_MASTER_ADDR is required when KUBETUNE_NNODES > 1")
        addr = "127.0.0.1"
    port = _int(env, "KUBETUNE_MASTER_PORT", 29500, 1)
    if port > 65535:
        raise PermanentError(f"KUBETUNE_MASTER_PORT={port} is not a port")
    return LaunchSpec(
        config=env.get("KUBETUNE_CONFIG", "").strip() or DEFAULT_CONFIG,
        nnodes=nnodes,
        nproc_per_node=_int(env, "KUBETUNE_NPROC_PER_NODE", 1, 1),
        node_rank=node_rank,
        master_addr=addr,
        master_port=port,
        rdzv_timeout=_int(env, "KUBETUNE_RDZV_TIMEOUT_SECONDS", 600, 1),
        shutdown_timeout=_int(env, "KUBETUNE_SHUTDOWN_TIMEOUT_SECONDS", 120, 0),
    )


def torchrun_command(spec: LaunchSpec, python: str = sys.executable) -> list[str]:
    """torchrun with a static rendezvous on rank 0; restarts are the operator's business, not torchrun's."""
    return [
        python,
        "-m",
        "torch.distributed.run",
        f"--nnodes={spec.nnodes}",
        f"--nproc-per-node={spec.nproc_per_node}",
        f"--node-rank={spec.node_rank}",
        f"--master-addr={spec.master_addr}",
        f"--master-port={spec.master_port}",
        f"--rdzv-conf=timeout={spec.rdzv_timeout}",
        "--max-restarts=0",
        f"--shutdown-timeout={spec.shutdown_timeout}",
        "-m",
        "kubetune_trainer",
        "--config",
        spec.config,
    ]


def wait_for_address(
    host: str,
    timeout: float,
    resolve: Callable[[str], object] = lambda h: socket.getaddrinfo(h, None),
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Block until `host` resolves; return the seconds waited. Raise TimeoutError naming it otherwise."""
    start = clock()
    next_note = start + 30
    delay = 0.5
    while True:
        try:
            resolve(host)
            return clock() - start
        except (socket.gaierror, UnicodeError) as e:
            waited = clock() - start
            if waited >= timeout:
                raise TimeoutError(
                    f"rank-0 address {host} did not resolve within {timeout:.0f}s ({e}); is the headless Service "
                    "there and is the rank-0 pod scheduled?"
                ) from None
            if clock() >= next_note:
                log.info("still waiting for rank-0 address %s to resolve (%.0fs)", host, waited)
                next_note = clock() + 30
            sleep(min(delay, max(0.0, timeout - waited)))
            delay = min(delay * 2, 5.0)


def outcome(torchrun_code: int, statuses: list[tuple[int, str]], final: str | None = None) -> tuple[int, str | None]:
    """The launcher's exit code and termination message, from torchrun's code and what the workers reported:
    the reason of a failure, or on success rank 0's final figures (`final`)."""
    chosen = most_telling(statuses)
    if chosen is not None:
        return chosen
    if torchrun_code == 0:
        return EXIT_OK, final
    code = torchrun_code if torchrun_code > 0 else 128 - torchrun_code
    return code, (
        f"torchrun exited with code {torchrun_code} before any worker reported a reason (a rendezvous failure, or a "
        "worker killed, e.g. out of memory: see the pod log)"
    )


class Forwarder:
    """Passes SIGTERM/SIGINT on to torchrun once it runs; before that, stops the launcher."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.child is None:
            raise Terminated(f"stopped by {signal.Signals(signum).name} before training started")
        log.info("forwarding %s to torchrun; workers save a checkpoint and stop", signal.Signals(signum).name)
        self.child.send_signal(signum)


# glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB); after that, the layers FSDP2
# all-gathers on the CPU come from the heap, which fragments and does not shrink: a LoRA of 350M parameters on 4 CPU
# ranks (bench/sharded_memory.py) peaked 0.6 to 1 GiB higher a rank, 2 to 3 times its share of the weights. A fixed
# threshold keeps every block of 1 MiB and more in its own mapping, returned to the system when freed.
MALLOC_MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"


def worker_env(env: Mapping[str, str], status_dir: Path) -> dict[str, str]:
    """torchrun's environment (the workers'): the launcher's, a fixed glibc mmap threshold unless the pod sets one,
    and where workers report how they ended."""
    return {MALLOC_MMAP_THRESHOLD: str(1 << 20), **env, EXIT_STATUS_DIR_ENV: str(status_dir)}


def run(env: Mapping[str, str]) -> tuple[int, str | None]:
    spec = spec_from_env(env)
    load_config(spec.config)  # a bad config fails here, before any waiting
    forward = Forwarder()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    try:
        waited = wait_for_address(spec.master_addr, spec.rdzv_timeout)
    except TimeoutError as e:
        return EXIT_FAILURE, str(e)
    log.info(
        "node %d/%d: rank-0 address %s resolved after %.1fs; starting %d worker(s)",
        spec.node_rank,
        spec.nnodes,
        spec.master_addr,
        waited,
        spec.nproc_per_node,
    )
    status_dir = Path(tempfile.mkdtemp(prefix="kubetune-exit-"))
    try:
        cmd = torchrun_command(spec)
        log.info("%s", " ".join(cmd))
        forward.child = subprocess.Popen(cmd, env=worker_env(env, status_dir))
        code = forward.child.wait()
        return outcome(code, read_exit_statuses(status_dir), read_final(status_dir))
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s launcher %(levelname)s: %(message)s")
    try:
        code, message = run(os.environ)
    except PermanentError as e:
        code, message = EXIT_CONFIG, str(e)
    except Terminated as e:
        code, message = EXIT_TERMINATED, str(e)
    if message:
        if code != EXIT_OK:
            log.error("exit %d: %s", code, message)
        write_termination_log(message)
    return code


if __name__ == "__main__":
    sys.exit(main())
