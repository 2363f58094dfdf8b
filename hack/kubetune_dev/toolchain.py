"""Where the control-plane binaries are: built (or found cached) by hack/toolchain.sh."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "toolchain.sh"


@functools.cache
def toolchain_bin() -> Path:
    """The directory holding kube-apiserver, etcd, kwok, kubectl, helm...; builds what is missing.

    KUBETUNE_TOOLCHAIN_BIN points at a ready directory and skips the build script.
    """
    given = os.environ.get("KUBETUNE_TOOLCHAIN_BIN")
    if given:
        return Path(given)
    return _run_script()


@functools.cache
def kubeflow_bin() -> Path:
    """The toolchain directory with Kubeflow Trainer's and JobSet's controllers in it too (built if missing)."""
    return _run_script("kubeflow")


def version(name: str) -> str:
    """A version pinned in toolchain.sh, e.g. version("JOBSET") -> "v0.12.0"."""
    found = re.search(rf"^{name}_VERSION=(\S+)", SCRIPT.read_text(), re.MULTILINE)
    if found is None:
        raise KeyError(f"{name}_VERSION is not in {SCRIPT}")
    return found[1]


def module_source(module: str, module_version: str) -> Path:
    """The source tree of a Go module version, from the module cache (downloaded through the module proxy when
    missing): where a controller's CRDs and manifests of exactly the version built are read from."""
    out = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{module_version}"],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        cwd=SCRIPT.parent,
        env={**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"},
    )
    return Path(json.loads(out.stdout)["Dir"])


def _run_script(*args: str) -> Path:
    out = subprocess.run([str(SCRIPT), *args], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])
