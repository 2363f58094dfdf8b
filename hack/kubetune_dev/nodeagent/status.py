"""Pure functions that turn what the agent knows about a pod's processes into the status the API expects:
container states, the pod phase (the kubelet's rules), conditions, and the Node's own status."""

from __future__ import annotations

import datetime as dt
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field

TERMINAL_PHASES = ("Succeeded", "Failed")
# The kubelet keeps at most this much of a termination message, and this much of a log as a fallback.
MAX_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    """The MicroTime format Lease.spec.renewTime wants."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class ContainerRun:
    """One container as the agent tracks it. `state` and `last_state` are API ContainerState dicts."""

    name: str
    image: str
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = field(default_factory=dict)
    restart_count: int = 0
    container_id: str = ""

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def terminated(self) -> bool:
        return "terminated" in self.state

    @property
    def succeeded(self) -> bool:
        return self.terminated and self.state["terminated"]["exitCode"] == 0

    @property
    def has_run(self) -> bool:
        """Started at least once (now running, or terminated now or before a restart)."""
        return self.running or self.terminated or bool(self.last_state)


def terminated_state(
    returncode: int,
    *,
    started_at: str,
    finished_at: str,
    container_id: str,
    message: str = "",
    oom_killed: bool = False,
    start_error: str | None = None,
) -> dict:
    """A `terminated` ContainerState from a Popen returncode (negative when a signal killed the process)."""
    if start_error is not None:
        return {
            "exitCode": 128,
            "reason": "StartError",
            "message": start_error,
            "startedAt": started_at,
            "finishedAt": finished_at,
            "containerID": container_id,
        }
    state: dict = {"startedAt": started_at, "finishedAt": finished_at, "containerID": container_id}
    if returncode < 0:
        # A container runtime reports death by signal as 128 + the signal number.
        state["exitCode"] = 128 - returncode
        state["signal"] = -returncode
    else:
        state["exitCode"] = returncode
    if oom_killed and returncode == -signal.SIGKILL:
        state["reason"] = "OOMKilled"
    else:
        state["reason"] = "Completed" if state["exitCode"] == 0 else "Error"
    if message:
        state["message"] = message
    return state


def termination_message(message_file: bytes, log_tail: bytes, exit_code: int, policy: str = "File") -> str:
    """The termination message: the file's content, or with FallbackToLogsOnError and a failure, the log tail."""
    text = message_file[:MAX_MESSAGE_BYTES].decode(errors="replace")
    if text or policy != "FallbackToLogsOnError" or exit_code == 0:
        return text
    lines = log_tail.splitlines(keepends=True)[-FALLBACK_LOG_LINES:]
    return b"".join(lines)[-FALLBACK_LOG_BYTES:].decode(errors="replace")


def container_status(run: ContainerRun, *, ready: bool) -> dict:
    status = {
        "name": run.name,
        "image": run.image,
        "imageID": "",
        "ready": ready,
        "started": run.running,
        "restartCount": run.restart_count,
        "state": run.state,
        "lastState": run.last_state,
    }
    if run.container_id:
        status["containerID"] = run.container_id
    return status


def pod_phase(restart_policy: str, init_runs: list[ContainerRun], runs: list[ContainerRun]) -> str:
    """The kubelet's phase rules. A container waiting after a run (backing off before a restart) counts as
    stopped; pass restart_policy "Never" for a pod being stopped, so its phase becomes terminal."""
    for run in init_runs:
        if run.succeeded:
            continue
        if run.terminated and restart_policy == "Never":
            return "Failed"
        return "Pending"
    waiting = sum(1 for r in runs if not r.has_run)
    running = sum(1 for r in runs if r.running)
    stopped = [r for r in runs if r.has_run and not r.running]
    if waiting:
        return "Pending"
    if running:
        return "Running"
    if restart_policy == "Always":
        return "Running"
    if all(r.succeeded for r in stopped):
        return "Succeeded"
    return "Failed" if restart_policy == "Never" else "Running"


def _condition(
    kind: str, ok: bool, previous: Mapping[str, dict], reason: str = "", message: str = "", at: str = ""
) -> dict:
    status = "True" if ok else "False"
    before = previous.get(kind)
    # The transition time only moves when the status does.
    changed = before is None or before.get("status") != status
    # None clears a field the previous status had (the status is sent as a strategic merge patch).
    return {
        "type": kind,
        "status": status,
        "reason": None if ok or not reason else reason,
        "message": None if ok or not message else message,
        "lastProbeTime": None,
        "lastTransitionTime": (at or now()) if changed else before.get("lastTransitionTime"),
    }


def pod_conditions(
    phase: str, init_runs: list[ContainerRun], runs: list[ContainerRun], previous: list[dict], *, at: str = ""
) -> list[dict]:
    """PodReadyToStartContainers, Initialized, ContainersReady and Ready (PodScheduled is the scheduler's)."""
    prev = {c["type"]: c for c in previous}
    incomplete = [r.name for r in init_runs if not r.succeeded]
    unready = [r.name for r in runs if not r.running]
    terminal = phase in TERMINAL_PHASES
    ready_reason = "PodCompleted" if terminal else "ContainersNotReady"
    ready_message = "" if terminal else f"containers with unready status: [{' '.join(unready)}]"
    return [
        _condition("PodReadyToStartContainers", not terminal, prev, at=at),
        _condition(
            "Initialized",
            not incomplete,
            prev,
            "ContainersNotInitialized",
            f"containers with incomplete status: [{' '.join(incomplete)}]",
            at=at,
        ),
        _condition("ContainersReady", not unready and not terminal, prev, ready_reason, ready_message, at=at),
        _condition("Ready", not unready and not terminal, prev, ready_reason, ready_message, at=at),
    ]


def pod_status(
    *,
    restart_policy: str,
    init_runs: list[ContainerRun],
    runs: list[ContainerRun],
    previous_conditions: list[dict],
    pod_ip: str,
    host_ip: str,
    start_time: str,
    stopping: bool = False,
    reason: str = "",
    message: str = "",
) -> dict:
    """The pod status to patch. A stopping pod that has no process left is given a terminal phase;
    `reason` marks it Failed whatever the exit codes (node shutdown, agent restart)."""
    policy = "Never" if stopping else restart_policy
    phase = pod_phase(policy, init_runs, runs)
    if stopping and phase not in TERMINAL_PHASES and not any(r.running for r in init_runs + runs):
        phase = "Failed"
    if reason and phase in TERMINAL_PHASES:
        phase = "Failed"
    status: dict = {
        "phase": phase,
        "conditions": pod_conditions(phase, init_runs, runs, previous_conditions),
        "initContainerStatuses": [container_status(r, ready=r.succeeded) for r in init_runs],
        "containerStatuses": [container_status(r, ready=r.running and not stopping) for r in runs],
    }
    if host_ip:
        status.update(hostIP=host_ip, hostIPs=[{"ip": host_ip}])
    if pod_ip:
        status.update(podIP=pod_ip, podIPs=[{"ip": pod_ip}])
    if start_time:
        status["startTime"] = start_time
    if reason and phase in TERMINAL_PHASES:
        status["reason"] = reason
        status["message"] = message
    return status


# --------------------------------------------------------------------------------------------------
# Node


def node_conditions(previous: list[dict], *, ready: bool, at: str, reason: str = "", message: str = "") -> list[dict]:
    prev = {c["type"]: c for c in previous}

    def cond(kind: str, status: str, why: str, text: str) -> dict:
        before = prev.get(kind)
        changed = before is None or before.get("status") != status
        return {
            "type": kind,
            "status": status,
            "reason": why,
            "message": text,
            "lastHeartbeatTime": at,
            "lastTransitionTime": at if changed else before["lastTransitionTime"],
        }

    return [
        cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
        cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
        cond(
            "Ready",
            "True" if ready else "False",
            reason or ("KubeletReady" if ready else "KubeletNotReady"),
            message or ("local node agent is posting ready status" if ready else "local node agent stopped"),
        ),
    ]


def node_status(
    *,
    capacity: Mapping[str, str],
    address: str,
    port: int,
    conditions: list[dict],
    architecture: str,
    kernel: str,
    os_image: str,
    boot_id: str,
) -> dict:
    return {
        "capacity": dict(capacity),
        "allocatable": dict(capacity),
        "conditions": conditions,
        "addresses": [{"type": "InternalIP", "address": address}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
        "nodeInfo": {
            "architecture": architecture,
            "bootID": boot_id,
            "containerRuntimeVersion": "kubetune-local-process://0.1",
            "kernelVersion": kernel,
            "kubeProxyVersion": "",
            "kubeletVersion": "kubetune-nodeagent-0.1",
            "machineID": "",
            "operatingSystem": "linux",
            "osImage": os_image,
            "systemUUID": "",
        },
    }


def orphaned_status(pod: dict, *, at: str, reason: str, message: str) -> dict:
    """The final status of a pod an earlier run of the agent started: its processes are gone (or were just
    killed), so every container not already terminated is reported terminated with an unknown status,
    as the kubelet does, and the pod Failed with `reason`."""
    status = pod.get("status") or {}

    def runs(key: str, specs: list[dict]) -> list[ContainerRun]:
        known = {s["name"]: s for s in status.get(key) or []}
        result = []
        for spec in specs:
            seen = known.get(spec["name"], {})
            run = ContainerRun(
                spec["name"],
                spec.get("image", ""),
                state=seen.get("state") or {},
                last_state=seen.get("lastState") or {},
                restart_count=seen.get("restartCount", 0),
                container_id=seen.get("containerID", ""),
            )
            if not run.terminated:
                gone = {"exitCode": 137, "reason": "ContainerStatusUnknown", "message": message, "finishedAt": at}
                if started := (run.state.get("running") or {}).get("startedAt"):
                    gone["startedAt"] = started
                run.state = {"terminated": gone}
            result.append(run)
        return result

    spec = pod["spec"]
    return pod_status(
        restart_policy="Never",
        init_runs=runs("initContainerStatuses", spec.get("initContainers") or []),
        runs=runs("containerStatuses", spec["containers"]),
        previous_conditions=status.get("conditions") or [],
        pod_ip=status.get("podIP", ""),
        host_ip=status.get("hostIP", ""),
        start_time=status.get("startTime", ""),
        stopping=True,
        reason=reason,
        message=message,
    )
