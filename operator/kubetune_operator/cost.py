"""What a run costs: GPU time of its worker pods, priced by their nodes (the budget guard is in policies.py).

Everything here is pure: the operator passes in what it observed (worker pods summarised by `pod_usage`, the
labels of their nodes) and the time, and writes what comes back into the status.

Cost is derived from the API objects, not kept in memory. A pod holds its GPUs from `status.startTime` until
its last container finished (see `pod_usage`); GPU-seconds x the price of the pod's node is its cost. The
reconcile measures each attempt's pods again every time and keeps the figure in the attempt's status record,
only ever upwards: an attempt's pods go with its Job (after checkpointing on SIGTERM), and its record then
holds what they used, across operator restarts. The run's cost is the sum of its attempts (`run_cost`).

Price per GPU-hour, most specific first: the node's `node.kubernetes.io/instance-type` in
`Pricing.by_instance_type` (a cloud SKU price, which already says which GPU it has), then its
`nvidia.com/gpu.product` (or, when the node is unknown, `spec.resources.gpuProduct`) in
`Pricing.by_gpu_product`, then `Pricing.default_usd_per_gpu_hour`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubetune_operator.api.spec import Resources
from kubetune_operator.api.status import CostStatus

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"

UsdPerHour = Annotated[float, Field(ge=0)]
NodeLabels = Mapping[str, Mapping[str, str]]  # node name -> its labels


class Pricing(BaseModel):
    """Prices per GPU-hour in US dollars (operator settings, from the Helm values). Keys are label values:
    instance types as in `node.kubernetes.io/instance-type`, GPU products as in `nvidia.com/gpu.product`."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    # Not 0: with a zero price every budget.maxCostUSD would silently never trigger. 2 USD is the order of an
    # on-demand data-centre GPU-hour (A100/H100 class), so an unconfigured operator still guards budgets roughly.
    default_usd_per_gpu_hour: UsdPerHour = Field(
        2.0, description="Price when neither the instance type nor the GPU product has one."
    )
    by_gpu_product: dict[str, UsdPerHour] = Field(
        default_factory=dict, description="Per GPU product, e.g. {NVIDIA-H100-80GB-HBM3: 4.0}."
    )
    by_instance_type: dict[str, UsdPerHour] = Field(
        default_factory=dict, description="Per instance type, per GPU (not per node), e.g. {p5.48xlarge: 3.9}."
    )


def usd_per_gpu_hour(pricing: Pricing, *, instance_type: str | None, gpu_product: str | None) -> float:
    """The price of one GPU-hour: instance type first, then GPU product, then the default."""
    if instance_type is not None and instance_type in pricing.by_instance_type:
        return pricing.by_instance_type[instance_type]
    if gpu_product is not None and gpu_product in pricing.by_gpu_product:
        return pricing.by_gpu_product[gpu_product]
    return pricing.default_usd_per_gpu_hour


# ----------------------------------------------------------------------------------------------
# pods
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodUsage:
    """What cost needs to know about one worker pod (`pod_usage` makes it from the API object, so a watch cache
    can keep this instead of the pod)."""

    gpus: int
    node_name: str | None
    start: datetime | None  # status.startTime; None: never admitted by a kubelet, held no GPU
    end: datetime | None  # when its last container finished; None while it still holds its GPUs

    def interval(self, now: datetime) -> tuple[datetime, datetime] | None:
        """When the pod held its GPUs."""
        if self.start is None:
            return None
        return self.start, max(self.start, self.end or now)

    @property
    def holds_gpus(self) -> bool:
        return self.gpus > 0 and self.start is not None and self.end is None


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value)
    return None


def _gpus(container: Mapping[str, Any]) -> int:
    # An extended resource's request defaults to its limit, and the two must be equal when both are set.
    resources = container.get("resources") or {}
    quantity = (resources.get("requests") or {}).get(GPU_RESOURCE) or (resources.get("limits") or {}).get(GPU_RESOURCE)
    return int(str(quantity)) if quantity is not None else 0


def pod_usage(pod: Mapping[str, Any]) -> PodUsage:
    """A pod as the API server returns it (camelCase JSON; times as RFC 3339 strings or datetimes).

    GPUs: the larger of the containers' sum and any single init container (the scheduler's rule). A pod holds
    them from status.startTime (the kubelet admitted it, the device plugin allocated the GPUs; image pulls
    included, as a cloud bill would) until its last container finished; still Running (also while it
    terminates and checkpoints) means until now. A finished pod that never ran a container ended when its
    conditions last changed.
    """
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    containers = sum(_gpus(c) for c in spec.get("containers") or [])
    init = max((_gpus(c) for c in spec.get("initContainers") or []), default=0)
    start = _time(status.get("startTime"))
    end = None
    if start is not None and status.get("phase") in ("Succeeded", "Failed"):
        finished = [
            _time(((s.get("state") or {}).get("terminated") or {}).get("finishedAt"))
            for s in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
        ]
        ends = [t for t in finished if t is not None] or [
            t for t in (_time(c.get("lastTransitionTime")) for c in status.get("conditions") or []) if t is not None
        ]
        end = max([start, *ends])
    return PodUsage(gpus=max(containers, init), node_name=spec.get("nodeName"), start=start, end=end)


def pod_price(pod: PodUsage, *, pricing: Pricing, nodes: NodeLabels, gpu_product: str | None) -> float:
    """Price per GPU-hour of the pod's node; `gpu_product` (the spec's) stands in for a node the operator
    cannot see (not scheduled yet, or gone)."""
    labels = nodes.get(pod.node_name or "", {})
    return usd_per_gpu_hour(
        pricing,
        instance_type=labels.get(INSTANCE_TYPE_LABEL),
        gpu_product=labels.get(GPU_PRODUCT_LABEL) or gpu_product,
    )


@dataclass(frozen=True)
class Spend:
    """GPU time and money, added up over pods and attempts (price can differ per node, so both are kept)."""

    gpu_seconds: float = 0.0
    usd: float = 0.0

    def __add__(self, other: Spend) -> Spend:
        return Spend(self.gpu_seconds + other.gpu_seconds, self.usd + other.usd)


def pods_spend(
    pods: Iterable[PodUsage],
    *,
    pricing: Pricing,
    nodes: NodeLabels,
    gpu_product: str | None,
    now: datetime,
) -> Spend:
    """What the pods used so far (finished pods: all they ever used)."""
    total = Spend()
    for pod in pods:
        interval = pod.interval(now)
        if not pod.gpus or interval is None:
            continue
        gpu_seconds = pod.gpus * (interval[1] - interval[0]).total_seconds()
        price = pod_price(pod, pricing=pricing, nodes=nodes, gpu_product=gpu_product)
        total += Spend(gpu_seconds, gpu_seconds / 3600 * price)
    return total


def hourly_rate(pods: Iterable[PodUsage], *, resources: Resources, pricing: Pricing, nodes: NodeLabels) -> float:
    """USD per hour the run spends while it trains: the pods that hold GPUs now, at their nodes' prices; before
    any does (queued, restarting), what the spec asks for at the spec's GPU product price."""
    holding = [p for p in pods if p.holds_gpus]
    if holding:
        return sum(
            p.gpus * pod_price(p, pricing=pricing, nodes=nodes, gpu_product=resources.gpu_product) for p in holding
        )
    planned_gpus = resources.num_nodes * resources.gpus_per_node
    return planned_gpus * usd_per_gpu_hour(pricing, instance_type=None, gpu_product=resources.gpu_product)


def run_cost(
    *,
    spent: Spend,
    pods: Iterable[PodUsage],
    resources: Resources,
    pricing: Pricing,
    nodes: NodeLabels,
    eta_seconds: float | None,
) -> CostStatus:
    """status.cost of the run: what it spent (all its attempts' pods so far), and the projection spent + eta x the
    hourly rate of `pods`, the current attempt's. `eta_seconds`: the trainer's estimate of the time left; 0 once
    the run is over (projected = spent); None while unknown (no projection)."""
    projected = None
    if eta_seconds is not None and math.isfinite(eta_seconds):
        rate = hourly_rate(pods, resources=resources, pricing=pricing, nodes=nodes)
        projected = round(spent.usd + max(0.0, eta_seconds) / 3600 * rate, 2)
    return CostStatus(gpu_hours=round(spent.gpu_seconds / 3600, 3), usd=round(spent.usd, 2), projected_usd=projected)
