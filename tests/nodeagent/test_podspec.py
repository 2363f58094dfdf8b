"""Unit tests for the pure pod-spec functions: expansion, env, downward API, volumes, mounts, names."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from kubetune_dev.nodeagent.podspec import (
    ConfigError,
    Layout,
    Mount,
    Objects,
    PlannedVolume,
    command_line,
    container_mounts,
    expand,
    field_ref_value,
    grace_period,
    plan_volumes,
    pod_dns_names,
    referenced_objects,
    resolve_env,
    resource_ref_value,
    token_requests,
    volume_files,
)

ALLOCATABLE = {"cpu": "2", "memory": "4Gi"}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def make_pod(**spec: object) -> dict:
    return {
        "metadata": {
            "name": "train-0",
            "namespace": "ml",
            "uid": "u-1",
            "labels": {"app": "kt", "job-name": "train"},
            "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
        },
        "spec": {"nodeName": "local-node-0", "serviceAccountName": "default", "containers": [], **spec},
        "status": {"podIP": "127.0.0.5", "podIPs": [{"ip": "127.0.0.5"}], "hostIP": "127.0.0.1"},
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)-$(B)", "a-b"),
        ("$(MISSING)", "$(MISSING)"),
        ("$$(A)", "$(A)"),
        ("$$", "$"),
        ("cost $5", "cost $5"),
        ("end$", "end$"),
        ("$(A", "$(A"),
        ("$()", "$()"),
        ("x$(A)$(A)y", "xaay"),
    ],
)
def test_expand_follows_kubernetes_rules(text: str, expected: str) -> None:
    assert expand(text, {"A": "a", "B": "b"}) == expected


def test_command_line_expands_and_needs_a_command() -> None:
    container = {"name": "c", "command": ["run", "$(X)"], "args": ["--n=$(X)", "$(Y)"]}
    assert command_line(container, {"X": "1"}) == ["run", "1", "--n=1", "$(Y)"]
    with pytest.raises(ConfigError, match="no command"):
        command_line({"name": "c", "args": ["x"]}, {})


def test_field_refs() -> None:
    pod = make_pod()
    assert field_ref_value(pod, "metadata.name") == "train-0"
    assert field_ref_value(pod, "metadata.uid") == "u-1"
    assert field_ref_value(pod, "metadata.annotations['batch.kubernetes.io/job-completion-index']") == "0"
    assert field_ref_value(pod, "metadata.labels['absent']") == ""
    assert field_ref_value(pod, "status.podIP") == "127.0.0.5"
    assert field_ref_value(pod, "spec.nodeName") == "local-node-0"
    assert field_ref_value(pod, "metadata.labels") == 'app="kt"\njob-name="train"'
    with pytest.raises(ConfigError):
        field_ref_value(pod, "spec.whatever")


def test_resource_refs_round_up_and_fall_back_to_the_node() -> None:
    container = {"name": "c", "resources": {"limits": {"memory": "1536Mi"}, "requests": {"cpu": "250m"}}}
    pod = make_pod(containers=[container])
    assert resource_ref_value(pod, "c", {"resource": "limits.memory", "divisor": "1Gi"}, ALLOCATABLE) == "2"
    assert resource_ref_value(pod, "c", {"resource": "requests.cpu", "divisor": "1m"}, ALLOCATABLE) == "250"
    assert resource_ref_value(pod, "c", {"resource": "requests.cpu", "divisor": "0"}, ALLOCATABLE) == "1"
    assert resource_ref_value(pod, "c", {"resource": "limits.cpu"}, ALLOCATABLE) == "2"


def test_env_order_sources_and_expansion() -> None:
    container = {
        "name": "c",
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}, {"secretRef": {"name": "creds"}}],
        "env": [
            {"name": "GREETING", "value": "$(CFG_greeting) from $(POD)"},  # POD is not defined yet
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "AGAIN", "value": "$(CFG_greeting) from $(POD) at $(KUBERNETES_SERVICE_HOST)"},
            {
                "name": "RANK",
                "valueFrom": {
                    "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
                },
            },
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "LR", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "lr"}}},
            {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nope", "optional": True}}},
            {"name": "token", "value": "overrides envFrom"},
        ],
    }
    objects = Objects(
        configmaps={"cfg": {"data": {"greeting": "hello", "lr": "0.1", "bad=key": "skipped"}}},
        secrets={"creds": {"data": {"token": b64("s3cret")}}},
    )
    env = resolve_env(make_pod(), container, objects, ALLOCATABLE, {"KUBERNETES_SERVICE_HOST": "127.0.0.1"})
    assert env["GREETING"] == "hello from $(POD)"
    assert env["AGAIN"] == "hello from train-0 at 127.0.0.1"
    assert env["RANK"] == "0"
    assert env["TOKEN"] == "s3cret"
    assert env["LR"] == "0.1"
    assert env["token"] == "overrides envFrom"
    assert "OPT" not in env
    assert not any("bad" in k for k in env)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}, 'secret "absent" not found'),
        ({"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "k"}}}, "couldn't find key k"),
    ],
)
def test_missing_references_stop_the_container(env: dict, message: str) -> None:
    objects = Objects(configmaps={"cfg": {"data": {}}}, secrets={"absent": None})
    with pytest.raises(ConfigError, match=message):
        resolve_env(make_pod(), {"name": "c", "env": [env]}, objects, ALLOCATABLE, {})


def test_referenced_objects_and_tokens() -> None:
    pod = make_pod(
        containers=[
            {
                "name": "c",
                "envFrom": [{"configMapRef": {"name": "a"}}],
                "env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": "s1", "key": "k"}}}],
            }
        ],
        volumes=[
            {"name": "v1", "secret": {"secretName": "s2"}},
            {
                "name": "api",
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                        {"configMap": {"name": "kube-root-ca.crt"}},
                    ]
                },
            },
        ],
    )
    assert referenced_objects(pod) == ({"a", "kube-root-ca.crt"}, {"s1", "s2"})
    assert token_requests(pod) == {("", 3607)}


def test_plan_volumes(tmp_path: Path) -> None:
    layout = Layout(claims=tmp_path / "volumes", pod_volumes=tmp_path / "pod", memory_volumes=tmp_path / "shm")
    pod = make_pod(
        volumes=[
            {"name": "data", "persistentVolumeClaim": {"claimName": "ckpt"}},
            {"name": "ro", "persistentVolumeClaim": {"claimName": "base", "readOnly": True}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            {"name": "cfg", "configMap": {"name": "c"}},
            {"name": "eph", "ephemeral": {"volumeClaimTemplate": {}}},
        ]
    )
    planned = plan_volumes(pod, layout)
    assert planned["data"] == PlannedVolume(tmp_path / "volumes" / "ml" / "ckpt", "claim")
    assert planned["ro"].read_only
    assert planned["scratch"].path == tmp_path / "pod" / "scratch"
    assert planned["dshm"].path == tmp_path / "shm" / "dshm"
    assert planned["cfg"] == PlannedVolume(tmp_path / "pod" / "cfg", "files", read_only=True)
    assert planned["eph"].path == tmp_path / "volumes" / "ml" / "train-0-eph"
    with pytest.raises(ConfigError, match="unsupported volume type"):
        plan_volumes(make_pod(volumes=[{"name": "x", "nfs": {}}]), layout)


def test_volume_files_items_modes_and_projection() -> None:
    objects = Objects(
        configmaps={
            "cfg": {"data": {"a.json": "{}", "b": "bee"}, "binaryData": {"bin": b64("\x00\x01")}},
            "kube-root-ca.crt": {"data": {"ca.crt": "CA"}},
        },
        secrets={"creds": {"data": {"token": b64("s3cret")}}},
        tokens={("", 3607): "jwt"},
    )
    pod = make_pod()
    whole = volume_files({"name": "v", "configMap": {"name": "cfg"}}, pod, objects, ALLOCATABLE)
    assert whole == {"a.json": (b"{}", 0o644), "b": (b"bee", 0o644), "bin": (b"\x00\x01", 0o644)}
    items = volume_files(
        {
            "name": "v",
            "secret": {"secretName": "creds", "defaultMode": 0o400, "items": [{"key": "token", "path": "x/t"}]},
        },
        pod,
        objects,
        ALLOCATABLE,
    )
    assert items == {"x/t": (b"s3cret", 0o400)}
    projected = {
        "name": "api",
        "projected": {
            "defaultMode": 0o420,
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
            ],
        },
    }
    assert volume_files(projected, pod, objects, ALLOCATABLE) == {
        "token": (b"jwt", 0o420),
        "ca.crt": (b"CA", 0o420),
        "namespace": (b"ml", 0o420),
    }
    assert volume_files({"name": "v", "configMap": {"name": "gone", "optional": True}}, pod, objects, {}) == {}
    with pytest.raises(ConfigError, match="must be relative"):
        volume_files(
            {"name": "v", "configMap": {"name": "cfg", "items": [{"key": "b", "path": "../escape"}]}},
            pod,
            objects,
            ALLOCATABLE,
        )


def test_container_mounts_sub_paths_read_only_and_order(tmp_path: Path) -> None:
    volumes = {
        "data": PlannedVolume(tmp_path / "claim", "claim"),
        "cfg": PlannedVolume(tmp_path / "cfg", "files", read_only=True),
    }
    container = {
        "name": "c",
        "volumeMounts": [
            {"name": "data", "mountPath": "/data/runs/run-1", "subPathExpr": "runs/$(RUN)"},
            {"name": "data", "mountPath": "/data"},
            {"name": "cfg", "mountPath": "/etc/kt/config.json", "subPath": "config.json"},
            {"name": "data", "mountPath": "/ro", "readOnly": True},
        ],
    }
    mounts = container_mounts(container, volumes, {"RUN": "7"})
    assert mounts == [
        Mount(tmp_path / "claim", "/data", False),
        Mount(tmp_path / "claim", "/ro", True),
        Mount(tmp_path / "claim" / "runs" / "7", "/data/runs/run-1", False),
        Mount(tmp_path / "cfg" / "config.json", "/etc/kt/config.json", True),
    ]
    with pytest.raises(ConfigError):
        container_mounts(
            {"name": "c", "volumeMounts": [{"name": "data", "mountPath": "/x", "subPath": "../.."}]}, volumes, {}
        )


def test_dns_names_and_grace() -> None:
    pod = make_pod(hostname="train-0", subdomain="train-svc")
    assert pod_dns_names(pod) == [
        "train-0.train-svc.ml.svc.cluster.local",
        "train-0.train-svc.ml.svc",
        "train-0.train-svc.ml",
        "train-0.train-svc",
        "train-0",
    ]
    assert pod_dns_names(make_pod()) == ["train-0"]
    assert grace_period(make_pod()) == 30
    assert grace_period(make_pod(terminationGracePeriodSeconds=120)) == 120
    deleting = make_pod(terminationGracePeriodSeconds=120)
    deleting["metadata"]["deletionGracePeriodSeconds"] = 0
    assert grace_period(deleting) == 0
