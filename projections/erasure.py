"""`taskctl users forget USER`: erase a user (crypto-shredding) without touching an event.

Their events stay in the append-only store, every personal field sealed with one of
their data keys (`shared.datakeys`). One transaction deletes those keys, and with them
every row of theirs the read tables, any leftover replay tables and the
Idempotency-Keys hold; then the touched tables are vacuumed, so no dead row version
keeps a copy. Afterwards the projector, the replay, the verification and the audit read
their events as erased (no key opens them) and apply them to no read model: nothing of
theirs comes back, and a later command of the same user id starts with a new key.

Serialised with what could write their rows again: the transaction takes the replay's
lock (a replay running now holds rows of theirs in memory: the erasure waits for none
and says so) and the live checkpoint row (the projector's batch in hand commits first;
its next one reads the keys again and finds them gone). Every append of the command
API checks its key in its statement: one after the erasure finds it gone and decides
again (with a new key); one already in flight is erased with the rest.

Events stored before sealing existed hold their fields in plaintext: an erasure
cannot remove those without rewriting events, so a user who has any is refused (exit
status 4) and the report says how many (docs/privacy.md, "Events stored before
sealing").
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from dataclasses import asdict, dataclass, field

import asyncpg

from projections.manifest import PROJECTIONS, table_names
from shared.catalog import EVENTS_TABLE, IDEMPOTENCY_TABLE, LIVE, PROJECTION, replay_lock
from shared.datakeys import DATA_KEYS_TABLE, SEALED_PATTERN
from shared.events import state_sql

EXIT_DONE, EXIT_BUSY, EXIT_LEGACY = 0, 3, 4

# The user's tasks (their creations, found by owner) and how many of them were stored
# before sealing (a plaintext title). A full scan: erasures are rare.
_COUNT_TASKS = (
    "SELECT count(*), count(*) FILTER (WHERE s ->> 'title' !~ $2)"
    f" FROM (SELECT {state_sql('e')} AS s FROM {EVENTS_TABLE} e"
    " WHERE e.originator_version = 1) c WHERE s ->> 'owner' = $1"
)
_COUNT_EVENTS = (
    f"SELECT count(*) FROM {EVENTS_TABLE} e WHERE e.originator_id IN ("
    f"SELECT c.originator_id FROM {EVENTS_TABLE} c WHERE c.originator_version = 1"
    f" AND {state_sql('c')} ->> 'owner' = $1)"
)
_TRY_REPLAY_LOCK = "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))"
_LOCK_CHECKPOINT = "SELECT 1 FROM {checkpoints} WHERE projection = $1 FOR UPDATE"
_DELETE_KEYS = f"DELETE FROM {DATA_KEYS_TABLE} WHERE user_id = $1"
_DELETE_ROWS = "DELETE FROM {table} WHERE user_id = $1"
# Tables an interrupted replay left (`rebuild_*_<n>`, `read_*_old_<n>`): the next
# replay drops them, but until then they may hold the user's rows.
_LEFTOVERS = (
    "SELECT c.relname FROM pg_class c WHERE c.relkind = 'r'"
    " AND c.relnamespace = current_schema()::regnamespace AND c.relname ~ $1"
    " AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid"
    " AND a.attname = 'user_id' AND NOT a.attisdropped) ORDER BY c.relname"
)


@dataclass
class Erasure:
    user: str
    erased: bool = False
    tasks: int = 0
    events_kept: int = 0
    legacy_tasks: int = 0
    keys_deleted: int = 0
    rows_deleted: dict[str, int] = field(default_factory=dict)
    idempotency_keys_deleted: int = 0
    vacuumed: list[str] = field(default_factory=list)
    problem: str | None = None

    def lines(self) -> list[str]:
        if self.problem is not None:
            return [f"taskctl users forget: {self.problem}"]
        rows = ", ".join(f"{n:,} from {t}" for t, n in self.rows_deleted.items() if n) or "none"
        return [
            f"forgot user {self.user!r}: {self.keys_deleted} data key(s) deleted;"
            f" rows deleted: {rows}; {self.idempotency_keys_deleted} Idempotency-Key(s)"
            " deleted",
            f"{self.events_kept:,} event(s) of their {self.tasks:,} task(s) kept, sealed:"
            " the audit shows them as erased; vacuumed " + (", ".join(self.vacuumed) or "-"),
        ]


def _leftover_regex() -> str:
    names = table_names(LIVE)
    rebuilt = "|".join(re.escape(n.removeprefix("read_")) for n in names)
    old = "|".join(re.escape(n) for n in names)
    return rf"^(rebuild_({rebuilt})|({old})_old)_[0-9]+$"


async def forget(dsn: str, user: str, *, vacuum: bool = True) -> tuple[int, Erasure]:
    """Erase `user`: (exit status, what was done)."""
    report = Erasure(user)
    conn = await asyncpg.connect(dsn)
    try:
        report.tasks, report.legacy_tasks = await conn.fetchrow(_COUNT_TASKS, user, SEALED_PATTERN)
        if report.legacy_tasks:
            report.problem = (
                f"user {user!r} has {report.legacy_tasks:,} task(s) stored before sealing"
                " (their title and description are plaintext in the append-only event store):"
                " not forgettable without the repair procedure (docs/privacy.md, 'Events"
                " stored before sealing'). Nothing was changed.")
            return EXIT_LEGACY, report
        report.events_kept = await conn.fetchval(_COUNT_EVENTS, user)
        tables = table_names(PROJECTIONS[PROJECTION])
        async with conn.transaction():
            if not await conn.fetchval(_TRY_REPLAY_LOCK, replay_lock(PROJECTION)):
                report.problem = ("a replay is running (it holds rows in memory that it would"
                                  " write back): run this again once it is done. Nothing was"
                                  " changed.")
                return EXIT_BUSY, report
            await conn.fetchval(_LOCK_CHECKPOINT.format(checkpoints=LIVE.checkpoints), PROJECTION)
            status = await conn.execute(_DELETE_KEYS, user)
            report.keys_deleted = int(status.rsplit(" ", 1)[-1])
            leftovers = [r[0] for r in await conn.fetch(_LEFTOVERS, _leftover_regex())]
            for table in [*tables, *leftovers]:
                status = await conn.execute(_DELETE_ROWS.format(table=table), user)
                report.rows_deleted[table] = int(status.rsplit(" ", 1)[-1])
            status = await conn.execute(_DELETE_ROWS.format(table=IDEMPOTENCY_TABLE), user)
            report.idempotency_keys_deleted = int(status.rsplit(" ", 1)[-1])
        report.erased = True
        if vacuum:  # no dead row version of theirs left for a page to show
            for table in [t for t, n in report.rows_deleted.items() if n] + (
                    [IDEMPOTENCY_TABLE] if report.idempotency_keys_deleted else []):
                await conn.execute(f"VACUUM (INDEX_CLEANUP ON) {table}")
                report.vacuumed.append(table)
    finally:
        await conn.close()
    return EXIT_DONE, report


def forget_main(dsn: str, user: str, *, as_json: bool = False, vacuum: bool = True) -> int:
    status, report = asyncio.run(forget(dsn, user, vacuum=vacuum))
    if as_json:
        print(json.dumps(asdict(report)))
    else:
        out = sys.stdout if status == EXIT_DONE else sys.stderr
        for line in report.lines():
            print(line, file=out)
    return status
