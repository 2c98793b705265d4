"""Read-your-writes: wait until the read tables have caught up with a position.

One `PositionWatch` per process holds one asyncpg connection that LISTENs on
`projection_advanced` (the projector NOTIFYs it after each committed batch). A
request that asks for a position parks on a future keyed by that position; the
watch's loop re-reads the checkpoints when notified, when a new waiter arrives, and
on a slow timer (a lost notification costs at most `recheck_interval`), and resolves
every future the checkpoints have passed. Where LISTEN is refused (a hot standby
delivers no NOTIFY) or useless (behind a transaction pooler) it re-reads them every
`poll_interval` instead, while anyone waits:
a read waiting for the replica then ends within that much of the replica's replay.
Nothing here runs for requests that do not ask to wait, and the loop reads nothing
while nobody waits. The connection comes back by itself after the database does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

from query_api.queries import read_position
from shared.catalog import ADVANCED_CHANNEL
from shared.position import ZERO, Position

log = logging.getLogger("taskservice.query_api.watch")

APPLICATION_NAME = "taskservice-query-watch"
MAX_RECONNECT_DELAY = 5.0
_CONNECT_FAILED = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


class PositionWatch:
    def __init__(
        self,
        dsn: str,
        *,
        recheck_interval: float = 1.0,
        poll_interval: float = 0.02,
        reconnect_delay: float = 0.5,
        connect_timeout: float = 5.0,
        pooled: bool = False,
    ) -> None:
        """`pooled`: `dsn` leads to a transaction-mode pooler (PgBouncer), where a
        LISTEN would hold a server connection other clients then use (their
        notifications lost to us): the watch polls, with no prepared statements."""
        self.dsn = dsn
        self.recheck_interval = recheck_interval
        self.poll_interval = poll_interval
        self.reconnect_delay = reconnect_delay
        self.connect_timeout = connect_timeout
        self.pooled = pooled
        self.listening = False
        self._known = ZERO
        self._futures: dict[Position, asyncio.Future[None]] = {}
        self._waiters: dict[Position, int] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def known(self) -> Position:
        """The highest position the checkpoints were seen to reach."""
        return self._known

    async def wait_for(self, position: Position, timeout: float) -> bool:
        """Wait until the checkpoints reach `position`, at most `timeout` seconds;
        whether they did."""
        if position <= self._known:
            return True
        if timeout <= 0:
            return False
        self._ensure_running()
        future = self._futures.get(position)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._futures[position] = future
        self._waiters[position] = self._waiters.get(position, 0) + 1
        self._wake.set()  # the checkpoint may have passed before anyone listened
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            pass
        finally:
            self._release(position)
        return position <= self._known

    def _release(self, position: Position) -> None:
        left = self._waiters.get(position, 0) - 1
        if left > 0:
            self._waiters[position] = left
            return
        self._waiters.pop(position, None)
        future = self._futures.pop(position, None)
        if future is not None and not future.done():
            future.cancel()

    def _advance(self, position: Position) -> None:
        if position <= self._known:
            return
        self._known = position
        for waited in [p for p in self._futures if p <= position]:
            future = self._futures.pop(waited)
            if not future.done():
                future.set_result(None)

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="position-watch")

    def _on_notify(self, *_: Any) -> None:
        if self._futures:
            self._wake.set()

    async def _run(self) -> None:
        delay = self.reconnect_delay
        while True:
            try:
                conn = await asyncpg.connect(
                    self.dsn,
                    timeout=self.connect_timeout,
                    server_settings={"application_name": APPLICATION_NAME},
                    statement_cache_size=0 if self.pooled else 100,
                )
            except _CONNECT_FAILED as e:
                log.warning("position watch cannot connect (%s); retrying in %.1fs", e, delay)
            else:
                delay = self.reconnect_delay
                try:
                    await self._follow(conn)
                except Exception as e:  # never die: waiters would only time out
                    log.warning("position watch lost its connection (%r); reconnecting", e)
                finally:
                    self.listening = False
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=1)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RECONNECT_DELAY)

    async def _follow(self, conn: asyncpg.Connection) -> None:
        lost = asyncio.Event()

        def on_lost(_: Any) -> None:
            lost.set()
            self._wake.set()

        conn.add_termination_listener(on_lost)
        if self.pooled:
            log.info("behind a transaction pooler: re-checking the checkpoints on a timer")
        else:
            try:
                await conn.add_listener(ADVANCED_CHANNEL, self._on_notify)
                self.listening = True
            except asyncpg.PostgresError as e:  # e.g. a hot standby: polling only
                log.warning("cannot LISTEN (%s); re-checking the checkpoints on a timer", e)
        self._wake.set()  # notifications may have been missed while disconnected
        while not lost.is_set() and not conn.is_closed():
            self._wake.clear()
            if self._futures:
                self._advance(await read_position(conn))
            if not self._futures:
                idle = 5 * self.recheck_interval
            else:  # without NOTIFY only this timer tells the checkpoints moved
                idle = self.recheck_interval if self.listening else self.poll_interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), idle)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for future in self._futures.values():
            if not future.done():
                future.cancel()
        self._futures.clear()
        self._waiters.clear()
