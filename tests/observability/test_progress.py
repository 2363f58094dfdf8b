"""Polling rank 0's /progress and mapping it into status.progress and status.checkpoint.

The documents come from the real trainer's progress module (kubetune_trainer.progress), so a change of its
shape breaks these tests rather than the operator in production.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from kubetune_operator.api.status import (
    CheckpointStatus,
    DataReportSummary,
    EvalSetResult,
    HistoryPoint,
    PinnedSource,
    Progress,
)
from kubetune_operator.progress import (
    ProgressPoller,
    fetch_progress,
    parse_report,
    poll_interval,
    thin_history,
    to_status,
)
from kubetune_trainer import progress as trainer_progress
from observability_helpers import T0

SAVED_AT = datetime(2026, 11, 27, 9, 30, 0, tzinfo=UTC).timestamp()
# Where the worker mounts its job's directory of the checkpoint claim, and what that is outside the pod.
ROOT = "/kubetune/job"
URI = "pvc://ft-checkpoints/ml-team/support-bot"


SUMMARY = {
    "rows": 9500,
    "tokens": 2_400_000,
    "lengthP50": 210,
    "lengthP99": 1900,
    "lengthMax": 5100,
    "truncatedRows": 3,
    "skippedRows": 1,
    "exactDuplicateRows": 12,
    "nearDuplicateRows": 40,
    "evaluationRows": 700,
    "leakedRows": 2,
}


def sets(general: float) -> dict[str, dict[str, float | None]]:
    from kubetune_trainer import evalsets

    return evalsets.figures({"general": general}, {"general": 2.0})


def trainer_doc() -> dict[str, Any]:
    """What a real rank 0 publishes mid-run, through JSON as on the wire."""
    p = trainer_progress.Progress(world_size=16)
    # As sources.resolve records them: an hf:// model pinned to a commit, an s3:// dataset (ETags, no commit).
    p.pinned(
        {
            "model": {"source": "hf://Qwen/Qwen2.5-7B", "path": "/c/hf-1", "revision": "main", "commit": "a" * 40},
            "dataset": {"source": "s3://b/d.jsonl", "path": "/c/s3-2/d.jsonl", "objects": []},
        }
    )
    p.set_plan(4000)
    p.data_report(SUMMARY)
    p.evaluated(0, eval_loss=2.2, perplexity=9.03, sets=sets(2.0), base_eval_loss=2.2)  # the base model
    p.set_state("training")
    for step in range(1, 1201):
        p.step_done(step, epoch=step / 2000, duration=0.5, tokens=4096)
        if step % 2 == 0:  # 600 logged points: more than the trainer's 500
            p.logged(
                loss=1.234 if step == 1200 else 2.0 - step / 1000,
                learning_rate=2e-4,
                grad_norm=0.8,
                tokens_per_second=48210.0,
                mfu=0.41,
                eta_seconds=5400.4,
                gpu_memory_peak=60 * 2**30,
            )
        if step % 100 == 0:
            loss = 1.31 if step == 1200 else 2.1 - step / 1000
            p.evaluated(step, eval_loss=loss, perplexity=3.7, sets=sets(2.0 + step / 10_000), base_eval_loss=2.2)
    p.checkpointed(1200, f"{ROOT}/runs/2/checkpoints/step-1200", SAVED_AT, duration=12.0)
    doc: dict[str, Any] = json.loads(json.dumps(p.snapshot()))
    return doc


def test_a_real_trainer_document_maps_into_the_status() -> None:
    doc = trainer_doc()
    report = parse_report(doc)
    assert report is not None
    progress, checkpoint = to_status(report, previous_checkpoint=None, checkpoint_root=ROOT, checkpoint_uri=URI)
    history = progress.history
    assert progress.model_copy(update={"history": []}) == Progress(
        step=1200,
        total_steps=4000,
        percent=30,
        epoch=0.6,
        loss=1.234,
        eval_loss=1.31,
        base_eval_loss=2.2,
        eval_sets=[EvalSetResult(name="general", loss=2.12, perplexity=8.3311, base_loss=2.0, change=0.06)],
        data_report=DataReportSummary.model_validate(SUMMARY),
        tokens_per_second=48210.0,
        mfu=0.41,
        eta="1h30m",
        eta_seconds=5400,
        updated_at=report.updated_at,
        pinned=[PinnedSource(role="model", source="hf://Qwen/Qwen2.5-7B", revision="main", commit="a" * 40)],
    )
    assert progress.updated_at is not None and abs(progress.updated_at.timestamp() - time.time()) < 60
    assert checkpoint == CheckpointStatus(
        latest=f"{URI}/runs/2/checkpoints/step-1200", step=1200, saved_at=datetime.fromtimestamp(SAVED_AT, UTC)
    )
    # the trainer's 500-point history, thinned for the status: spread over the run, every evaluation kept
    assert len(doc["history"]) > 300 and 50 < len(history) <= 100
    assert history[-1] == HistoryPoint(step=1200, loss=1.234, eval_loss=1.31, eval_sets={"general": 2.12})
    assert history[0] == HistoryPoint(step=0, eval_loss=2.2, eval_sets={"general": 2.0})  # the base model
    steps = [p.step for p in history]
    assert steps == sorted(set(steps)) and steps[0] == doc["history"][0]["step"]
    evaluated = [h["step"] for h in doc["history"] if "evalLoss" in h]
    assert evaluated and [p.step for p in history if p.eval_loss is not None] == evaluated
    # the status accepts it: it serialises to JSON the API server takes
    json.loads(progress.model_dump_json(by_alias=True))


def test_a_fresh_trainer_has_no_progress_figures_yet() -> None:
    report = parse_report(json.loads(json.dumps(trainer_progress.Progress(world_size=1).snapshot())))
    assert report is not None
    progress, checkpoint = to_status(report, previous_checkpoint=None, checkpoint_root=ROOT, checkpoint_uri=URI)
    assert (progress.step, progress.total_steps, progress.percent, progress.loss, progress.eta) == (
        0,
        None,
        None,
        None,
        None,
    )
    assert checkpoint is None


BASE = {"step": 10, "totalSteps": 100, "updatedAt": "2026-11-27T09:00:00Z"}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"loss": float("nan")}, {"loss": None}),  # NaN cannot go into a Kubernetes object
        ({"evalLoss": float("inf")}, {"eval_loss": None}),
        ({"mfu": 1.7}, {"mfu": None}),  # outside 0-1: a broken figure, not a clamped one
        ({"mfu": -0.1}, {"mfu": None}),
        ({"tokensPerSecond": -5}, {"tokens_per_second": None}),
        ({"etaSeconds": -3}, {"eta": None, "eta_seconds": None}),
        ({"etaSeconds": 59.6}, {"eta": "1m", "eta_seconds": 60}),
        ({"state": "done", "step": 100, "etaSeconds": 30}, {"percent": 100, "eta": "0s", "eta_seconds": 0}),
        ({"step": 150}, {"percent": 100}),
        ({"totalSteps": 0}, {"total_steps": None, "percent": None}),
        ({"epoch": -1}, {"epoch": None}),
        ({"unknownField": {"x": 1}}, {}),  # newer trainers may add fields
    ],
)
def test_mapping_drops_figures_a_status_cannot_hold(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    report = parse_report({**BASE, **fields})
    assert report is not None
    progress, _ = to_status(report, previous_checkpoint=None, checkpoint_root=ROOT, checkpoint_uri=URI)
    for key, value in expected.items():
        assert getattr(progress, key) == value, key


def points(n: int, eval_every: int) -> list[HistoryPoint]:
    return [HistoryPoint(step=i, loss=1.0, eval_loss=0.5 if i % eval_every == 0 else None) for i in range(1, n + 1)]


@pytest.mark.parametrize(
    ("n", "eval_every", "evals_kept"),
    [
        (100, 10, 10),  # fits: unchanged
        (500, 25, 20),  # every evaluation kept, training points fill the rest
        (500, 2, 33),  # at most half of the points for evaluations, spread over the run; training points the rest
        (101, 1000, 0),
    ],
)
def test_history_is_thinned_evenly_keeping_the_ends_and_the_evaluations(
    n: int, eval_every: int, evals_kept: int
) -> None:
    thinned = thin_history(points(n, eval_every), limit=100)
    steps = [p.step for p in thinned]
    # The trainer's thinning (power-of-two step buckets, stable as the run grows): more than half the room is used.
    assert min(n, 100) // 2 < len(thinned) <= min(n, 100)
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == n
    assert sum(p.eval_loss is not None for p in thinned) == evals_kept
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    assert max(gaps) <= 3 * n / 100  # spread over the whole run, no long holes


def test_odd_history_points_are_dropped_not_the_report() -> None:
    history = [
        {"step": 1, "loss": 2.0},
        {"step": "x"},
        "junk",
        {"step": 2, "loss": float("nan")},
        {"step": 3, "evalLoss": 1.5},
    ]
    report = parse_report({**BASE, "history": history})
    assert report is not None
    progress, _ = to_status(report, previous_checkpoint=None, checkpoint_root=ROOT, checkpoint_uri=URI)
    assert progress.history == [HistoryPoint(step=1, loss=2.0), HistoryPoint(step=3, eval_loss=1.5)]


@pytest.mark.parametrize(
    "doc",
    [
        {"step": "many"},
        {"totalSteps": [1]},
        {"updatedAt": "yesterday"},
        {"updatedAt": "2026-11-27T09:00:00"},  # no zone: ambiguous
        {"checkpoint": {"step": 5}},
    ],
)
def test_documents_of_another_shape_are_rejected(doc: dict[str, Any]) -> None:
    assert parse_report(doc) is None


@pytest.mark.parametrize(
    ("reported_step", "root", "expected"),
    [
        (300, "/ckpt", CheckpointStatus(latest="pvc://c/ns/j/runs/1/step-300", step=300, saved_at=T0)),
        (300, "/ckpt/", CheckpointStatus(latest="pvc://c/ns/j/runs/1/step-300", step=300, saved_at=T0)),
        (300, "/elsewhere", CheckpointStatus(latest="/ckpt/runs/1/step-300", step=300, saved_at=T0)),
        (300, "/ck", CheckpointStatus(latest="/ckpt/runs/1/step-300", step=300, saved_at=T0)),  # not a prefix dir
        (100, "/ckpt", CheckpointStatus(latest="runs/1/step-200", step=200)),  # older than what status has
        (None, "/ckpt", CheckpointStatus(latest="runs/1/step-200", step=200)),  # restarted trainer, still loading
    ],
)
def test_checkpoint_is_the_newest_known(reported_step: int | None, root: str, expected: CheckpointStatus) -> None:
    doc: dict[str, Any] = dict(BASE)
    if reported_step is not None:
        doc["checkpoint"] = {
            "step": reported_step,
            "path": f"/ckpt/runs/1/step-{reported_step}",
            "savedAt": "2026-11-27T09:00:00Z",
        }
    report = parse_report(doc)
    assert report is not None
    previous = CheckpointStatus(latest="runs/1/step-200", step=200)
    assert (
        to_status(report, previous_checkpoint=previous, checkpoint_root=root, checkpoint_uri="pvc://c/ns/j")[1]
        == expected
    )


# -- polling ------------------------------------------------------------------------------------------


def test_poll_interval_is_stable_per_job_and_spread_over_the_range() -> None:
    intervals = [poll_interval(f"uid-{i}", 15, 30) for i in range(500)]
    assert all(15.0 <= i <= 30.0 for i in intervals)
    assert poll_interval("uid-7", 15, 30) == intervals[7]
    assert max(intervals) - min(intervals) > 12  # spread, not all the same
    assert 5.0 <= poll_interval("uid-7", low=5, high=10) <= 10.0


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def server(routes: dict[str, Handler]) -> AsyncIterator[str]:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_fetch_progress_returns_the_document_or_none_and_never_raises() -> None:
    def reply(body: bytes, status: int = 200, content_type: str = "text/plain", delay: float = 0) -> Handler:
        async def handler(_: web.Request) -> web.Response:
            await asyncio.sleep(delay)
            return web.Response(body=body, status=status, content_type=content_type)

        return handler

    routes: dict[str, Handler] = {
        "/ok": reply(json.dumps({"step": 3}).encode()),  # wrong content type: the body still counts
        "/error": reply(b"boom", status=500),
        "/garbage": reply(b"<html>not json"),
        "/array": reply(b"[1, 2]"),
        "/binary": reply(b"\xff\xfe\x00", content_type="application/json"),
        "/slow": reply(b"{}", delay=1.0),
    }

    async def scenario() -> None:
        async with server(routes) as base, aiohttp.ClientSession() as session:
            assert await fetch_progress(session, base + "/ok", timeout=2) == {"step": 3}
            for path in ("/error", "/garbage", "/array", "/binary", "/missing"):
                assert await fetch_progress(session, base + path, timeout=2) is None, path
            started = time.monotonic()
            assert await fetch_progress(session, base + "/slow", timeout=0.2) is None
            assert time.monotonic() - started < 0.9
            assert await fetch_progress(session, f"http://127.0.0.1:{closed_port()}/progress", timeout=2) is None
            assert await fetch_progress(session, "http://no-such-host.invalid/progress", timeout=2) is None

    asyncio.run(scenario())


def test_fetch_progress_from_the_real_trainer_server() -> None:
    p = trainer_progress.Progress(world_size=2)
    p.set_plan(10)
    p.step_done(4, epoch=0.4, duration=0.1, tokens=100)
    httpd = trainer_progress.serve(p, "127.0.0.1", 0)

    async def fetch() -> dict[str, Any] | None:
        async with aiohttp.ClientSession() as session:
            return await fetch_progress(session, f"http://127.0.0.1:{httpd.server_address[1]}/progress", timeout=2)

    try:
        doc = asyncio.run(fetch())
    finally:
        httpd.shutdown()
    assert doc is not None
    report = parse_report(doc)
    assert report is not None
    progress, _ = to_status(report, previous_checkpoint=None, checkpoint_root=ROOT, checkpoint_uri=URI)
    assert (progress.step, progress.total_steps, progress.percent, progress.epoch) == (4, 10, 40, 0.4)


def test_the_poller_wakes_a_job_on_news_and_a_hung_trainer_holds_up_nobody() -> None:
    reported: dict[str, Any] = {"step": 1}
    served: list[int] = []
    release = asyncio.Event()

    async def progress(_: web.Request) -> web.Response:
        served.append(reported["step"])
        return web.json_response({**BASE, **reported})

    async def hung(_: web.Request) -> web.Response:
        await release.wait()  # until the test ends
        return web.json_response({})

    async def polls(count: int) -> None:
        target = len(served) + count
        while len(served) < target:
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        woken: asyncio.Queue[str] = asyncio.Queue()
        async with server({"/progress": progress, "/hung": hung}) as base:
            # One request at a time: the hung trainer's polls must time out and let the other job's through.
            poller: ProgressPoller[str] = ProgressPoller(0.2, woken.put_nowait, concurrency=1)
            try:
                poller.watch("hung", base + "/hung", 1, 1, T0)
                view = poller.watch("ok", base + "/progress", 1, 1, T0)
                assert (view.report, view.watching_since) == (None, T0)
                assert await asyncio.wait_for(woken.get(), 10) == "ok"
                later = poller.watch("ok", base + "/progress", 1, 1, T0 + timedelta(minutes=1))
                assert later.report is not None and later.report.step == 1
                assert later.watching_since == T0  # the same rank 0: watched since it was first named

                await asyncio.wait_for(polls(3), 10)
                assert woken.empty()  # the same report again is no news
                reported["step"] = 2
                await asyncio.wait_for(polls(2), 10)
                # new steps are known at once but wait for the job's periodic reconcile
                known = poller.watch("ok", base + "/progress", 1, 1, T0).report
                assert woken.empty() and known is not None and known.step == 2
                reported["evalLoss"] = 1.25  # an evaluation is news
                assert await asyncio.wait_for(woken.get(), 10) == "ok"

                # the next attempt's rank 0 is another target: nothing known about it yet
                fresh = poller.watch("ok", base + "/progress", 1, 2, T0 + timedelta(minutes=2))
                assert (fresh.attempt, fresh.report, fresh.watching_since) == (2, None, T0 + timedelta(minutes=2))
                assert await asyncio.wait_for(woken.get(), 10) == "ok"

                poller.unwatch("ok")
                await asyncio.sleep(0)
                count = len(served)
                await asyncio.sleep(0.5)
                assert len(served) == count  # no longer polled
            finally:
                await poller.stop()
                release.set()
            assert woken.empty()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("fields", "finishing"),
    [
        ({"state": "training", "step": 399, "totalSteps": 400}, False),
        ({"state": "evaluating", "step": 400, "totalSteps": 400}, True),  # the final evaluation
        ({"state": "exporting", "step": 400, "totalSteps": None}, True),
        ({"state": "done"}, True),
        ({"state": "loading", "step": 0, "totalSteps": 0}, False),
    ],
)
def test_a_report_past_the_last_step_is_finishing(fields: dict[str, Any], finishing: bool) -> None:
    report = parse_report({**BASE, **fields})
    assert report is not None and report.finishing is finishing


def test_past_the_last_step_the_poller_polls_every_second() -> None:
    served: list[int] = []

    async def progress(_: web.Request) -> web.Response:
        served.append(1)
        return web.json_response({**BASE, "state": "exporting", "step": 100, "totalSteps": 100})

    async def polls(count: int) -> None:
        while len(served) < count:
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        async with server({"/progress": progress}) as base:
            poller: ProgressPoller[str] = ProgressPoller(3600, lambda _: None)  # otherwise every 45-90 minutes
            try:
                poller.watch("job", base + "/progress", 1, 1, T0)
                await asyncio.wait_for(polls(3), 10)
            finally:
                await poller.stop()

    asyncio.run(scenario())
