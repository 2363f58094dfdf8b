"""Applying a plan: the status write guards everything after it, children are created once, a 409 adopts only
what is ours, an invalid child is reported as such, and a lost event costs nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ftj_builders import SETTINGS, T0, UID, ftj, job_state, later, owner, pod, spec, step
from kubetune_operator.api import FineTuneJob
from kubetune_operator.apply import (
    EventPoster,
    JobRef,
    Rejected,
    StaleView,
    apply_children,
    commit,
    merge_diff,
    only_figures_differ,
)
from kubetune_operator.kube import ApiError
from kubetune_operator.observed import Observed
from kubetune_operator.reconcile import Deletion, Event, Plan, status_wire
from kubetune_operator.render import render_job

JOB = JobRef("sft", "ml", UID, "41")


class FakeKube:
    """Records calls; `fail` maps (verb, kind or name) to the ApiError to raise."""

    def __init__(self, fail: dict[tuple[str, str], ApiError] | None = None, live_version: str = "41") -> None:
        self.calls: list[tuple[str, ...]] = []
        self.bodies: list[Any] = []
        self.fail = fail or {}
        self.live_version = live_version
        self.existing: dict[str, Any] = {}

    def _check(self, verb: str, what: str) -> None:
        if (verb, what) in self.fail:
            raise self.fail[(verb, what)]

    async def merge_patch(self, kind: str, ns: str, name: str, patch: dict, subresource: str | None = None) -> dict:
        self.calls.append(("PATCH", kind if subresource is None else f"{kind}/{subresource}", name))
        self.bodies.append(patch)
        self._check("PATCH", kind)
        return {"metadata": {"resourceVersion": "42"}}

    async def get(self, kind: str, ns: str, name: str) -> dict:
        self.calls.append(("GET", kind, name))
        if kind == "FineTuneJob":
            return {"metadata": {"resourceVersion": self.live_version}}
        return self.existing[name]

    async def create(self, manifest: dict) -> dict:
        kind, name = manifest["kind"], manifest["metadata"].get("name", "")
        self.calls.append(("POST", kind, name))
        self._check("POST", kind)
        return manifest

    async def delete(self, kind: str, ns: str, name: str, propagation: str = "Background") -> None:
        self.calls.append(("DELETE", kind, name, propagation))


def first_plan() -> tuple[Plan, dict]:
    job = ftj()
    plan, _ = step(job)
    return plan, status_wire(job.status)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def apply_plan(kube: FakeKube, job: JobRef, current: dict, plan: Plan) -> Any:
    """What the controller does: commit, then the children."""
    applied = await commit(kube, job, current, plan)
    await apply_children(kube, job, plan)
    return applied


def test_the_status_is_written_first_with_the_version_the_plan_was_made_from() -> None:
    plan, current = first_plan()
    kube = FakeKube()
    applied = run(apply_plan(kube, JOB, current, plan))
    assert kube.calls[0] == ("PATCH", "FineTuneJob/status", "sft")
    assert kube.bodies[0]["metadata"] == {"resourceVersion": "41"}
    # Then the children, in parallel. No events: the caller's.
    assert sorted(kube.calls[1:]) == [
        ("POST", "ConfigMap", "sft-r1-a1"),
        ("POST", "Job", "sft-r1-a1"),
        ("POST", "Service", "sft-r1-a1"),
    ]
    assert (applied.replaced_version, applied.written_version) == ("41", "42")


def test_a_conflicting_status_write_stops_everything_after_it() -> None:
    plan, current = first_plan()
    kube = FakeKube(fail={("PATCH", "FineTuneJob"): ApiError(409, "Conflict", "the object has been modified")})
    with pytest.raises(StaleView):
        run(apply_plan(kube, JOB, current, plan))
    assert kube.calls == [("PATCH", "FineTuneJob/status", "sft")]


def test_without_a_status_change_the_version_is_confirmed_before_touching_children() -> None:
    plan, _ = first_plan()
    unchanged = status_wire(plan.status)
    kube = FakeKube(live_version="43")
    with pytest.raises(StaleView):
        run(apply_plan(kube, JOB, unchanged, plan))
    assert kube.calls == [("GET", "FineTuneJob", "sft")]
    kube = FakeKube()
    run(apply_plan(kube, JOB, unchanged, Plan(status=plan.status, delete=(Deletion("Job", "sft-r0-a1"),))))
    assert kube.calls == [("GET", "FineTuneJob", "sft"), ("DELETE", "Job", "sft-r0-a1", "Foreground")]


def test_nothing_to_do_makes_no_request() -> None:
    plan, _ = first_plan()
    kube = FakeKube()
    run(apply_plan(kube, JOB, status_wire(plan.status), Plan(status=plan.status)))
    assert kube.calls == []


# Two workers running since T0.
WORKERS = Observed(jobs=(job_state("sft-r1-a1"),), pods=(pod(0), pod(1)))


def running() -> FineTuneJob:
    """The job with two workers running, as its status is after a reconcile a second after they started."""
    return step(step(ftj())[1], WORKERS, later(1))[1]


def wire(job: FineTuneJob) -> dict[str, Any]:
    return status_wire(job.status)


def test_only_the_running_cost_and_worker_counts_are_figures() -> None:
    job = running()
    a, b = wire(job), status_wire(step(job, WORKERS, later(90))[0].status)
    assert a["cost"] != b["cost"] and a["attempts"][0]["gpuHours"] != b["attempts"][0]["gpuHours"]
    assert only_figures_differ(a, b)
    assert not only_figures_differ(a, a)
    assert only_figures_differ(a, {**a, "workers": {"active": 2, "ready": 1}})
    # anything else is news: a phase, a condition, an ended attempt's record, progress
    assert not only_figures_differ(a, {**b, "phase": "Pending"})
    closed = [{**a["attempts"][0], "reason": "Preempted"}]
    assert not only_figures_differ({**a, "attempts": closed}, {**a, "attempts": [{**closed[0], "gpuHours": 9.0}]})
    assert not only_figures_differ(a, {**b, "progress": {"step": 3}})


def test_a_status_that_differs_only_in_figures_waits_when_asked_to() -> None:
    job = running()
    plan = step(job, WORKERS, later(90))[0]
    kube = FakeKube()
    applied = run(commit(kube, JOB, wire(job), Plan(status=plan.status), defer_figures=True))
    assert kube.calls == [] and applied.deferred
    applied = run(commit(kube, JOB, wire(job), Plan(status=plan.status)))
    assert kube.calls == [("PATCH", "FineTuneJob/status", "sft")] and not applied.deferred
    assert set(kube.bodies[0]["status"]) == {"cost", "attempts"}
    # A transition is written at once, figures and all.
    suspended = step(ftj(spec(runPolicy={"suspend": True}), status=wire(job)), WORKERS, later(90))[0]
    kube = FakeKube()
    run(commit(kube, JOB, wire(job), Plan(status=suspended.status), defer_figures=True))
    assert kube.calls == [("PATCH", "FineTuneJob/status", "sft")] and "cost" in kube.bodies[0]["status"]


def test_an_existing_child_is_adopted_only_when_it_is_ours() -> None:
    job = ftj()
    manifest = render_job(owner(job), job.spec, 1, 1, SETTINGS)
    plan = Plan(status=step(job)[0].status, create=(manifest,))
    current = status_wire(plan.status)
    exists = {("POST", "Job"): ApiError(409, "AlreadyExists", "jobs.batch sft-r1-a1 already exists")}

    ours = FakeKube(fail=exists)
    ours.existing["sft-r1-a1"] = {"metadata": {"ownerReferences": [{"uid": UID, "controller": True}], "labels": {}}}
    run(apply_plan(ours, JOB, current, plan))
    assert ours.calls[-2:] == [("GET", "Job", "sft-r1-a1"), ("PATCH", "Job", "sft-r1-a1")]
    assert ours.bodies[-1] == {"metadata": {"labels": manifest["metadata"]["labels"]}}

    theirs = FakeKube(fail=exists)
    theirs.existing["sft-r1-a1"] = {"metadata": {"ownerReferences": [{"uid": "another", "controller": True}]}}
    with pytest.raises(ApiError, match="not controlled by this FineTuneJob"):
        run(apply_plan(theirs, JOB, current, plan))


def test_an_invalid_child_is_a_rejection() -> None:
    plan, current = first_plan()
    kube = FakeKube(fail={("POST", "Job"): ApiError(422, "Invalid", 'Job.batch "sft-r1-a1" is invalid: ...')})
    with pytest.raises(Rejected, match=r"Job sft-r1-a1: Job\.batch"):
        run(apply_plan(kube, JOB, current, plan))


def test_events_are_posted_in_the_background_and_a_failed_one_is_dropped() -> None:
    async def main() -> list[tuple[str, ...]]:
        kube = FakeKube(fail={("POST", "Event"): ApiError(403, "Forbidden", "events is forbidden")})
        poster = EventPoster(kube)
        task = asyncio.create_task(poster.run())
        poster.submit(JOB, (Event("Normal", "A", "a"), Event("Warning", "B", "b")), T0)
        await asyncio.wait_for(poster.drain(), 5)
        assert not task.done()
        task.cancel()
        return kube.calls

    assert run(main()) == [("POST", "Event", ""), ("POST", "Event", "")]


@pytest.mark.parametrize(
    ("old", "new", "patch"),
    [
        ({"a": 1}, {"a": 1}, {}),
        ({"a": 1, "b": 2}, {"a": 1}, {"b": None}),
        ({"a": {"x": 1, "y": 2}}, {"a": {"x": 1, "y": 3}}, {"a": {"y": 3}}),
        ({"a": {"x": 1}}, {"a": {}}, {"a": {"x": None}}),
        ({"l": [1, 2]}, {"l": [2]}, {"l": [2]}),
        ({}, {"n": {"x": 1}}, {"n": {"x": 1}}),
    ],
)
def test_merge_diff(old: dict, new: dict, patch: dict) -> None:
    assert merge_diff(old, new) == patch
