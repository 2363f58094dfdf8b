"""Smoke tests proving the local control plane is a real Kubernetes: API server, admission (CEL),
scheduler, Job and garbage-collector controllers, kwok-played nodes, volume binding, RBAC."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from kubetune_dev.cluster import GPU_PRODUCT_LABEL, LocalCluster

pytestmark = pytest.mark.e2e


def wait_for(cluster: LocalCluster, *args: str, timeout: str = "90s") -> None:
    cluster.kubectl("wait", *args, f"--timeout={timeout}")


def get(cluster: LocalCluster, *args: str) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def test_api_server_is_the_pinned_release(cluster: LocalCluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.34.4"
    assert version["clientVersion"]["gitVersion"] == "v1.34.4"


def test_gpu_nodes_advertise_gpus(cluster: LocalCluster) -> None:
    nodes = get(cluster, "nodes", "-l", GPU_PRODUCT_LABEL)["items"]
    assert len(nodes) >= 2
    for node in nodes:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])


def test_namespace_is_created(cluster: LocalCluster, namespace: str) -> None:
    assert get(cluster, "namespace", namespace)["status"]["phase"] == "Active"


def test_cel_rule_rejects_a_bad_object_with_its_message(cluster: LocalCluster, namespace: str) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.smoke.kubetune.io"},
        "spec": {
            "group": "smoke.kubetune.io",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}},
                                    "x-kubernetes-validations": [
                                        {"rule": "self.min <= self.max", "message": "min must not exceed max"}
                                    ],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(crd))
    cluster.wait_established("widgets.smoke.kubetune.io")
    good = {
        "apiVersion": "smoke.kubetune.io/v1",
        "kind": "Widget",
        "metadata": {"name": "ok", "namespace": namespace},
        "spec": {"min": 1, "max": 2},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(good))
    bad = {**good, "metadata": {"name": "bad", "namespace": namespace}, "spec": {"min": 3, "max": 2}}
    result = cluster.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
    assert result.returncode != 0
    assert "min must not exceed max" in result.stderr


def test_indexed_job_runs_on_gpu_nodes_and_completes(cluster: LocalCluster, namespace: str) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "smoke", "namespace": namespace},
        "spec": {
            "completions": 2,
            "parallelism": 2,
            "completionMode": "Indexed",
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "worker", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu": "8"}}}
                    ],
                }
            },
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(job))
    wait_for(cluster, "--for=condition=Complete", "job/smoke", "-n", namespace)
    pods = get(cluster, "pods", "-n", namespace, "-l", "job-name=smoke")["items"]
    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods) == ["0", "1"]
    gpu_nodes = {n["metadata"]["name"] for n in get(cluster, "nodes", "-l", GPU_PRODUCT_LABEL)["items"]}
    # 8 GPUs each: the scheduler must put the two pods on two different GPU nodes.
    assert {p["spec"]["nodeName"] for p in pods} <= gpu_nodes
    assert len({p["spec"]["nodeName"] for p in pods}) == 2
    assert all(p["status"]["phase"] == "Succeeded" for p in pods)


def test_pod_failure_is_reported_with_exit_code(cluster: LocalCluster, namespace: str) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "oom", "namespace": namespace},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {
                    "annotations": {
                        "kwok.kubetune.io/outcome": "fail",
                        "kwok.kubetune.io/exit-code": "137",
                        "kwok.kubetune.io/reason": "OOMKilled",
                    }
                },
                "spec": {"restartPolicy": "Never", "containers": [{"name": "worker", "image": "busybox"}]},
            },
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(job))
    wait_for(cluster, "--for=condition=Failed", "job/oom", "-n", namespace)
    pod = get(cluster, "pods", "-n", namespace, "-l", "job-name=oom")["items"][0]
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (137, "OOMKilled")


def test_pvc_binds(cluster: LocalCluster, namespace: str) -> None:
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data", "namespace": namespace},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pvc))
    wait_for(cluster, "--for=jsonpath={.status.phase}=Bound", "pvc/data", "-n", namespace)
    assert get(cluster, "pvc", "data", "-n", namespace)["spec"]["storageClassName"] == "kwok-volume"


def test_owned_object_is_garbage_collected(cluster: LocalCluster, namespace: str) -> None:
    cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    owner_uid = get(cluster, "configmap", "owner", "-n", namespace)["metadata"]["uid"]
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "child",
            "namespace": namespace,
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(child))
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)
    wait_for(cluster, "--for=delete", "configmap/child", "-n", namespace)


def test_rbac_denies_what_a_role_does_not_grant(cluster: LocalCluster, namespace: str, tmp_path: Path) -> None:
    cluster.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    cluster.kubectl("create", "role", "read-pods", "--verb=get,list", "--resource=pods", "-n", namespace)
    cluster.kubectl(
        "create", "rolebinding", "reader", "--role=read-pods", f"--serviceaccount={namespace}:reader", "-n", namespace
    )
    token = cluster.kubectl("create", "token", "reader", "-n", namespace).stdout.strip()
    reader = cluster.token_kubeconfig(token, tmp_path / "reader.kubeconfig")

    def as_reader(*args: str) -> subprocess.CompletedProcess[str]:
        return cluster.kubectl(*args, kubeconfig=reader, check=False)

    # The binding takes effect within moments; the allowed call proves the token itself works.
    deadline = time.monotonic() + 30
    while as_reader("get", "pods", "-n", namespace).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert as_reader("get", "pods", "-n", namespace).returncode == 0
    denied = as_reader("get", "secrets", "-n", namespace)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr
    assert "forbidden" in as_reader("delete", "pod", "any", "-n", namespace).stderr
