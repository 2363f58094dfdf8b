"""A delaying, de-duplicating work queue of FineTuneJob keys (the client-go workqueue idea, in asyncio).

- A key is queued at most once; adding it again keeps the earlier due time. Ten pod events for one job
  while it waits become one reconcile.
- A key is handed to one worker at a time. Added while it is being processed, it is queued again when
  that worker is done, so no change is missed and no job is reconciled twice concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._due: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._order = itertools.count()
        self._processing: set[K] = set()
        # Keys added while being processed: due time to queue them at when their worker is done.
        self._again: dict[K, float] = {}
        self._changed = asyncio.Event()

    def add(self, key: K, delay: float = 0.0) -> None:
        due = self._clock() + max(0.0, delay)
        if key in self._processing:
            self._again[key] = min(due, self._again.get(key, due))
            return
        if key in self._due and self._due[key] <= due:
            return
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._order), key))
        self._changed.set()

    def forget(self, key: K) -> None:
        """Drop the key (its object is gone); a worker holding it finishes normally."""
        self._due.pop(key, None)
        self._again.pop(key, None)

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._again:
            due = self._again.pop(key)
            self.add(key, due - self._clock())

    def pending(self) -> dict[K, float]:
        """Queued keys and their due times (on the queue's clock)."""
        return dict(self._due)

    def __len__(self) -> int:
        return len(self._due)

    async def get(self) -> K:
        """Wait for the next due key and mark it as being processed; call done() with it afterwards."""
        while True:
            while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
                heapq.heappop(self._heap)  # superseded by an earlier due time, or forgotten
            if self._heap:
                due, _, key = self._heap[0]
                wait = due - self._clock()
                if wait <= 0:
                    heapq.heappop(self._heap)
                    del self._due[key]
                    self._processing.add(key)
                    return key
            else:
                wait = None
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=wait)
