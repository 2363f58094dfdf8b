"""Where the control-plane binaries are: built (or found cached) by hack/toolchain.sh."""

from __future__ import annotations

import functools
import os
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
    out = subprocess.run([str(SCRIPT)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])
