"""Pure functions from a pod object (a dict as the API returns it) to what a container needs:
its environment, its command line, the files of its configMap/secret/downward-API volumes, its mounts
and the names other pods resolve it by. No I/O: the objects a pod refers to are fetched by the caller
and handed in as `Objects`.
"""

from __future__ import annotations

import base64
import math
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from kubernetes.utils import parse_quantity

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
DEFAULT_FILE_MODE = 0o644
CLUSTER_DOMAIN = "cluster.local"


class ConfigError(Exception):
    """The pod cannot start yet: a referenced object or key is missing, or a field is unsupported."""


@dataclass(frozen=True)
class Objects:
    """The API objects a pod refers to. A name mapped to None was looked up and does not exist."""

    configmaps: Mapping[str, dict | None] = field(default_factory=dict)
    secrets: Mapping[str, dict | None] = field(default_factory=dict)
    # Service-account tokens, keyed by (audience, expirationSeconds) as the projected source asks.
    tokens: Mapping[tuple[str, int], str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# $(VAR) expansion, as the kubelet does for env values, command, args and subPathExpr.


def expand(text: str, variables: Mapping[str, str]) -> str:
    """Replace `$(NAME)` with variables[NAME]; `$$` is an escaped `$`; unknown references stay as written."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$" or i + 1 == len(text):
            out.append(text[i])
            i += 1
        elif text[i + 1] == "$":
            out.append("$")
            i += 2
        elif text[i + 1] == "(":
            end = text.find(")", i + 2)
            if end == -1:
                out.append(text[i:])
                break
            name = text[i + 2 : end]
            out.append(variables[name] if name in variables else text[i : end + 1])
            i = end + 1
        else:
            out.append("$")
            i += 1
    return "".join(out)


def command_line(container: dict, env: Mapping[str, str]) -> list[str]:
    """command + args with $(VAR) expanded. The agent runs no images, so there is no image entrypoint."""
    if not container.get("command"):
        raise ConfigError(
            f"container {container['name']!r} has no command: the local node agent runs no images, "
            "so it cannot fall back to an image entrypoint"
        )
    return [expand(a, env) for a in container["command"] + (container.get("args") or [])]


# --------------------------------------------------------------------------------------------------
# Downward API


_MAP_KEY = re.compile(r"metadata\.(labels|annotations)\['(.+)'\]")


def field_ref_value(pod: dict, path: str) -> str:
    """The value of a downward-API fieldRef. Pod IPs are read from pod.status, which the agent fills first."""
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": status.get("hostIP", ""),
        "status.hostIPs": ",".join(ip["ip"] for ip in status.get("hostIPs", [])),
        "status.podIP": status.get("podIP", ""),
        "status.podIPs": ",".join(ip["ip"] for ip in status.get("podIPs", [])),
    }
    if path in simple:
        return simple[path]
    if m := _MAP_KEY.fullmatch(path):
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        # Volume form: one key="value" line per entry, sorted (values quoted as Go's %q would).
        entries = meta.get(path.split(".")[1]) or {}
        return "\n".join(f"{k}={_go_quote(v)}" for k, v in sorted(entries.items()))
    raise ConfigError(f"unsupported fieldRef {path!r}")


def _go_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def resource_ref_value(pod: dict, container_name: str, ref: dict, allocatable: Mapping[str, str]) -> str:
    """A resourceFieldRef: a limit falls back to the node's allocatable; the value is divided, rounded up."""
    container = _find_container(pod, container_name)
    kind, _, resource = ref["resource"].partition(".")
    if kind not in ("limits", "requests") or not resource:
        raise ConfigError(f"unsupported resourceFieldRef {ref['resource']!r}")
    amounts = (container.get("resources") or {}).get(kind) or {}
    # The API server already defaulted an unset request to the limit; an unset limit is the node's capacity.
    raw = amounts.get(resource) or (allocatable.get(resource) if kind == "limits" else None) or "0"
    value = Decimal(parse_quantity(raw))
    # The API server defaults an unset divisor to "0", meaning 1.
    divisor = Decimal(parse_quantity(str(ref.get("divisor") or "1"))) or Decimal(1)
    return str(math.ceil(value / divisor))


def _find_container(pod: dict, name: str) -> dict:
    for c in pod["spec"].get("containers", []) + pod["spec"].get("initContainers", []):
        if c["name"] == name:
            return c
    raise ConfigError(f"resourceFieldRef names unknown container {name!r}")


# --------------------------------------------------------------------------------------------------
# Environment


def referenced_objects(pod: dict) -> tuple[set[str], set[str]]:
    """(configMap names, secret names) the pod's env, envFrom and volumes refer to."""
    configmaps: set[str] = set()
    secrets: set[str] = set()
    spec = pod["spec"]
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        for src in c.get("envFrom") or []:
            if "configMapRef" in src:
                configmaps.add(src["configMapRef"]["name"])
            if "secretRef" in src:
                secrets.add(src["secretRef"]["name"])
        for e in c.get("env") or []:
            value_from = e.get("valueFrom") or {}
            if "configMapKeyRef" in value_from:
                configmaps.add(value_from["configMapKeyRef"]["name"])
            if "secretKeyRef" in value_from:
                secrets.add(value_from["secretKeyRef"]["name"])
    for v in spec.get("volumes") or []:
        sources = [v] + [s for s in (v.get("projected") or {}).get("sources") or []]
        for s in sources:
            if "configMap" in s:
                configmaps.add(s["configMap"]["name"])
            if "secret" in s:
                secrets.add(s["secret"].get("secretName") or s["secret"].get("name"))
    return configmaps, secrets


def token_requests(pod: dict) -> set[tuple[str, int]]:
    """(audience, expirationSeconds) of each serviceAccountToken a projected volume asks for."""
    wanted = set()
    for v in pod["spec"].get("volumes") or []:
        for s in (v.get("projected") or {}).get("sources") or []:
            if token := s.get("serviceAccountToken"):
                wanted.add((token.get("audience", ""), int(token.get("expirationSeconds", 3600))))
    return wanted


def _object_data(obj: dict | None, kind: str) -> dict[str, str] | None:
    if obj is None:
        return None
    if kind == "secret":
        return {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
    return dict(obj.get("data") or {})


def _lookup(objects: Objects, kind: str, name: str) -> dict[str, str] | None:
    table = objects.secrets if kind == "secret" else objects.configmaps
    return _object_data(table.get(name), kind)


def _key_ref(objects: Objects, kind: str, ref: dict) -> str | None:
    data = _lookup(objects, kind, ref["name"])
    optional = bool(ref.get("optional"))
    if data is None:
        if optional:
            return None
        raise ConfigError(f'{kind} "{ref["name"]}" not found')
    if ref["key"] not in data:
        if optional:
            return None
        raise ConfigError(f'couldn\'t find key {ref["key"]} in {kind} "{ref["name"]}"')
    return data[ref["key"]]


def resolve_env(
    pod: dict,
    container: dict,
    objects: Objects,
    allocatable: Mapping[str, str],
    service_env: Mapping[str, str],
) -> dict[str, str]:
    """The container's environment as the kubelet builds it: service variables, then envFrom in order,
    then env in order, each value expanded against what is defined before it."""
    env = dict(service_env)
    for src in container.get("envFrom") or []:
        kind, ref = ("secret", src["secretRef"]) if "secretRef" in src else ("configmap", src["configMapRef"])
        data = _lookup(objects, kind, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f'{kind} "{ref["name"]}" not found')
        prefix = src.get("prefix", "")
        env.update({prefix + k: v for k, v in data.items() if "=" not in k})
    for e in container.get("env") or []:
        value_from = e.get("valueFrom")
        if value_from is None:
            env[e["name"]] = expand(e.get("value", ""), env)
            continue
        if "fieldRef" in value_from:
            value: str | None = field_ref_value(pod, value_from["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in value_from:
            ref = value_from["resourceFieldRef"]
            value = resource_ref_value(pod, ref.get("containerName") or container["name"], ref, allocatable)
        elif "secretKeyRef" in value_from:
            value = _key_ref(objects, "secret", value_from["secretKeyRef"])
        elif "configMapKeyRef" in value_from:
            value = _key_ref(objects, "configmap", value_from["configMapKeyRef"])
        else:
            raise ConfigError(f"unsupported valueFrom for env {e['name']!r}: {sorted(value_from)}")
        if value is not None:
            env[e["name"]] = value
    return env


# --------------------------------------------------------------------------------------------------
# Volumes


@dataclass(frozen=True)
class PlannedVolume:
    """Where a pod volume lives on this machine. kind: dir (emptyDir), claim (PVC), host (hostPath),
    files (configMap/secret/downwardAPI/projected, materialised by the agent from `volume_files`)."""

    path: Path
    kind: str
    read_only: bool = False


@dataclass(frozen=True)
class Layout:
    """The directories a pod's volumes map to."""

    claims: Path  # <root>/volumes: one directory per <namespace>/<claim>, kept across pods
    pod_volumes: Path  # per-pod directory for emptyDirs and materialised files
    memory_volumes: Path  # per-pod directory on a tmpfs (/dev/shm) for emptyDir medium Memory


def plan_volumes(pod: dict, layout: Layout) -> dict[str, PlannedVolume]:
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    planned = {}
    for v in pod["spec"].get("volumes") or []:
        vname = v["name"]
        if "emptyDir" in v:
            memory = (v["emptyDir"] or {}).get("medium") == "Memory"
            planned[vname] = PlannedVolume((layout.memory_volumes if memory else layout.pod_volumes) / vname, "dir")
        elif "persistentVolumeClaim" in v:
            claim = v["persistentVolumeClaim"]
            planned[vname] = PlannedVolume(
                layout.claims / ns / claim["claimName"], "claim", bool(claim.get("readOnly"))
            )
        elif "ephemeral" in v:
            # A generic ephemeral volume is a PVC the ephemeral controller names <pod>-<volume>.
            planned[vname] = PlannedVolume(layout.claims / ns / f"{name}-{vname}", "claim")
        elif "hostPath" in v:
            planned[vname] = PlannedVolume(Path(v["hostPath"]["path"]), "host")
        elif any(k in v for k in ("configMap", "secret", "downwardAPI", "projected")):
            planned[vname] = PlannedVolume(layout.pod_volumes / vname, "files", read_only=True)
        else:
            kinds = sorted(set(v) - {"name"})
            raise ConfigError(f"volume {vname!r}: unsupported volume type {kinds} on the local node agent")
    return planned


def volume_files(
    volume: dict, pod: dict, objects: Objects, allocatable: Mapping[str, str]
) -> dict[str, tuple[bytes, int]]:
    """The files (relative path -> (content, mode)) of a configMap, secret, downwardAPI or projected volume."""
    if "projected" in volume:
        projected = volume["projected"]
        default_mode = projected.get("defaultMode", DEFAULT_FILE_MODE)
        files: dict[str, tuple[bytes, int]] = {}
        for source in projected.get("sources") or []:
            files.update(_source_files(source, pod, objects, allocatable, default_mode))
        return files
    return _source_files(volume, pod, objects, allocatable, None)


def _source_files(
    source: dict, pod: dict, objects: Objects, allocatable: Mapping[str, str], projected_mode: int | None
) -> dict[str, tuple[bytes, int]]:
    if "configMap" in source or "secret" in source:
        kind = "secret" if "secret" in source else "configmap"
        ref = source["secret"] if kind == "secret" else source["configMap"]
        name = ref.get("secretName") or ref.get("name")
        mode = projected_mode if projected_mode is not None else ref.get("defaultMode", DEFAULT_FILE_MODE)
        return _keyed_files(kind, name, objects, ref, mode)
    if "downwardAPI" in source:
        api = source["downwardAPI"]
        mode = projected_mode if projected_mode is not None else api.get("defaultMode", DEFAULT_FILE_MODE)
        files = {}
        for item in api.get("items") or []:
            if "fieldRef" in item:
                value = field_ref_value(pod, item["fieldRef"]["fieldPath"])
            else:
                ref = item["resourceFieldRef"]
                value = resource_ref_value(pod, ref["containerName"], ref, allocatable)
            files[_safe_relative(item["path"])] = (value.encode(), item.get("mode", mode))
        return files
    if "serviceAccountToken" in source:
        token = source["serviceAccountToken"]
        key = (token.get("audience", ""), int(token.get("expirationSeconds", 3600)))
        return {_safe_relative(token["path"]): (objects.tokens[key].encode(), projected_mode or DEFAULT_FILE_MODE)}
    kinds = sorted(source)
    raise ConfigError(f"unsupported projected volume source {kinds} on the local node agent")


def _keyed_files(kind: str, name: str, objects: Objects, ref: dict, mode: int) -> dict[str, tuple[bytes, int]]:
    table = objects.secrets if kind == "secret" else objects.configmaps
    obj = table.get(name)
    if obj is None:
        if ref.get("optional"):
            return {}
        raise ConfigError(f'{kind} "{name}" not found')
    data: dict[str, bytes] = {}
    if kind == "secret":
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    else:
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    items = ref.get("items")
    if not items:
        return {_safe_relative(k): (v, mode) for k, v in data.items()}
    files = {}
    for item in items:
        if item["key"] not in data:
            if ref.get("optional"):
                continue
            raise ConfigError(f'couldn\'t find key {item["key"]} in {kind} "{name}"')
        files[_safe_relative(item["path"])] = (data[item["key"]], item.get("mode", mode))
    return files


def _safe_relative(path: str) -> str:
    norm = posixpath.normpath(path)
    if posixpath.isabs(path) or norm == ".." or norm.startswith("../"):
        raise ConfigError(f"path {path!r} must be relative and may not contain '..'")
    return norm


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool


def container_mounts(container: dict, volumes: Mapping[str, PlannedVolume], env: Mapping[str, str]) -> list[Mount]:
    """The container's volumeMounts resolved to host paths, parents before children."""
    mounts = []
    for vm in container.get("volumeMounts") or []:
        if vm["name"] not in volumes:
            raise ConfigError(f"volumeMount {vm['name']!r} names no volume of the pod")
        volume = volumes[vm["name"]]
        sub_path = vm.get("subPath") or expand(vm.get("subPathExpr", ""), env)
        source = volume.path / _safe_relative(sub_path) if sub_path else volume.path
        mounts.append(Mount(source, vm["mountPath"], bool(vm.get("readOnly")) or volume.read_only))
    return sorted(mounts, key=lambda m: len(Path(m.target).parts))


# --------------------------------------------------------------------------------------------------
# Names


def pod_hostname(pod: dict) -> str:
    return (pod["spec"].get("hostname") or pod["metadata"]["name"])[:63]


def pod_dns_names(pod: dict) -> list[str]:
    """Names that resolve to the pod: with a subdomain, the forms cluster DNS answers for
    `<hostname>.<subdomain>` through the pod's search path, longest first; the bare hostname last."""
    hostname = pod_hostname(pod)
    subdomain = pod["spec"].get("subdomain")
    if not subdomain:
        return [hostname]
    base = f"{hostname}.{subdomain}"
    ns = pod["metadata"]["namespace"]
    return [f"{base}.{ns}.svc.{CLUSTER_DOMAIN}", f"{base}.{ns}.svc", f"{base}.{ns}", base, hostname]


def termination_message_path(container: dict) -> str:
    return container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH


def grace_period(pod: dict) -> float:
    """Seconds between SIGTERM and SIGKILL: the deletion's grace period, else the pod's, else 30."""
    meta_grace = pod["metadata"].get("deletionGracePeriodSeconds")
    if meta_grace is not None:
        return float(meta_grace)
    spec_grace = pod["spec"].get("terminationGracePeriodSeconds")
    return float(30 if spec_grace is None else spec_grace)
