"""Unit tests for the pure status functions: container terminations, the kubelet's phase rules, conditions."""

from __future__ import annotations

import signal

import pytest
from kubetune_dev.nodeagent.status import (
    ContainerRun,
    node_conditions,
    orphaned_status,
    pod_conditions,
    pod_phase,
    pod_status,
    terminated_state,
    termination_message,
)

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z"


def run(name: str = "c", *, state: str = "waiting", exit_code: int = 0, restarted: bool = False) -> ContainerRun:
    r = ContainerRun(name, "img")
    if state == "running":
        r.state = {"running": {"startedAt": T0}}
    elif state == "terminated":
        r.state = {"terminated": {"exitCode": exit_code}}
    if restarted:
        r.last_state = {"terminated": {"exitCode": 1}}
    return r


def test_terminated_state_reasons() -> None:
    common = {"started_at": T0, "finished_at": T1, "container_id": "local://x"}
    assert terminated_state(0, **common)["reason"] == "Completed"
    failed = terminated_state(3, message="disk on fire", **common)
    assert (failed["exitCode"], failed["reason"], failed["message"]) == (3, "Error", "disk on fire")
    killed = terminated_state(-signal.SIGKILL, **common)
    assert (killed["exitCode"], killed["signal"], killed["reason"]) == (137, 9, "Error")
    assert terminated_state(-signal.SIGKILL, oom_killed=True, **common)["reason"] == "OOMKilled"
    assert terminated_state(-signal.SIGTERM, oom_killed=True, **common)["reason"] == "Error"
    start_error = terminated_state(128, start_error="exec: not found", **common)
    assert (start_error["exitCode"], start_error["reason"]) == (128, "StartError")


def test_termination_message_fallback_to_logs() -> None:
    log = b"".join(f"line {i}\n".encode() for i in range(100))
    assert termination_message(b"from file", log, 1, "FallbackToLogsOnError") == "from file"
    assert termination_message(b"", log, 0, "FallbackToLogsOnError") == ""
    assert termination_message(b"", log, 1, "File") == ""
    fallback = termination_message(b"", log, 1, "FallbackToLogsOnError")
    assert fallback.startswith("line 20\n") and fallback.endswith("line 99\n")
    assert len(termination_message(b"x" * 10000, b"", 1)) == 4096


@pytest.mark.parametrize(
    ("policy", "inits", "containers", "phase"),
    [
        ("Never", [], [run()], "Pending"),
        ("Never", [run("i", state="running")], [run()], "Pending"),
        ("Never", [run("i", state="terminated", exit_code=1)], [run()], "Failed"),
        ("OnFailure", [run("i", state="terminated", exit_code=1)], [run()], "Pending"),
        ("Never", [run("i", state="terminated")], [run(state="running")], "Running"),
        ("Never", [], [run(state="running"), run("b", state="terminated", exit_code=1)], "Running"),
        ("Never", [], [run(state="terminated"), run("b", state="terminated")], "Succeeded"),
        ("Never", [], [run(state="terminated"), run("b", state="terminated", exit_code=2)], "Failed"),
        ("OnFailure", [], [run(state="terminated", exit_code=2)], "Running"),
        ("OnFailure", [], [run(state="terminated")], "Succeeded"),
        ("OnFailure", [], [run(restarted=True)], "Running"),  # backing off before a restart
        ("Always", [], [run(state="terminated")], "Running"),
    ],
)
def test_pod_phase(policy: str, inits: list, containers: list, phase: str) -> None:
    assert pod_phase(policy, inits, containers) == phase


def test_conditions_keep_transition_times_until_the_status_changes() -> None:
    first = pod_conditions("Pending", [], [run()], [], at=T0)
    ready = {c["type"]: c for c in first}["Ready"]
    assert (ready["status"], ready["reason"], ready["message"]) == (
        "False",
        "ContainersNotReady",
        "containers with unready status: [c]",
    )
    second = {c["type"]: c for c in pod_conditions("Running", [], [run(state="running")], first, at=T1)}
    assert second["Ready"]["status"] == "True" and second["Ready"]["lastTransitionTime"] == T1
    assert second["Ready"]["reason"] is None  # cleared in the merge patch
    assert second["Initialized"]["lastTransitionTime"] == T0
    done = {c["type"]: c for c in pod_conditions("Succeeded", [], [run(state="terminated")], first, at=T1)}
    assert done["Ready"]["reason"] == "PodCompleted" and done["Ready"]["message"] is None


def test_a_stopped_pod_ends_in_a_terminal_phase() -> None:
    common = {"previous_conditions": [], "pod_ip": "127.0.0.2", "host_ip": "127.0.0.1", "start_time": T0}
    graceful = pod_status(
        restart_policy="Always", init_runs=[], runs=[run(state="terminated")], stopping=True, **common
    )
    assert graceful["phase"] == "Succeeded"
    assert graceful["podIPs"] == [{"ip": "127.0.0.2"}]
    never_started = pod_status(restart_policy="Always", init_runs=[], runs=[run()], stopping=True, **common)
    assert never_started["phase"] == "Failed"
    still_stopping = pod_status(
        restart_policy="Never", init_runs=[], runs=[run(state="running")], stopping=True, **common
    )
    assert still_stopping["phase"] == "Running"
    assert still_stopping["containerStatuses"][0]["ready"] is False
    shutdown = pod_status(
        restart_policy="Never",
        init_runs=[],
        runs=[run(state="terminated")],
        stopping=True,
        reason="Terminated",
        message="agent stopped",
        **common,
    )
    assert (shutdown["phase"], shutdown["reason"]) == ("Failed", "Terminated")


def test_orphaned_pods_fail_with_unknown_container_status() -> None:
    pod = {
        "spec": {"containers": [{"name": "a", "image": "i"}, {"name": "b", "image": "i"}]},
        "status": {
            "podIP": "127.0.0.3",
            "hostIP": "127.0.0.1",
            "startTime": T0,
            "containerStatuses": [
                {"name": "a", "state": {"running": {"startedAt": T0}}, "restartCount": 2},
                {"name": "b", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}},
            ],
        },
    }
    status = orphaned_status(pod, at=T1, reason="NodeAgentRestarted", message="restarted")
    assert (status["phase"], status["reason"]) == ("Failed", "NodeAgentRestarted")
    a, b = status["containerStatuses"]
    assert a["state"]["terminated"] == {
        "exitCode": 137,
        "reason": "ContainerStatusUnknown",
        "message": "restarted",
        "startedAt": T0,
        "finishedAt": T1,
    }
    assert a["restartCount"] == 2
    assert b["state"]["terminated"]["reason"] == "Completed"


def test_node_conditions_keep_transition_time_while_ready() -> None:
    first = node_conditions([], ready=True, at=T0)
    again = {c["type"]: c for c in node_conditions(first, ready=True, at=T1)}
    assert again["Ready"]["lastHeartbeatTime"] == T1 and again["Ready"]["lastTransitionTime"] == T0
    stopped = {c["type"]: c for c in node_conditions(first, ready=False, at=T1)}
    assert stopped["Ready"]["status"] == "False" and stopped["Ready"]["lastTransitionTime"] == T1
