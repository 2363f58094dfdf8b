"""The operator's moving parts: kopf watches feed caches and a work queue; workers reconcile.

Why this shape rather than kopf's create/update handlers or a daemon per object:
- Level-triggered: whatever happened, a worker reads the latest FineTuneJob and its children from the caches,
  asks the pure `reconcile` what should be, and applies the plan. Nothing depends on seeing every event.
- kopf indexes are the informer caches (summaries of children, filtered server-side by the operator's label;
  the price labels of nodes), and kopf holds every handler until they are filled, so a restart never mistakes
  "not listed yet" for "missing". `@kopf.on.event` handlers only put the owning job's key in the queue: a
  pod's status change wakes its FineTuneJob early; a timer per job (requeue_after) wakes it for backoffs,
  deadlines and polls.
- The progress poller (progress.py) polls each running attempt's rank 0 beside the workers; a reconcile only
  reads its latest report, and a report with news (state, evaluation, checkpoint) wakes the job.
- No state-changing handlers, daemons or timers means no kopf finalizer and no kopf annotations on the user's
  object: deleting a FineTuneJob never waits for the operator (children go by ownerReferences), and Argo CD
  sees no diff it did not make.
- kopf runs standalone. Peering pauses kopf's own handlers but not these workers, and correctness never
  relied on a single replica anyway: deterministic names, create-if-absent and status writes guarded by
  resourceVersion make a second replica harmless (apply.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from kubetune_operator.api import GROUP, PLURAL, VERSION, FineTuneJob
from kubetune_operator.apply import EventPoster, JobRef, Rejected, StaleView, apply_children, commit
from kubetune_operator.cost import GPU_PRODUCT_LABEL, INSTANCE_TYPE_LABEL
from kubetune_operator.kube import Connection
from kubetune_operator.kube_async import AsyncKube
from kubetune_operator.metrics import OperatorMetrics, ReconcileResult
from kubetune_operator.names import CHILD_SELECTOR, LABEL_JOB
from kubetune_operator.observed import (
    Observed,
    Rejection,
    summarize_child,
    summarize_config_map,
    summarize_job,
    summarize_pod,
)
from kubetune_operator.progress import ProgressPoller, TrainerView
from kubetune_operator.reconcile import reconcile, status_wire, with_running_figures
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, FineTuneJob name)

# Children the operator watches: (group, version, plural), "" being the core group, and the summary its
# cache keeps of each.
CHILDREN: dict[str, tuple[tuple[str, str, str], Any]] = {
    "jobs": (("batch", "v1", "jobs"), summarize_job),
    "pods": (("", "v1", "pods"), summarize_pod),
    "services": (("", "v1", "services"), summarize_child),
    "configmaps": (("", "v1", "configmaps"), summarize_config_map),
    "claims": (("", "v1", "persistentvolumeclaims"), summarize_child),
}
# Once the cached FineTuneJob is known to be behind the API server (we wrote it, or a write of ours was
# refused as stale), its watch event will enqueue the job when it lands. Only if it does not land this long
# does the worker act on the cache anyway (every write is guarded, so that is safe, merely wasteful). A busy
# operator's watch can run many seconds behind: acting sooner would only collect 409s.
STALE_CACHE_TIMEOUT = 30.0
# How long a child just created or deleted is taken as such while the caches do not show it yet.
CHILD_CACHE_TIMEOUT = 15.0
# Children change in bursts (a Job's pods start within moments of each other): one reconcile a moment after
# the first change sees them all, and writes the status once instead of once per pod.
CHILD_EVENT_BATCH = 1.0
MAX_ERROR_BACKOFF = 300.0
EVENT_DRAIN_SECONDS = 2.0


@dataclass
class ReconcileStats:
    """Reconcile counts and the latest durations, summarised when the operator stops (read by the benchmark)."""

    durations: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    reconciles: int = 0
    errors: int = 0
    conflicts: int = 0

    def record(self, seconds: float) -> None:
        self.reconciles += 1
        self.durations.append(seconds)

    def summary(self, requests: dict[str, int]) -> dict[str, Any]:
        d = sorted(self.durations)

        def ms(q: float) -> float:
            return round(d[min(len(d) - 1, int(q * len(d)))] * 1000, 2) if d else 0.0

        return {
            "reconciles": self.reconciles,
            "errors": self.errors,
            "conflicts": self.conflicts,
            "p50_ms": ms(0.50),
            "p90_ms": ms(0.90),
            "p99_ms": ms(0.99),
            "max_ms": ms(1.0),
            "api_requests": sum(requests.values()),
            "api_requests_by_kind": dict(sorted(requests.items())),
        }


class Controller:
    def __init__(self, kube: AsyncKube, settings: OperatorSettings) -> None:
        self.kube = kube
        self.settings = settings
        self.queue: WorkQueue[Key] = WorkQueue()
        self.stats = ReconcileStats()
        self.metrics = OperatorMetrics(self.finetunejobs)
        self.poller: ProgressPoller[Key] = ProgressPoller(settings.progress_poll_interval_seconds, self.queue.add)
        self.events = EventPoster(kube)
        self.ready = asyncio.Event()
        self._caches: dict[str, kopf.Index[Any, Any]] = {}  # by job key; nodes by name
        self._rejections: dict[Key, Rejection] = {}
        # A resourceVersion the cache is known to be behind, by job, and since when.
        self._behind: dict[Key, tuple[str, float]] = {}
        # The resourceVersion of the operator's last status write, by job, until its watch event arrives.
        self._echoes: dict[Key, str] = {}
        # Jobs whose reconcile waits for the cache to catch up with a write of ours.
        self._waiting: set[Key] = set()
        # When each job's status was last written, running figures (cost, worker counts) included.
        self._figures_written: dict[Key, float] = {}
        self._errors: dict[Key, int] = {}
        # Children created or deleted in the last moments, by job: (verb, kind, name) -> when. Until the watch
        # shows the change, the caches say "missing" (or "still there") and would invite a second request.
        self._recent: dict[Key, dict[tuple[str, str, str], float]] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._poster: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------------------
    # kopf wiring
    # ------------------------------------------------------------------------------------------

    def registry(self) -> kopf.OperatorRegistry:
        registry = kopf.OperatorRegistry()

        @kopf.on.login(registry=registry)
        async def login(**_: Any) -> kopf.ConnectionInfo:
            # kopf's watches use the operator's own credentials (kube.py), read again when kopf logs in anew.
            return connection_info(self.kube.connection)

        @kopf.index(GROUP, VERSION, PLURAL, id="finetunejobs", registry=registry)
        async def finetunejobs(body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
            meta = body.get("metadata", {})
            kept = {k: meta[k] for k in ("name", "namespace", "uid", "generation", "resourceVersion") if k in meta}
            for k in ("annotations", "deletionTimestamp"):
                if k in meta:
                    kept[k] = meta[k]
            return {
                (meta["namespace"], meta["name"]): {
                    "metadata": kept,
                    "spec": body.get("spec"),
                    "status": body.get("status"),
                }
            }

        @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
        async def finetunejob_changed(type: str, body: kopf.Body, **_: Any) -> None:
            key = (body.metadata["namespace"], body.metadata["name"])
            if type == "DELETED":
                self.forget(key)
            elif self.is_echo(key, body.metadata.get("resourceVersion")):
                # The operator's own status write coming back: nothing to react to. Reacting would make every
                # write the cause of the next (the status holds figures that change with time).
                pass
            else:
                self.queue.add(key)

        for cache, (resource, summarize) in CHILDREN.items():
            self._watch_children(registry, cache, resource, summarize)

        @kopf.index("", "v1", "nodes", id="nodes", registry=registry)
        async def nodes(body: kopf.Body, **_: Any) -> dict[str, dict[str, str]]:
            # Only what prices a GPU-hour; a pod's node is looked up by name.
            labels = body.metadata.labels
            return {body.metadata.name: {k: labels[k] for k in (INSTANCE_TYPE_LABEL, GPU_PRODUCT_LABEL) if k in labels}}

        @kopf.on.startup(registry=registry)
        async def capture_caches(**kwargs: Any) -> None:
            # kopf hands the (live) indexes to handlers as keyword arguments named after their functions.
            self._caches = {"finetunejobs": kwargs["finetunejobs"], "nodes": kwargs["nodes"]}
            self._caches.update({cache: kwargs[cache] for cache in CHILDREN})
            self.ready.set()

        @kopf.on.cleanup(registry=registry)
        async def stop_reconciling(**_: Any) -> None:
            # Before kopf's own exit: it would otherwise wait for the workers as if they were hung.
            await self.stop_workers()

        return registry

    def _watch_children(
        self, registry: kopf.OperatorRegistry, cache: str, resource: tuple[str, str, str], summarize: Any
    ) -> None:
        async def index(body: kopf.Body, **_: Any) -> dict[Key, Any]:
            return {_owner_key(body): summarize(body)}

        async def wake_owner(body: kopf.Body, **_: Any) -> None:
            self.queue.add(_owner_key(body), CHILD_EVENT_BATCH)

        kopf.index(*resource, id=cache, labels={LABEL_JOB: kopf.PRESENT}, registry=registry)(index)
        kopf.on.event(*resource, labels={LABEL_JOB: kopf.PRESENT}, registry=registry)(wake_owner)

    def configure(self, kopf_settings: kopf.OperatorSettings, namespaces: list[str]) -> None:
        """kopf settings (DESIGN section 9) for watching `namespaces` (none: every namespace)."""
        s = kopf_settings
        # A fixed list of namespaces needs no scanning: kopf then neither lists and watches namespaces to resolve
        # the list, nor watches CRDs to notice ours appear or change; it serves the resources discovery showed at
        # start (the FineTuneJob CRD must be installed before the operator starts; the chart's is). So namespaced
        # mode needs no cluster-wide read of CRDs or namespaces. Every namespace, or globs, keep it.
        s.scanning.disabled = only_exact_namespaces(namespaces)
        # Only the operator's own children are listed and watched, filtered by the API server.
        for resource, _ in CHILDREN.values():
            s.watching.label_selectors[resource] = CHILD_SELECTOR
        # Reconnect a watch that went silent (bookmarks arrive every minute), and bound every request.
        s.watching.inactivity_timeout = 70.0
        s.watching.server_timeout = 300
        s.watching.connect_timeout = 10.0
        s.networking.request_timeout = 60.0
        s.queueing.error_delays = (1, 2, 5, 10, 30, 60)
        # The operator posts its own Events, one per transition, with reasons; kopf's would repeat them.
        s.posting.enabled = False
        # No handler here stores progress, a diff base or a finalizer (NoEssence relies on that); should one
        # ever do, it stays under our own prefix instead of kopf.zalando.org.
        s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        s.persistence.diffbase_storage = NoEssence(prefix=GROUP, key="last-handled-configuration")
        s.persistence.finalizer = f"{GROUP}/finalizer"

    # ------------------------------------------------------------------------------------------
    # workers
    # ------------------------------------------------------------------------------------------

    def start_workers(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(), name=f"reconcile-worker-{i}")
            for i in range(self.settings.reconcile_workers)
        ]
        self._poster = asyncio.create_task(self.events.run(), name="event-poster")

    async def stop_workers(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self.poller.stop()
        if self._poster:
            # The last transitions' events, briefly; then whatever is left is dropped.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.events.drain(), EVENT_DRAIN_SECONDS)
            self._poster.cancel()
            await asyncio.gather(self._poster, return_exceptions=True)

    def alive(self) -> bool:
        tasks = [*self._workers, *([self._poster] if self._poster else [])]
        return bool(tasks) and not any(t.done() for t in tasks)

    def is_echo(self, key: Key, version: str | None) -> bool:
        """Whether a watch event of the FineTuneJob at `version` only brings back the operator's own last write,
        for which no reconcile waits."""
        if key in self._waiting:
            self._waiting.discard(key)
            return False
        if version is not None and self._echoes.get(key) == version:
            del self._echoes[key]
            return True
        return False

    def forget(self, key: Key) -> None:
        self.queue.forget(key)
        self.poller.unwatch(key)
        self._rejections.pop(key, None)
        self._behind.pop(key, None)
        self._echoes.pop(key, None)
        self._waiting.discard(key)
        self._figures_written.pop(key, None)
        self._errors.pop(key, None)
        self._recent.pop(key, None)

    async def _work(self) -> None:
        while True:
            key = await self.queue.get()
            started = time.perf_counter()
            try:
                with self.metrics.reconcile() as outcome:
                    outcome.result = await self.reconcile_key(key)
                self._errors.pop(key, None)
            except Exception:
                self.stats.errors += 1
                failures = self._errors[key] = self._errors.get(key, 0) + 1
                delay = min(2.0 ** (failures - 1), MAX_ERROR_BACKOFF)
                log.exception("reconciling %s/%s failed (retry %d in %.0fs)", *key, failures, delay)
                self.queue.add(key, delay)
            finally:
                self.stats.record(time.perf_counter() - started)
                self.queue.done(key)

    async def reconcile_key(self, key: Key) -> ReconcileResult:
        body = _only(self._caches["finetunejobs"], key)
        if body is None:
            self.forget(key)
            return "success"
        meta = body["metadata"]
        version = meta["resourceVersion"]
        behind = self._behind.get(key)
        if behind and behind[0] == version:
            waited = time.monotonic() - behind[1]
            if waited < STALE_CACHE_TIMEOUT:
                self._waiting.add(key)
                self.queue.add(key, STALE_CACHE_TIMEOUT - waited)
                return "requeue_after"
        ftj = FineTuneJob.model_validate(body)
        now = datetime.now(UTC)
        plan = reconcile(ftj, self.observe(key, ftj, now), self.settings, now)
        job = JobRef(meta["name"], meta["namespace"], meta["uid"], version)
        # Running figures change every second: rewritten at most once per interval, unless something else
        # changes and carries them along. Metrics compute them when scraped.
        interval = self.settings.figures_write_interval_seconds
        since = time.monotonic() - self._figures_written.get(key, -math.inf)
        try:
            applied = await commit(self.kube, job, status_wire(ftj.status), plan, defer_figures=since < interval)
        except StaleView:
            self.stats.conflicts += 1
            self._behind[key] = (version, time.monotonic())
            self.queue.add(key, STALE_CACHE_TIMEOUT)
            return "requeue"
        if applied.replaced_version:
            self._behind[key] = (applied.replaced_version, time.monotonic())
        if applied.written_version:
            self._echoes[key] = applied.written_version
            self._figures_written[key] = time.monotonic()
        if applied.deferred:
            self.queue.add(key, interval - since)
        self.events.submit(job, plan.events, now)
        try:
            await apply_children(self.kube, job, plan)
        except Rejected as e:
            log.warning("%s/%s: %s", *key, e)
            self._rejections[key] = Rejection(run=plan.status.run or 1, message=str(e))
            self.queue.add(key)
            return "requeue"
        touched = [("create", m["kind"], m["metadata"]["name"]) for m in plan.create]
        touched += [("delete", d.kind, d.name) for d in plan.delete]
        if touched:
            self._recent.setdefault(key, {}).update(dict.fromkeys(touched, time.monotonic()))
        if plan.requeue_after is None:
            return "success"
        self.queue.add(key, plan.requeue_after)
        # Waking up for a backoff, a deadline or the next look at a running job; the idle resync is no requeue.
        return "requeue_after" if plan.requeue_after < self.settings.resync_seconds else "success"

    def finetunejobs(self) -> list[FineTuneJob]:
        """The FineTuneJobs in the cache, their running figures (cost so far, worker counts) computed from the
        pods now rather than read from the status, which refreshes them only every so often: the metrics
        collector's source. One that does not validate is left out (its reconcile logs why)."""
        index = self._caches.get("finetunejobs")
        now = datetime.now(UTC)
        jobs = []
        for key, store in index.items() if index is not None else ():
            for body in store:
                try:
                    ftj = FineTuneJob.model_validate(body)
                except ValidationError:
                    continue
                jobs.append(with_running_figures(ftj, self._children(key), self.settings, now))
        return jobs

    def observe(self, key: Key, ftj: FineTuneJob, now: datetime) -> Observed:
        """Everything the caches and the progress poller hold about one job: the pure reconcile's input."""
        recent = {
            change: at
            for change, at in self._recent.pop(key, {}).items()
            if time.monotonic() - at < CHILD_CACHE_TIMEOUT
        }
        if recent:
            self._recent[key] = recent
        observed = replace(
            self._children(key),
            rejection=self._rejections.get(key),
            just_created=frozenset((kind, name) for verb, kind, name in recent if verb == "create"),
            just_deleted=frozenset((kind, name) for verb, kind, name in recent if verb == "delete"),
        )
        return replace(observed, trainer=self._trainer(key, ftj, observed, now))

    def _children(self, key: Key) -> Observed:
        """What the caches hold about one job's children, their pods and those pods' nodes."""
        c = self._caches
        pods = tuple(_all(c["pods"], key))
        on = {p.usage.node_name for p in pods if p.usage.node_name}
        return Observed(
            jobs=tuple(_all(c["jobs"], key)),
            pods=pods,
            services=tuple(_all(c["services"], key)),
            config_maps=tuple(_all(c["configmaps"], key)),
            claims=tuple(_all(c["claims"], key)),
            nodes={name: labels for name in on if (labels := _only(c["nodes"], name)) is not None},
        )

    def _trainer(self, key: Key, ftj: FineTuneJob, observed: Observed, now: datetime) -> TrainerView | None:
        """Have the poller watch the current attempt's rank 0 while it runs (also while it checkpoints after
        SIGTERM), and return what it knows."""
        status = ftj.status
        rank0 = None
        if status is not None and status.run is not None and status.attempt is not None:
            pods = observed.owned_by(ftj.metadata["uid"]).pods_of(status.run, status.attempt)
            rank0 = next((p for p in pods if p.index == 0 and p.phase == "Running" and p.pod_ip), None)
        if status is None or status.run is None or status.attempt is None or rank0 is None or rank0.pod_ip is None:
            self.poller.unwatch(key)
            return None
        host = f"[{rank0.pod_ip}]" if ":" in rank0.pod_ip else rank0.pod_ip
        url = f"http://{host}:{self.settings.trainer_metrics_port}/progress"
        return self.poller.watch(key, url, status.run, status.attempt, now)


class NoEssence(kopf.AnnotationsDiffBaseStorage):
    """For every watch event, kopf builds the object's "essence" (a deep copy of all of it) to diff against the
    last handled one, which only change-detecting handlers (create/update/field) and daemons use. The operator has
    neither (index and event handlers only, which see every event anyway), so the essence is left empty: no deep
    copy of each pod on each of its events, which was the operator's largest CPU cost under a burst of jobs."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return {}


def connection_info(connection: Connection) -> kopf.ConnectionInfo:
    """kopf's credentials from the operator's: the same server, TLS material and current token."""
    c = connection.configuration
    return kopf.ConnectionInfo(
        server=connection.server,
        default_namespace=connection.namespace,
        ca_path=c.ssl_ca_cert,
        insecure=not c.verify_ssl,
        certificate_path=c.cert_file,
        private_key_path=c.key_file,
        scheme="Bearer" if connection.token() else None,
        token=connection.token(),
        proxy_url=connection.proxy,
    )


def only_exact_namespaces(namespaces: list[str]) -> bool:
    """Whether `namespaces` names namespaces one by one: no globs ("*", "?"), negations ("!") or kopf's
    comma-separated patterns, none of which kopf can resolve without listing namespaces."""
    return bool(namespaces) and not any(set(ns) & set("*?!,") for ns in namespaces)


def _owner_key(child: kopf.Body) -> Key:
    return child.metadata["namespace"], child.metadata.labels[LABEL_JOB]


def _all(index: kopf.Index[Any, Any], key: Any) -> Iterator[Any]:
    store = index.get(key)
    return iter(store) if store is not None else iter(())


def _only(index: kopf.Index[Any, Any], key: Any) -> Any:
    return next(_all(index, key), None)
