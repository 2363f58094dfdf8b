"""Support for the chart tests: helm, rendered manifests, the Argo CD health check under Lua, and the
Prometheus Operator's CRDs (from its Go module, like the rest of the toolchain)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from kubetune_dev.system import tool
from kubetune_dev.toolchain import toolchain_bin

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
GITOPS = REPO / "docs" / "gitops"
HEALTH_LUA = GITOPS / "finetunejob-health.lua"
TESTDATA = Path(__file__).resolve().parent / "testdata"

# The Prometheus Operator release whose CRDs (ServiceMonitor, PodMonitor, PrometheusRule) validate the chart's
# monitoring objects on the API server. Fetched through the Go module proxy into the Go module cache.
PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
MONITORING_CRDS = ("servicemonitors", "podmonitors", "prometheusrules")

Manifest = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# helm
# ----------------------------------------------------------------------------------------------


def helm(*args: str, check: bool = True, kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [str(toolchain_bin() / "helm"), *args]
    env = {**os.environ, "HELM_CACHE_HOME": str(REPO / ".cache" / "helm")}
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def values_args(values: Sequence[Path | dict[str, Any]], tmp: Path) -> list[str]:
    """`-f` arguments: files as they are, dicts written to a file under tmp first (later ones win)."""
    args = []
    for i, v in enumerate(values):
        if isinstance(v, dict):
            path = tmp / f"values-{i}.yaml"
            path.write_text(yaml.safe_dump(v))
            v = path
        args += ["-f", str(v)]
    return args


def render_text(
    values: Sequence[Path | dict[str, Any]], tmp: Path, *, release: str = "kt", namespace: str = "kubetune-system"
) -> str:
    return helm("template", release, str(CHART), "--namespace", namespace, *values_args(values, tmp)).stdout


def render(
    values: Sequence[Path | dict[str, Any]] = (),
    *,
    tmp: Path,
    release: str = "kt",
    namespace: str = "kubetune-system",
) -> list[Manifest]:
    """The chart's objects for these values, as `helm template` renders them."""
    text = render_text(values, tmp, release=release, namespace=namespace)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def of_kind(docs: Iterable[Manifest], kind: str) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: Iterable[Manifest], kind: str, name_suffix: str = "") -> Manifest:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def settings_of(docs: Iterable[Manifest]) -> dict[str, Any]:
    """The operator settings file the chart renders into its ConfigMap."""
    cm = one(docs, "ConfigMap", "-settings")
    loaded: dict[str, Any] = yaml.safe_load(cm["data"]["settings.yaml"])
    return loaded


# ----------------------------------------------------------------------------------------------
# the Argo CD health check, run by Lua 5.4 as Argo CD runs it
# ----------------------------------------------------------------------------------------------

# What the script may use: Argo CD's Lua VM opens only the base, table and a safe part of the os library
# unless useOpenLibs is set; the string, io and debug libraries (and require) are absent.
_SANDBOX = """
local sandbox = {
  ipairs = ipairs, pairs = pairs, next = next, select = select, type = type, tostring = tostring,
  tonumber = tonumber, error = error, assert = assert, pcall = pcall, rawget = rawget, rawset = rawset,
  rawequal = rawequal, setmetatable = setmetatable, getmetatable = getmetatable, unpack = table.unpack,
  table = table, os = {time = os.time, date = os.date, clock = os.clock},
}
"""


def lua_literal(value: Any) -> str:
    """A JSON value as a Lua expression (objects and arrays as tables, as Argo CD converts them)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        assert math.isfinite(value)
        return repr(value)
    if isinstance(value, str):
        # Printable ASCII as is; everything else (quotes, backslashes, newlines, UTF-8 bytes) as \\ddd.
        escaped = "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\{b:03d}" for b in value.encode())
        return f'"{escaped}"'
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{lua_literal(str(k))}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"not a JSON value: {value!r}")


def argocd_health(obj: Manifest, script: Path = HEALTH_LUA) -> tuple[str, str]:
    """(status, message) the health check returns for `obj`."""
    program = (
        _SANDBOX
        + f"sandbox.obj = {lua_literal(obj)}\n"
        + f"local chunk = assert(loadfile({lua_literal(str(script))}, 't', sandbox))\n"
        + "local hs = chunk()\n"
        + "io.write(hs.status, '\\n', hs.message or '')\n"
    )
    result = subprocess.run([tool("lua5.4"), "-"], input=program, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"lua failed:\n{result.stderr}"
    status, _, message = result.stdout.partition("\n")
    return status, message


# ----------------------------------------------------------------------------------------------
# the Prometheus Operator's CRDs
# ----------------------------------------------------------------------------------------------


def prometheus_operator_crds() -> list[Path]:
    """The upstream ServiceMonitor, PodMonitor and PrometheusRule CRDs of PROMETHEUS_OPERATOR."""
    out = subprocess.run(
        ["go", "mod", "download", "-json", PROMETHEUS_OPERATOR],
        capture_output=True,
        text=True,
        env={**os.environ, "GOFLAGS": "-mod=mod"},
        cwd=REPO,
    )
    assert out.returncode == 0, f"go mod download {PROMETHEUS_OPERATOR} failed:\n{out.stdout}{out.stderr}"
    module = Path(json.loads(out.stdout)["Dir"])
    return [
        module / "example" / "prometheus-operator-crd" / f"monitoring.coreos.com_{crd}.yaml" for crd in MONITORING_CRDS
    ]


# ----------------------------------------------------------------------------------------------
# Flux's CEL health checks, evaluated by cel-go as kustomize-controller evaluates them
# ----------------------------------------------------------------------------------------------

FLUXCEL = Path(__file__).resolve().parent / "fluxcel"


def flux_health(exprs: dict[str, str], objects: Sequence[Manifest]) -> list[str]:
    """The status (Current, Failed, InProgress) Flux's healthCheckExprs give each object, or kstatus's when `exprs`
    is empty; AssertionError with cel-go's message when an expression cannot be evaluated (Flux then reports
    Unknown and polls again)."""
    binary = REPO / ".cache" / "chart-tests" / "fluxcel"
    build = subprocess.run(
        ["go", "build", "-o", str(binary), "."],
        cwd=FLUXCEL,
        capture_output=True,
        text=True,
        env={**os.environ, "CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly -buildvcs=false"},
    )
    assert build.returncode == 0, f"building tests/chart/fluxcel failed:\n{build.stderr}"
    request = {k: exprs.get(k, "") for k in ("current", "failed", "inProgress")}
    result = subprocess.run(
        [str(binary)], input=json.dumps({**request, "objects": list(objects)}), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()
