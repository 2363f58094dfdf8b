"""The cost model: prices, GPU time from pod objects, settled attempts plus live pods, projection. (The budget,
stall and evaluation-gate policies that act on it: tests/operator/test_policies.py.)"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from kubetune_operator.api.spec import Resources
from kubetune_operator.api.status import CostStatus
from kubetune_operator.cost import (
    PodUsage,
    Pricing,
    Spend,
    hourly_rate,
    pod_usage,
    pods_spend,
    run_cost,
    usd_per_gpu_hour,
)
from observability_helpers import H100, T0, pod

PRICING = Pricing(
    default_usd_per_gpu_hour=2.0,
    by_gpu_product={H100: 4.0, "NVIDIA-A100-SXM4-80GB": 1.5},
    by_instance_type={"p5.48xlarge": 3.0},
)
NODES = {
    "p5-node": {"node.kubernetes.io/instance-type": "p5.48xlarge", "nvidia.com/gpu.product": H100},
    "h100-node": {"node.kubernetes.io/instance-type": "bare-metal", "nvidia.com/gpu.product": H100},
    "plain-node": {},
}
HOUR = timedelta(hours=1)


def usage(**kwargs: Any) -> PodUsage:
    return pod_usage(pod(**kwargs))


@pytest.mark.parametrize(
    ("instance_type", "gpu_product", "price"),
    [
        ("p5.48xlarge", H100, 3.0),  # instance type wins over the product
        ("p5.48xlarge", None, 3.0),
        ("unknown-sku", H100, 4.0),  # then the product
        (None, "NVIDIA-A100-SXM4-80GB", 1.5),
        ("unknown-sku", "unknown-gpu", 2.0),  # then the default
        (None, None, 2.0),
    ],
)
def test_price_lookup_order(instance_type: str | None, gpu_product: str | None, price: float) -> None:
    assert usd_per_gpu_hour(PRICING, instance_type=instance_type, gpu_product=gpu_product) == price


def test_pricing_reads_helm_style_camel_case_and_rejects_negative_prices() -> None:
    parsed = Pricing.model_validate({"defaultUsdPerGpuHour": 1.25, "byGpuProduct": {H100: 4}})
    assert parsed == Pricing(default_usd_per_gpu_hour=1.25, by_gpu_product={H100: 4.0})
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        Pricing(by_instance_type={"x": -1.0})


@pytest.mark.parametrize(
    ("the_pod", "gpus"),
    [
        (pod(gpus=8), 8),
        (pod(gpus=0), 0),
        (pod(gpus=2, init_gpus=4), 4),  # an init container holding more sets the pod's request
        (pod(gpus=4, init_gpus=1), 4),
        (
            {"spec": {"containers": [{"resources": {"requests": {"nvidia.com/gpu": "2"}}}, {"resources": {}}]}},
            2,
        ),
    ],
)
def test_pod_gpus(the_pod: dict, gpus: int) -> None:
    assert pod_usage(the_pod).gpus == gpus


@pytest.mark.parametrize(
    ("the_pod", "interval"),
    [
        (pod(started=None), None),  # never admitted by a kubelet: held no GPU
        (pod(started=T0), (T0, T0 + HOUR)),  # running: up to now
        (pod(started=T0, finished=T0 + 0.5 * HOUR), (T0, T0 + 0.5 * HOUR)),
        (pod(started=T0, finished=T0 + 0.5 * HOUR, phase="Failed"), (T0, T0 + 0.5 * HOUR)),
        # terminating (deletionTimestamp set) is still Running: the GPUs are held while it checkpoints
        ({**pod(started=T0), "metadata": {"deletionTimestamp": "2026-11-27T09:30:00Z"}}, (T0, T0 + HOUR)),
        # failed before any container ran: it ended when its conditions last changed
        (
            {
                "spec": {},
                "status": {
                    "phase": "Failed",
                    "startTime": "2026-11-27T09:00:00Z",
                    "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": "2026-11-27T09:05:00Z"}],
                },
            },
            (T0, T0 + timedelta(minutes=5)),
        ),
    ],
)
def test_pod_gpu_interval(the_pod: dict, interval: tuple | None) -> None:
    usage = pod_usage(the_pod)
    assert usage.interval(now=T0 + HOUR) == interval
    assert usage.holds_gpus is (interval is not None and interval[1] == T0 + HOUR and usage.gpus > 0)


def test_pods_spend_prices_each_pod_by_its_node() -> None:
    pods = [
        usage(gpus=8, node="p5-node", started=T0),  # 8 GPU-h at 3.0
        usage(gpus=8, node="h100-node", started=T0, finished=T0 + 0.5 * HOUR),  # 4 GPU-h at 4.0 (product)
        usage(gpus=2, node="gone-node", started=T0),  # 2 GPU-h, node unknown: the spec's product, 4.0
        usage(gpus=8, node=None, started=None),  # pending: nothing
    ]
    spend = pods_spend(pods, pricing=PRICING, nodes=NODES, gpu_product=H100, now=T0 + HOUR)
    assert spend.gpu_seconds == pytest.approx((8 + 4 + 2) * 3600)
    assert spend.usd == pytest.approx(8 * 3.0 + 4 * 4.0 + 2 * 4.0)
    # without a product in the spec, the unknown node falls to the default price
    spend = pods_spend(pods[2:], pricing=PRICING, nodes=NODES, gpu_product=None, now=T0 + HOUR)
    assert spend.usd == pytest.approx(2 * 2.0)


def test_run_cost_is_what_every_attempt_spent_projected_at_the_current_attempts_rate() -> None:
    # attempts 1 and 2 ended (their pods are gone; their records kept what they used); attempt 3 runs
    attempt1 = [usage(gpus=8, node="p5-node", started=T0, finished=T0 + HOUR, phase="Failed")]
    attempt2 = [usage(gpus=8, node="plain-node", started=T0 + 2 * HOUR, finished=T0 + 3 * HOUR)]
    attempt3 = [usage(gpus=8, node="p5-node", started=T0 + 4 * HOUR)]
    spent = Spend()
    for pods in (attempt1, attempt2, attempt3):
        spent += pods_spend(pods, pricing=PRICING, nodes=NODES, gpu_product=H100, now=T0 + 5 * HOUR)
    assert spent == Spend(gpu_seconds=24 * 3600, usd=24.0 + 32.0 + 24.0)

    resources = Resources(num_nodes=1, gpus_per_node=8, gpu_product=H100)
    cost = run_cost(spent=spent, pods=attempt3, resources=resources, pricing=PRICING, nodes=NODES, eta_seconds=7200)
    assert cost == CostStatus(gpu_hours=24.0, usd=80.0, projected_usd=80.0 + 2 * 8 * 3.0)


@pytest.mark.parametrize(
    ("pods", "rate"),
    [
        ([usage(gpus=8, node="p5-node"), usage(gpus=8, node="h100-node")], 8 * 3.0 + 8 * 4.0),  # live pods, their nodes
        ([usage(gpus=8, node="p5-node"), usage(gpus=8, started=T0, finished=T0 + HOUR)], 8 * 3.0),  # finished: none
        ([], 2 * 8 * 4.0),  # nothing holds GPUs (queued, restarting): the spec's shape at the spec's product price
        ([usage(gpus=8, node=None, started=None)], 2 * 8 * 4.0),
    ],
)
def test_hourly_rate(pods: list[PodUsage], rate: float) -> None:
    resources = Resources(num_nodes=2, gpus_per_node=8, gpu_product=H100)
    assert hourly_rate(pods, resources=resources, pricing=PRICING, nodes=NODES) == pytest.approx(rate)


@pytest.mark.parametrize(
    ("eta_seconds", "projected"),
    [
        (3600, 8.0 + 8.0),  # $8 so far; 1 h left with nothing running: the planned 2 GPUs at $4
        (0, 8.0),  # run over: projected = accrued
        (None, None),  # trainer has not estimated yet: no projection rather than a guess
        (float("nan"), None),
    ],
)
def test_run_cost_projection(eta_seconds: float | None, projected: float | None) -> None:
    spent = Spend(gpu_seconds=2 * 3600, usd=8.0)
    resources = Resources(num_nodes=1, gpus_per_node=2, gpu_product=H100)
    cost = run_cost(spent=spent, pods=[], resources=resources, pricing=PRICING, nodes=NODES, eta_seconds=eta_seconds)
    assert cost == CostStatus(gpu_hours=2.0, usd=8.0, projected_usd=projected)


def test_run_cost_rounds_for_the_status() -> None:
    live = [usage(gpus=1, node="plain-node", started=T0)]
    spent = pods_spend(live, pricing=PRICING, nodes=NODES, gpu_product=None, now=T0 + timedelta(seconds=100))
    cost = run_cost(
        spent=spent, pods=live, resources=Resources(gpus_per_node=1), pricing=PRICING, nodes=NODES, eta_seconds=None
    )
    assert (cost.gpu_hours, cost.usd) == (0.028, 0.06)
