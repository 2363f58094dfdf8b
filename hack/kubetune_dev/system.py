"""The Debian tools the tests and the demo run (hack/system-packages.txt), found or named when missing."""

from __future__ import annotations

import shutil
from pathlib import Path

PACKAGES = Path(__file__).resolve().parent.parent / "system-packages.txt"


class MissingTool(RuntimeError):
    pass


def packages() -> dict[str, str]:
    """file -> Debian package, as hack/system-packages.txt lists them."""
    found = {}
    for line in PACKAGES.read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            found[fields[0]] = fields[1]
    return found


def tool(name: str) -> str:
    """The path of a listed command or file; MissingTool says which package provides it and how to get it."""
    package = packages()[name]
    path = name if name.startswith("/") else shutil.which(name)
    if path is None or not Path(path).exists():
        raise MissingTool(
            f"{name} is not installed: it comes with the Debian package {package}. "
            f"`make system-packages` (hack/system-packages.sh) installs every missing one, "
            f"or: apt-get install {package}"
        )
    return path
