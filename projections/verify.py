"""An independent fold of the event store, to check read tables against.

Deliberately not the projector's code: it derives each read model's rows from the
README's rules, so a bug in a handler shows up as a difference instead of being
repeated (a new read model gets its expected rows here, by hand, and its entry in
`TABLE_SUMMARIES`). It takes the topics from `shared.events`; reading the stored rows
itself (`Fold.fold`), it parses their JSON with orjson, without the transcoding hook of
`shared.events.read_state`. Rows are compared per user as counts plus an
order-independent checksum (the sum of a 64-bit hash of each row's canonical text),
so neither side has to hold a table in memory or sort it. The tables' side is computed
by PostgreSQL (`summarise`: the same canonical text and hash, in SQL), so the replay can
fold the events in Python while the server sums the tables.

In the replay the fold is a `TaskFold`: task by task, a `Fold` of a page of tasks at a
time whose per-user sums are added up, so its memory does not grow with the store. Each
of the replay's loaders feeds one the events it has read, decoded and opened
(`TaskFold.observe`, `Fold.fold_event`: the same rules on the runner's decoding, so the
log is read and decoded once); their summaries seed a `FoldProcess`, a `TaskFold` in a
process of its own, which reads and folds every later event itself (the catch-up and
the switch). The replay counts the events its loaders read against the event store's
count, the one thing the shared read would otherwise leave unchecked. `taskctl replay
--in-place` and the audit read the log with `Fold.fold`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

import asyncpg
import orjson

from projections.checkpoints import AFTER, EVENT_KEY, EVENT_ORDER, EVENTS_UP_TO, args
from projections.child import Child, ChildFailed
from projections.manifest import READ_MODELS
from projections.task_list import DOC_SQL
from shared.catalog import EVENTS_TABLE, Tables
from shared.datakeys import KeyRing, ring_for
from shared.events import (
    COMPLETED,
    CREATED,
    DEFAULT_PRIORITY,
    DELETED,
    DESCRIPTION_CHANGED,
    DUE_DATE_CHANGED,
    PRIORITY_CHANGED,
    REOPENED,
    TAGS_CHANGED,
    TITLE_CHANGED,
    TaskEvent,
)
from shared.position import ZERO, Position

MASK = (1 << 64) - 1
PAGE = 10_000


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NULL = "\x01"
_json_string = json.JSONEncoder(ensure_ascii=False).encode


def row_hash(*parts: Any) -> int:
    """The first 64 bits of the MD5 of the row's canonical text (`ROW_HASH` in SQL)."""
    return _hash_text("\x1f".join(_canonical(p) for p in parts))


_md5 = hashlib.md5
_first_64_bits = struct.Struct(">Q").unpack_from  # of a digest, big-endian


def _hash_text(text: str) -> int:
    return _first_64_bits(_md5(text.encode()).digest())[0]  # type: ignore[no-any-return]


def _micros_since_epoch(at: datetime) -> int:
    """Whole microseconds from the epoch to `at` (from the timedelta's fields)."""
    d = at - EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def _scalar(value: str | bool | None) -> str:
    """A scalar as `_jsonb_text` writes it."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    return _json_string(value)


def _changed(name: str, old: str | bool | None, new: str | bool | None) -> str:
    """`_jsonb_text({name: {"from": old, "to": new}})`: "to" sorts first (shorter)."""
    return f'{{"{name}": {{"to": {_scalar(new)}, "from": {_scalar(old)}}}}}'


def _list(values: list[str] | tuple[str, ...] | None) -> str:
    """A list of strings (or null) as `_jsonb_text` writes it."""
    if values is None:
        return "null"
    return "[" + ", ".join(_json_string(v) for v in values) + "]"


def _canonical(value: Any) -> str:
    """A value as PostgreSQL writes it as text, timestamps as epoch microseconds."""
    if value is None:
        return NULL
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return str(_micros_since_epoch(value))
    if isinstance(value, dict):
        return _jsonb_text(value)
    return str(value)


def _jsonb_text(value: Any) -> str:
    """`value::jsonb::text`: keys by byte length then bytes, ", " and ": " between."""
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: (len(k.encode()), k.encode()))
        return "{" + ", ".join(f"{_json_string(k)}: {_jsonb_text(value[k])}" for k in keys) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_jsonb_text(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _json_string(value)
    return str(value)


def _micros(column: str) -> str:
    return f"(extract(epoch FROM {column}) * 1000000)::bigint::text"


# The SQL twin of `row_hash` over a row's columns, and the per-user sums of it.
ROW_HASH = "('x' || left(md5(concat_ws(chr(31), {columns})), 16))::bit(64)::bigint"
TASK_COLUMNS = ", ".join([
    "user_id", "task_id::text", "title", "coalesce(description, chr(1))", "completed::text",
    _micros("created_at"), _micros("updated_at"), "version::text", "position::text",
    "priority", "to_json(tags)::text", f"coalesce({_micros('due_date')}, chr(1))",
])
HISTORY_COLUMNS = ", ".join([
    "user_id", "position::text", "task_id::text", "version::text", "event_type", "actor",
    "request_id", _micros("occurred_at"), "changes::text",
])
SUMS = "SELECT user_id, count(*), sum({hash}) FROM {table}{where} GROUP BY user_id"
# Task rows whose stored `doc` (rendered by the projector in Python) is not what their
# columns render to in SQL: the two renderings are independent, so a stale or wrong
# document shows up here.
TASK_SUMS = (
    "SELECT user_id, count(*), sum({hash}), count(*) FILTER (WHERE doc IS DISTINCT FROM {doc})"
    " FROM {table}{where} GROUP BY user_id"
)


@dataclass
class Summary:
    """One user's rows in the read tables, reduced to what is compared."""

    tasks: int = 0
    tasks_sum: int = 0
    history: int = 0
    history_sum: int = 0
    stats: tuple[int, int, int] = (0, 0, 0)
    bad_docs: int = 0  # task rows whose `doc` does not match their columns

    def differences(self, other: Summary) -> list[str]:
        out = []
        if (self.tasks, self.tasks_sum) != (other.tasks, other.tasks_sum):
            out.append(f"tasks rows {self.tasks} vs {other.tasks} (or their contents)")
        if (self.history, self.history_sum) != (other.history, other.history_sum):
            out.append(f"history rows {self.history} vs {other.history} (or their contents)")
        if self.stats != other.stats:
            out.append(f"stats {self.stats} vs {other.stats}")
        if self.bad_docs != other.bad_docs:
            out.append(f"task documents not matching their rows {self.bad_docs} vs {other.bad_docs}")
        return out


@dataclass(slots=True)
class _Task:
    owner: str
    title: str
    description: str | None
    completed: bool
    created_at: datetime
    updated_at: datetime
    version: int
    position: int
    deleted: bool = False
    priority: str = DEFAULT_PRIORITY
    tags: list[str] = field(default_factory=list)
    due_date: datetime | None = None


def _parse(state: bytes | str) -> Any:
    """`json.loads(state)`, by orjson (the faster); what orjson refuses (NaN,
    infinities, lone surrogates) by the standard library. (orjson reads an integer
    past 64 bits as a float, where the runner keeps the integer; no field of an event
    of ours holds one: a store that did would fail the check, not pass it wrongly.)"""
    try:
        return orjson.loads(state)
    except orjson.JSONDecodeError:
        return json.loads(state)


def _time(value: dict[str, str]) -> datetime:
    return datetime.fromisoformat(value["_data_"])


def _due(value: dict[str, str] | datetime | None) -> datetime | None:
    """A due date: as stored (transcoded), or as `shared.events` decoded it."""
    if value is None or value.__class__ is datetime:
        return value  # type: ignore[return-value]
    return _time(value)  # type: ignore[arg-type]


def _iso(value: datetime | None) -> str | None:
    """A due date as the history shows it: ISO 8601 in UTC."""
    return None if value is None else value.astimezone(UTC).isoformat()


@dataclass
class Fold:
    """The read models' expected state, folded from events in `(position, upto]` pages."""

    position: Position = ZERO
    tasks: dict[UUID, _Task] = field(default_factory=dict)
    history: dict[str, list[int]] = field(default_factory=dict)  # user: [rows, checksum]
    task_history: dict[UUID, list[int]] = field(default_factory=dict)
    owned: dict[str, set[UUID]] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    per_task: bool = True  # keep `task_history` (the audit compares per task; replay per user)
    # The data keys that open sealed fields (`shared.datakeys`), read at each advance;
    # tasks created with a key that is gone (their owner forgotten) fold to nothing.
    ring: KeyRing | None = None
    erased: set[UUID] = field(default_factory=set)

    async def advance(self, conn: asyncpg.Connection, upto: Position) -> int:
        """Fold every event after the last position up to `upto`; how many."""
        count = 0
        async with conn.transaction(readonly=True):
            self.ring = await ring_for(conn)
            await self.ring.load_all(conn)
            cursor = conn.cursor(
                EVENTS_UP_TO, *args(self.position), *args(upto), prefetch=PAGE
            )
            async for row in cursor:
                self.fold(*row)
                count += 1
        self.position = upto
        return count

    def fold(self, position: int, task_id: UUID, version: int, topic: str, state: bytes) -> None:
        """Fold one stored event row: its JSON parsed here, its sealed fields opened."""
        data = _parse(state)
        if task_id in self.erased:
            return
        if self.ring is not None and not self.ring.open_data(data):
            self.erased.add(task_id)  # its creation, or (if that was erased) nothing later
            return
        self._fold(position, task_id, version, topic, _time(data["timestamp"]), data["actor"],
                   data["request_id"], data)

    def fold_event(self, e: TaskEvent) -> None:
        """Fold one event as the runner read it (`shared.events.decode_event`, its sealed
        fields opened: the replay's load hands each page to its fold too)."""
        if e.task_id in self.erased:
            return
        if e.erased:
            self.erased.add(e.task_id)  # as `fold` does when the event does not open
            return
        self._fold(e.position, e.task_id, e.version, e.topic, e.timestamp, e.actor,
                   e.request_id, e.data)

    def _fold(self, position: int, task_id: UUID, version: int, topic: str, at: datetime,
              actor: str, request_id: str, data: dict[str, Any]) -> None:
        task = self.tasks.get(task_id)
        changes: str  # the history row's changes, as jsonb::text (`_jsonb_text`) writes them
        if topic == CREATED:
            task = _Task(data["owner"], data["title"], data["description"], False, at, at,
                         version, position)
            self.tasks[task_id] = task
            self.owned.setdefault(task.owner, set()).add(task_id)
            # Priority, tags and a due date are in the history only when not the
            # defaults (a TaskCreated stored before them has none of them).
            task.priority = data.get("priority", DEFAULT_PRIORITY)
            task.tags = data.get("tags", [])
            task.due_date = _due(data.get("due_date"))
            if task.priority == DEFAULT_PRIORITY and not task.tags and task.due_date is None:
                changes = (f'{{"title": {{"to": {_scalar(task.title)}, "from": null}},'
                           ' "completed": {"to": false, "from": null},'
                           f' "description": {{"to": {_scalar(task.description)},'
                           ' "from": null}}')
            else:
                created: dict[str, Any] = {
                    "title": task.title, "description": task.description, "completed": False}
                if task.priority != DEFAULT_PRIORITY:
                    created["priority"] = task.priority
                if task.tags:
                    created["tags"] = task.tags
                if task.due_date is not None:
                    created["due_date"] = _iso(task.due_date)
                changes = _jsonb_text({k: {"from": None, "to": v} for k, v in created.items()})
        elif task is None or task.deleted:
            self.problems.append(f"event {position} of task {task_id}: no live task")
            return
        else:
            if topic == TITLE_CHANGED:
                changes = _changed("title", task.title, data["title"])
                task.title = data["title"]
            elif topic == DESCRIPTION_CHANGED:
                changes = _changed("description", task.description, data["description"])
                task.description = data["description"]
            elif topic == PRIORITY_CHANGED:
                changes = _changed("priority", task.priority, data["priority"])
                task.priority = data["priority"]
            elif topic == TAGS_CHANGED:
                changes = f'{{"tags": {{"to": {_list(data["tags"])}, "from": {_list(task.tags)}}}}}'
                task.tags = data["tags"]
            elif topic == DUE_DATE_CHANGED:
                due = _due(data["due_date"])
                changes = _changed("due_date", _iso(task.due_date), _iso(due))
                task.due_date = due
            elif topic == COMPLETED:
                changes = _changed("completed", task.completed, True)
                task.completed = True
            elif topic == REOPENED:
                changes = _changed("completed", task.completed, False)
                task.completed = False
            elif topic == DELETED:
                changes = "{}"
                task.deleted = True
            else:
                self.problems.append(f"event {position}: unknown topic {topic}")
                return
            task.updated_at, task.version, task.position = at, version, position
        h = _hash_text("\x1f".join((
            task.owner, str(position), str(task_id), str(version), topic,
            actor if actor.__class__ is str else _canonical(actor),
            request_id if request_id.__class__ is str else _canonical(request_id),
            str(_micros_since_epoch(at)), changes,
        )))
        sums = self.history.setdefault(task.owner, [0, 0])
        sums[0] += 1
        sums[1] = (sums[1] + h) & MASK
        if self.per_task:
            sums = self.task_history.setdefault(task_id, [0, 0])
            sums[0] += 1
            sums[1] = (sums[1] + h) & MASK
        self.touched.add(task.owner)

    def expected(self, users: Iterable[str] | None = None) -> dict[str, Summary]:
        out: dict[str, Summary] = {}
        for user in self.history if users is None else users:
            s = Summary()
            completed = 0
            for task_id in self.owned.get(user, ()):
                task = self.tasks[task_id]
                if task.deleted:
                    continue
                s.tasks += 1
                completed += task.completed
                s.tasks_sum = (s.tasks_sum + task_row_hash(
                    user, task_id, task.title, task.description, task.completed,
                    task.created_at, task.updated_at, task.version, task.position,
                    task.priority, task.tags, task.due_date)) & MASK
            s.history, s.history_sum = self.history.get(user, [0, 0])
            s.stats = (s.tasks, completed, s.tasks - completed)
            out[user] = s
        return out


async def _ring(conn: asyncpg.Connection) -> KeyRing:
    """The data keys, as `Fold.advance` reads them (in the caller's transaction)."""
    ring = await ring_for(conn)
    await ring.load_all(conn)
    return ring


# The events up to a position ($1, $2), task by task (the events' primary key order).
EVENTS_BY_TASK = (
    "SELECT notification_id, originator_id, originator_version, topic, state"
    f" FROM {EVENTS_TABLE} WHERE {EVENT_KEY} <= ($1::text::xid8, $2::bigint)"
    " ORDER BY originator_id, originator_version"
)
# Read by a sort (of the server, spilling past `work_mem`), not the key's index: an index
# scan reads the events' pages in random order, several times slower on a busy machine.
SORTED_READ = (
    "SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off;"
    " SET LOCAL work_mem = '64MB'"
)
# The same, of some tasks ($3) only (by the key's index).
EVENTS_OF_TASKS = (
    "SELECT notification_id, originator_id, originator_version, topic, state"
    f" FROM {EVENTS_TABLE} WHERE originator_id = ANY($3::uuid[])"
    f" AND {EVENT_KEY} <= ($1::text::xid8, $2::bigint)"
    " ORDER BY originator_id, originator_version"
)
# The tasks of the next events after one position ($1, $2) up to another ($3, $4), in
# the log's order, and where they end.
TASKS_AFTER = (
    f"SELECT originator_id, tx_id::text, notification_id FROM {EVENTS_TABLE}"
    f" WHERE {AFTER} AND {EVENT_KEY} <= ($3::text::xid8, $4::bigint)"
    f" ORDER BY {EVENT_ORDER} LIMIT $5"
)


@dataclass
class TaskFold:
    """The expected per-user summaries, folded task by task in memory that does not grow
    with the store: a `Fold` of one page of tasks (about `PAGE` events) at a time, whose
    summaries are added to one running `Summary` per user before the next page. The
    first `advance` reads every task in the events' key order; each later one reads the
    events after the last position in pages, and folds the tasks they touch twice, up
    to the page's start and up to its end, adding the difference (the sums are sums of
    per-task terms, modulo 2^64). The same interface as `Fold` for `FoldProcess`."""

    position: Position = ZERO
    totals: dict[str, Summary] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    # `observe`'s page in hand, the task it ends with, and how many events it holds.
    _page: Fold | None = None
    _last: UUID | None = None
    _in_page: int = 0

    async def advance(self, conn: asyncpg.Connection, upto: Position) -> int:
        """Fold every event after the last position up to `upto`; how many."""
        if upto <= self.position:
            return 0
        count = await (self._first(conn, upto) if self.position == ZERO
                       else self._since(conn, upto))
        self.position = upto
        return count

    async def _first(self, conn: asyncpg.Connection, upto: Position) -> int:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute(SORTED_READ)
            ring = await _ring(conn)
            total, in_page, page, last = 0, 0, Fold(per_task=False, ring=ring), None
            cursor = await conn.cursor(EVENTS_BY_TASK, *args(upto))
            fetching = asyncio.ensure_future(cursor.fetch(PAGE))  # the next page meanwhile
            while rows := await fetching:
                if len(rows) == PAGE:
                    fetching = asyncio.ensure_future(cursor.fetch(PAGE))
                for row in rows:
                    if row[1] != last:
                        if in_page >= PAGE:  # a page of whole tasks
                            self._close(page)
                            in_page, page = 0, Fold(per_task=False, ring=ring)
                        last = row[1]
                    page.fold(*row)
                    in_page += 1
                total += len(rows)
                if len(rows) < PAGE:
                    break
        self._close(page)
        return total

    def observe(self, events: list[TaskEvent]) -> None:
        """Fold a page of the replay's load (`projector.load_by_task`'s `observe`: events
        task by task, as the runner decoded and opened them), a page of whole tasks at a
        time as `_first` does; `seed` the `FoldProcess` with the totals once the load is
        done (`finish` first)."""
        page, last, in_page = self._page or Fold(per_task=False), self._last, self._in_page
        for e in events:
            if e.task_id != last:
                if in_page >= PAGE:
                    self._close(page)
                    in_page, page = 0, Fold(per_task=False)
                last = e.task_id
            page.fold_event(e)
            in_page += 1
        self._page, self._last, self._in_page = page, last, in_page

    def finish(self) -> None:
        """Add the last page `observe` holds."""
        if self._page is not None:
            self._close(self._page)
        self._page, self._last, self._in_page = None, None, 0

    def seed(self, upto: Position, totals: dict[str, Summary], problems: list[str]) -> None:
        """Start from these summaries of every event up to `upto` (the replay's loads
        folded them); later advances fold what comes after."""
        self.position, self.totals = upto, totals
        self.problems = list(problems)
        self.touched.clear()

    def _close(self, page: Fold) -> None:
        self._add(page, 1)
        self.problems.extend(page.problems)

    async def _since(self, conn: asyncpg.Connection, upto: Position) -> int:
        count, start = 0, self.position
        while True:
            rows = await conn.fetch(TASKS_AFTER, *args(start), *args(upto), PAGE)
            if not rows:
                return count
            end = Position(int(rows[-1][1]), rows[-1][2])
            tasks = list({r[0] for r in rows})
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                ring = await _ring(conn)
                before, after = Fold(per_task=False, ring=ring), Fold(per_task=False, ring=ring)
                for fold, position in ((before, start), (after, end)):
                    for row in await conn.fetch(EVENTS_OF_TASKS, *args(position), tasks):
                        fold.fold(*row)
            self._add(before, -1)
            self._add(after, 1)
            known = set(before.problems)
            self.problems.extend(p for p in after.problems if p not in known)
            count += len(rows)
            start = end
            if len(rows) < PAGE:
                return count

    def _add(self, fold: Fold, sign: int) -> None:
        """Add (sign 1) or take away (-1) a page's summaries."""
        for user, s in fold.expected().items():
            _accumulate(self.totals.setdefault(user, Summary()), s, sign)
        if sign > 0:
            self.touched |= fold.touched

    def expected(self, users: Iterable[str] | None = None) -> dict[str, Summary]:
        if users is None:
            return {u: replace(s) for u, s in self.totals.items()}
        return {u: replace(self.totals.get(u, Summary())) for u in users}


def add_summaries(into: dict[str, Summary], more: dict[str, Summary]) -> None:
    """Add `more`'s per-user summaries to `into`'s (the loads' folds of disjoint tasks)."""
    for user, s in more.items():
        _accumulate(into.setdefault(user, Summary()), s)


def _accumulate(total: Summary, s: Summary, sign: int = 1) -> None:
    """Add (sign 1) or take away (-1) `s` from `total` (the sums modulo 2^64)."""
    total.tasks += sign * s.tasks
    total.tasks_sum = (total.tasks_sum + sign * s.tasks_sum) & MASK
    total.history += sign * s.history
    total.history_sum = (total.history_sum + sign * s.history_sum) & MASK
    total.stats = tuple(  # type: ignore[assignment]
        a + sign * b for a, b in zip(total.stats, s.stats, strict=True))


def task_row_hash(
    user: str, task_id: UUID, title: str, description: str | None, completed: bool,
    created_at: datetime, updated_at: datetime, version: int, position: int,
    priority: str = DEFAULT_PRIORITY, tags: list[str] | tuple[str, ...] = (),
    due_date: datetime | None = None,
) -> int:
    """`row_hash` of a task row, spelled out for its column types (tags as `to_json`
    writes a text[]: as orjson writes a list)."""
    return _hash_text("\x1f".join((
        user, str(task_id), title, NULL if description is None else description,
        "true" if completed else "false", str(_micros_since_epoch(created_at)),
        str(_micros_since_epoch(updated_at)), str(version), str(position),
        priority, orjson.dumps(list(tags)).decode(),
        NULL if due_date is None else str(_micros_since_epoch(due_date)),
    )))


def _tasks(s: Summary, r: Any) -> None:
    s.tasks, s.tasks_sum, s.bad_docs = r[1], int(r[2]) & MASK, r[3]


def _history(s: Summary, r: Any) -> None:
    s.history, s.history_sum = r[1], int(r[2]) & MASK


def _stats(s: Summary, r: Any) -> None:
    s.stats = (r[1], r[2], r[3])


# For each read model (by its `TABLE` field): the per-user query over its table (given
# the table and a WHERE clause), and how a result row fills the user's `Summary`.
TABLE_SUMMARIES: dict[str, tuple[Callable[[str, str], str], Callable[[Summary, Any], None]]] = {
    "tasks": (lambda table, where: TASK_SUMS.format(
        hash=ROW_HASH.format(columns=TASK_COLUMNS), doc=DOC_SQL, table=table, where=where),
        _tasks),
    "history": (lambda table, where: SUMS.format(
        hash=ROW_HASH.format(columns=HISTORY_COLUMNS), table=table, where=where), _history),
    "stats": (lambda table, where:
              f"SELECT user_id, total, completed, pending FROM {table}{where}", _stats),
}


async def summarise(
    conn: asyncpg.Connection, t: Tables, users: list[str] | None = None
) -> dict[str, Summary]:
    """Per-user summaries of the read tables `t` (every user, or only `users`)."""
    where, args = ("", []) if users is None else (" WHERE user_id = ANY($1::text[])", [users])
    out: dict[str, Summary] = {}
    async with conn.transaction(readonly=True):
        for model in READ_MODELS:
            query, read = TABLE_SUMMARIES[model.TABLE]
            for r in await conn.fetch(query(getattr(t, model.TABLE), where), *args):
                read(out.setdefault(r[0], Summary()), r)
    return out


def compare(expected: dict[str, Summary], actual: dict[str, Summary]) -> dict[str, list[str]]:
    """{user: what differs}, for every user whose rows differ from the fold's."""
    differing: dict[str, list[str]] = {}
    for user in sorted(set(expected) | set(actual)):
        diff = expected.get(user, Summary()).differences(actual.get(user, Summary()))
        if diff:
            differing[user] = [f"expected vs rebuilt: {d}" for d in diff]
    return differing


# -- the fold in a process of its own ---------------------------------------------------

APPLICATION_NAME = "taskservice-replay-fold"


class FoldProcessFailed(ChildFailed):
    """The fold process failed (its database connection, say) or died."""


class FoldProcess:
    """A `TaskFold` in a child process (`projections.child.Child`), driven from the
    replay's event loop: `advance` folds up to a position (concurrently with whatever the
    caller does meanwhile), `check` folds up to a position and returns the expected
    summaries. The child holds the fold's state between calls."""

    def __init__(self, dsn: str) -> None:
        self._child = Child(_handle, TaskFold, (dsn,), name="replay-fold",
                            what="verification fold", failed=FoldProcessFailed)

    async def advance(self, upto: Position) -> None:
        await self._child.call("advance", tuple(upto))

    async def seed(self, upto: Position, totals: dict[str, Summary], problems: list[str]
                   ) -> None:
        """Start from the replay's loads' folds up to `upto` (`TaskFold.seed`)."""
        await self._child.call("seed", tuple(upto), totals, problems)

    async def check(
        self, upto: Position, users: Literal["all", "touched"], also: Iterable[str] = ()
    ) -> tuple[list[str] | None, dict[str, Summary], list[str]]:
        """Fold up to `upto`; (the users checked, their expected summaries, problems).
        `users`: "all", or "touched": those whose events this call folded, plus `also`
        (None stands for every user)."""
        reply = await self._child.call("check", tuple(upto), users, sorted(set(also)))
        return reply  # type: ignore[no-any-return]

    def peak_rss_mb(self) -> float | None:
        """The child's peak resident memory so far (MB), None if it is gone."""
        return self._child.peak_rss_mb()

    def close(self) -> None:
        """Stop the child now (it holds nothing but a read-only connection)."""
        self._child.close()


async def _handle(dsn: str, fold: TaskFold, command: str, upto: tuple[int, int],
                  users: Any = "all", also: list[str] | None = None) -> Any:
    if command == "seed":  # (upto, totals, problems)
        fold.seed(Position(*upto), users, also or [])
        return None
    fold.touched.clear()
    position = Position(*upto)
    if position > fold.position:
        conn = await asyncpg.connect(dsn, server_settings={"application_name": APPLICATION_NAME})
        try:
            await fold.advance(conn, position)
        finally:
            await conn.close()
    if command == "advance":
        return None
    chosen = None if users == "all" else sorted(fold.touched | set(also or ()))
    return chosen, fold.expected(chosen), list(fold.problems)
