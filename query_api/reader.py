"""One read: query the read tables and their checkpoint in one snapshot, so
`meta.position` names exactly what the data shows; wait first if the read must reflect
the user's own latest write (read-your-own-writes, by default) or a position it names.

Both in one statement, which reads one snapshot: the checkpoint's row LEFT JOIN
LATERAL the query. One round trip, where a read-only REPEATABLE READ transaction
around two queries makes four (BEGIN, the checkpoint, the query, COMMIT)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar
from uuid import UUID

import asyncpg

from query_api import queries
from query_api.queries import Missing, Query, position_from, position_sql
from query_api.watch import PositionWatch
from shared.catalog import OWN_POSITIONS_TABLE
from shared.errors import DATABASE_DOWN
from shared.position import ZERO, Position, PositionCodec
from shared.row_security import STREAM_ROLE, USER_SETTING, USERS_SETTING

T = TypeVar("T")
log = logging.getLogger("taskservice.query_api.reader")


@dataclass(frozen=True)
class Read(Generic[T]):
    result: T
    position: Position
    stale: bool  # whether the read tables had not reached what the read must reflect

    sealed: str  # the position as the client sees it (`shared.position`)

    def meta(self) -> dict[str, Any]:
        return {"position": self.sealed, "stale": self.stale}


_OWN = f"LEFT JOIN {OWN_POSITIONS_TABLE} o ON o.user_id = ${{n}}"
_OWN_COLUMNS = "o.tx_id::text AS own_tx_id, o.notification_id AS own_position"
_NO_OWN_COLUMNS = "NULL::text AS own_tx_id, NULL::bigint AS own_position"
# The checkpoint's three columns and the user's latest position's two come first.
_LEAD = 5
# Row-level security (`shared.row_security`): the statement first sets its user, local
# to its own implicit transaction (so a pooled connection never carries it to the next
# read), in a CTE evaluated once; the query is a LATERAL subquery that references it
# and cannot be flattened (OFFSET 0), so its scans are the inner side of a nested loop
# whose outer side is that CTE: they run, and the policies read the setting, only after
# it is set. The planner merges the policy (`user_id = current_setting(...)`) with the
# query's own `user_id = $1`: the same plan, plus a one-time filter.
_WHO = (
    f"WITH _who AS MATERIALIZED (SELECT set_config('{USER_SETTING}', ${{n}}, true) AS u) "
)
_AFTER_WHO = "SELECT * FROM ({query}) q0 WHERE w.u IS NOT NULL OFFSET 0"
# The streams' users, and their role for the rest of the transaction.
_AS_STREAMS = (
    f"SELECT set_config('{USERS_SETTING}', $1::text[]::text, true),"
    f" CASE WHEN pg_has_role(current_user, '{STREAM_ROLE}', 'MEMBER')"
    f" THEN set_config('role', '{STREAM_ROLE}', true) END"
)


class Reader:
    """Reads for one user (`for_user`). Every read reflects the user's own acknowledged
    writes: the statement that reads the rows also reads the checkpoint and the user's
    latest position (`command_api.store`); if the checkpoint is behind it, the read
    waits for the projector (at most `wait_timeout` in all) and reads again. A user with
    nothing unprojected pays one index lookup in the same statement, no wait and no
    round trip. A read may also name a position of its own to wait for (`wanted`).

    The statement also sets its user for the read tables' row-level security (`_WHO`);
    the benchmark's "without" turns `sets_user` off (bench/rls_bypassed.py)."""

    sets_user = True

    def __init__(
        self,
        pool: asyncpg.Pool,
        watch: PositionWatch,
        wait_timeout: float,
        acquire_timeout: float = 10.0,
        *,
        user_id: str | None = None,
        own_positions: OwnPositions | None = None,
        codec: PositionCodec,
    ) -> None:
        self.pool = pool
        self.watch = watch
        self.wait_timeout = wait_timeout
        self.acquire_timeout = acquire_timeout
        self.user_id = user_id
        self.own_positions = own_positions
        self.codec = codec

    def for_user(self, user_id: str) -> Reader:
        """This reader, reflecting `user_id`'s own writes."""
        return Reader(self.pool, self.watch, self.wait_timeout, self.acquire_timeout,
                      user_id=user_id, own_positions=self.own_positions, codec=self.codec)

    def deadline(self) -> float:
        """When a read starting now must have answered (`wait_timeout` from now, on the
        event loop's clock): pass it to a second read that must keep the first's bound."""
        return asyncio.get_running_loop().time() + self.wait_timeout

    async def read_row(self, wanted: Position | None, query: Query, *,
                       deadline: float | None = None) -> Read[asyncpg.Record]:
        """`query`'s row (its columns all NULL when it has none) with the checkpoint,
        both from one statement; any wait over by `deadline` (default: `deadline()`)."""
        row, position, stale = await self._joined(wanted, query, "fetchrow", deadline)
        return Read(row, position, stale, self.codec.encode(position))

    async def read_rows(
        self, wanted: Position | None, query: Query, *, deadline: float | None = None
    ) -> Read[list[tuple[Any, ...]]]:
        """`query`'s rows (each its own columns only, in `query.order`) with the
        checkpoint, both from one statement; any wait over by `deadline`."""
        records, position, stale = await self._joined(wanted, query, "fetch", deadline)
        # Without rows, the join's one row has NULL for every column of the query's.
        rows = [tuple(r)[_LEAD:] for r in records if r[_LEAD] is not None]
        return Read(rows, position, stale, self.codec.encode(position))

    async def _joined(
        self, wanted: Position | None, query: Query, method: str, deadline: float | None
    ) -> tuple[Any, Position, bool]:
        """Wait for `wanted` if asked, run the statement; if the user's own latest write
        is past the checkpoint, wait for it and run the statement again. The result,
        the checkpoint it reflects, and whether that is short of what it must reflect."""
        deadline = self.deadline() if deadline is None else deadline
        if wanted is not None:
            await self.watch.wait_for(wanted, self._left(deadline))
        own: Position | None = None
        in_statement = self.user_id is not None
        if self.user_id is not None and self.own_positions is not None:
            # The user's position is the primary's, the rows a replica's (docs/scaling.md).
            try:
                own = await self.own_positions.latest(self.user_id)
                in_statement = False
            except PrimaryAway:  # the replica's own copy, which lags with the rows
                pass
            if own is not None:
                await self.watch.wait_for(own, self._left(deadline))
        result = await self._statement(query, method, in_statement)
        first = result if method == "fetchrow" else (result[0] if result else None)
        position = ZERO if first is None else position_from(first[0], first[1], first[2])
        if in_statement and first is not None and first[3] is not None:
            own = Position(int(first[3]), first[4])
            if position < own and await self.watch.wait_for(own, self._left(deadline)):
                result = await self._statement(query, method, in_statement)
                first = result if method == "fetchrow" else result[0]
                position = position_from(first[0], first[1], first[2])
        target = max((p for p in (wanted, own) if p is not None), default=ZERO)
        return result, position, position < target

    @staticmethod
    def _left(deadline: float) -> float:
        return max(0.0, deadline - asyncio.get_running_loop().time())

    async def _statement(self, query: Query, method: str, own: bool) -> Any:
        """The checkpoint's row, LEFT JOIN the user's latest position if `own`, LEFT
        JOIN LATERAL `query`, with `conn.<method>`: one statement, one snapshot."""
        who = self.user_id is not None and self.sets_user
        own = own and self.user_id is not None
        args = (*query.args, self.user_id) if who or own else query.args
        # The text is the same for every read of a shape: built once (the shapes are
        # the queries' and their filters' combinations, a few hundred at most).
        key = (query.sql, query.order, len(query.args), who, own)
        sql = _STATEMENTS.get(key)
        if sql is None:
            sql = _joined_sql(query, len(query.args) + 1, who, own)
            if len(_STATEMENTS) < 4096:
                _STATEMENTS[key] = sql
        async with self.connection() as conn:
            return await getattr(conn, method)(sql, *args)

    async def why_missing(self, task_id: UUID) -> Missing:
        """Why this user's read found no task `task_id` (`queries.why_missing`). On a
        replica the task's latest event comes from the primary, as the user's own
        position does (the replica's copy lags); while the primary is away, the
        replica's."""
        assert self.user_id is not None
        user_id = self.user_id
        why = await self.run(lambda conn: queries.why_missing(conn, user_id, task_id))
        if self.own_positions is not None:
            try:
                row = await self.own_positions.fetchrow(queries.TASK_LATEST, task_id)
            except PrimaryAway:
                return why
            why = replace(why, latest=None if row is None else Position(int(row[0]), row[1]))
        return why

    async def run(self, operation: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """`operation(conn)` on a pooled connection, outside any snapshot."""
        async with self.connection() as conn:
            return await operation(conn)

    def connection(self) -> _Pooled:
        return _Pooled(self.pool, self.acquire_timeout)

    @asynccontextmanager
    async def for_streams(self, users: Sequence[str]) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection in a read-only transaction that reads the rows of `users`
        (the live streams', `query_api.stream`): as the stream role, whose policy admits
        the users of its setting (`shared.row_security`), when the connection's role may
        become it (the query role; a superuser); else as itself (the tables' owner, whom
        no policy binds). Two round trips more than a read: once per hub read, not per
        request."""
        async with self.connection() as conn, conn.transaction(readonly=True):
            await conn.execute(_AS_STREAMS, list(users))
            yield conn


_STATEMENTS: dict[tuple[str, str, int, bool, bool], str] = {}


def _joined_sql(query: Query, n: int, who: bool, own: bool) -> str:
    """`Reader._statement`'s text: `who` sets the user (${n}) for row-level security,
    `own` joins the user's latest position (${n})."""
    order = f" ORDER BY {query.order}" if query.order else ""
    head, body, cross = "", query.sql, ""
    if who:
        head, body, cross = (_WHO.format(n=n), _AFTER_WHO.format(query=query.sql),
                             " CROSS JOIN _who w")
    columns, join = (_OWN_COLUMNS, " " + _OWN.format(n=n)) if own else (_NO_OWN_COLUMNS, "")
    return (f"{head}SELECT p.cp_n, p.cp_tx_id, p.cp_position, {columns}, q.*"
            f" FROM ({position_sql()}) p{cross}{join}"
            f" LEFT JOIN LATERAL ({body}) q ON true{order}")


class PrimaryAway(Exception):
    """The primary cannot be asked right now."""


class OwnPositions:
    """Users' latest positions read from the primary, for a query API whose read tables
    are a replica's: the replica's own copy of a position lags with everything else, so
    a read would not know to wait. One index lookup on the primary per read.

    While the primary is away (a failover, an outage) reads go on from the replica, which
    then reflects the writes it has replayed: after a failure the primary is not asked
    again for `retry_after` seconds, so reads do not each wait for it."""

    def __init__(self, dsn: str, *, pool_size: int, acquire_timeout: float,
                 pool_options: dict[str, Any], retry_after: float = 5.0) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        # The API's connect and statement timeouts (`shared.pools`), so a hung primary
        # costs a read no more than a hung replica would.
        self.pool_options = pool_options
        self.acquire_timeout = acquire_timeout
        self.retry_after = retry_after
        self.pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()
        self._away_until = 0.0

    async def latest(self, user_id: str) -> Position | None:
        """The user's latest position on the primary (None: no writes); raises
        PrimaryAway."""
        row = await self.fetchrow(_SELECT_OWN, user_id)
        return None if row is None else Position(int(row[0]), row[1])

    async def fetchrow(self, statement: str, *args: Any) -> asyncpg.Record | None:
        """`statement`'s first row, read on the primary; raises PrimaryAway."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._away_until:
            raise PrimaryAway
        try:
            if self.pool is None:
                async with self._lock:
                    if self.pool is None:
                        self.pool = await asyncpg.create_pool(
                            self.dsn, min_size=1, max_size=self.pool_size,
                            **self.pool_options,
                        )
            async with _Pooled(self.pool, self.acquire_timeout) as conn:
                return await conn.fetchrow(statement, *args)
        except (TimeoutError, *DATABASE_DOWN) as e:
            self._away_until = loop.time() + self.retry_after
            log.warning("the primary is away (%r): reads reflect what the replica holds"
                        " for %.0fs", e, self.retry_after)
            raise PrimaryAway from None

    async def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (TimeoutError, *DATABASE_DOWN):
                pool.terminate()


_SELECT_OWN = (
    f"SELECT tx_id::text, notification_id FROM {OWN_POSITIONS_TABLE} WHERE user_id = $1"
)


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

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if self.conn is not None:
            if kind is not None and issubclass(kind, TimeoutError):
                # A statement outlived DB_STATEMENT_TIMEOUT: released, the connection
                # would wait as long again for its cancel (a hung database); dropped,
                # the 503 goes out now.
                self.conn.terminate()
            await self.pool.release(self.conn)
