"""The runner: folds the event store into the read models, batch by batch. The live
projector and the replay are this one runner with a different sink and stop condition.

Each step is one transaction: lock the checkpoint row, read up to `batch_size` events
after it in the event order (below), fold them into every read model of
`projections.manifest` (`apply_events`), have the sink write their rows, move the
checkpoint and, for the live tables, NOTIFY `projection_advanced`. A crash at any
instant leaves the read tables exactly at some checkpoint. A handler that fails stops
the runner (`HandlerFailed` names the event): it never skips an event.

Sinks: `UpsertRows` (the live projector, and any table others may write: it reads back
the touched tasks' rows, skips events already applied, upserts and deletes) and
`BulkRows` (the replay's fresh tables, which only it writes: it is fed task by task by
`load_by_task`, keeps the states of one page's tasks, and COPYs each page's rows on a
connection of its own while the next page is folded).
Stop conditions: `apply_until_caught_up` returns once a batch comes back short (the
replay, tests and benchmarks call it); `load_by_task` once it has read every event up
to a position (the replay's load); `run` follows the event store until stopped: it
is woken by the event store's NOTIFY, polls as a fallback, reconnects with backoff, and
only one projector applies events at a time: it holds a session advisory lock and a
lease it renews (a heartbeat), and each of its batches is fenced by the lease's epoch;
a second one waits on the lock, ends a hung holder once its lease has lapsed, and takes
over (`projections.lease` says how, and its bounds).

The event order is `(tx_id, notification_id)`, the one this module owns: see
`SAFE_BOUND`; every other module that reads events in order points here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol
from uuid import UUID

import asyncpg

from projections import checkpoints, task_history, task_list
from projections import lease as leases
from projections.lease import LeaseLost, LeaseTimes
from projections.manifest import READ_MODELS, STATE_MODEL
from projections.task_list import TaskState
from shared import aio
from shared.catalog import (
    ADVANCED_CHANNEL,
    EVENTS_CHANNEL,
    EVENTS_TABLE,
    LIVE,
    PROJECTION,
    Tables,
    projector_lock,
)
from shared.datakeys import key_ids, ring_for
from shared.events import CREATED, TaskEvent, UndecodableEvent, decode_event, read_state
from shared.observability import (
    EVENT_STORE_HEAD,
    PROJECTION_LAG_EVENTS,
    PROJECTION_LAG_SECONDS,
    PROJECTOR_BATCH_SECONDS,
    PROJECTOR_BATCH_SIZE,
    PROJECTOR_POSITION,
    start_metrics_server,
)
from shared.position import Position
from shared.settings import Settings

log = logging.getLogger("projections.projector")

BATCH_SIZE = 500
POLL_INTERVAL = 1.0
APPLICATION_NAME = "taskservice-projector"
LOCK_APPLICATION_NAME = "taskservice-projector-lock"

ENSURE_CHECKPOINT = (
    "INSERT INTO {checkpoints} (projection, tx_id, position) VALUES ($1, '0', 0)"
    " ON CONFLICT (projection) DO NOTHING"
)
LOCK_CHECKPOINT = (
    "SELECT tx_id, position FROM {checkpoints} WHERE projection = $1 FOR UPDATE"
)
SAVE_CHECKPOINT = (
    "UPDATE {checkpoints} SET tx_id = $2, position = $3, updated_at = now()"
    " WHERE projection = $1"
)
# The live projector's batches: only while the row's epoch is the lease's it holds
# (`projections.lease`); the row lock makes a takeover wait for the batch in hand.
LOCK_FENCED_CHECKPOINT = (
    f"SELECT tx_id, position, {leases.EPOCH_COLUMN} AS epoch FROM {{checkpoints}}"
    " WHERE projection = $1 FOR UPDATE"
)
SAVE_FENCED_CHECKPOINT = (
    "UPDATE {checkpoints} SET tx_id = $2, position = $3, updated_at = now()"
    f" WHERE projection = $1 AND {leases.EPOCH_COLUMN} = $4"
)
# The global order is (tx_id, notification_id). A step takes only events of
# transactions older than every transaction of THIS database still running: such a
# transaction has committed (its rows are visible to the later SELECT) or aborted (it
# has none), so no event can ever commit behind a position already passed. Writers
# take no table lock for this. The bound is read in two statements, in this order,
# before the SELECT: first the next transaction id to be assigned, then the running
# transactions of this database (a transaction that gets its id after the first read
# gets a higher one). Unlike pg_snapshot_xmin, a long transaction in another database
# of the cluster does not hold the projector back. pg_stat_activity's backend_xid is
# 32 bits: it is widened against the next id (running xids are < 2^31 behind it).
NEXT_XID = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
# x is a 32-bit xid, n ($1) the 64-bit reference: x's signed distance from n, in
# [-2^31, 2^31), added to n. (A running xid may be above n: xmax is the latest
# completed xid + 1, not the next one to be assigned.)
WIDEN_XID = (
    "($1::bigint + (((({x}::text::bigint - $1::bigint + 2147483648) % 4294967296)"
    " + 4294967296) % 4294967296 - 2147483648))"
)
SAFE_BOUND = (
    f"SELECT least($1::bigint, min({WIDEN_XID.format(x='backend_xid')}))::text::xid8"
    " FROM pg_stat_activity"
    " WHERE datname = current_database() AND backend_xid IS NOT NULL"
)
SELECT_EVENTS = (
    "SELECT notification_id, originator_id, originator_version, topic, state, tx_id"
    f" FROM {EVENTS_TABLE}"
    " WHERE (tx_id, notification_id) > ($1::xid8, $2::bigint) AND tx_id < $3::xid8"
    " ORDER BY tx_id, notification_id LIMIT $4"
)


async def safe_bound(conn: asyncpg.Connection) -> int:
    """Every event with a tx_id below this is committed and visible, or never will be.
    Must be called before the statement that reads events (and, for pg_stat_activity's
    per-transaction cache, first in its transaction)."""
    next_xid = await conn.fetchval(NEXT_XID)
    return int(await conn.fetchval(SAFE_BOUND, next_xid))


NOTIFY_ADVANCED = f"SELECT pg_notify('{ADVANCED_CHANNEL}', $1)"
TRY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))"
WAIT_LOCK = "SELECT pg_advisory_lock(hashtextextended($1, 0))"

RETRYABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    # asyncpg's protocol state can be left mid-operation when the server kills the
    # connection ("cannot switch to state ...; another operation is in progress"):
    # the connection is unusable, so reconnect like for any lost connection.
    asyncpg.exceptions.InternalClientError,
    # A takeover waited its lock_timeout on the checkpoint row (`lease.take_over`).
    asyncpg.exceptions.LockNotAvailableError,
)


class HandlerFailed(Exception):
    """An event could not be applied; the projector stops before it."""

    def __init__(self, position: int, task_id: Any, version: int, topic: str, cause: str) -> None:
        self.position = position
        super().__init__(
            f"cannot apply event position={position} task_id={task_id} version={version}"
            f" topic={topic}: {cause}"
        )

    @classmethod
    def again(cls, position: int, message: str) -> HandlerFailed:
        """The same failure, raised by another process (a replay's second loader)."""
        failure = cls.__new__(cls)
        Exception.__init__(failure, message)
        failure.position = position
        return failure


def _decode(rows: Sequence[asyncpg.Record]) -> list[TaskEvent]:
    events = []
    for position, task_id, version, topic, state, _ in rows:
        try:
            events.append(decode_event(position, task_id, version, topic, state))
        except UndecodableEvent as e:
            raise HandlerFailed(position, task_id, version, topic, str(e)) from e
    return events


# -- sealed fields (`shared.datakeys`) ---------------------------------------------------

async def open_events(conn: asyncpg.Connection, events: list[TaskEvent]) -> list[TaskEvent]:
    """`events` with their sealed fields opened; an event whose key is gone is marked
    `erased`. The keys are read again, in the caller's transaction, for every batch: a
    key an erasure deleted (`taskctl users forget`, which locks the checkpoint row this
    transaction holds) never opens anything after it."""
    ids = key_ids(e.data for e in events)
    if not ids:
        return events
    ring = await ring_for(conn)
    await ring.load(conn, ids)
    return [e if ring.open_data(e.data) else e._replace(erased=True) for e in events]


# Each task's creation, for tasks met without a state: was its owner forgotten?
_SELECT_CREATIONS = (
    "SELECT e.originator_id, e.state FROM unnest($1::uuid[]) AS ids(id) CROSS JOIN LATERAL ("
    f" SELECT originator_id, state FROM {EVENTS_TABLE}"
    " WHERE originator_id = ids.id AND originator_version = 1) AS e"
)


async def erased_tasks(conn: asyncpg.Connection, task_ids: set[UUID]) -> set[UUID]:
    """Which of `task_ids` were created with a key that is gone (their owner forgotten):
    their later events, sealed or not, are applied by no read model."""
    rows = await conn.fetch(_SELECT_CREATIONS, list(task_ids))
    datas = {task_id: read_state(state) for task_id, state in rows}
    ids = key_ids(datas.values())
    if not ids:
        return set()
    ring = await ring_for(conn)
    await ring.load(conn, ids)
    return {task_id for task_id, data in datas.items() if not ring.open_data(data)}


def _failed(event: TaskEvent, cause: object) -> HandlerFailed:
    return HandlerFailed(event.position, event.task_id, event.version, event.topic, str(cause))


class Sink(Protocol):
    """Where a step's rows go: the task states the fold starts from, the read models'
    row batches, and how they are written (inside the step's transaction)."""

    async def states(
        self, conn: asyncpg.Connection, t: Tables, events: list[TaskEvent]
    ) -> tuple[dict[UUID, TaskState], set[int]]:
        """(the touched tasks' states before these events, positions applied already)."""
        ...

    def rows(self) -> tuple[Any, ...]:
        """Empty row batches (`Rows`) of the models this sink writes per step."""
        ...

    async def write(self, conn: asyncpg.Connection, t: Tables, rows: tuple[Any, ...]) -> None:
        ...


class UpsertRows:
    """The sink for tables others may write too (the live ones, or a replay in place):
    the touched tasks' states are read from the task list, events the tables already
    hold are skipped, and every model's rows are upserted or deleted."""

    async def states(
        self, conn: asyncpg.Connection, t: Tables, events: list[TaskEvent]
    ) -> tuple[dict[UUID, TaskState], set[int]]:
        states = await task_list.load_states(conn, t, list({e.task_id for e in events}))
        # A task with no row and no creation in this batch: its events can only be ones
        # applied before the task was deleted (a re-application); history says which.
        created = {e.task_id for e in events if e.topic == CREATED}
        orphans = [
            e.position for e in events if e.task_id not in states and e.task_id not in created
        ]
        applied = await task_history.applied_positions(conn, t, orphans) if orphans else set()
        return states, applied

    def rows(self) -> tuple[Any, ...]:
        return tuple(model.Rows() for model in READ_MODELS)

    async def write(self, conn: asyncpg.Connection, t: Tables, rows: tuple[Any, ...]) -> None:
        for batch in rows:
            await batch.write(conn, t)


class BulkRows:
    """The replay's sink for fresh tables that were empty when the run began and that
    only this run writes, fed task by task (`load_by_task`: every event of a task before
    any of the next). So no step reads a state back and none is applied already; the
    states held are those of one page's tasks: when a page is written, every task in it
    but its last one (whose events may go on in the next page) is complete, and its row
    is COPYed with the page's other rows, then forgotten. Memory: one page's states and
    rows, and the page being COPYed, whatever the size of the store.

    Each page is COPYed on `writer`, a connection of its own, while the runner folds the
    next one (one page in flight: `write` waits for the previous one first); `finish`
    writes the last task and waits. The checkpoint is the caller's, once `finish` has
    returned: a run killed before leaves tables the next replay drops. Never for live
    tables."""

    def __init__(self, writer: asyncpg.Connection) -> None:
        self.writer = writer
        self.held: dict[UUID, TaskState] = {}
        self.open: UUID | None = None  # the task the page in hand ends with
        self._applied: set[int] = set()  # always empty
        self._models = tuple(m for m in READ_MODELS if m is not STATE_MODEL)
        self._writing: asyncio.Future[None] | None = None

    async def states(
        self, conn: asyncpg.Connection, t: Tables, events: list[TaskEvent]
    ) -> tuple[dict[UUID, TaskState], set[int]]:
        self.open = events[-1].task_id if events else None
        return self.held, self._applied

    def rows(self) -> tuple[Any, ...]:
        return tuple(model.Rows() for model in self._models)

    async def write(self, conn: asyncpg.Connection, t: Tables, rows: tuple[Any, ...]) -> None:
        """Start COPYing the page's rows and its complete tasks (after the previous page)."""
        done = self.complete()
        await self._wait()
        self._writing = asyncio.ensure_future(self._copy(t, rows, done))

    def complete(self) -> list[TaskState]:
        """The page's complete tasks, forgotten; the one it ends with is kept."""
        still = self.held.pop(self.open, None) if self.open is not None else None
        done, self.held = list(self.held.values()), {}
        if still is not None:
            self.held[self.open] = still  # type: ignore[index]
        return done

    async def _copy(self, t: Tables, rows: tuple[Any, ...], done: list[TaskState]) -> None:
        for batch in rows:
            await batch.copy(self.writer, t)
        if done:
            await task_list.copy_states(self.writer, t, done)

    async def _wait(self) -> None:
        writing, self._writing = self._writing, None
        if writing is not None:
            await writing

    async def finish(self, conn: asyncpg.Connection, t: Tables) -> None:
        """COPY the last task held and wait for every page's COPY."""
        await self._wait()
        await task_list.copy_states(self.writer, t, self.held.values())
        self.held = {}

    def abandon(self) -> None:
        """Stop a COPY in flight (the load failed)."""
        if self._writing is not None and not self._writing.done():
            self._writing.cancel()


LIVE_ROWS = UpsertRows()


async def apply_events(
    conn: asyncpg.Connection, events: list[TaskEvent], t: Tables, sink: Sink = LIVE_ROWS
) -> None:
    """Fold `events` into every read model and have `sink` write their rows (inside the
    caller's transaction). Events the sink says are applied already are left alone."""
    states, applied = await sink.states(conn, t, events)
    rows = sink.rows()
    deleted: set[Any] = set()
    # Events of forgotten users: erased ones, and the others of their tasks (met with
    # no state: created erased in this batch or an earlier one, their rows deleted).
    # (A task created in this batch is no orphan: a replay's pages hold whole tasks.)
    created = {e.task_id: e.erased for e in events if e.topic == CREATED}
    erased = {task_id for task_id, gone in created.items() if gone}
    orphans = {e.task_id for e in events if e.task_id not in states and e.task_id not in created
               and not e.erased and e.position not in applied}
    if orphans:
        erased |= await erased_tasks(conn, orphans)
    for event in events:
        if event.erased or event.task_id in erased:
            continue
        before: TaskState | None = states.get(event.task_id)
        if before is not None and event.version <= before.version:
            continue  # applied already
        if event.position in applied:
            continue
        try:
            if before is None and event.topic != CREATED:
                raise LookupError(
                    "deleted task" if event.task_id in deleted else "no such task in the read tables"
                )
            after = task_list.evolve(event, before)
            for batch in rows:
                batch.apply(event, before, after)
        except Exception as e:  # wrapped, named and re-raised: never skipped
            raise _failed(event, f"{type(e).__name__}: {e}") from e
        if after is None:
            states.pop(event.task_id, None)
            deleted.add(event.task_id)
        else:
            states[event.task_id] = after
    await sink.write(conn, t, rows)


async def ensure_checkpoint(conn: asyncpg.Connection, t: Tables = LIVE) -> None:
    await conn.execute(ENSURE_CHECKPOINT.format(checkpoints=t.checkpoints), PROJECTION)


async def step(
    conn: asyncpg.Connection,
    t: Tables = LIVE,
    batch_size: int = BATCH_SIZE,
    sink: Sink = LIVE_ROWS,
    epoch: int | None = None,
) -> tuple[Position, int]:
    """Apply the next batch in one transaction; (checkpoint, events applied). With
    `epoch` (the live projector's lease), the batch commits only while the checkpoint
    row's epoch is that one; else `LeaseLost`, and nothing is written."""
    async with conn.transaction():
        lock = LOCK_CHECKPOINT if epoch is None else LOCK_FENCED_CHECKPOINT
        row = await conn.fetchrow(lock.format(checkpoints=t.checkpoints), PROJECTION)
        if row is None:
            raise RuntimeError(f"no checkpoint row {PROJECTION!r}: run ensure_checkpoint first")
        if epoch is not None and row["epoch"] != epoch:
            raise LeaseLost(f"the checkpoint's epoch is {row['epoch']}, not this projector's"
                            f" {epoch}: another projector took over")
        position = Position(int(row["tx_id"]), row["position"])
        bound = await safe_bound(conn)
        rows = await conn.fetch(SELECT_EVENTS, *position, bound, batch_size)
        if not rows:
            return position, 0
        await apply_events(conn, await open_events(conn, _decode(rows)), t, sink)
        last = rows[-1]
        position = Position(int(last["tx_id"]), last["notification_id"])
        if epoch is None:
            await conn.execute(
                SAVE_CHECKPOINT.format(checkpoints=t.checkpoints), PROJECTION, *position
            )
        elif await conn.execute(SAVE_FENCED_CHECKPOINT.format(checkpoints=t.checkpoints),
                                PROJECTION, *position, epoch) != "UPDATE 1":
            raise LeaseLost(f"the checkpoint's epoch is no longer {epoch}: another projector"
                            " took over")  # rolled back: this batch writes nothing
        if t == LIVE:
            await conn.execute(NOTIFY_ADVANCED, str(position))
    return position, len(rows)


AfterBatch = Callable[[Position, int, float], Awaitable[None]]


async def apply_until_caught_up(
    conn: asyncpg.Connection,
    t: Tables = LIVE,
    *,
    batch_size: int = BATCH_SIZE,
    sink: Sink = LIVE_ROWS,
    after_batch: AfterBatch | None = None,
    stop: asyncio.Event | None = None,
    epoch: int | None = None,
) -> Position:
    """Steps until one comes back short (caught up with every event committed so far),
    or until `stop` is set: the batch in hand commits (or rolls back) whole first, so a
    stop waits for one batch, never for the backlog. `after_batch(position, count,
    seconds)` after each step. The checkpoint row must exist (`ensure_checkpoint`).
    `epoch`: every step is fenced by it (`step`)."""
    while True:
        started = time.perf_counter()
        position, count = await step(conn, t, batch_size, sink, epoch)
        if after_batch is not None:
            await after_batch(position, count, time.perf_counter() - started)
        if count < batch_size or (stop is not None and stop.is_set()):
            return position


# The replay's load: every event up to a position ($1, $2), task by task (the events'
# primary key), read with a server-side cursor of one read-only transaction; with a
# `TaskRange`, only the tasks from $3 (inclusive) to $4 (exclusive), either end open.
SELECT_EVENTS_BY_TASK = (
    "SELECT notification_id, originator_id, originator_version, topic, state, tx_id"
    f" FROM {EVENTS_TABLE} WHERE (tx_id, notification_id) <= ($1::text::xid8, $2::bigint)"
    " AND ($3::uuid IS NULL OR originator_id >= $3::uuid)"
    " AND ($4::uuid IS NULL OR originator_id < $4::uuid)"
    " ORDER BY originator_id, originator_version"
)
# Tasks from `lo` (inclusive) to `hi` (exclusive) by id; None: that end is open.
TaskRange = tuple[UUID | None, UUID | None]
EVERY_TASK: TaskRange = (None, None)
# ... read by a sort, not by the key's index: an index scan fetches the events' pages in
# random order (3x slower than the sort on the 2-core VM when it was busy, and no faster
# when it was quiet). The sort spills past `work_mem` to temporary files: the server's
# memory stays bounded, and its temporary disk is about the size of the events' rows.
SORTED_READ = (
    "SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off;"
    " SET LOCAL work_mem = '64MB'"
)


async def load_by_task(
    read: asyncpg.Connection,
    conn: asyncpg.Connection,
    t: Tables,
    upto: Position,
    sink: BulkRows,
    *,
    batch_size: int = BATCH_SIZE,
    after_batch: AfterBatch | None = None,
    tasks: TaskRange = EVERY_TASK,
    checkpoint: bool = True,
    observe: Callable[[list[TaskEvent]], None] | None = None,
) -> None:
    """Apply every event up to `upto` (all committed) of the tasks in `tasks` to the
    fresh tables `t`, task by task: pages of `batch_size` events from a cursor on `read`
    (sorted by the server, `SORTED_READ`; the next page is fetched
    while one is folded), each folded by `apply_events` into `sink` (whose COPYs run on
    its own connection), then (`checkpoint`) the checkpoint at `upto`, on `conn`. Loads
    of disjoint ranges may run at once, on connections of their own: their rows are
    disjoint, and the counts are added up (`user_stats`, in the users' order).
    `observe` is handed each page's events as decoded and opened, before they are
    applied (the replay's verification fold, `verify.TaskFold.observe`). A task's events come
    in version order, which is their order in the log; the tables end as the runner's
    steps in the log's order leave them (one task's rows never depend on another's, and
    the counts are sums). Memory: a few pages, whatever the size of the store. The read
    transaction takes no transaction id, so it holds back no projector's bound
    (`SAFE_BOUND`)."""
    async with read.transaction(isolation="repeatable_read", readonly=True):
        await read.execute(SORTED_READ)
        cursor = await read.cursor(SELECT_EVENTS_BY_TASK, str(upto.tx_id), upto.notification_id,
                                   *tasks)
        fetching: asyncio.Future[list[asyncpg.Record]] = asyncio.ensure_future(
            cursor.fetch(batch_size))
        try:
            while True:
                started = time.perf_counter()
                rows = await fetching
                if not rows:
                    break
                if len(rows) == batch_size:
                    fetching = asyncio.ensure_future(cursor.fetch(batch_size))
                events = await open_events(conn, _decode(rows))
                if observe is not None:
                    observe(events)
                await apply_events(conn, events, t, sink)
                if after_batch is not None:
                    await after_batch(upto, len(rows), time.perf_counter() - started)
                if len(rows) < batch_size:
                    break
            await sink.finish(conn, t)
        except BaseException:
            fetching.cancel()
            sink.abandon()
            raise
    if checkpoint:
        await save_checkpoint(conn, t, upto)


async def save_checkpoint(conn: asyncpg.Connection, t: Tables, position: Position) -> None:
    await conn.execute(SAVE_CHECKPOINT.format(checkpoints=t.checkpoints), PROJECTION, *position)


# -- the live process ------------------------------------------------------------------


async def run(
    dsn: str,
    *,
    batch_size: int = BATCH_SIZE,
    poll_interval: float = POLL_INTERVAL,
    max_backoff: float = 5.0,
    stop: asyncio.Event | None = None,
    metrics: ProjectorMetrics | None = None,
    lease: LeaseTimes | None = None,
) -> None:
    """Follow the event store until `stop` is set; raises `HandlerFailed` on a bad event.
    One projector of a database at a time is active (`projections.lease`, its `lease`
    times); the others stand by. Losing the lease, the active one stands by again."""
    stop = stop or asyncio.Event()
    backoff = [0.1]
    metrics = metrics or ProjectorMetrics()
    times = lease or LeaseTimes()
    holder = leases.holder_name()

    def reset() -> None:
        backoff[0] = 0.1

    while not stop.is_set():
        try:
            await _follow(dsn, batch_size, poll_interval, stop, on_active=reset,
                          metrics=metrics, times=times, holder=holder)
            return
        except LeaseLost as e:
            log.warning("projector stopped projecting at position %s: %s; standing by",
                        metrics.position, e, extra={"position": str(metrics.position)})
            reset()
        except RETRYABLE as e:
            delay = backoff[0] * random.uniform(0.5, 1.0)
            log.warning("projector lost the database at position %s (%s: %s); retrying in %.1fs",
                        metrics.position, type(e).__name__, e, delay,
                        extra={"position": str(metrics.position)})
            backoff[0] = min(max_backoff, backoff[0] * 2)
            await _sleep_unless(stop, delay)


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


class _LostConnection(ConnectionError):
    pass


class ProjectorMetrics:
    """The live projector's metrics (PROJECTOR_*, lag, head) and its batch log lines:
    every batch at debug level, a summary at info level at most every `info_every`
    seconds; head and lag are measured at most every `lag_every` seconds."""

    def __init__(self, info_every: float = 5.0, lag_every: float = 1.0) -> None:
        self.position: Position | None = None
        self.role = "starting"  # then "standby" (waiting for the lock) or "active"
        self.epoch: int | None = None  # the lease's, while active
        self.info_every = info_every
        self.lag_every = lag_every
        self._applied = 0
        self._last_info = time.monotonic()
        self._last_lag = 0.0

    def batch(self, position: Position, count: int, seconds: float) -> None:
        self.position = position
        PROJECTOR_POSITION.labels(PROJECTION).set(position.notification_id)
        if not count:
            return
        PROJECTOR_BATCH_SIZE.observe(count)
        PROJECTOR_BATCH_SECONDS.observe(seconds)
        self._applied += count
        log.debug("applied %d events up to position %s in %.3fs", count, position, seconds,
                  extra={"position": str(position), "events": count})
        now = time.monotonic()
        if now - self._last_info >= self.info_every:
            log.info("projected %d events in %.0fs, now at position %s",
                     self._applied, now - self._last_info, position,
                     extra={"position": str(position), "events": self._applied})
            self._applied, self._last_info = 0, now

    async def measure(self, conn: asyncpg.Connection, *, caught_up: bool) -> None:
        """Head and lag, read at most every `lag_every` seconds (5x less while behind)."""
        now = time.monotonic()
        every = self.lag_every if caught_up else self.lag_every * 5
        if self.position is None or now - self._last_lag < every:
            return
        self._last_lag = now
        head = await checkpoints.head(conn)
        events, seconds = await checkpoints.lag(conn, self.position)
        EVENT_STORE_HEAD.set(head.notification_id)
        PROJECTION_LAG_EVENTS.labels(PROJECTION).set(events)
        PROJECTION_LAG_SECONDS.labels(PROJECTION).set(seconds)


async def _stand_by(
    lock_conn: asyncpg.Connection,
    conn: asyncpg.Connection,
    stop: asyncio.Event,
    times: LeaseTimes,
) -> bool:
    """Wait on the advisory lock (its holder dies: granted at once); every heartbeat,
    end the holder's backends if its lease has lapsed (it hung: then granted too).
    True once this process holds the lock, False when stopped first."""
    waiting = asyncio.ensure_future(lock_conn.fetchval(WAIT_LOCK, projector_lock(PROJECTION)))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while True:
            await asyncio.wait({waiting, stopping}, timeout=times.heartbeat,
                               return_when=asyncio.FIRST_COMPLETED)
            if waiting.done():
                waiting.result()
                return True
            if stopping.done():
                return False
            await leases.fence_lapsed(conn, PROJECTION)
    finally:
        stopping.cancel()
        if not waiting.done():
            waiting.cancel()


async def _follow(
    dsn: str,
    batch_size: int,
    poll_interval: float,
    stop: asyncio.Event,
    on_active: Any,
    metrics: ProjectorMetrics | None = None,
    times: LeaseTimes | None = None,
    holder: str | None = None,
) -> None:
    metrics = metrics or ProjectorMetrics()
    times = times or LeaseTimes()
    holder = holder or leases.holder_name()
    lock_conn = await asyncpg.connect(
        dsn, server_settings={"application_name": LOCK_APPLICATION_NAME}
    )
    conn: asyncpg.Connection | None = None
    heart: asyncio.Future[None] | None = None
    try:
        conn = await asyncpg.connect(dsn, server_settings={"application_name": APPLICATION_NAME})
        if not await lock_conn.fetchval(TRY_LOCK, projector_lock(PROJECTION)):
            metrics.role = "standby"
            log.info("another projector is active; waiting to take over")
            if not await _stand_by(lock_conn, conn, stop, times):
                return
        await ensure_checkpoint(conn)
        lease = await leases.take_over(lock_conn, PROJECTION, holder, times,
                                       [conn.get_server_pid()])
        metrics.role, metrics.epoch = "active", lease.epoch
        log.info("projector active (lease epoch %d)", lease.epoch,
                 extra={"epoch": lease.epoch, "holder": holder})

        wake = asyncio.Event()
        conn.add_termination_listener(lambda _: wake.set())
        lock_conn.add_termination_listener(lambda _: wake.set())
        await conn.add_listener(EVENTS_CHANNEL, lambda *_: wake.set())
        # The heartbeat, on the lock's connection (idle otherwise), in this event loop:
        # a loop that hangs stops renewing too.
        heart = asyncio.ensure_future(leases.keep(lock_conn, lease))

        def heart_stopped(beat: asyncio.Future[None]) -> None:
            wake.set()
            if not beat.cancelled() and beat.exception() is not None:
                conn.terminate()  # a batch in hand (blocked, say) ends now, uncommitted

        heart.add_done_callback(heart_stopped)

        def still_holder() -> None:
            if heart.done():
                heart.result()  # raises: LeaseLost, or the connection's error
            lease.check()

        async def after_batch(position: Position, count: int, seconds: float) -> None:
            metrics.batch(position, count, seconds)
            still_holder()
            await metrics.measure(conn, caught_up=count < batch_size)

        on_active()
        try:
            while not stop.is_set():
                still_holder()
                if conn.is_closed() or lock_conn.is_closed():
                    raise _LostConnection("a projector connection closed")
                wake.clear()
                await apply_until_caught_up(conn, batch_size=batch_size, stop=stop,
                                            after_batch=after_batch, epoch=lease.epoch)
                waiter = asyncio.ensure_future(wake.wait())
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait({waiter, stopping}, timeout=poll_interval,
                                   return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopping.cancel()
        except Exception:
            if heart.done() and not heart.cancelled() and heart.exception() is not None:
                raise heart.exception() from None  # why the work connection was ended
            raise
        heart.cancel()
        with contextlib.suppress(asyncio.CancelledError, *RETRYABLE, LeaseLost):
            await heart
        with contextlib.suppress(*RETRYABLE):
            await leases.release(lock_conn, lease)
    finally:
        if heart is not None:
            heart.cancel()
        if metrics.role == "active":
            metrics.role, metrics.epoch = "starting", None
        for c in (conn, lock_conn):
            if c is not None and not c.is_closed():
                c.terminate()


def main(
    dsn: str,
    *,
    batch_size: int = BATCH_SIZE,
    poll_interval: float = POLL_INTERVAL,
    metrics_host: str = "127.0.0.1",
    metrics_port: int = 0,
    lease: LeaseTimes | None = None,
) -> int:
    """`taskctl projector`: follow the event store until SIGTERM/SIGINT; the exit status.
    With `metrics_port`, serves /metrics and /health there (a thread of this process).
    `lease`: by default from the settings (PROJECTOR_LEASE_SECONDS and
    PROJECTOR_HEARTBEAT_SECONDS)."""
    metrics = ProjectorMetrics()
    settings = Settings.from_env(require_auth=False)
    times = lease or LeaseTimes.from_settings(settings)
    if settings.environment == "production" and not settings.data_master_key:
        # What opens the sealed fields (`shared.datakeys.ring_for`) reads it there too.
        log.error("DATA_MASTER_KEY is not set: in production the users' data keys are"
                  " wrapped by a master key of yours (docs/privacy.md)")
        return 2

    def health() -> dict[str, Any]:
        position = metrics.position
        return {"status": "healthy", "service": "projector", "role": metrics.role,
                "epoch": metrics.epoch,
                "position": None if position is None else str(position)}

    server = None
    if metrics_port:
        try:
            server = start_metrics_server(metrics_host, metrics_port, health)
        except OSError as e:
            # Projecting matters more than its metrics: go on, loudly (the health
            # check that polls this port then marks the process unhealthy).
            log.error("cannot serve /metrics on %s:%d: %s", metrics_host, metrics_port, e)

    async def follow() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await run(dsn, batch_size=batch_size, poll_interval=poll_interval, stop=stop,
                      metrics=metrics, lease=times)
        except HandlerFailed as e:
            log.critical("projector stopped: %s", e, extra={"position": e.position})
            return 1
        except (asyncpg.exceptions.UndefinedTableError,
                asyncpg.exceptions.UndefinedColumnError) as e:
            log.critical("projector stopped: the database lacks its tables (%s): run"
                         " `taskctl db init` (it migrates an existing database)", e)
            return 1
        log.info("projector stopped", extra={"position": str(metrics.position)})
        return 0

    try:
        return aio.run(follow)  # on uvloop, as the APIs run
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
