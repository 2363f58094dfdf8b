"""Runs one pod's containers as local processes and reports its status: the I/O around podspec and status.

A PodWorker lives from the moment the agent sees a pod bound to its node until the pod has ended for good
(every container finished and none will restart) or has been stopped (deleted, or the agent shuts down).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from kubetune_dev.nodeagent import podspec
from kubetune_dev.nodeagent.kube import STRATEGIC_MERGE_PATCH, ApiError, Kube, retrying
from kubetune_dev.nodeagent.logs import pod_dir
from kubetune_dev.nodeagent.network import PodNetwork
from kubetune_dev.nodeagent.podspec import ConfigError, Mount, Objects, PlannedVolume
from kubetune_dev.nodeagent.status import (
    ContainerRun,
    now,
    pod_status,
    terminated_state,
    termination_message,
)

log = logging.getLogger("kubetune.nodeagent")

SANDBOX = Path(__file__).with_name("sandbox.py")
MEMORY_ROOT = Path("/dev/shm/kubetune-nodeagent")
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0  # seconds before a restart; the kubelet's are 10 s and 5 min
CONFIG_RETRY_SECONDS = 2.0
# How long the sandbox may take to set a container up and exec its command before the agent reports it running
# anyway (normally well under a second; much longer only on a machine starved of CPU).
EXEC_WAIT_SECONDS = 60.0


@dataclass
class NodeContext:
    """What every pod worker of one agent shares."""

    kube: Kube
    node: str
    root: Path
    network: PodNetwork
    host_ip: str
    allocatable: dict[str, str]
    service_env: dict[str, str]  # KUBERNETES_SERVICE_HOST/PORT: in-cluster clients find the API server
    base_env: dict[str, str]  # PATH and HOME of the agent: what an image would otherwise provide


def sandbox_command(plan_file: Path) -> list[str]:
    """The command line that starts a container: the sandbox, in a private mount and hostname namespace."""
    return ["unshare", "--mount", "--uts", "--", sys.executable, str(SANDBOX), str(plan_file)]


async def _read_until_closed(fd: int, timeout: float) -> bytes:
    """What is written to pipe `fd` until every writer has closed it (or `timeout` seconds pass); then close it."""
    loop = asyncio.get_running_loop()
    closed = loop.create_future()
    data = bytearray()

    def read() -> None:
        chunk = os.read(fd, 64)
        data.extend(chunk)
        if not chunk and not closed.done():
            closed.set_result(None)

    loop.add_reader(fd, read)
    try:
        await asyncio.wait_for(closed, timeout)
    except TimeoutError:
        log.warning("a container's command had not started after %.0fs; reporting it running anyway", timeout)
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return bytes(data)


def read_oom_kills() -> int:
    """The kernel's count of OOM kills so far (0 where /proc/vmstat has no such line)."""
    with contextlib.suppress(OSError):
        if m := re.search(r"^oom_kill (\d+)$", Path("/proc/vmstat").read_text(), re.MULTILINE):
            return int(m.group(1))
    return 0


def process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: tells a process from a later one that reuses its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def signal_process(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def kill_recorded_processes(directory: Path) -> None:
    """SIGKILL the processes an agent recorded for a pod, where they still run: each container's main process (the
    kernel kills the rest of the container with it) and the sandbox process that waits for it (the main process
    dies with it: that covers a main process not recorded yet)."""
    state = directory / "state.json"
    if not state.exists():
        return
    for processes in json.loads(state.read_text()).get("processes", {}).values():
        for pid, started in processes:
            if process_start_time(pid) == started:
                signal_process(pid, signal.SIGKILL)


class PodWorker:
    def __init__(self, ctx: NodeContext, pod: dict) -> None:
        self.ctx = ctx
        self.pod = pod
        meta, spec = pod["metadata"], pod["spec"]
        self.uid, self.namespace, self.name = meta["uid"], meta["namespace"], meta["name"]
        self.path = f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"
        self.dir = pod_dir(ctx.root, self.namespace, self.name, self.uid)
        self.memory_dir = MEMORY_ROOT / self.uid
        self.restart_policy = spec.get("restartPolicy", "Always")
        self.init_specs = spec.get("initContainers") or []
        self.specs = spec["containers"]
        self.init_runs = [ContainerRun(c["name"], c.get("image", "")) for c in self.init_specs]
        self.runs = [ContainerRun(c["name"], c.get("image", "")) for c in self.specs]
        self.conditions: list[dict] = list((pod.get("status") or {}).get("conditions") or [])
        self.pod_ip = ""
        self.start_time = ""
        self.volumes: dict[str, PlannedVolume] = {}
        self.stopping = asyncio.Event()
        self.deadline: float | None = None
        self.delete_when_stopped = False
        self.reason = ""
        self.message = ""
        self._processes: dict[str, list[list]] = {}  # container -> [pid, start time] of its processes to kill
        self._report_lock = asyncio.Lock()

    # ------------------------------------------------------------------------------------------
    # Requests from the agent

    def update(self, pod: dict) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.stop(podspec.grace_period(pod), delete=True)

    def stop(self, grace: float, *, delete: bool = False, reason: str = "", message: str = "") -> None:
        """Stop the pod: SIGTERM now, SIGKILL after `grace` seconds. A later, shorter grace wins."""
        deadline = asyncio.get_running_loop().time() + grace
        if self.deadline is None or deadline < self.deadline:
            self.deadline = deadline
        self.delete_when_stopped |= delete
        if reason and not self.reason:
            self.reason, self.message = reason, message
        self.stopping.set()

    # ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if await self._set_up() and await self._run_init_containers():
                await asyncio.gather(*(self._run_container(s, r) for s, r in zip(self.specs, self.runs, strict=True)))
            await self._report()
            if self.delete_when_stopped:
                await delete_pod(self.ctx.kube, self.namespace, self.name, self.uid)
        finally:
            self.ctx.network.release(self.uid)
            # No container of the pod runs again: give back the memory its Memory-medium emptyDirs hold.
            shutil.rmtree(self.memory_dir, ignore_errors=True)
            if self.delete_when_stopped:
                remove_pod_volumes(self.dir, self.uid)

    async def _set_up(self) -> bool:
        """Address, name, directories and volumes; retried while a referenced object is missing."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_state()
        self.pod_ip = self.ctx.network.allocate(self.uid, podspec.pod_dns_names(self.pod))
        self.start_time = now()
        await self._report()
        while not self.stopping.is_set():
            try:
                layout = podspec.Layout(
                    claims=self.ctx.root / "volumes",
                    pod_volumes=self.dir / "volumes",
                    memory_volumes=self.memory_dir,
                )
                self.volumes = podspec.plan_volumes(self.pod, layout)
                await self._materialise_volumes()
                return True
            except (ConfigError, ApiError) as e:
                for run in self.init_runs + self.runs:
                    run.state = {"waiting": {"reason": "ContainerCreating", "message": f"volumes: {e}"}}
                await self._report()
                await self._sleep(CONFIG_RETRY_SECONDS)
        return False

    async def _run_init_containers(self) -> bool:
        if self.init_specs:
            for run in self.runs:
                run.state = {"waiting": {"reason": "PodInitializing"}}
        for spec, run in zip(self.init_specs, self.init_runs, strict=True):
            await self._run_container(spec, run, init=True)
            if not run.succeeded:
                return False
        return True

    async def _run_container(self, spec: dict, run: ContainerRun, *, init: bool = False) -> None:
        """Run a container until it is done for good: restarted with backoff as the policy says."""
        backoff = BACKOFF_FIRST
        while not self.stopping.is_set():
            started = await self._start(spec, run)
            if started is None:
                await self._sleep(CONFIG_RETRY_SECONDS)
                continue
            await self._wait(spec, run, *started)
            if self.stopping.is_set() or not self._restarts(run, init):
                return
            run.last_state, run.state = (
                run.state,
                {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": f"back-off {backoff:g}s restarting container={run.name} pod={self.name}",
                    }
                },
            )
            await self._report()
            await self._sleep(backoff)
            if self.stopping.is_set():
                run.state = run.last_state  # the pod ends with the last run's termination
                return
            backoff = min(backoff * 2, BACKOFF_MAX)
            run.restart_count += 1

    def _restarts(self, run: ContainerRun, init: bool) -> bool:
        if self.restart_policy == "Never":
            return False
        if init or self.restart_policy == "OnFailure":
            return not run.succeeded
        return True

    # ------------------------------------------------------------------------------------------
    # One run of one container

    async def _start(self, spec: dict, run: ContainerRun) -> tuple[asyncio.subprocess.Process, int, Path, int] | None:
        name = spec["name"]
        try:
            objects = await self._fetch_objects(with_tokens=False)
            env = podspec.resolve_env(self._pod_with_ips(), spec, objects, self.ctx.allocatable, self.ctx.service_env)
            argv = podspec.command_line(spec, env)
            mounts = podspec.container_mounts(spec, self.volumes, env)
        except (ConfigError, ApiError) as e:
            run.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
            await self._report()
            return None
        termination_file = self.dir / "termination" / name
        termination_file.parent.mkdir(exist_ok=True)
        termination_file.write_bytes(b"")
        mounts.append(Mount(termination_file, podspec.termination_message_path(spec), False))
        if not any(m.target == "/etc/hosts" for m in mounts):
            mounts.append(Mount(self.ctx.network.hosts, "/etc/hosts", True))
        for m in mounts:
            if not m.source.exists():  # a subPath the kubelet would create
                m.source.mkdir(parents=True, exist_ok=True)
        hostname = podspec.pod_hostname(self.pod)
        error_file = self.dir / "errors" / name
        error_file.parent.mkdir(exist_ok=True)
        error_file.unlink(missing_ok=True)
        started_read, started_write = os.pipe()
        plan = {
            "started_fd": started_write,
            "mounts": [
                {"source": str(m.source), "target": m.target, "read_only": m.read_only}
                for m in sorted(mounts, key=lambda m: len(Path(m.target).parts))
            ],
            "hostname": hostname,
            "workdir": spec.get("workingDir") or "/",
            "argv": argv,
            "env": {**self.ctx.base_env, "HOSTNAME": hostname, **env},
            "error_file": str(error_file),
            "scratch": str(self.dir / "sandbox" / name),
        }
        plan_file = self.dir / "plans" / f"{name}.json"
        plan_file.parent.mkdir(exist_ok=True)
        # The plan holds the container's secrets: readable by root only; the sandbox deletes it once read.
        plan_file.touch(mode=0o600)
        plan_file.write_text(json.dumps(plan))
        log_file = self.dir / "logs" / name / f"{run.restart_count}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        oom_before = read_oom_kills()
        try:
            with open(log_file, "ab") as out:
                proc = await asyncio.create_subprocess_exec(
                    *sandbox_command(plan_file),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # out of the agent's process group: a Ctrl-C to the agent stops it alone
                    pass_fds=(started_write,),
                )
        finally:
            os.close(started_write)
        run.container_id = f"local://{self.uid}/{name}/{run.restart_count}"
        self._processes[name] = [[proc.pid, process_start_time(proc.pid)]]
        self._write_state()
        # The sandbox reports the pid of the container's main process (PID 1 of its PID namespace) as it forks it,
        # and the pipe closes once that process runs the command: only then is the container running, as a runtime
        # reports it (a SIGTERM before would reach the sandbox's code, not the command). With no pid reported (the
        # sandbox failed, or is starved of CPU), signals go to the sandbox process: the main process dies with it.
        reported = await _read_until_closed(started_read, EXEC_WAIT_SECONDS)
        main_pid = int(reported) if reported else proc.pid
        if reported:
            self._processes[name].append([main_pid, process_start_time(main_pid)])
            self._write_state()
        run.state = {"running": {"startedAt": now()}}
        log.info("pod %s/%s: started container %s (pid %d)", self.namespace, self.name, name, main_pid)
        await self._report()
        return proc, main_pid, log_file, oom_before

    async def _wait(
        self,
        spec: dict,
        run: ContainerRun,
        proc: asyncio.subprocess.Process,
        main_pid: int,
        log_file: Path,
        oom_before: int,
    ) -> None:
        """Wait for the sandbox process, which ends as the main process did once every process of the container has
        ended (the kernel kills them when the main process, their PID namespace's init, ends)."""
        exited = asyncio.ensure_future(proc.wait())
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not exited.done():
            # Like a container runtime, SIGTERM goes to the main process only (it may forward it, as the launcher
            # does to torchrun; as PID 1 it ignores it without a handler); SIGKILL to it at the deadline ends them all.
            signal_process(main_pid, signal.SIGTERM)
            loop = asyncio.get_running_loop()
            while not exited.done():
                # Re-read the deadline each round: a second deletion may have shortened it.
                remaining = (self.deadline or loop.time()) - loop.time()
                if remaining <= 0:
                    signal_process(main_pid, signal.SIGKILL)
                    await exited
                    break
                await asyncio.wait({exited}, timeout=min(remaining, 0.25))
        returncode = exited.result()
        error_file = self.dir / "errors" / spec["name"]
        start_error = (error_file.read_text() if error_file.exists() else "") or None
        exit_code = returncode if returncode >= 0 else 128 - returncode
        message = termination_message(
            (self.dir / "termination" / spec["name"]).read_bytes(),
            _log_tail(log_file),
            exit_code,
            spec.get("terminationMessagePolicy", "File"),
        )
        run.state = {
            "terminated": terminated_state(
                returncode,
                started_at=run.state["running"]["startedAt"],
                finished_at=now(),
                container_id=run.container_id,
                message=message,
                oom_killed=read_oom_kills() > oom_before,
                start_error=start_error,
            )
        }
        log_file.with_suffix(".done").write_text(str(exit_code))
        log.info("pod %s/%s: container %s exited %d", self.namespace, self.name, spec["name"], exit_code)
        await self._report()

    # ------------------------------------------------------------------------------------------
    # Helpers

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake as soon as the pod is asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    def _pod_with_ips(self) -> dict:
        pod = copy.deepcopy(self.pod)
        pod.setdefault("status", {}).update(
            podIP=self.pod_ip,
            podIPs=[{"ip": self.pod_ip}],
            hostIP=self.ctx.host_ip,
            hostIPs=[{"ip": self.ctx.host_ip}],
        )
        return pod

    def _write_state(self) -> None:
        state = {"node": self.ctx.node, "processes": self._processes}
        (self.dir / "state.json").write_text(json.dumps(state))

    async def _fetch_objects(self, *, with_tokens: bool) -> Objects:
        kube, ns = self.ctx.kube, self.namespace
        configmaps, secrets = podspec.referenced_objects(self.pod)
        tokens = {}
        if with_tokens:
            account = self.pod["spec"].get("serviceAccountName") or "default"
            for audience, seconds in podspec.token_requests(self.pod):
                request = {
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenRequest",
                    "spec": {
                        "audiences": [audience] if audience else [],
                        "expirationSeconds": seconds,
                        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid},
                    },
                }
                answer = await kube.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/{account}/token", request)
                tokens[(audience, seconds)] = answer["status"]["token"]
        return Objects(
            configmaps={n: await kube.get_or_none(f"/api/v1/namespaces/{ns}/configmaps/{n}") for n in configmaps},
            secrets={n: await kube.get_or_none(f"/api/v1/namespaces/{ns}/secrets/{n}") for n in secrets},
            tokens=tokens,
        )

    async def _materialise_volumes(self) -> None:
        needs_objects = any(v.kind == "files" for v in self.volumes.values())
        objects = await self._fetch_objects(with_tokens=True) if needs_objects else Objects()
        pod = self._pod_with_ips()
        by_name = {v["name"]: v for v in self.pod["spec"].get("volumes") or []}
        for name, planned in self.volumes.items():
            if planned.kind == "files":
                files = podspec.volume_files(by_name[name], pod, objects, self.ctx.allocatable)
                shutil.rmtree(planned.path, ignore_errors=True)
                planned.path.mkdir(parents=True)
                for relative, (content, mode) in files.items():
                    target = planned.path / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(content)
                    target.chmod(mode)
            elif planned.kind != "host" or by_name[name]["hostPath"].get("type") == "DirectoryOrCreate":
                planned.path.mkdir(parents=True, exist_ok=True)

    async def _report(self) -> None:
        async with self._report_lock:
            status = pod_status(
                restart_policy=self.restart_policy,
                init_runs=self.init_runs,
                runs=self.runs,
                previous_conditions=self.conditions,
                pod_ip=self.pod_ip,
                host_ip=self.ctx.host_ip,
                start_time=self.start_time,
                stopping=self.stopping.is_set(),
                reason=self.reason,
                message=self.message,
            )
            self.conditions = status["conditions"]
            try:
                await retrying(
                    lambda: self.ctx.kube.request(
                        "PATCH", self.path + "/status", {"status": status}, content_type=STRATEGIC_MERGE_PATCH
                    )
                )
            except ApiError as e:
                if e.status == 404:  # removed behind our back (force deletion): stop what still runs
                    self.stop(0)
                else:
                    log.warning("pod %s/%s: status update failed: %s", self.namespace, self.name, e)


def _log_tail(path: Path, size: int = 8192) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read()


async def delete_pod(kube: Kube, namespace: str, name: str, uid: str) -> None:
    """The kubelet's last word on a deleted pod: its processes are gone, so remove it now."""
    body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
    try:
        await retrying(lambda: kube.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", body))
    except ApiError as e:
        if e.status not in (404, 409):  # already gone, or a new pod of the same name
            raise


def remove_pod_volumes(directory: Path, uid: str) -> None:
    """A deleted pod's emptyDirs and materialised files go; its logs stay until the agent next starts."""
    shutil.rmtree(directory / "volumes", ignore_errors=True)
    shutil.rmtree(directory / "plans", ignore_errors=True)
    shutil.rmtree(directory / "sandbox", ignore_errors=True)
    shutil.rmtree(MEMORY_ROOT / uid, ignore_errors=True)
