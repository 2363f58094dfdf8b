"""Unit tests for the agent's small helpers and the `node logs` command's answers without a cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kubetune_dev.__main__ import main
from kubetune_dev.nodeagent.agent import hidden_from_containers, machine_capacity, parse_taint
from kubetune_dev.nodeagent.logs import pod_dir


def test_parse_taint() -> None:
    assert parse_taint("kubetune.io/local-node=true:NoSchedule") == {
        "key": "kubetune.io/local-node",
        "value": "true",
        "effect": "NoSchedule",
    }
    assert parse_taint("dedicated:NoExecute") == {"key": "dedicated", "effect": "NoExecute"}
    with pytest.raises(ValueError, match="expected"):
        parse_taint("dedicated=x:Sometimes")


def test_machine_capacity(tmp_path: Path) -> None:
    capacity = machine_capacity(tmp_path, gpus=0)
    assert capacity["cpu"] == str(len(os.sched_getaffinity(0)))
    assert capacity["memory"].endswith("Ki") and int(capacity["memory"][:-2]) > 0
    assert "nvidia.com/gpu" not in capacity
    assert machine_capacity(tmp_path, gpus=4)["nvidia.com/gpu"] == "4"


def test_node_logs_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = pod_dir(tmp_path, "ns", "trainer", "uid-1")
    for container, text in (("main", "step 1\nstep 2\n"), ("sidecar", "ok\n")):
        (directory / "logs" / container).mkdir(parents=True)
        (directory / "logs" / container / "0.log").write_text(text)

    assert main(["node", "logs", "ns/trainer", "--root", str(tmp_path), "-c", "main", "--tail", "1"]) == 0
    assert capsys.readouterr().out == "step 2\n"
    assert main(["node", "logs", "ns/trainer", "--root", str(tmp_path)]) == 1
    assert "choose a container with -c: main, sidecar" in capsys.readouterr().err
    assert main(["node", "logs", "ns/trainer", "--root", str(tmp_path), "-c", "main", "--previous"]) == 1
    assert main(["node", "logs", "ns/absent", "--root", str(tmp_path)]) == 1
    assert "no pod ns/absent" in capsys.readouterr().err


def test_an_environment_under_tmp_is_refused() -> None:
    """Trainer pods mount an emptyDir at /tmp: an agent whose Python environment lies there could not run them."""
    venv = Path("/tmp/checkout/.cache/venv")
    message = hidden_from_containers([Path("/root/.cache/kubetune/venv/0123"), venv])
    assert message is not None and message.startswith(f"{venv} lies under /tmp,")
    assert hidden_from_containers([Path("/var/tmp/venv"), Path("/root/x")]) is None
    assert hidden_from_containers([Path("/dev/shm/venv")]) is not None
