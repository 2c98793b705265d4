"""The event store on PostgreSQL: the executor's port (`command_api.ports`) implemented
with asyncpg on the tables eventsourcing made.

The command API runs on one event loop, and this store reads and appends on that loop
(a synchronous store would cost a hop to a worker thread per command and a fight for
the GIL). It keeps everything the library's recorder keeps:

- the same tables (`taskctl db init` creates them through `shared.eventstore`), the
  same stored form (each event encoded and decoded by the eventsourcing `Mapper` of
  `TaskStore`, so the library reads what we write and we read what it writes);
- per-task optimistic concurrency: the primary key on (task id, version);
- the global order (tx_id, notification_id): the insert takes no table lock, and the
  projector takes only events of transactions older than every running one;
- the idempotency record in the same statement (a data-modifying CTE) as the events;
- and, also in that statement, the user's latest position (`user_write_positions`),
  which the query side compares with its checkpoint: read-your-own-writes by default.

The personal fields of every event are sealed with its owner's data key
(`shared.datakeys`: made on the user's first command, cached per process), and every
append checks in its statement that the key still exists: an append after an erasure
(`taskctl users forget`) finds its key gone, writes nothing, drops the key and decides
again (a new task gets a new key; a task sealed with the old one reads as not found).
An append already in flight when the erasure commits is erased with the rest.

Round trips are coalesced (`command_api.batching.Coalescer`): the latest-state reads of
concurrent commands go out as one `= ANY($1)` query, and their single-event appends
without an Idempotency-Key as one `INSERT ... ON CONFLICT ON CONSTRAINT ... DO NOTHING
RETURNING` (group commit: one statement, one transaction, one WAL flush). A row left
out of RETURNING lost the race for its (task id, version): only its command gets
VersionConflict and decides again. A batch that fails fails each of its commands as
it would have failed alone; no command is acknowledged before its batch commits.
Commands with several events or an Idempotency-Key take the single-command path.

NOTIFY is sent after the commit, not inside the transaction (a NOTIFY inside serialises
every notifying commit on one lock, WAL flush included), and coalesced: one NOTIFY
covers every save that committed before it was sent, and a process sends at most one
per `NOTIFY_INTERVAL`. The projector also polls, so a
NOTIFY lost with a crash delays projection by at most its poll interval.

The purge of expired Idempotency-Keys is here too (`purge_idempotency`): batched, one
process at a time under an advisory lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
from eventsourcing.persistence import StoredEvent

from command_api.batching import Coalescer
from command_api.ports import IdempotencyRecord, KeyTaken, VersionConflict
from shared.catalog import (
    EVENTS_TABLE,
    IDEMPOTENCY_TABLE,
    OWN_POSITIONS_TABLE,
    PURGE_IDEMPOTENCY_LOCK,
)
from shared.datakeys import (
    DATA_KEYS_TABLE,
    INSERT_KEY,
    KEY_HELD,
    SEALED_FIELDS,
    SELECT_NEWEST_KEY,
    DataKey,
    Erased,
    KeyRing,
    MasterKeyError,
    MasterKeys,
    default_ring,
    is_sealed,
    load_master_keys,
    new_data_key,
    seal_fields,
    sealed_key_id,
)
from shared.errors import DATABASE_DOWN
from shared.events import Task
from shared.eventstore import mapper
from shared.observability import COMMAND_DB_BATCH
from shared.pools import pool_options, warn_if_pool_over_budget
from shared.position import Position, PositionCodec, load_codec
from shared.settings import Settings

log = logging.getLogger("taskservice.taskstore")
T = TypeVar("T")

EVENTS_KEY = f"{EVENTS_TABLE}_pkey"
IDEMPOTENCY_KEY = f"{IDEMPOTENCY_TABLE}_pkey"
APPLICATION_NAME = "taskservice-command-api"

_EVENT_COLUMNS = f"INSERT INTO {EVENTS_TABLE} (originator_id, originator_version, topic, state)"
# The user's latest position, in the statement (so the transaction) that appends their
# events: `{own}` selects (user_id, notification_id) rows from the appended events. The
# row lock it takes is held until the commit; with several users (a batch) the rows are
# locked in user order, after every event is in, so two batches never deadlock. A
# transaction that commits after a later one keeps the later position: the checkpoint
# passes a position only once every older transaction is projected.
_UPSERT_OWN = (
    f"INSERT INTO {OWN_POSITIONS_TABLE} AS o (user_id, tx_id, notification_id)"
    " SELECT user_id, pg_current_xact_id(), max(notification_id) FROM ({own}) AS own"
    " GROUP BY user_id ORDER BY user_id"
    " ON CONFLICT (user_id) DO UPDATE SET tx_id = excluded.tx_id,"
    " notification_id = excluded.notification_id"
    " WHERE (o.tx_id, o.notification_id) < (excluded.tx_id, excluded.notification_id)"
)
# The sealing key's parameter in `_ONE` and `_MANY`, numbered by `_appending`.
_KEY = "{key}"


# An event is appended only after its predecessor: version 1, or version n - 1 of its
# task already stored. A cached copy of a task can be ahead of the store (events lost
# to an asynchronous failover, a restore): its save is then a VersionConflict and the
# command decides again on what is stored, rather than writing a version with none
# before it, which would stop the projector. One index probe, in the same statement.
_FOLLOWS = (
    "({version} = 1 OR EXISTS (SELECT 1 FROM " + EVENTS_TABLE + " p"
    " WHERE p.originator_id = {task} AND p.originator_version = {version} - 1))"
)


def _appending(insert: str, owner: str, *, keyed: bool = False) -> str:
    """`insert` (an events INSERT whose rows are all the user `owner`'s, an SQL
    expression) with the user's position upserted in the same statement, and the
    idempotency record if `keyed` (only if the events went in)."""
    own = _UPSERT_OWN.format(own=f"SELECT {owner} AS user_id, notification_id FROM appended")
    idempotency = f", idempotency AS ({_INSERT_IDEMPOTENCY})" if keyed else ""
    insert = insert.replace(_KEY, "$12::uuid" if keyed else "$6::uuid")
    return (
        f"WITH appended AS ({insert} RETURNING notification_id, tx_id), own AS ({own})"
        f"{idempotency} SELECT notification_id, tx_id::text FROM appended"
    )


_INSERT_IDEMPOTENCY = (
    f"INSERT INTO {IDEMPOTENCY_TABLE} (user_id, key, fingerprint, status, task_id, version)"
    " SELECT $6, $7, $8, $9, $10, $11 WHERE EXISTS (SELECT 1 FROM appended) RETURNING 1"
)
_INSERT_IDEMPOTENCY_ONLY = (
    f"INSERT INTO {IDEMPOTENCY_TABLE} (user_id, key, fingerprint, status, task_id, version)"
    " VALUES ($1, $2, $3, $4, $5, $6) RETURNING 1"
)
# One event (most commands) as plain parameters; several (in version order) as arrays.
# $5: the user; $6-$11: idempotency; the sealing key last.
_ONE = (
    f"{_EVENT_COLUMNS} SELECT $1::uuid, $2::bigint, $3::text, $4::bytea"
    f" WHERE {_FOLLOWS.format(task='$1::uuid', version='$2::bigint')}"
    f" AND {KEY_HELD.format(key=_KEY)}"
)
_MANY = (
    f"{_EVENT_COLUMNS} SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::bytea[])"
    f" WHERE {_FOLLOWS.format(task='($1::uuid[])[1]', version='($2::bigint[])[1]')}"
    f" AND {KEY_HELD.format(key=_KEY)}"
)
_INSERT_ONE = _appending(_ONE, "$5::text")
_INSERT_MANY = _appending(_MANY, "$5::text")
# The same with the idempotency record: one statement, one transaction.
_KEYED = {
    _INSERT_ONE: _appending(_ONE, "$5::text", keyed=True),
    _INSERT_MANY: _appending(_MANY, "$5::text", keyed=True),
}


# Single-event appends of concurrent commands (of any users), in one statement: a row
# that loses the race for its (task id, version), or whose predecessor is not stored, is
# left out of RETURNING, and only its command fails.
_APPEND_BATCH = (
    "WITH batch AS (SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::bytea[],"
    " $5::text[], $6::uuid[]) WITH ORDINALITY AS b(id, version, topic, state, user_id, key_id, n)),"
    f" appended AS ({_EVENT_COLUMNS} SELECT id, version, topic, state FROM batch b"
    f" WHERE {_FOLLOWS.format(task='b.id', version='b.version')}"
    f" AND {KEY_HELD.format(key='b.key_id')}"
    # In the batch's order, whatever the plan: of two events for one (task id, version)
    # the first is inserted, and the result's mapping (`_append_batch`) says so.
    " ORDER BY b.n"
    f" ON CONFLICT ON CONSTRAINT {EVENTS_KEY} DO NOTHING"
    " RETURNING originator_id, originator_version, notification_id, tx_id),"
    " own AS ("
    + _UPSERT_OWN.format(own=(
        "SELECT b.user_id, a.notification_id FROM appended a JOIN batch b"
        " ON b.id = a.originator_id AND b.version = a.originator_version"))
    + ") SELECT originator_id, originator_version, notification_id, tx_id::text FROM appended"
)
_SELECT_EVENTS = (
    f"SELECT originator_version, topic, state FROM {EVENTS_TABLE}"
    " WHERE originator_id = $1 AND originator_version <= $2 ORDER BY originator_version"
)
# One index lookup per id, whatever the plan: `originator_id = ANY($1)` gets a generic
# plan that may scan the whole table (seen: a sequential scan on a small table).
_SELECT_MANY = (
    "SELECT e.originator_id, e.originator_version, e.topic, e.state"
    " FROM unnest($1::uuid[]) AS ids(id) CROSS JOIN LATERAL ("
    f" SELECT originator_id, originator_version, topic, state FROM {EVENTS_TABLE}"
    " WHERE originator_id = ids.id ORDER BY originator_version) AS e"
)
_SELECT_KEY = (
    f"SELECT user_id, key, fingerprint, status, task_id, version FROM {IDEMPOTENCY_TABLE}"
    " WHERE user_id = $1 AND key = $2"
)
_TOUCH_KEY = f"UPDATE {IDEMPOTENCY_TABLE} SET status = status WHERE user_id = $1 AND key = $2"
_SELECT_POSITION = (
    f"SELECT tx_id::text, notification_id FROM {EVENTS_TABLE}"
    " WHERE originator_id = $1 AND originator_version = $2"
)
_KEY_EXISTS = f"SELECT 1 FROM {DATA_KEYS_TABLE} WHERE key_id = $1"
# The same appends with nothing sealed and no key held: only for the benchmark's
# measure of what sealing costs (`PostgresEventStore.sealing`; bench/unsealed_store.py).
_UNSEALED = {
    statement: statement.replace(f" AND {KEY_HELD.format(key=key)}", "")
    for statement, key in ((_INSERT_ONE, "$6::uuid"), (_INSERT_MANY, "$6::uuid"),
                           (_KEYED[_INSERT_ONE], "$12::uuid"),
                           (_KEYED[_INSERT_MANY], "$12::uuid"))
}
_APPEND_BATCH_UNSEALED = _APPEND_BATCH.replace(
    f" AND {KEY_HELD.format(key='b.key_id')}", "").replace(
    ", $6::uuid[]) WITH ORDINALITY AS b(id, version, topic, state, user_id, key_id, n)",
    ") WITH ORDINALITY AS b(id, version, topic, state, user_id, n)")
_NOTIFY = f'NOTIFY "{EVENTS_TABLE}"'
_PURGE_LOCK = f"SELECT pg_try_advisory_xact_lock(hashtextextended('{PURGE_IDEMPOTENCY_LOCK}', 0))"
_PURGE_BATCH = (
    f"DELETE FROM {IDEMPOTENCY_TABLE} WHERE ctid = ANY(ARRAY("
    f"SELECT ctid FROM {IDEMPOTENCY_TABLE}"
    " WHERE created_at < now() - make_interval(secs => $1) LIMIT $2))"
)
_LATEST = 2**63 - 1
# A user's newest data key is read again after this many seconds (a rotated key is
# used from then on: `taskctl users rotate-key`).
SEALING_KEY_TTL = 300.0
# At most one NOTIFY per this many seconds per process (what it adds to projection lag).
NOTIFY_INTERVAL = 0.005


async def _no_session_state(_: asyncpg.Connection) -> None:
    """The pool's reset between two users of a connection. asyncpg's default sends
    `RESET ALL; UNLISTEN *; CLOSE ALL; ...` (a round trip per command); this client
    leaves no session state behind (no SET, LISTEN, cursor or advisory lock, and every
    statement is its own transaction), and asyncpg still rolls back a transaction left
    open before this runs."""


class PostgresEventStore:
    def __init__(
        self, pool: asyncpg.Pool, *, ring: KeyRing, acquire_timeout: float = 10.0
    ) -> None:
        self.pool = pool
        self.acquire_timeout = acquire_timeout
        self.mapper = mapper()
        self.ring = ring  # every data key this process has opened, by id
        # False only in the benchmark's measure of what sealing costs: events are then
        # stored with their fields open and no key is checked (never in a deployment).
        self.sealing = True
        # Each user's newest key, for new events, and when it was read.
        self._sealing: dict[str, tuple[DataKey, float]] = {}
        self._making: dict[str, asyncio.Future[DataKey]] = {}
        self._latest: Coalescer[UUID, list[Any]] = Coalescer(
            self._fetch_latest, on_batch=COMMAND_DB_BATCH.labels("read").observe
        )
        self._appends: Coalescer[tuple[Any, ...], tuple[int, str] | None] = Coalescer(
            self._append_batch, max_in_flight=4,
            on_batch=COMMAND_DB_BATCH.labels("append").observe,
        )
        self._notify_wanted = asyncio.Event()
        self._notifier: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, settings: Settings, *, min_size: int = 1, sealing: bool = True
    ) -> PostgresEventStore:
        """The store on a new pool, its timeouts from the settings (`shared.pools`: a
        hung database is a 503 within DB_POOL_TIMEOUT or twice DB_STATEMENT_TIMEOUT);
        warns when the pool could exhaust the server's connections. Refuses (raises
        MasterKeyError) without a master key, unless not `sealing` (a store that never
        reads nor writes events: the purge)."""
        dsn = settings.require_database_url()
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=settings.db_pool_size + settings.db_max_overflow,
            reset=_no_session_state,
            **pool_options(settings, dsn, APPLICATION_NAME),
        )
        await warn_if_pool_over_budget(pool, settings, process="command API")
        try:
            async with pool.acquire() as conn:
                master = await load_master_keys(
                    conn, settings.data_master_key,
                    settings.environment if sealing else "development")
        except MasterKeyError:
            if sealing:
                await pool.close()
                raise
            master = MasterKeys((bytes(32),))  # never used: nothing is sealed or opened
        except BaseException:
            await pool.close()
            raise
        ring = default_ring(master, settings.data_master_key)
        return cls(pool, ring=ring, acquire_timeout=settings.db_pool_timeout)

    async def close(self) -> None:
        await self._latest.close()
        await self._appends.close()
        if self._notifier is not None:
            self._notifier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._notifier
            self._notifier = None
        try:
            await asyncio.wait_for(self.pool.close(), 5)
        except (TimeoutError, *DATABASE_DOWN):
            self.pool.terminate()

    async def _call(self, method: str, statement: str, *args: Any) -> Any:
        """`conn.<method>(statement, *args)` on a pooled connection."""
        return await self.use(lambda conn: getattr(conn, method)(statement, *args))

    async def use(self, operation: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """`operation(conn)` on a pooled connection. A connection whose backend went
        away while it sat in the pool (a restart, `pg_terminate_backend`) fails its next
        operation with asyncpg's InternalClientError before sending anything; it is
        dropped and the operation run once more on a fresh connection."""
        for attempt in (1, 2):
            # A pool that stays exhausted (a stuck database) is a TimeoutError: a 503.
            # asyncio.timeout rather than acquire(timeout=): that one wraps each acquire
            # in a task of its own (costly on this path).
            async with asyncio.timeout(self.acquire_timeout):
                conn = await self.pool.acquire()
            try:
                return await operation(conn)
            except TimeoutError:
                # The statement outlived DB_STATEMENT_TIMEOUT: a released connection
                # would wait as long again for its cancel to land (a hung database);
                # dropped, the 503 goes out now.
                conn.terminate()
                raise
            except asyncpg.exceptions.InternalClientError:
                conn.terminate()  # its protocol state is lost: never hand it out again
                if attempt == 2:
                    raise
            finally:
                await self.pool.release(conn)
        raise AssertionError("unreachable")

    # -- reading -----------------------------------------------------------------------

    async def get(self, task_id: UUID, version: int | None = None) -> Task | None:
        """The task as of `version` (default: the latest), or None if it has no events.
        Reads of the latest state from concurrent commands share one round trip."""
        if version is None:
            rows = await self._latest(task_id)
        else:
            rows = await self._call("fetch", _SELECT_EVENTS, task_id, version)
        if not rows:
            return None
        to_domain = self.mapper.to_domain_event
        task = None
        # What eventsourcing's project_aggregate() does, without its per-event
        # isinstance() against a runtime Protocol (costly on this path).
        for v, topic, state in rows:
            task = to_domain(StoredEvent(task_id, v, topic, state)).mutate(task)
        assert isinstance(task, Task)
        return task if await self._open(task) else None

    async def _open(self, task: Task) -> bool:
        """Open the task's sealed fields in place; False if its owner was forgotten
        (a key is gone): the task is then as good as never created."""
        sealed = [v for v in (task.title, task.description, *task.tags) if is_sealed(v)]
        if not sealed:
            return True  # stored before sealing
        ids = {sealed_key_id(v) for v in sealed}
        if not ids <= self.ring.keys.keys():
            await self.use(lambda conn: self.ring.load(conn, ids - self.ring.keys.keys()))
        try:
            task.title = self.ring.open("title", task.title)
            if is_sealed(task.description):
                task.description = self.ring.open("description", task.description)
            task.tags = tuple(self.ring.open("tags", t) if is_sealed(t) else t
                              for t in task.tags)
        except Erased:
            return False
        return True

    async def sealing_key(self, user_id: str) -> DataKey:
        """The user's newest data key (made, wrapped and stored on their first command)."""
        held = self._sealing.get(user_id)
        if held is not None and time.monotonic() - held[1] < SEALING_KEY_TTL:
            return held[0]
        making = self._making.get(user_id)
        if making is None:
            making = asyncio.get_running_loop().create_future()
            self._making[user_id] = making
            try:
                key = await self.use(lambda conn: self._newest_key(conn, user_id))
            except BaseException as e:
                making.set_exception(e)
                making.exception()  # retrieved: no "never retrieved" warning
                raise
            finally:
                self._making.pop(user_id, None)
            making.set_result(key)
            self._sealing[user_id] = (key, time.monotonic())
            return key
        return await asyncio.shield(making)

    async def _newest_key(self, conn: asyncpg.Connection, user_id: str) -> DataKey:
        row = await conn.fetchrow(SELECT_NEWEST_KEY, user_id)
        if row is not None:
            return self.ring.add_row(row[0], row[1], row[2], row[3])
        key, raw = new_data_key(user_id)
        wrapped_by, wrapped = self.ring.master.wrap(user_id, key.key_id, raw)
        await conn.execute(INSERT_KEY, key.key_id, user_id, wrapped_by, wrapped)
        return self.ring.add_row(key.key_id, user_id, wrapped_by, wrapped)

    async def _key_gone(self, key: DataKey) -> bool:
        """After an append that wrote nothing: was it because the key was deleted (the
        user forgotten)? Then this process stops using it."""
        if await self._call("fetchval", _KEY_EXISTS, key.key_id) is not None:
            return False
        self._sealing.pop(key.user_id, None)
        self.ring.drop_user(key.user_id)
        return True

    async def _fetch_latest(self, task_ids: list[UUID]) -> list[list[Any]]:
        """The events of each task, for a batch of `get()`s."""
        rows = await self._call("fetch", _SELECT_MANY, list(dict.fromkeys(task_ids)))
        events: dict[UUID, list[Any]] = {}
        for task_id, version, topic, state in rows:
            events.setdefault(task_id, []).append((version, topic, state))
        return [events.get(task_id, []) for task_id in task_ids]

    async def key_record(self, user_id: str, key: str) -> IdempotencyRecord | None:
        """The record of this user's key, once it is as durable as any write. A first
        request whose commit was still waiting for a synchronous standby when it timed
        out (a 503: asyncpg cancels, PostgreSQL keeps the commit locally) leaves a record
        the standby may never get; answering its retry from it would acknowledge a write
        a failover can lose. So a found record is touched: that commit waits for the
        standby like any other, and covers the first one (WAL is one stream)."""
        row = await self._call("fetchrow", _SELECT_KEY, user_id, key)
        if row is None:
            return None
        await self._call("execute", _TOUCH_KEY, user_id, key)
        return IdempotencyRecord(*row)

    async def position_of(self, task_id: UUID, version: int) -> Position | None:
        row = await self._call("fetchrow", _SELECT_POSITION, task_id, version)
        return None if row is None else Position(int(row[0]), row[1])

    async def position_codec(self) -> PositionCodec:
        """How this deployment seals positions (its key, from the database)."""
        return await self.use(load_codec)

    async def ping(self) -> None:
        await self._call("fetchval", "SELECT 1")

    async def purge_idempotency(self, older_than_hours: float, batch: int = 10_000) -> int | None:
        """Forget Idempotency-Keys older than `older_than_hours`, in batches (short
        transactions); how many, or None when another process is purging right now."""
        if older_than_hours < 24:
            raise ValueError("Idempotency-Keys are kept at least 24 hours")

        async def purge_batch(conn: asyncpg.Connection) -> int | None:
            async with conn.transaction():
                if not await conn.fetchval(_PURGE_LOCK):
                    return None
                status = await conn.execute(_PURGE_BATCH, older_than_hours * 3600, batch)
            return int(status.rsplit(" ", 1)[-1])

        removed = 0
        while True:
            count = await self.use(purge_batch)
            if count is None:  # another process holds the purge
                return None if removed == 0 else removed
            removed += count
            if count < batch:
                return removed

    # -- writing -----------------------------------------------------------------------

    async def save(
        self, task: Task, idempotency: IdempotencyRecord | None = None
    ) -> tuple[int, Position | None]:
        """Append the task's pending events (and the idempotency record) in one
        transaction: how many events, and where the last one landed.

        Raises VersionConflict or KeyTaken; a lost connection raises one of
        DATABASE_DOWN and the outcome is unknown (an Idempotency-Key retry settles it).
        """
        pending = task.collect_events()
        if not pending and idempotency is None:
            return 0, None
        if not self.sealing:
            return await self._save_unsealed(pending, task.owner, idempotency)
        key = await self.sealing_key(task.owner)
        stored = [self.mapper.to_stored_event(_sealed(e, key)) for e in pending]
        if len(stored) == 1 and idempotency is None:
            # Most commands: one event, no key. Appended together with the concurrent
            # commands' events, in one statement and transaction (group commit).
            e = stored[0]
            landed = await self.append_one(
                (e.originator_id, e.originator_version, e.topic, e.state, task.owner,
                 key.key_id)
            )
            if landed is None:
                await self._key_gone(key)
                raise VersionConflict
            self._notify_soon()
            return 1, Position(int(landed[1]), landed[0])
        args: list[Any] = []
        if len(stored) == 1:
            e = stored[0]
            args = [e.originator_id, e.originator_version, e.topic, e.state, task.owner]
            statement = _INSERT_ONE
        elif stored:
            args = [
                [e.originator_id for e in stored],
                [e.originator_version for e in stored],
                [e.topic for e in stored],
                [e.state for e in stored],
                task.owner,
            ]
            statement = _INSERT_MANY
        else:
            statement = _INSERT_IDEMPOTENCY_ONLY
        if idempotency is not None:
            r = idempotency
            args += [r.user_id, r.key, r.fingerprint, r.status, r.task_id, r.version]
            if stored:
                statement = _KEYED[statement]
        if stored:
            args.append(key.key_id)
        return await self._insert_stored(statement, args, stored, key)

    async def _save_unsealed(
        self, pending: list[Any], owner: str, idempotency: IdempotencyRecord | None
    ) -> tuple[int, Position | None]:
        """`save` with nothing sealed and no key held (`sealing` off: the benchmark's)."""
        stored = [self.mapper.to_stored_event(e) for e in pending]
        if len(stored) == 1 and idempotency is None:
            e = stored[0]
            landed = await self.append_one(
                (e.originator_id, e.originator_version, e.topic, e.state, owner))
            if landed is None:
                raise VersionConflict
            self._notify_soon()
            return 1, Position(int(landed[1]), landed[0])
        if len(stored) == 1:
            e = stored[0]
            args: list[Any] = [e.originator_id, e.originator_version, e.topic, e.state, owner]
            statement = _INSERT_ONE
        elif stored:
            args = [[e.originator_id for e in stored], [e.originator_version for e in stored],
                    [e.topic for e in stored], [e.state for e in stored], owner]
            statement = _INSERT_MANY
        else:
            args, statement = [], _INSERT_IDEMPOTENCY_ONLY
        if idempotency is not None:
            r = idempotency
            args += [r.user_id, r.key, r.fingerprint, r.status, r.task_id, r.version]
            if stored:
                statement = _KEYED[statement]
        return await self._insert_stored(_UNSEALED.get(statement, statement), args, stored, None)

    async def _insert_stored(
        self, statement: str, args: list[Any], stored: list[Any], key: DataKey | None
    ) -> tuple[int, Position | None]:
        try:
            rows = await self.insert(statement, args)
        except asyncpg.UniqueViolationError as e:
            if e.constraint_name == IDEMPOTENCY_KEY:
                raise KeyTaken from None
            if e.constraint_name == EVENTS_KEY:
                raise VersionConflict from None
            raise
        if not stored:
            return 0, None
        if not rows:  # the first event's predecessor or its key is gone: nothing written
            if key is not None:
                await self._key_gone(key)
            raise VersionConflict
        self._notify_soon()
        last = max(rows, key=lambda row: row[0])
        return len(stored), Position(int(last[1]), last[0])

    async def _append_batch(
        self, events: list[tuple[Any, ...]]
    ) -> list[tuple[int, str] | None]:
        """For each event (id, version, topic, state, owner, key id): (notification_id, tx_id) where
        it landed, or None if its (task id, version) was taken (by another writer, or by
        an earlier event of this batch)."""
        statement = _APPEND_BATCH if len(events[0]) == 6 else _APPEND_BATCH_UNSEALED
        rows = await self._call(
            "fetch", statement, *(list(column) for column in zip(*events, strict=True))
        )
        landed = {(row[0], row[1]): (row[2], row[3]) for row in rows}
        return [landed.pop((event[0], event[1]), None) for event in events]

    async def append_one(self, event: tuple[Any, ...]) -> tuple[int, str] | None:
        """Append one event (id, version, topic, state, the task's owner, the id of the
        key its fields are sealed with) with the
        concurrent commands' events (group commit): (notification_id, tx_id) where it
        landed, or None if its (task id, version) was taken."""
        return await self._appends(event)

    async def insert(self, statement: str, args: list[Any]) -> list[Any]:
        """Run one of `save`'s insert statements, in a transaction of its own."""
        return await self._call("fetch", statement, *args)

    def _notify_soon(self) -> None:
        self._notify_wanted.set()
        if self._notifier is None or self._notifier.done():
            self._notifier = asyncio.get_running_loop().create_task(self._notify_loop())

    async def _notify_loop(self) -> None:
        """One NOTIFY for every save that committed before it goes out, and at most one
        per NOTIFY_INTERVAL: the first save after a quiet spell is announced at once, a
        busy stream of saves costs a bounded number of round trips."""
        while True:
            await self._notify_wanted.wait()
            self._notify_wanted.clear()
            try:
                await self._call("execute", _NOTIFY)
            except DATABASE_DOWN as e:  # the projector's poll picks the events up
                log.warning("NOTIFY failed: %s", e)
                await asyncio.sleep(0.5)
            await asyncio.sleep(NOTIFY_INTERVAL)


def _sealed(event: Task.Event, key: DataKey) -> Task.Event:
    """`event` with its personal fields sealed by `key` (a copy: the task keeps them open)."""
    if not any(name in vars(event) for name in SEALED_FIELDS):
        return event
    copy = object.__new__(type(event))
    object.__setattr__(copy, "__dict__", seal_fields(key, vars(event)))
    return copy
