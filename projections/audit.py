"""`taskctl audit` and `taskctl export`: the event store itself, not the read tables.

Events stream from a server-side cursor in the store's event order (see
`projections.projector`), so any number of events needs a page of memory.
Stored events are read through `shared.events`, in Python and in SQL. `--verify`
checks the store (each task's versions run 1, 2, 3... without a gap; every event names
its actor) and that the history read table agrees with it for every task, folding the
events independently (`projections.verify`) in one snapshot with the checkpoint.

It also prints a digest of the event store: SHA-256 over every event up to a sealed
position (one no event can ever land before again), each event's order, identity,
topic and stored bytes. The store only grows, so the digest of events up to a position
never changes; given one recorded earlier (`--expect-digest`), `--verify` fails when it
differs: an event before it was rewritten, removed or slipped in, which only the tables'
owner (or a superuser) can do (docs/operations-append-only.md, "What the owner can still
do").
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO
from uuid import UUID

import asyncpg

from projections import checkpoints as cp
from projections.verify import MASK, Fold, row_hash
from shared.catalog import EVENTS_TABLE, LIVE, Tables
from shared.datakeys import KeyRing, is_sealed, ring_for, sealed_key_id
from shared.events import (
    UndecodableEvent,
    actor_sql,
    decode_event,
    occurred_at_sql,
    owner_sql,
    read_state,
    state_sql,
)
from shared.position import Position

PAGE = 2_000
_SELECT = (
    "SELECT * FROM (SELECT e.notification_id, e.tx_id::text AS tx_id, e.originator_id,"
    " e.originator_version, e.topic, e.state,"
    f" {owner_sql(EVENTS_TABLE, 'e')} AS owner, {state_sql('e')} AS j,"
    # The task's title as created: sealed with the key all its events stand or fall by.
    f" (SELECT {state_sql('c')} ->> 'title' FROM {EVENTS_TABLE} c"
    "  WHERE c.originator_id = e.originator_id AND c.originator_version = 1) AS created_title"
    f" FROM {EVENTS_TABLE} e{{inner}}) x{{outer}} ORDER BY x.tx_id::xid8, x.notification_id"
)


@dataclass
class Filters:
    user: str | None = None  # the task's owner OR the event's actor
    owner: str | None = None  # the task's owner only (export)
    task: UUID | None = None
    since: datetime | None = None
    until: datetime | None = None
    types: list[str] = field(default_factory=list)

    def sql(self) -> tuple[str, list[Any]]:
        inner: list[str] = []
        outer: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if self.task is not None:
            inner.append(f"e.originator_id = {arg(self.task)}")
        if self.types:
            inner.append(f"e.topic = ANY({arg(self.types)}::text[])")
        if self.user is not None:
            p = arg(self.user)
            outer.append(f"(x.owner = {p} OR {actor_sql('x.j')} = {p})")
        if self.owner is not None:
            outer.append(f"x.owner = {arg(self.owner)}")
        when = occurred_at_sql("x.j")
        if self.since is not None:
            outer.append(f"{when} >= {arg(self.since)}")
        if self.until is not None:
            outer.append(f"{when} < {arg(self.until)}")
        text = _SELECT.format(
            inner=" WHERE " + " AND ".join(inner) if inner else "",
            outer=" WHERE " + " AND ".join(outer) if outer else "",
        )
        return text, args


def _record(row: asyncpg.Record, ring: KeyRing) -> dict[str, Any]:
    event = decode_event(row["notification_id"], row["originator_id"],
                         row["originator_version"], row["topic"], row["state"])
    # Sealed fields opened; an erased event (its owner forgotten: the key its task was
    # created with is gone) shows them as null.
    created = row["created_title"]
    erased = not ring.open_data(event.data) or (
        is_sealed(created) and sealed_key_id(created) not in ring.keys)
    return {
        "position": str(Position(int(row["tx_id"]), row["notification_id"])),
        "occurred_at": event.timestamp.astimezone(UTC).isoformat(),
        "type": event.topic,
        "task_id": str(event.task_id),
        "version": event.version,
        "owner": row["owner"],
        "actor": event.actor,
        "request_id": event.request_id,
        "data": {k: _plain(v) for k, v in event.data.items() if k != "owner"},
        "erased": erased,
    }


def _plain(value: Any) -> Any:
    """A field as JSON shows it: a date-time (a due date) in ISO 8601, UTC."""
    return value.astimezone(UTC).isoformat() if isinstance(value, datetime) else value


async def stream(dsn: str, filters: Filters) -> AsyncIterator[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        sql, args = filters.sql()
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            ring = await ring_for(conn)
            await ring.load_all(conn)
            async for row in conn.cursor(sql, *args, prefetch=PAGE):
                yield _record(row, ring)
    finally:
        await conn.close()


COLUMNS = ("position", "occurred_at", "type", "task_id", "version", "owner", "actor", "data")
WIDTHS = (14, 32, 22, 36, 7, 32, 32, 0)


def _cell(record: dict[str, Any], column: str) -> str:
    value = record[column]
    if column == "data":
        return json.dumps(value, ensure_ascii=False, default=str)
    return "-" if value is None else str(value)


async def _print(dsn: str, filters: Filters, as_json: bool, out: TextIO) -> int:
    count = 0
    if not as_json:
        out.write("  ".join(c.ljust(w) for c, w in zip(COLUMNS, WIDTHS)).rstrip() + "\n")
    async for record in stream(dsn, filters):
        if as_json:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            out.write("  ".join(_cell(record, c).ljust(w) for c, w in zip(COLUMNS, WIDTHS))
                      .rstrip() + "\n")
        count += 1
    if not as_json:
        out.write(f"({count} events)\n")
    return count


def _time(text: str | None) -> datetime | None:
    if text is None:
        return None
    value = datetime.fromisoformat(text)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def audit_main(dsn: str, args: argparse.Namespace) -> int:
    expected = getattr(args, "expect_digest", None)
    if args.verify or expected:
        try:
            expect = None if expected is None else parse_digest(expected)
        except ValueError as e:
            print(f"taskctl audit: {e}", file=sys.stderr)
            return 2
        report = asyncio.run(verify(dsn, expect=expect))
        for line in report.lines():
            print(line, file=sys.stdout if report.ok else sys.stderr)
        return 0 if report.ok else 1
    try:
        filters = Filters(
            user=args.user,
            task=UUID(args.task) if args.task else None,
            since=_time(args.since),
            until=_time(args.until),
            types=args.types or [],
        )
    except ValueError as e:
        print(f"taskctl audit: {e}", file=sys.stderr)
        return 2
    asyncio.run(_print(dsn, filters, args.json, sys.stdout))
    return 0


def export_main(dsn: str, user: str) -> int:
    """Every event of the user's own tasks (as owner), one JSON object per line."""
    asyncio.run(_print(dsn, Filters(owner=user), True, sys.stdout))
    return 0


# -- --verify --------------------------------------------------------------------------


# The first statement of the snapshot: every transaction below its xmin had ended when
# it was taken, so each of their events is in it, and no event can get an order before
# the last of them again (new transaction ids are higher). Cluster-wide, so a long
# transaction anywhere only makes the sealed prefix shorter.
SEALED_BOUND = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
_DIGEST = re.compile(r"^([0-9]+)\.([0-9]+):(?:sha256:)?([0-9a-f]{64})$")


def format_digest(position: Position, digest: str) -> str:
    """The token `--verify` prints and `--expect-digest` takes: `<position>:<sha256>`."""
    return f"{position}:{digest}"


def parse_digest(text: str) -> tuple[Position, str]:
    match = _DIGEST.match(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r} is not a digest as `taskctl audit --verify` prints it"
                         " (<position>:<64 hex digits>, e.g. 1234.56:9f86d0...)")
    return Position(int(match[1]), int(match[2])), match[3]


def _digest_update(digest: Any, tx: str, position: int, task_id: UUID, version: int,
                   topic: str, state: bytes) -> None:
    """One event into a digest: its order, identity and topic, then its stored bytes,
    length-prefixed (no two different events feed the same bytes)."""
    head = f"{tx}.{position} {task_id} {version} {topic} {len(state)}\n".encode()
    digest.update(head)
    digest.update(state)


@dataclass
class Report:
    events: int = 0
    tasks: int = 0
    position: str = ""
    gaps: list[str] = field(default_factory=list)
    no_actor: list[str] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)
    history: list[str] = field(default_factory=list)
    # The digest of every event up to `sealed`, and how many those are.
    sealed: Position | None = None
    sealed_events: int = 0
    digest: str = ""
    # `--expect-digest`: what was recorded, and a line when the store no longer matches.
    expected: tuple[Position, str] | None = None
    tampered: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.gaps or self.no_actor or self.undecodable or self.history
                    or self.tampered)

    def lines(self, limit: int = 50) -> list[str]:
        out = [f"checked {self.events:,} events of {self.tasks:,} tasks; history read table"
               f" at checkpoint {self.position}"]
        if self.sealed is not None:
            out.append(f"event store digest {format_digest(self.sealed, self.digest)}"
                       f" ({self.sealed_events:,} events up to position {self.sealed}); keep"
                       " it outside the database and pass it as --expect-digest next time")
        if self.expected is not None and not self.tampered:
            out.append(f"the {self.expected[0]} digest recorded earlier matches")
        for title, items in (("version gaps", self.gaps), ("events without an actor",
                             self.no_actor), ("undecodable events", self.undecodable),
                             ("history differs from the event store", self.history),
                             ("the event store differs from its recorded digest",
                              self.tampered)):
            if items:
                out.append(f"{title}: {len(items)}")
                out.extend(f"  {item}" for item in items[:limit])
        out.append("OK" if self.ok else "FAILED")
        return out


def _actor(state: bytes) -> str | None:
    try:
        actor = read_state(state).get("actor")
    except (ValueError, UnicodeDecodeError):
        return "?"  # not a JSON object: reported as undecodable
    return actor if isinstance(actor, str) and actor else None


async def verify(
    dsn: str, tables: Tables = LIVE, expect: tuple[Position, str] | None = None
) -> Report:
    """`expect`: a digest recorded earlier (`parse_digest`), checked against the store."""
    report = Report(expected=expect)
    fold = Fold()
    sealed_digest, expected_digest = hashlib.sha256(), hashlib.sha256()
    expected_events = 0
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            sealed = await cp.head_below(conn, int(await conn.fetchval(SEALED_BOUND)))
            report.sealed = sealed
            checkpoint = await cp.read_checkpoint(conn, tables)
            report.position = str(checkpoint)
            fold.ring = await ring_for(conn)
            await fold.ring.load_all(conn)
            last_task: UUID | None = None
            expected_version = 1
            async for row in conn.cursor(
                "SELECT notification_id, originator_id, originator_version, topic, state,"
                f" tx_id::text FROM {EVENTS_TABLE} ORDER BY originator_id, originator_version",
                prefetch=5_000,
            ):
                position, task_id, version, topic, state, tx = row
                report.events += 1
                at = Position(int(tx), position)
                if at <= sealed:
                    _digest_update(sealed_digest, tx, position, task_id, version, topic, state)
                    report.sealed_events += 1
                if expect is not None and at <= expect[0]:
                    _digest_update(expected_digest, tx, position, task_id, version, topic, state)
                    expected_events += 1
                if task_id != last_task:
                    last_task, expected_version = task_id, 1
                    report.tasks += 1
                if version != expected_version:
                    report.gaps.append(f"task {task_id}: version {version} where"
                                       f" {expected_version} was expected")
                expected_version = version + 1
                actor = _actor(state)
                if not actor:
                    report.no_actor.append(f"event {position} of task {task_id} version"
                                           f" {version} ({topic})")
                    continue
                try:
                    decode_event(position, task_id, version, topic, state)
                except UndecodableEvent as e:
                    report.undecodable.append(f"event {position} of task {task_id}: {e}")
                    continue
                if checkpoint is not None and Position(int(tx), position) <= checkpoint:
                    fold.fold(position, task_id, version, topic, state)
            actual: dict[UUID, list[int]] = {}
            async for r in conn.cursor(
                "SELECT task_id, user_id, position, version, event_type, actor, request_id,"
                f" occurred_at, changes FROM {tables.history}", prefetch=5_000,
            ):
                sums = actual.setdefault(r[0], [0, 0])
                sums[0] += 1
                sums[1] = (sums[1] + row_hash(r[1], r[2], r[0], *r[3:8], json.loads(r[8])))
                sums[1] &= MASK
    finally:
        await conn.close()
    report.digest = sealed_digest.hexdigest()
    if expect is not None and expected_digest.hexdigest() != expect[1]:
        report.tampered.append(
            f"the {expected_events:,} events up to position {expect[0]} no longer hash to the"
            f" digest recorded: an event before it was rewritten, removed or added (only the"
            " tables' owner or a superuser can: docs/operations-append-only.md)")
    for task_id in sorted(set(fold.task_history) | set(actual), key=str):
        want = fold.task_history.get(task_id, [0, 0])
        have = actual.get(task_id, [0, 0])
        if want != have:
            detail = ("rows differ in content" if want[0] == have[0]
                      else f"{have[0]} history rows, the event store says {want[0]}")
            report.history.append(f"task {task_id}: {detail}")
    report.history.extend(fold.problems)
    return report
