"""One read: optionally wait for a position, then query the read tables and their
checkpoint in one snapshot, so `meta.position` names exactly what the data shows.

Both in one statement, which reads one snapshot: the checkpoint's row LEFT JOIN
LATERAL the query. One round trip, where a read-only REPEATABLE READ transaction
around two queries makes four (BEGIN, the checkpoint, the query, COMMIT)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import asyncpg

from query_api.queries import Query, position_from, position_sql
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

    async def read_row(self, wanted: Position | None, query: Query) -> Read[asyncpg.Record]:
        """`query`'s row (its columns all NULL when it has none) with the checkpoint,
        both from one statement."""
        row = await self._joined(wanted, query, "fetchrow")
        return self._read(row, row, wanted)

    async def read_rows(
        self, wanted: Position | None, query: Query
    ) -> Read[list[tuple[Any, ...]]]:
        """`query`'s rows (each its own columns only, in `query.order`) with the
        checkpoint, both from one statement."""
        records = await self._joined(wanted, query, "fetch")
        # Without rows, the join's one row has NULL for every column of the query's.
        rows = [tuple(r)[3:] for r in records if r[3] is not None]
        return self._read(rows, records[0], wanted)

    async def _joined(self, wanted: Position | None, query: Query, method: str) -> Any:
        """Wait for `wanted` if asked, then run the checkpoint's row LEFT JOIN LATERAL
        `query` with `conn.<method>`."""
        if wanted is not None:
            await self.watch.wait_for(wanted, self.wait_timeout)
        order = f" ORDER BY {query.order}" if query.order else ""
        async with self.connection() as conn:
            return await getattr(conn, method)(
                f"SELECT p.cp_n, p.cp_tx_id, p.cp_position, q.* FROM ({position_sql()}) p"
                f" LEFT JOIN LATERAL ({query.sql}) q ON true{order}",
                *query.args,
            )

    @staticmethod
    def _read(result: T, checkpoint: asyncpg.Record, wanted: Position | None) -> Read[T]:
        position = position_from(checkpoint[0], checkpoint[1], checkpoint[2])
        return Read(result, position, None if wanted is None else position < wanted)

    async def run(self, operation: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """`operation(conn)` on a pooled connection, outside any snapshot."""
        async with self.connection() as conn:
            return await operation(conn)

    def connection(self) -> _Pooled:
        return _Pooled(self.pool, self.acquire_timeout)


class _Pooled:
    """A pooled connection. A pool that stays exhausted (a stuck database) is a
    TimeoutError: a 503. `asyncio.timeout` rather than `acquire(timeout=)`, which runs
    each acquire in a task of its own."""

    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout
        self.conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        async with asyncio.timeout(self.timeout):
            self.conn = await self.pool.acquire()
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        if self.conn is not None:
            await self.pool.release(self.conn)
