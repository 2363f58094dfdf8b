"""The Debian tools the tests run: listed once (hack/system-packages.txt), installed by `make system-packages`,
and named with their package when missing instead of failing as FileNotFoundError."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from kubetune_dev import system

REPO = Path(__file__).resolve().parents[2]


def test_a_missing_tool_is_named_with_its_package_and_the_command_that_installs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(system.MissingTool) as raised:
        system.tool("promtool")
    message = str(raised.value)
    assert "promtool is not installed" in message
    assert "Debian package prometheus" in message and "make system-packages" in message


def test_every_tool_the_tests_ask_for_is_listed() -> None:
    sources = [*(REPO / "tests").rglob("*.py"), *(REPO / "hack").rglob("*.py")]
    names = {name for path in sources for name in re.findall(r"\btool\(\"([\w./-]+)\"\)", path.read_text())}
    assert {"lua5.4", "prometheus", "promtool"} <= names
    assert names <= set(system.packages()), names - set(system.packages())


def test_the_install_script_does_nothing_when_every_listed_tool_is_there() -> None:
    # `make test` runs it on every call: with nothing missing it must neither call apt nor print anything.
    for name in system.packages():
        system.tool(name)
    result = subprocess.run([str(REPO / "hack" / "system-packages.sh")], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
