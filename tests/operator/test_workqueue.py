"""The work queue: one entry per key, the earliest due time wins, one worker per key at a time."""

from __future__ import annotations

import asyncio

from kubetune_operator.workqueue import WorkQueue


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_adding_a_queued_key_keeps_one_entry_at_the_earliest_time() -> None:
    async def main() -> None:
        clock = Clock()
        q: WorkQueue[str] = WorkQueue(clock)
        q.add("a", 30)
        q.add("a", 10)
        q.add("a", 50)
        assert q.pending() == {"a": 110.0}
        assert len(q) == 1

    asyncio.run(main())


def test_due_keys_come_out_in_due_order() -> None:
    async def main() -> None:
        clock = Clock()
        q: WorkQueue[str] = WorkQueue(clock)
        q.add("late", 20)
        q.add("soon", 5)
        q.add("now")
        assert await q.get() == "now"
        clock.now += 30
        assert [await q.get(), await q.get()] == ["soon", "late"]

    asyncio.run(main())


def test_a_key_is_never_handed_to_two_workers_and_a_change_meanwhile_is_kept() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue(Clock())
        q.add("a")
        assert await q.get() == "a"
        q.add("a")  # a watch event while a worker holds "a"
        assert q.pending() == {}
        waiting = asyncio.create_task(q.get())
        await asyncio.sleep(0)
        assert not waiting.done()
        q.done("a")
        assert await asyncio.wait_for(waiting, 1) == "a"

    asyncio.run(main())


def test_a_forgotten_key_does_not_come_back() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue(Clock())
        q.add("gone")
        q.add("kept")
        q.forget("gone")
        assert await q.get() == "kept"
        assert q.pending() == {}

    asyncio.run(main())


def test_a_waiting_worker_wakes_up_for_a_new_key() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue(Clock())
        waiting = asyncio.create_task(q.get())
        await asyncio.sleep(0)
        q.add("b")
        assert await asyncio.wait_for(waiting, 1) == "b"

    asyncio.run(main())
