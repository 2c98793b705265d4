"""One read: optionally wait for a position, then query the read tables and their
checkpoint in one snapshot, so `meta.position` names exactly what the data shows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import asyncpg

from query_api.queries import read_position
from query_api.watch import PositionWatch
from shared.position import Position, encode

T = TypeVar("T")


@dataclass(frozen=True)
class Read(Generic[T]):
    result: T
    position: Position
    stale: bool | None  # None when the request named no position

    def meta(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"position": encode(self.position)}
        if self.stale is not None:
            extra["stale"] = self.stale
        return extra


class Reader:
    def __init__(
        self,
        pool: asyncpg.Pool,
        watch: PositionWatch,
        wait_timeout: float,
        acquire_timeout: float = 10.0,
    ) -> None:
        self.pool = pool
        self.watch = watch
        self.wait_timeout = wait_timeout
        self.acquire_timeout = acquire_timeout

    async def read(
        self, wanted: Position | None, query: Callable[[asyncpg.Connection], Awaitable[T]]
    ) -> Read[T]:
        if wanted is not None:
            await self.watch.wait_for(wanted, self.wait_timeout)
        # A pool that stays exhausted (a stuck database) is a TimeoutError: a 503.
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                position = await read_position(conn)
                result = await query(conn)
        stale = None if wanted is None else position < wanted
        return Read(result, position, stale)
