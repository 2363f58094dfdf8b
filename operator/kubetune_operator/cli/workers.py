"""Which worker pod and container `kubectl finetune logs` reads: pure choices over pod objects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kubetune_operator.cli.errors import CliError
from kubetune_operator.names import COMPLETION_INDEX_LABEL

# kubectl's convention for the container `kubectl logs` picks in a pod with several.
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"

Obj = Mapping[str, Any]


def rank_of(pod: Obj) -> int | None:
    """The worker's rank: its Indexed Job completion index (a label since Kubernetes 1.28, always an annotation)."""
    meta = pod.get("metadata") or {}
    value = (meta.get("labels") or {}).get(COMPLETION_INDEX_LABEL) or (meta.get("annotations") or {}).get(
        COMPLETION_INDEX_LABEL
    )
    return int(value) if value is not None and str(value).isdigit() else None


def pick_worker(pods: Sequence[Obj], rank: int, *, where: str) -> Obj:
    """The newest pod of `rank` (an index whose pod was replaced has several); `where` names the attempt."""
    matching = [p for p in pods if rank_of(p) == rank]
    if not matching:
        ranks = sorted({r for r in map(rank_of, pods) if r is not None})
        have = f"it has ranks {', '.join(map(str, ranks))}" if ranks else "it has no worker pods now"
        raise CliError(f"no worker of rank {rank} in {where}: {have}")
    return max(matching, key=lambda p: p["metadata"].get("creationTimestamp") or "")


def log_container(pod: Obj) -> str:
    names: list[str] = [c["name"] for c in pod["spec"]["containers"]]
    preferred = (pod["metadata"].get("annotations") or {}).get(DEFAULT_CONTAINER_ANNOTATION)
    return str(preferred) if preferred in names else names[0]
