"""GPU time and cost measured from real API objects: worker pods of an Indexed Job on the local control plane's
fake GPU nodes, read back from the API server exactly as the operator reads them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubetune_dev.cluster import LocalCluster
from kubetune_operator.api.spec import Resources
from kubetune_operator.api.status import CostStatus
from kubetune_operator.cost import GPU_PRODUCT_LABEL, Pricing, pod_usage, pods_spend, run_cost

pytestmark = pytest.mark.e2e

PRICING = Pricing(default_usd_per_gpu_hour=1.0, by_instance_type={"p5.48xlarge": 3.6})


def get(cluster: LocalCluster, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)
    return result


def worker_job(name: str, namespace: str, annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "completions": 2,
            "parallelism": 2,
            "completionMode": "Indexed",
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"kubetune.io/job": name}, "annotations": annotations},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "trainer", "image": "trainer", "resources": {"limits": {"nvidia.com/gpu": "8"}}}
                    ],
                },
            },
        },
    }


def node_labels(cluster: LocalCluster) -> dict[str, dict[str, str]]:
    nodes = get(cluster, "nodes", "-l", GPU_PRODUCT_LABEL)["items"]
    return {n["metadata"]["name"]: n["metadata"]["labels"] for n in nodes}


def test_finished_attempt_is_measured_from_its_pods_and_priced_by_instance_type(
    cluster: LocalCluster, namespace: str
) -> None:
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps(worker_job("done", namespace, {"kwok.kubetune.io/run-for": "4s"}))
    )
    cluster.kubectl("wait", "--for=condition=Complete", "job/done", "-n", namespace, "--timeout=90s")
    pods = get(cluster, "pods", "-n", namespace, "-l", "kubetune.io/job=done")["items"]
    usages = [pod_usage(p) for p in pods]
    assert [u.gpus for u in usages] == [8, 8]
    assert all(u.start is not None and u.end is not None and not u.holds_gpus for u in usages)
    # kwok ran each pod about 4 s (API times have 1 s resolution)
    for u in usages:
        assert u.start is not None and u.end is not None
        assert 3 <= (u.end - u.start).total_seconds() <= 8

    nodes = node_labels(cluster)
    later = datetime.now(UTC)
    settled = pods_spend(usages, pricing=PRICING, nodes=nodes, gpu_product=None, now=later)
    assert 2 * 8 * 3 <= settled.gpu_seconds <= 2 * 8 * 8
    assert settled.usd == pytest.approx(settled.gpu_seconds / 3600 * 3.6)  # the p5.48xlarge price, not the default
    # measured again later, a finished attempt costs the same: nothing depends on when the operator looks
    assert pods_spend(usages, pricing=PRICING, nodes=nodes, gpu_product=None, now=datetime.now(UTC)) == settled


def test_running_attempt_keeps_accruing(cluster: LocalCluster, namespace: str) -> None:
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps(worker_job("live", namespace, {"kwok.kubetune.io/outcome": "hang"}))
    )
    cluster.kubectl("wait", "--for=jsonpath={.status.ready}=2", "job/live", "-n", namespace, "--timeout=90s")
    pods = get(cluster, "pods", "-n", namespace, "-l", "kubetune.io/job=live")["items"]
    usages = [pod_usage(p) for p in pods]
    assert all(u.holds_gpus for u in usages)
    nodes = node_labels(cluster)
    resources = Resources(num_nodes=2, gpus_per_node=8)
    t = datetime.now(UTC)

    def cost_at(now: datetime) -> CostStatus:
        spent = pods_spend(usages, pricing=PRICING, nodes=nodes, gpu_product=None, now=now)
        return run_cost(spent=spent, pods=usages, resources=resources, pricing=PRICING, nodes=nodes, eta_seconds=3600)

    first, later = cost_at(t), cost_at(t + timedelta(hours=1))
    assert first.gpu_hours is not None and later.gpu_hours is not None and first.usd is not None
    assert later.gpu_hours == pytest.approx(first.gpu_hours + 16, abs=0.001)  # 16 GPUs held for one more hour
    # the projection: the hour the trainer says is left, on 16 GPUs at the p5.48xlarge price
    assert first.projected_usd == pytest.approx(first.usd + 16 * 3.6, abs=0.01)
