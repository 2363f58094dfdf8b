"""Carry out a Plan against the API server: guarded, idempotent, in a safe order.

Every mutation is tied to the FineTuneJob resourceVersion the plan was computed from. A status change is
written first as a merge patch carrying that resourceVersion (409 if anyone wrote since); a plan without a
status change confirms the version with a GET before touching children. So a replica or a restarted operator
acting on a stale cache never creates the children of an attempt that was already replaced: it reconciles
again instead. Creation is create-if-absent under deterministic names: a 409 means the child is there
(adopted if ours, an error if someone else's).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubetune_operator.api import API_VERSION, KIND
from kubetune_operator.api.common import format_time
from kubetune_operator.kube import ApiError
from kubetune_operator.kube_async import AsyncKube
from kubetune_operator.names import LABEL_JOB, MANAGED_BY
from kubetune_operator.reconcile import Event, Plan, status_wire
from kubetune_operator.render import Manifest

COMPONENT = "kubetune-operator"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
log = logging.getLogger(__name__)


class StaleView(Exception):
    """The FineTuneJob changed after the plan was computed; reconcile again with the newer object."""


class Rejected(Exception):
    """The API server refused a child as invalid: retrying the same spec cannot help."""


@dataclass(frozen=True)
class JobRef:
    name: str
    namespace: str
    uid: str
    resource_version: str


@dataclass(frozen=True)
class Applied:
    # After a status write: the version it replaced (a cache still holding it is behind), and the one it made
    # (its watch event is the operator's own write coming back, with nothing new in it).
    replaced_version: str | None = None
    written_version: str | None = None
    # The status differed only in running figures, and was not written (defer_figures).
    deferred: bool = False


async def commit(
    kube: AsyncKube, job: JobRef, current_status: dict[str, Any], plan: Plan, *, defer_figures: bool = False
) -> Applied:
    """Write the plan's status, or confirm the job is unchanged when the plan only touches children: the guard
    before apply_children. After it, the plan's transitions have happened and its events may be posted.
    `defer_figures`: a status that differs only in running figures (`only_figures_differ`) is not written now."""
    applied = Applied()
    desired = status_wire(plan.status)
    deferred = defer_figures and only_figures_differ(current_status, desired)
    if desired != current_status and not deferred:
        body = {"metadata": {"resourceVersion": job.resource_version}, "status": merge_diff(current_status, desired)}
        try:
            written = await kube.merge_patch(KIND, job.namespace, job.name, body, subresource="status")
        except ApiError as e:
            if e.status in (404, 409):
                raise StaleView(str(e)) from e
            raise
        applied = Applied(replaced_version=job.resource_version, written_version=written["metadata"]["resourceVersion"])
    elif plan.create or plan.delete or plan.release:
        await _confirm_version(kube, job)
    return Applied(deferred=True) if deferred else applied


async def apply_children(kube: AsyncKube, job: JobRef, plan: Plan) -> None:
    """Delete and create the plan's children (after commit)."""
    # Foreground for Jobs: the Job stays visible until its pods are gone, so "workers still stopping" is
    # observable; the workers get SIGTERM and checkpoint within their grace period.
    await asyncio.gather(
        *(
            kube.delete(d.kind, job.namespace, d.name, "Foreground" if d.kind == "Job" else "Background")
            for d in plan.delete
        )
    )
    # A claim that now holds outputs loses its owner, so the garbage collector never takes it with the job.
    release = {"metadata": {"ownerReferences": None}}
    await asyncio.gather(
        *(kube.merge_patch("PersistentVolumeClaim", job.namespace, claim, release) for claim in plan.release)
    )
    # All at once: one round trip. The Job's pods need the claim, config and Service, but they are created,
    # scheduled and started well after those (and would wait for them anyway).
    await asyncio.gather(*(create_or_adopt(kube, job, m) for m in plan.create))


async def _confirm_version(kube: AsyncKube, job: JobRef) -> None:
    try:
        live = await kube.get(KIND, job.namespace, job.name)
    except ApiError as e:
        if e.status == 404:
            raise StaleView("the FineTuneJob is gone") from e
        raise
    if live["metadata"]["resourceVersion"] != job.resource_version:
        raise StaleView("the FineTuneJob changed")


async def create_or_adopt(kube: AsyncKube, job: JobRef, manifest: Manifest) -> None:
    kind, name = manifest["kind"], manifest["metadata"]["name"]
    try:
        await kube.create(manifest)
        return
    except ApiError as e:
        if e.status in (400, 422):
            raise Rejected(f"{kind} {name}: {e.message}") from e
        if e.status != 409:
            raise
    existing = await kube.get(kind, job.namespace, name)
    if _kept_claim_of(job, manifest, existing):
        return
    owners = existing["metadata"].get("ownerReferences") or []
    if not any(ref.get("uid") == job.uid and ref.get("controller") for ref in owners):
        # A leftover of an earlier job with the same name (the garbage collector will remove it) or someone
        # else's object: never take it over.
        raise ApiError(409, "AlreadyExists", f"{kind} {name} exists and is not controlled by this FineTuneJob")
    want = manifest["metadata"].get("labels") or {}
    have = existing["metadata"].get("labels") or {}
    if any(have.get(k) != v for k, v in want.items()):
        await kube.merge_patch(kind, job.namespace, name, {"metadata": {"labels": want}})


def _kept_claim_of(job: JobRef, manifest: Manifest, existing: dict[str, Any]) -> bool:
    """The claim is one the operator created for a job of this name and left without an owner because it holds
    outputs: it is this job's to use (by uid, its runs' directories never meet those of the job before)."""
    meta = existing["metadata"]
    return (
        manifest["kind"] == "PersistentVolumeClaim"
        and not meta.get("ownerReferences")
        and (meta.get("labels") or {}).get(LABEL_JOB) == job.name
        and (meta.get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY
    )


class EventPoster:
    """Posts Events in the background, so a reconcile never waits for them. They are for humans: one that
    cannot be posted is logged and dropped, and a full queue drops new ones rather than grow."""

    def __init__(self, kube: AsyncKube, capacity: int = 10_000) -> None:
        self._kube = kube
        self._queue: asyncio.Queue[tuple[JobRef, Event, datetime]] = asyncio.Queue(capacity)

    def submit(self, job: JobRef, events: tuple[Event, ...], now: datetime) -> None:
        for event in events:
            try:
                self._queue.put_nowait((job, event, now))
            except asyncio.QueueFull:
                log.warning("event queue full; dropped %s for %s/%s", event.reason, job.namespace, job.name)

    async def run(self) -> None:
        while True:
            job, event, now = await self._queue.get()
            try:
                await post_event(self._kube, job, event, now)
            except ApiError as e:
                log.warning("could not post event %s for %s/%s: %s", event.reason, job.namespace, job.name, e)
            finally:
                self._queue.task_done()

    async def drain(self) -> None:
        await self._queue.join()


async def post_event(kube: AsyncKube, job: JobRef, event: Event, now: datetime) -> None:
    stamp = format_time(now)
    await kube.create(
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{job.name}.", "namespace": job.namespace},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": job.name,
                "namespace": job.namespace,
                "uid": job.uid,
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message,
            "source": {"component": COMPONENT},
            "reportingComponent": f"kubetune.io/{COMPONENT}",
            "reportingInstance": socket.gethostname(),
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
    )


def only_figures_differ(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether two statuses (as written) differ, but only in running figures: values that follow from the pods'
    times and counts and so change from one moment to the next, without anything having happened. They are the
    run's cost so far (status.cost, and the open attempt's and the active run's records of it) and the worker
    counts (status.workers). A finished attempt's or run's record is history, never a running figure."""
    return old != new and _without_figures(old) == _without_figures(new)


def _without_figures(status: dict[str, Any]) -> dict[str, Any]:
    spent = ("gpuHours", "costUSD")

    def drop(record: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if k not in keys}

    rest = {k: v for k, v in status.items() if k not in ("cost", "workers")}
    rest["attempts"] = [a if "reason" in a else drop(a, spent) for a in status.get("attempts") or []]
    rest["runs"] = [r if "result" in r else drop(r, spent) for r in status.get("runs") or []]
    return rest


def merge_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: changed keys, nulls for removed ones."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            nested = merge_diff(before, value)
            if nested:
                patch[key] = nested
        elif value != before or key not in old:
            patch[key] = value
    return patch
