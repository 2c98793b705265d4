"""`taskctl replay`: rebuild a projection's read tables from the first event, beside the
live ones, then switch the query side over in one transaction.

1. Under a session advisory lock (one replay at a time), drop what an interrupted replay
   left (`rebuild_*_<n>`, `read_*_old_<n>`), create fresh `rebuild_*_<n>` tables as each
   read model makes them for a bulk load (no secondary indexes, no keys the load does
   without), and apply every event committed so far with the runner's bulk path
   (`projections.projector.load_by_task`: the same handlers, fed task by task from a
   server-side cursor in the events' key order, into its `BulkRows` sink, which COPYs
   each page's rows and finished tasks while the next page is folded; then their own
   checkpoint row). A large store's load is split by task id over processes, one per
   core (`projections.loader`): this one loads the first range, a child each other one.
   The live projector and the query API keep using the live tables. Each loader also
   hands the events it read to a fold of its own (`verify.TaskFold`: the README's
   rules, not the handlers); the events they read are counted against the store's.
   Their summaries seed a child process (`verify.FoldProcess`) that folds every later
   event itself.
2. Add the keys and the indexes (two sessions, each build as soon as its table's key
   is: `build_keys_and_indexes`), catch up again in the log's order, and check the
   tables against the fold, advanced to the same checkpoint:
   per-user row counts and checksums, the tables' side summed by the server. A
   difference aborts, names the users, and leaves the live tables alone.
3. Switch, in one transaction: lock the live checkpoint row (the live projector's next
   `step` waits on it), apply the events that arrived meanwhile and check the users they
   touched, rename live -> `read_*_old_<n>` and rebuilt -> live (indexes too), copy the
   checkpoint, record the version in `projection_versions`. Then drop the old tables.

Every step iterates the read models of `projections.manifest`.

Memory: neither this process nor a loader's nor the fold's holds more than a few pages of
events, their tasks' states and one summary per user, whatever the size of the store (README, "Replay",
states the measured bound).

Readers name the tables (`read_tasks`...), so a query sees the old tables or the new
ones, both complete, never a mix. Killed at any point before the switch commits, the
live tables are untouched and the next run starts clean (the fold and loader processes
die with the replay).
"""

from __future__ import annotations

import asyncio
import gc
import re
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

import asyncpg

from projections import checkpoints as cp
from projections.loader import LoadProcess, loaders_for, split
from projections.manifest import (
    PROJECTIONS,
    READ_MODELS,
    load_ddl,
    table_names,
)
from projections.progress import peak_rss_mb
from projections.projector import (
    LIVE_ROWS,
    BulkRows,
    Sink,
    apply_until_caught_up,
    ensure_checkpoint,
    load_by_task,
    safe_bound,
    save_checkpoint,
)
from projections.verify import (
    FoldProcess,
    Summary,
    TaskFold,
    add_summaries,
    compare,
    summarise,
)
from shared.catalog import (
    ADVANCED_CHANNEL,
    EVENTS_TABLE,
    PROJECTION,
    VERSIONS_TABLE,
    Tables,
    replay_lock,
)
from shared.observability import REPLAY_EVENTS, REPLAY_TOTAL
from shared.position import Position

BATCH_SIZE = 10_000
VERSIONS_DDL = (
    f"CREATE TABLE IF NOT EXISTS {VERSIONS_TABLE} ("
    " projection text PRIMARY KEY, version bigint NOT NULL, events bigint NOT NULL,"
    " switched_at timestamptz NOT NULL DEFAULT now())"
)
RECORD_VERSION = (
    f"INSERT INTO {VERSIONS_TABLE} (projection, version, events) VALUES ($1, $2, $3)"
    " ON CONFLICT (projection) DO UPDATE SET version = EXCLUDED.version,"
    " events = EXCLUDED.events, switched_at = now()"
)
REPLAY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))"  # $1: replay_lock()
# Who holds it: the backend, what it runs, since when.
REPLAY_LOCK_HOLDER = (
    "SELECT a.pid, a.application_name, a.state, a.query_start"
    " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.database = ("
    "SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.objsubid = 1 AND ((l.classid::bigint << 32) | l.objid::bigint)"
    " = hashtextextended($1, 0) LIMIT 1"
)
# A replay killed a moment ago may hold the lock until its backend notices (it finishes
# the statement in hand first): a new run waits this long before it says "busy".
LOCK_WAIT = 10.0
APPLICATION_NAME = "taskservice-replay"
SWITCH_LOCK_TIMEOUT = "5s"
SWITCH_ATTEMPTS = 5
OLD_TRANSACTION_WAIT = 10.0
# The sessions that build the keys and indexes: memory for each build's sort (the
# server's default, 64MB, spills the history's to disk), and no parallel workers: the
# builds run side by side on their sessions, which keeps the cores busy already.
INDEX_SESSIONS = 2
INDEX_SETTINGS = {
    "application_name": APPLICATION_NAME,
    "maintenance_work_mem": "256MB",
    "max_parallel_maintenance_workers": "0",
}


class VerificationFailed(Exception):
    def __init__(self, differing: dict[str, list[str]], problems: list[str]) -> None:
        self.differing = differing
        self.problems = problems
        super().__init__(f"{len(differing)} user(s) differ")


class ReplayBusy(Exception):
    pass


def rebuild_tables(live: Tables, n: int) -> Tables:
    return replace(
        live,
        checkpoints=f"rebuild_checkpoints_{n}",
        **{m.TABLE: f"rebuild_{getattr(live, m.TABLE).removeprefix('read_')}_{n}"
           for m in READ_MODELS},
    )


def _leftover_pattern(live: Tables) -> re.Pattern[str]:
    names = table_names(live)
    rebuilt = "|".join(re.escape(n.removeprefix("read_")) for n in names)
    old = "|".join(re.escape(n) for n in names)
    return re.compile(rf"^(rebuild_({rebuilt}|checkpoints)|({old})_old)_[0-9]+$")


@dataclass
class ReplayCounter:
    """Events applied so far, of how many; reported as it goes (`on_progress(done, total)`)."""

    total: int = 0
    done: int = 0
    on_progress: Callable[[int, int], None] | None = None
    # Events applied by other processes (a parallel load's `LoadProcess`es) so far.
    elsewhere: Callable[[], int] | None = None

    async def add(self, _: Position, count: int, __: float) -> None:
        """An `after_batch` of the runner."""
        self.done += count
        self.report()

    def report(self) -> None:
        done = self.done + (self.elsewhere() if self.elsewhere is not None else 0)
        REPLAY_EVENTS.labels(PROJECTION).set(done)
        if self.on_progress is not None:
            self.on_progress(done, self.total)

    def absorb(self, count: int) -> None:
        """The other processes are done: `count` events were theirs."""
        self.elsewhere = None
        self.done += count


@dataclass
class Result:
    projection: str
    version: int | None
    events: int
    seconds: float
    events_per_s: float
    rows: dict[str, int]
    switched: bool
    in_place: bool
    phases: dict[str, float] = field(default_factory=dict)
    # Peak resident memory (MB, `peak_rss`): this process's so far, the fold process's
    # when the run ended it, and a second loader's ("load") when the load had one.
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    loaders: int = 1  # processes that loaded the events (`projections.loader`)


async def replay(
    dsn: str,
    *,
    projection: str = PROJECTION,
    batch_size: int = BATCH_SIZE,
    in_place: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    lock_wait: float = LOCK_WAIT,
    loaders: int | None = None,
) -> Result:
    """Rebuild `projection` and switch to it (or rebuild the live tables `in_place`).
    `loaders`: processes that load the events (default: by the store's size and the
    cores, `projections.loader.loaders_for`). Raises `VerificationFailed` (nothing
    switched) or `ReplayBusy` (another replay still held the projection after
    `lock_wait` seconds)."""
    with _without_cyclic_gc():
        return await _replay(dsn, projection, batch_size, in_place, on_progress, lock_wait,
                             loaders)


@contextmanager
def _without_cyclic_gc() -> Iterator[None]:
    """The replay allocates a few objects per event, none in cycles: reference counting
    frees them, and the cyclic collector's passes over each page would cost the load
    dearly. Off for the run, back on after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


async def _replay(
    dsn: str,
    projection: str,
    batch_size: int,
    in_place: bool,
    on_progress: Callable[[int, int], None] | None,
    lock_wait: float,
    loaders: int | None,
) -> Result:
    live = PROJECTIONS[projection]
    started = time.perf_counter()
    phases: dict[str, float] = {}
    conn = await asyncpg.connect(
        dsn,
        server_settings={
            "application_name": APPLICATION_NAME,
            # A crash loses at most the last batches, and their checkpoint with them.
            "synchronous_commit": "off",
        },
    )
    fold: FoldProcess | None = None
    others: list[LoadProcess] = []
    folding: asyncio.Future[None] | None = None
    fold_peak: float | None = None
    peaks: dict[str, float] = {}
    try:
        await _take_replay_lock(conn, projection, lock_wait)
        await conn.execute(VERSIONS_DDL)
        await _drop_leftovers(conn, live)
        version = await conn.fetchval(
            f"SELECT coalesce(max(version), 0) + 1 FROM {VERSIONS_TABLE} WHERE projection = $1",
            projection,
        )
        progress = ReplayCounter(total=int(await conn.fetchval(f"SELECT count(*) FROM {EVENTS_TABLE}")),
                            on_progress=on_progress)
        REPLAY_TOTAL.labels(projection).set(progress.total)
        if in_place:
            target = live
            await _truncate_live(conn, live)
        else:
            target = rebuild_tables(live, version)
            # The other loaders start now: their start overlaps the rest of the setup.
            others = [LoadProcess(dsn) for _ in range(
                (loaders if loaders is not None else loaders_for(progress.total)) - 1)]
            await _create_for_load(conn, target)
        await ensure_checkpoint(conn, target)
        # The independent fold: up to where the load gets (every event committed so
        # far), then on. It lives in a process of its own, and checks every later step.
        upto = await _reachable(conn)
        fold = FoldProcess(dsn)
        if in_place:  # it folds the events itself, beside the drain
            folding = asyncio.ensure_future(fold.advance(upto))
        phases["setup"] = time.perf_counter() - started

        mark = time.perf_counter()
        if in_place:  # the live projector may write these tables too
            await _drain(conn, target, batch_size, progress)
        else:  # each loader folds its tasks as it loads them; the fold goes on from there
            loaders, totals, problems = await _load(dsn, conn, target, upto, batch_size,
                                                    progress, others, peaks)
            folding = asyncio.ensure_future(fold.seed(upto, totals, problems))
        phases["load"] = time.perf_counter() - mark
        if not in_place:
            mark = time.perf_counter()
            await build_keys_and_indexes(dsn, target)
            await _drain(conn, target, batch_size, progress)
            phases["index"] = time.perf_counter() - mark

        mark = time.perf_counter()
        await folding
        if not in_place:  # in place, the live projector moves the tables: check under lock
            # The server sums the tables on a second connection while the fold catches up.
            summing = await asyncpg.connect(
                dsn, server_settings={"application_name": APPLICATION_NAME})
            try:
                await check_rebuild(conn, target, fold, "all", summing=summing)
            finally:
                await summing.close()
        phases["verify"] = time.perf_counter() - mark

        mark = time.perf_counter()
        await _wait_for_old_transactions(conn)
        await _switch(conn, live, target, fold, progress, projection, version, in_place,
                      batch_size)
        if not in_place:
            await _drop_leftovers(conn, live)
        phases["switch"] = time.perf_counter() - mark
        rows = {
            name: int(await conn.fetchval(f"SELECT count(*) FROM {name}"))
            for name in table_names(live)
        }
    finally:
        if folding is not None and not folding.done():
            folding.cancel()
        elif folding is not None and not folding.cancelled():
            folding.exception()  # retrieved: whatever stopped the replay is what it reports
        if fold is not None:
            fold_peak = fold.peak_rss_mb()
            fold.close()
        for other in others:  # (a load that failed early)
            other.close()
        conn.terminate() if conn.is_in_transaction() else await conn.close()
    seconds = time.perf_counter() - started
    return Result(projection, None if in_place else version, progress.done, seconds,
                  progress.done / seconds if seconds else 0.0, rows, True, in_place,
                  {k: round(v, 3) for k, v in phases.items()}, {**peak_rss(fold_peak), **peaks},
                  1 if in_place else loaders or 1)


def peak_rss(fold: float | None = None) -> dict[str, float]:
    """{"replay": this process's peak RSS, "fold": the fold process's (`fold`, read
    before it was stopped)}, in MB, by `peak_rss_mb` (VmHWM). Without /proc, ru_maxrss:
    this process's, and its largest reaped child's."""
    own = peak_rss_mb()
    return {
        "replay": own if own is not None else round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "fold": fold if fold is not None else round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


async def _take_replay_lock(conn: asyncpg.Connection, projection: str, wait: float) -> None:
    deadline = time.monotonic() + wait
    key = replay_lock(projection)
    while not await conn.fetchval(REPLAY_LOCK, key):
        if time.monotonic() >= deadline:
            holder = await conn.fetchrow(REPLAY_LOCK_HOLDER, key)
            who = "" if holder is None else (
                f" (backend {holder['pid']}, {holder['application_name'] or 'no name'},"
                f" {holder['state']} since {holder['query_start']:%H:%M:%S})"
                if holder["query_start"] else f" (backend {holder['pid']})")
            raise ReplayBusy(f"another replay of {projection!r} is running{who};"
                             f" waited {wait:g} s")
        await asyncio.sleep(0.25)


async def _drain(
    conn: asyncpg.Connection,
    t: Tables,
    batch_size: int,
    progress: ReplayCounter,
    sink: Sink = LIVE_ROWS,
) -> None:
    await apply_until_caught_up(conn, t, batch_size=batch_size, sink=sink,
                                after_batch=progress.add)


async def _load(
    dsn: str,
    conn: asyncpg.Connection,
    t: Tables,
    upto: Position,
    batch_size: int,
    progress: ReplayCounter,
    others: list[LoadProcess],
    peaks: dict[str, float],
) -> tuple[int, dict[str, Summary], list[str]]:
    """Every event up to `upto` into the fresh tables `t`, task by task, split into
    one range of tasks (`projections.loader.split`) per loader: this process loads the
    first (read on one connection, COPYed on another), each of `others` the next one
    (those the split has no range for stop);
    then the checkpoint, on `conn`. Each loader hands the events it read, as the
    runner decoded and opened them, to its own `verify.TaskFold` too (the fold's rules
    are its own: it checks the handlers). As the loads share their reads with the fold,
    the events they read are counted against the event store's count up to `upto`
    (`VerificationFailed` if a range missed or repeated any). Returns how many
    processes loaded, the folds' per-user summaries and problems; their peak RSS goes
    into `peaks` ("load")."""
    counting = asyncio.ensure_future(_events_up_to(dsn, upto))
    ranges = await split(conn, progress.total, 1 + len(others))
    for spare in others[len(ranges) - 1:]:
        spare.close()
    others = others[:len(ranges) - 1]
    loading = [asyncio.ensure_future(other.load(t, upto, tasks, batch_size))
               for other, tasks in zip(others, ranges[1:], strict=True)]
    progress.elsewhere = lambda: sum(other.done for other in others)
    folded = TaskFold()
    try:
        settings = {"application_name": APPLICATION_NAME, "synchronous_commit": "off"}
        read = await asyncpg.connect(dsn, server_settings=settings)
        try:
            writer = await asyncpg.connect(dsn, server_settings=settings)
            try:
                await load_by_task(read, conn, t, upto, BulkRows(writer),
                                   batch_size=batch_size, after_batch=progress.add,
                                   tasks=ranges[0], checkpoint=False, observe=folded.observe)
            finally:
                writer.terminate() if writer.is_in_transaction() else await writer.close()
        finally:
            read.terminate() if read.is_in_transaction() else await read.close()
        folded.finish()
        while loading and not all(f.done() for f in loading):  # the others', reported
            await asyncio.wait(loading, timeout=0.5, return_when=asyncio.FIRST_EXCEPTION)
            progress.report()
        replies = await asyncio.gather(*loading)
        progress.absorb(sum(other.done for other in others))
        for other in others:
            peak = other.peak_rss_mb()
            if peak is not None:
                peaks["load"] = max(peaks.get("load", 0.0), peak)
        stored = await counting
    finally:
        progress.elsewhere = None
        for future in (*loading, counting):
            future.cancel()
        for other in others:
            other.close()
    if progress.done != stored:
        raise VerificationFailed({}, [f"the load read {progress.done:,} events up to {upto};"
                                      f" the event store holds {stored:,}"])
    totals, problems = folded.expected(), list(folded.problems)
    for more, theirs in replies:
        add_summaries(totals, more)
        problems.extend(theirs)
    await save_checkpoint(conn, t, upto)
    return len(ranges), totals, problems


async def _events_up_to(dsn: str, upto: Position) -> int:
    conn = await asyncpg.connect(dsn, server_settings={"application_name": APPLICATION_NAME})
    try:
        return int(await conn.fetchval(
            f"SELECT count(*) FROM {EVENTS_TABLE} WHERE {cp.EVENT_KEY}"
            " <= ($1::text::xid8, $2::bigint)", *cp.args(upto)))
    finally:
        await conn.close()


async def _drop_leftovers(conn: asyncpg.Connection, live: Tables) -> None:
    pattern = _leftover_pattern(live)
    names = [
        r["tablename"]
        for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
        if pattern.match(r["tablename"])
    ]
    for name in names:
        await conn.execute(f"DROP TABLE IF EXISTS {name}")


async def _create_for_load(conn: asyncpg.Connection, t: Tables) -> None:
    """The rebuild tables as each read model makes them for the bulk load
    (`tables(load=True)`): no secondary index, and no key the load does without (the
    `BulkRows` sink reads no table back and COPYs into them; a sorted build afterwards
    costs less than one index insertion per row)."""
    async with conn.transaction():
        for statement in load_ddl(t):
            await conn.execute(statement)


async def build_keys_and_indexes(dsn: str, t: Tables) -> None:
    """What the load went without, built at once on `INDEX_SESSIONS` sessions
    (`INDEX_SETTINGS`), each taking the first job it may start (`_index_jobs`): a
    table's keys (adding a primary key locks its table), then, once they are built,
    each of its secondary indexes (a table's build side by side), then, once those are
    built, its ANALYZE (which waits for any index build of its table); the larger
    tables' first. So while one session builds the history's key, the other builds
    the task list's key and indexes instead of waiting.
    (The benchmark's COPY ceiling builds its tables' the same way.)"""
    sessions = [await asyncpg.connect(dsn, server_settings=INDEX_SETTINGS)
                for _ in range(INDEX_SESSIONS)]
    jobs = _index_jobs(t)
    keyed: set[str] = set()  # tables whose keys are built
    indexing = {job.table: sum(1 for j in jobs if j.table == job.table and j.kind == "index")
                for job in jobs}  # index builds of each table not yet done
    changed = asyncio.Condition()

    def may_start(job: _IndexJob) -> bool:
        return (job.kind == "keys" or job.table in keyed
                and (job.kind == "index" or indexing[job.table] == 0))

    async def run(session: asyncpg.Connection) -> None:
        while True:
            async with changed:
                while jobs and (job := next((j for j in jobs if may_start(j)), None)) is None:
                    await changed.wait()
                if not jobs:
                    return
                jobs.remove(job)
            for statement in job.statements:
                await session.execute(statement)
            async with changed:
                if job.kind == "keys":
                    keyed.add(job.table)
                elif job.kind == "index":
                    indexing[job.table] -= 1
                changed.notify_all()

    builds = [asyncio.ensure_future(run(s)) for s in sessions]
    try:
        await asyncio.gather(*builds)
    finally:
        for build in builds:  # one failed: the others stop too
            build.cancel()
        for session in sessions:
            session.terminate() if session.is_in_transaction() else await session.close()


class _IndexJob(NamedTuple):
    table: str
    kind: Literal["keys", "index", "analyze"]
    statements: list[str]


def _index_jobs(t: Tables) -> list[_IndexJob]:
    """The jobs in the order they are taken: every table's keys, then each secondary
    index, then each ANALYZE; the models in reverse (the larger tables last in the
    manifest: the history before the task list)."""
    models = list(reversed(READ_MODELS))
    return [
        *(_IndexJob(getattr(t, m.TABLE), "keys", m.keys(t)) for m in models),
        *(_IndexJob(getattr(t, m.TABLE), "index", [s]) for m in models for s in m.indexes(t)),
        *(_IndexJob(getattr(t, m.TABLE), "analyze", [f"ANALYZE {getattr(t, m.TABLE)}"])
          for m in models),
    ]


async def _truncate_live(conn: asyncpg.Connection, live: Tables) -> None:
    """--in-place: empty the live tables and zero their checkpoint, atomically."""
    await ensure_checkpoint(conn, live)
    zero = Tables(checkpoints="replay_zero_checkpoints")
    async with conn.transaction():
        await cp.lock_checkpoint(conn, live)
        await conn.execute(
            f"CREATE TEMP TABLE {zero.checkpoints}"
            f" (LIKE {live.checkpoints} INCLUDING ALL) ON COMMIT DROP"
        )
        await ensure_checkpoint(conn, zero)
        await cp.copy_checkpoint(conn, zero, live)
        await conn.execute(f"TRUNCATE {', '.join(table_names(live))}")


async def _reachable(conn: asyncpg.Connection) -> Position:
    """The last event committed so far: a drain started now gets at least this far."""
    async with conn.transaction():
        return await cp.head_below(conn, await safe_bound(conn))


async def check_rebuild(
    conn: asyncpg.Connection,
    t: Tables,
    fold: FoldProcess,
    users: Literal["all", "touched"],
    also: Iterable[str] = (),
    summing: asyncpg.Connection | None = None,
) -> list[str] | None:
    """Fold the events up to `t`'s checkpoint and compare: every user, or those whose
    events this fold step covered plus `also`; the users checked (None: all). With
    `summing`, the tables are summed there meanwhile (it must see what `conn` wrote)."""
    position = await cp.read_checkpoint(conn, t)
    assert position is not None
    if summing is None:
        checked, expected, problems = await fold.check(position, users, also)
        actual = await summarise(conn, t, checked)
    else:
        assert users == "all"
        (checked, expected, problems), actual = await asyncio.gather(
            fold.check(position, users), summarise(summing, t, None))
    differing = compare(expected, actual)
    if differing or problems:
        raise VerificationFailed(differing, problems)
    return checked


async def _wait_for_old_transactions(conn: asyncpg.Connection) -> None:
    """A transaction whose snapshot predates the rebuild could read the new tables as
    empty after the switch; give any such reader a bounded time to finish first."""
    deadline = time.monotonic() + OLD_TRANSACTION_WAIT
    since = await conn.fetchval("SELECT now()")
    while time.monotonic() < deadline:
        old = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND backend_xmin IS NOT NULL AND xact_start < $1"
            " AND xact_start < now() - interval '1 second'",
            since,
        )
        if not old:
            return
        await asyncio.sleep(0.2)


async def _switch(
    conn: asyncpg.Connection,
    live: Tables,
    target: Tables,
    fold: FoldProcess,
    progress: ReplayCounter,
    projection: str,
    version: int,
    in_place: bool,
    batch_size: int,
) -> None:
    await ensure_checkpoint(conn, live)
    # Users checked in an attempt that then rolled back: their rows were written again.
    rolled_back: set[str] = set()
    for attempt in range(1, SWITCH_ATTEMPTS + 1):
        checked: list[str] | None = []
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{SWITCH_LOCK_TIMEOUT}'")
                await cp.lock_checkpoint(conn, live)  # the live projector waits from here
                before = progress.done
                await _drain(conn, target, batch_size, progress)
                if in_place:
                    await check_rebuild(conn, target, fold, "all")
                    return
                if progress.done > before or rolled_back:
                    checked = await check_rebuild(conn, target, fold, "touched", rolled_back)
                for name, new in zip(table_names(live), table_names(target), strict=True):
                    await _copy_privileges(conn, name, new)
                    await _copy_row_security(conn, name, new)
                    await _rename(conn, name, f"{name}_old_{version}")
                    await _rename(conn, new, name)
                await cp.copy_checkpoint(conn, target, live)
                await conn.execute(RECORD_VERSION, projection, version, progress.done)
                position = await cp.read_checkpoint(conn, live)
                await conn.execute(f"SELECT pg_notify('{ADVANCED_CHANNEL}', $1)", str(position))
            return
        except asyncpg.exceptions.LockNotAvailableError:
            if attempt == SWITCH_ATTEMPTS:
                raise
            rolled_back.update(checked or ())
            await asyncio.sleep(0.5 * attempt)


async def _copy_privileges(conn: asyncpg.Connection, live: str, new: str) -> None:
    """Grant on the rebuilt table what was granted on the live one (a read-only role the
    query API connects as must keep reading after the switch)."""
    for r in await conn.fetch(
        "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC'"
        " ELSE quote_ident(pg_get_userbyid(a.grantee)) END AS grantee,"
        " a.privilege_type, a.is_grantable"
        " FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a"
        " WHERE c.oid = $1::regclass AND a.grantee <> c.relowner",
        live,
    ):
        option = " WITH GRANT OPTION" if r["is_grantable"] else ""
        await conn.execute(f"GRANT {r['privilege_type']} ON {new} TO {r['grantee']}{option}")


async def _copy_row_security(conn: asyncpg.Connection, live: str, new: str) -> None:
    """Give the rebuilt table the live one's row-level security (enabled, forced) and
    its policies, in the switch's transaction: a role the policies limit (the query
    API's, `taskctl db init`) must never see the new table unlimited, nor empty."""
    flags = await conn.fetchrow(
        "SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = $1::regclass", live)
    if flags["relrowsecurity"]:
        await conn.execute(f"ALTER TABLE {new} ENABLE ROW LEVEL SECURITY")
    if flags["relforcerowsecurity"]:
        await conn.execute(f"ALTER TABLE {new} FORCE ROW LEVEL SECURITY")
    for p in await conn.fetch(
        "SELECT quote_ident(p.polname) AS name,"
        " CASE WHEN p.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END AS kind,"
        " CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'"
        "  WHEN 'd' THEN 'DELETE' ELSE 'ALL' END AS cmd,"
        " (SELECT string_agg(CASE WHEN r = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r))"
        "  END, ', ') FROM unnest(p.polroles) r) AS roles,"
        " pg_get_expr(p.polqual, p.polrelid) AS qual,"
        " pg_get_expr(p.polwithcheck, p.polrelid) AS with_check"
        " FROM pg_policy p WHERE p.polrelid = $1::regclass ORDER BY p.polname",
        live,
    ):
        statement = (f"CREATE POLICY {p['name']} ON {new} AS {p['kind']} FOR {p['cmd']}"
                     f" TO {p['roles']}")
        if p["qual"] is not None:
            statement += f" USING ({p['qual']})"
        if p["with_check"] is not None:
            statement += f" WITH CHECK ({p['with_check']})"
        await conn.execute(statement)


async def _rename(conn: asyncpg.Connection, old: str, new: str) -> None:
    """Rename a table, the indexes named after it (primary key included) and its other
    constraints named after it (checks; from PostgreSQL 18 also its NOT NULLs, which
    it names `<table>_<column>_not_null`)."""
    for r in await conn.fetch(
        "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND tablename = $1",
        old,
    ):
        name = r["indexname"]
        if name.startswith(old):
            await conn.execute(f"ALTER INDEX {name} RENAME TO {new}{name[len(old):]}")
    for r in await conn.fetch(  # an index's constraint went with its index, above
        "SELECT conname FROM pg_constraint WHERE conrelid = $1::regclass AND conindid = 0",
        old,
    ):
        name = r["conname"]
        if name.startswith(old):
            await conn.execute(
                f"ALTER TABLE {old} RENAME CONSTRAINT {name} TO {new}{name[len(old):]}")
    await conn.execute(f"ALTER TABLE {old} RENAME TO {new}")
