"""Coalescing: concurrent callers' requests answered by one database round trip.

A round trip to PostgreSQL costs the client about as much CPU as the rest of a
command (mostly the socket system calls). `Coalescer` collects the items callers hand
it while the event loop is busy and runs them as one batch: the first item after a
quiet spell goes out on the loop's next turn (no timer, no added latency), and while
`max_in_flight` batches are running, new items wait for the next one, so batches grow
with the load instead of the number of round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    """`await coalescer(item)` is `run([item, ...])[i]` for a batch holding the item.

    `run` answers a batch with one result per item, in order. If it raises, every
    caller in that batch gets the exception. A caller that is cancelled leaves the
    others alone (each has a future of its own). `on_batch(size)` is told of every
    batch run (for metrics)."""

    def __init__(
        self,
        run: Callable[[list[Item]], Awaitable[Sequence[Result]]],
        *,
        max_batch: int = 500,
        max_in_flight: int = 2,
        on_batch: Callable[[int], object] | None = None,
    ) -> None:
        self._run = run
        self._on_batch = on_batch
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._items: list[Item] = []
        self._waiters: list[asyncio.Future[Result]] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Result] = loop.create_future()
        self._items.append(item)
        self._waiters.append(waiter)
        self._schedule(loop)
        return await waiter

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled and self._items and self._in_flight < self.max_in_flight:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._items or self._in_flight >= self.max_in_flight:
            return
        items, waiters = self._items[: self.max_batch], self._waiters[: self.max_batch]
        del self._items[: self.max_batch], self._waiters[: self.max_batch]
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._batch(items, waiters))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._schedule(asyncio.get_running_loop())

    async def _batch(self, items: list[Item], waiters: list[asyncio.Future[Result]]) -> None:
        try:
            results = await self._run(items)
        except asyncio.CancelledError:  # the loop is shutting down
            for waiter in waiters:
                waiter.cancel()
            raise
        except Exception as e:  # every caller of the batch gets it
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(e)
        else:
            assert len(results) == len(items), "one result per item"
            for waiter, result in zip(waiters, results, strict=True):
                if not waiter.done():
                    waiter.set_result(result)
        finally:
            if self._on_batch is not None:
                self._on_batch(len(items))
            self._in_flight -= 1
            self._schedule(asyncio.get_running_loop())

    async def close(self) -> None:
        """Wait for the batches under way (new ones still start while items come)."""
        while self._tasks:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.gather(*self._tasks)
            # A done task leaves `_tasks` in its done callback, which runs on a later turn
            # of the loop; gathering tasks already done does not yield on Python 3.12+.
            await asyncio.sleep(0)
