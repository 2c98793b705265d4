"""The live projector's lease: which process may write a projection's read tables, kept
alive by a heartbeat, taken over when it lapses, and fenced by an epoch.

A session advisory lock (`shared.catalog.projector_lock`) queues the projectors: one
holds it, the others wait on it. A projector that dies (crash, SIGKILL, lost
connection) loses it at once and the next one takes over within milliseconds. A hung
one (SIGSTOP, a frozen VM, a blocked event loop) keeps its TCP connection, so the lock
alone would be held forever. Hence the lease, a row of `projector_leases` per projection:

- **Take over** (`take_over`, by the process that has just got the advisory lock, in one
  transaction): end every backend the previous lease recorded (`pg_terminate_backend`:
  its open batch rolls back, its locks go), lock the checkpoint row, and write a new
  `epoch` (one more than any before) into the lease AND the checkpoint row, with this
  process as the holder, its two backends (pid and start time), and
  `expires_at = clock_timestamp() + lease`, by the database's clock, never a process's.
- **Heartbeat** (`keep`): the holder renews every `heartbeat` seconds
  (`expires_at = now() + lease` where the epoch is still its own). No row renewed (a
  newer epoch), or no renewal within its lease by its own monotonic clock (it was
  stopped, or the database did not answer): `LeaseLost`, and it stops projecting.
- **Fence a hung holder** (`fence_lapsed`, by each standby every `heartbeat` seconds
  while it waits on the advisory lock): when the lease has lapsed by the database's
  clock, end the backends it records. The hung holder's advisory lock goes with its
  session, so the standby's wait returns and it takes over as above.
- **Every batch is fenced** (`projections.projector.step` with `epoch`): it locks the
  checkpoint row, refuses if the row's epoch is not its own, and saves the checkpoint
  with `... WHERE projection = $1 AND epoch = $2`; no row: `LeaseLost`, rolled back. A
  takeover changes the epoch under that same row lock, so a batch commits either before
  the takeover (while its holder still held the lease) or not at all: even a holder
  whose backends could not be ended, that wakes up later, commits nothing.

Bounds (settings `PROJECTOR_LEASE_SECONDS`, default 10, and
`PROJECTOR_HEARTBEAT_SECONDS`, default 2, at most half the lease): a hung holder's
lease lapses between `lease - heartbeat` and `lease` seconds after it hung, a standby
sees it within `heartbeat` more and ends its backends within `TERMINATE_WAIT` (1 s): a
takeover within `lease + heartbeat + 1` seconds (13 s by default). A projector that lost
its lease, or whose heartbeat failed, becomes a standby again (it does not exit): it
reconnects and waits on the advisory lock like any other.

Ending another backend needs the same role (or `pg_signal_backend`): run every
projector of a database as the same role (`taskservice_projector`, docs/operations.md).
A standby that may not end them says so in its log, every heartbeat; the epoch fence
still holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from shared.catalog import CHECKPOINTS_TABLE, LEASES_TABLE
from shared.settings import Settings

log = logging.getLogger("projections.lease")

# The checkpoint row's column that fences batches (never copied by a replay's switch:
# `projections.checkpoints.copy_checkpoint`).
EPOCH_COLUMN = "epoch"
# How long a takeover waits for each backend it ends to be gone (milliseconds).
TERMINATE_WAIT_MS = 1000

# Run by `taskctl db init` (idempotent; an existing database gets the table and the
# checkpoint's column, epoch 0: the first takeover makes it 1).
LEASE_DDL = (
    f"CREATE TABLE IF NOT EXISTS {LEASES_TABLE} ("
    " projection text PRIMARY KEY, epoch bigint NOT NULL DEFAULT 0, holder text,"
    " backends integer[] NOT NULL DEFAULT '{}',"
    " backend_starts timestamptz[] NOT NULL DEFAULT '{}',"
    " acquired_at timestamptz, renewed_at timestamptz, expires_at timestamptz)",
    f"ALTER TABLE {CHECKPOINTS_TABLE} ADD COLUMN IF NOT EXISTS {EPOCH_COLUMN}"
    " bigint NOT NULL DEFAULT 0",
)

ENSURE_LEASE = (
    f"INSERT INTO {LEASES_TABLE} (projection) VALUES ($1) ON CONFLICT (projection) DO NOTHING"
)
LOCK_LEASE = f"SELECT epoch, holder FROM {LEASES_TABLE} WHERE projection = $1 FOR UPDATE"
# The backends a lease records that still run (the same pid AND start time: a reused
# pid is another backend), never the caller's ($2).
RECORDED_ALIVE = (
    f"SELECT h.pid, l.holder, l.epoch, extract(epoch FROM now() - l.expires_at) AS lapsed"
    f" FROM {LEASES_TABLE} l"
    " CROSS JOIN LATERAL unnest(l.backends, l.backend_starts) AS h(pid, started)"
    " JOIN pg_stat_activity a ON a.pid = h.pid AND a.backend_start = h.started"
    " WHERE l.projection = $1 AND h.pid <> ALL($2::int[])"
)
TERMINATE = (
    f"SELECT r.pid, r.holder, r.epoch, r.lapsed,"
    f" pg_terminate_backend(r.pid, {TERMINATE_WAIT_MS}) AS ended FROM ({{alive}}) r"
)
TERMINATE_RECORDED = TERMINATE.format(alive=RECORDED_ALIVE)
TERMINATE_LAPSED = TERMINATE.format(alive=RECORDED_ALIVE + " AND l.expires_at <= now()")
MY_BACKENDS = "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = ANY($1::int[])"
LOCK_CHECKPOINT_EPOCH = (
    f"SELECT {EPOCH_COLUMN} FROM {CHECKPOINTS_TABLE} WHERE projection = $1 FOR UPDATE"
)
# Inside the takeover transaction, whose now() is its start: it may have waited on the
# checkpoint row, so the lease runs from clock_timestamp() (the database's clock too).
GRANT = (
    f"UPDATE {LEASES_TABLE} SET epoch = $2, holder = $3, backends = $4::int[],"
    " backend_starts = $5::timestamptz[], acquired_at = clock_timestamp(),"
    " renewed_at = clock_timestamp(),"
    " expires_at = clock_timestamp() + make_interval(secs => $6::float8)"
    " WHERE projection = $1"
)
SET_CHECKPOINT_EPOCH = (
    f"UPDATE {CHECKPOINTS_TABLE} SET {EPOCH_COLUMN} = $2 WHERE projection = $1"
)
RENEW = (
    f"UPDATE {LEASES_TABLE} SET renewed_at = now(),"
    " expires_at = now() + make_interval(secs => $3::float8)"
    " WHERE projection = $1 AND epoch = $2 RETURNING expires_at"
)
RELEASE = (
    f"UPDATE {LEASES_TABLE} SET expires_at = now() WHERE projection = $1 AND epoch = $2"
)
STATUS = (
    f"SELECT l.epoch, l.holder, l.backends, l.acquired_at, l.renewed_at,"
    " extract(epoch FROM l.expires_at - now()) AS expires_in,"
    f" (SELECT c.{EPOCH_COLUMN} FROM {CHECKPOINTS_TABLE} c WHERE c.projection = l.projection)"
    f" AS checkpoint_epoch FROM {LEASES_TABLE} l WHERE l.projection = $1"
)


class LeaseLost(Exception):
    """This projector may no longer write: another took over (a newer epoch), or it
    could not renew its lease in time. It stops projecting and stands by."""


def _default(name: str) -> float:
    value = Settings.model_fields[name].default
    assert isinstance(value, float)
    return value


@dataclass(frozen=True)
class LeaseTimes:
    """Seconds: how long a lease lasts unrenewed, and how often the holder renews it
    (and each standby looks at it)."""

    lease: float = field(default_factory=lambda: _default("projector_lease_seconds"))
    heartbeat: float = field(default_factory=lambda: _default("projector_heartbeat_seconds"))

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat * 2 <= self.lease:
            raise ValueError(f"heartbeat {self.heartbeat}s must be at most half the lease"
                             f" {self.lease}s")

    @classmethod
    def from_settings(cls, settings: Settings) -> LeaseTimes:
        return cls(settings.projector_lease_seconds, settings.projector_heartbeat_seconds)

    @property
    def takeover(self) -> float:
        """The longest a hung holder goes unreplaced (seconds)."""
        return self.lease + self.heartbeat + TERMINATE_WAIT_MS / 1000


def holder_name() -> str:
    """This process, as the lease names it: host, pid and a random part (a restarted
    process, or one in another container with the same pid, is another holder)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Lease:
    """A lease this process holds. `deadline` is by this process's monotonic clock:
    the database's `expires_at` is never earlier (each renewal starts the clock before
    the statement is sent)."""

    projection: str
    holder: str
    epoch: int
    times: LeaseTimes
    deadline: float

    def check(self) -> None:
        """`LeaseLost` if the lease may have lapsed (e.g. this process was stopped)."""
        late = time.monotonic() - self.deadline
        if late >= 0:
            raise LeaseLost(f"lease of epoch {self.epoch} not renewed within"
                            f" {self.times.lease:g}s ({late:.1f}s late)")


async def take_over(
    conn: asyncpg.Connection,
    projection: str,
    holder: str,
    times: LeaseTimes,
    backends: Sequence[int],
) -> Lease:
    """Make this process the holder, with a new epoch (one transaction on `conn`,
    whose session holds the advisory lock). `backends`: this process's other backend
    pids (the one projecting); the lease records them and `conn`'s own. Every backend
    the previous lease recorded is ended first. The checkpoint row must exist."""
    mine = [conn.get_server_pid(), *backends]
    async with conn.transaction():
        # Bounded: a row lock held by a backend this cannot end (LockNotAvailableError:
        # the projector reconnects and tries again).
        await conn.execute(f"SET LOCAL lock_timeout = '{int(times.lease * 1000)}ms'")
        await conn.execute(ENSURE_LEASE, projection)
        before = await conn.fetchrow(LOCK_LEASE, projection)
        assert before is not None
        await _terminate(conn, TERMINATE_RECORDED, projection, mine)
        checkpoint_epoch = await conn.fetchval(LOCK_CHECKPOINT_EPOCH, projection)
        if checkpoint_epoch is None:
            raise RuntimeError(f"no checkpoint row {projection!r}: run ensure_checkpoint first")
        epoch = max(int(before["epoch"]), int(checkpoint_epoch)) + 1
        started = {r["pid"]: r["backend_start"] for r in await conn.fetch(MY_BACKENDS, mine)}
        starts: list[datetime] = [started[pid] for pid in mine]
        clock = time.monotonic()
        await conn.execute(GRANT, projection, epoch, holder, mine, starts, times.lease)
        await conn.execute(SET_CHECKPOINT_EPOCH, projection, epoch)
    if before["holder"] is not None:
        log.info("took over projection %s from %s (epoch %d -> %d)", projection,
                 before["holder"], before["epoch"], epoch,
                 extra={"epoch": epoch, "previous_holder": before["holder"]})
    return Lease(projection, holder, epoch, times, clock + times.lease)


async def fence_lapsed(conn: asyncpg.Connection, projection: str) -> list[int]:
    """A standby's look at the lease: if it has lapsed (by the database's clock), end
    the backends it records (the hung holder's advisory lock goes with them). The pids
    ended."""
    return await _terminate(conn, TERMINATE_LAPSED, projection, [conn.get_server_pid()])


async def _terminate(
    conn: asyncpg.Connection, query: str, projection: str, spare: list[int]
) -> list[int]:
    try:
        async with conn.transaction():  # a savepoint inside take_over's transaction
            rows = await conn.fetch(query, projection, spare)
    except asyncpg.exceptions.InsufficientPrivilegeError as e:
        log.error("cannot end the backends of projection %s's previous lease holder (%s):"
                  " run every projector as the same database role; batches stay fenced"
                  " by the checkpoint's epoch", projection, e)
        return []
    if rows:
        first = rows[0]
        lapsed = first["lapsed"]
        log.warning(
            "ended backends %s of projector %s (lease epoch %d%s)",
            [r["pid"] for r in rows], first["holder"], first["epoch"],
            "" if lapsed is None or lapsed < 0 else f", lapsed {float(lapsed):.1f}s ago",
            extra={"backends": [r["pid"] for r in rows], "epoch": first["epoch"]},
        )
    return [r["pid"] for r in rows if r["ended"]]


async def renew(conn: asyncpg.Connection, lease: Lease) -> None:
    """One heartbeat: the lease runs `lease` seconds more, or `LeaseLost`."""
    lease.check()
    started = time.monotonic()
    try:
        renewed = await conn.fetchval(RENEW, lease.projection, lease.epoch, lease.times.lease,
                                      timeout=max(0.001, lease.deadline - started))
    except TimeoutError:
        raise LeaseLost(f"lease of epoch {lease.epoch}: no renewal within"
                        f" {lease.times.lease:g}s") from None
    if renewed is None:
        raise LeaseLost(f"another projector took over (lease epoch {lease.epoch} is not"
                        " the newest)")
    lease.deadline = started + lease.times.lease


async def keep(conn: asyncpg.Connection, lease: Lease) -> None:
    """Renew the lease every heartbeat until cancelled; raises `LeaseLost` (or the
    connection's error) when it cannot."""
    while True:
        await asyncio.sleep(lease.times.heartbeat)
        await renew(conn, lease)


async def release(conn: asyncpg.Connection, lease: Lease) -> None:
    """On a clean stop: the lease lapses now (a standby's takeover needs no wait)."""
    await conn.execute(RELEASE, lease.projection, lease.epoch, timeout=1.0)


async def status(conn: asyncpg.Connection, projection: str) -> dict[str, Any] | None:
    """The lease as `taskctl projections status` shows it; None without one (or
    before `db init` made the table)."""
    if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", LEASES_TABLE):
        return None
    row = await conn.fetchrow(STATUS, projection)
    if row is None or row["holder"] is None or row["expires_in"] is None:
        return None
    expires_in = float(row["expires_in"])
    return {
        "holder": row["holder"],
        "epoch": int(row["epoch"]),
        "checkpoint_epoch": None if row["checkpoint_epoch"] is None
        else int(row["checkpoint_epoch"]),
        "backends": list(row["backends"]),
        "acquired_at": row["acquired_at"].isoformat(),
        "renewed_at": row["renewed_at"].isoformat(),
        "expires_in_seconds": round(expires_in, 3),
        "lapsed": expires_in <= 0,
    }
