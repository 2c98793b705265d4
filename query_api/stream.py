"""The live stream of a user's task changes: Server-Sent Events (docs/streams.md).

`GET /api/tasks/stream` (and `/api/{user_id}/tasks/stream`) answers `text/event-stream`:
each change of the caller's tasks as the read tables record it, `event: task` with the
task's document after the change or `event: task_deleted`, `id:` its position. A client
that reconnects with `Last-Event-ID` (or `?last_event_id=`) gets every change after it
and none before it.

**Where the changes come from.** Not from the NOTIFY payloads (lost while disconnected)
nor from a table the replay renames away: from the event store, in its global order
(`(tx_id, notification_id)`, which no replay changes), joined in the same statement to
the read tables and their checkpoint. A statement sees the checkpoint and the rows it
covers in one snapshot, before or after a replay's switch, never a mix; and the
positions of the rebuilt tables are the same events' positions. Filtered by user in
SQL: a task's owner is its creation event's (`shared.events.owner_sql`, by primary key);
and beneath that by row-level security, read as the stream role for the users whose
streams are open (`Reader.for_streams`, `shared.row_security`).

**One change per task per read.** A read sends a task only at its latest version in
that snapshot (the document the read tables hold is exactly the state after it), so
a task changed three times between two reads arrives once, at its last position.
Positions still increase strictly along a stream, and resuming after any `id:` misses
no change: whatever changed after it has a later latest version.

**Bounded.** One `StreamHub` per process follows the read tables for every open stream:
it waits on the process's one LISTEN connection (`query_api.watch.PositionWatch`,
`projection_advanced`; on a replica its timer), then reads what changed since its last
read for all the users with a stream open, in one statement on a pooled connection,
and hands each change to that user's streams. No stream holds a database connection;
one that (re)connects with an older position reads its gap once, in pages. Each stream
buffers at most STREAM_BUFFER_EVENTS changes and may block on a write at most
STREAM_SEND_TIMEOUT seconds; past either it is dropped (`end`, reason `slow_consumer`)
and its client resumes from its last id. STREAM_MAX_PER_USER and STREAM_MAX_PER_PROCESS
cap the streams (429, 503). A stop signal (SIGTERM, SIGINT, SIGHUP) ends every stream
at once (`end`, reason `shutdown`) rather than after uvicorn's graceful timeout.

**Joining without a gap.** A new stream registers with the hub first, then learns the
position the hub's next read starts from (`coverage`): the hub delivers everything after
it. If the client asked for an older position, the stream reads the gap itself, in a
snapshot taken after that, so its floor is at or past the hub's start; changes the hub
hands it at or before its floor are dropped (they were in the gap read): no gap, no
duplicate. The position the client gave is a floor too (a replica reading a lagging
database sends nothing the client already has).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
import jwt
import orjson
from fastapi import APIRouter, Header, Query, Request
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, Field
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from query_api.queries import position_from, position_sql
from query_api.reader import Reader
from query_api.tickets import Tickets, ticket_key
from shared import catalog
from shared.auth import CurrentUser
from shared.errors import DATABASE_DOWN, ApiError, Forbidden, ServiceUnavailable, ValidationFailed
from shared.events import DELETED, owner_sql
from shared.http import Envelope
from shared.openapi import DataEnvelope, DateTime, error_responses
from shared.position import ZERO, Position, PositionCodec
from shared.settings import Settings

log = logging.getLogger("taskservice.query_api.stream")

STREAMS_OPEN = Gauge("query_api_streams_open", "Open task-change streams of this process")
STREAMS_ENDED = Counter(
    "query_api_streams_ended_total", "Task-change streams ended, by reason", ["reason"]
)
STREAM_CHANGES = Counter(
    "query_api_stream_changes_total", "Task changes written to streams (one per stream)"
)

# Events read at most per hub statement (the hub reads again at once when it was full),
# and changes per page of a reconnecting stream's gap.
HUB_PAGE = 2000
GAP_PAGE = 500
# The longest the hub waits on the watch before it checks whether anyone still listens.
HUB_WAIT = 5.0
# Why a stream ended (the `reason` of its `end` event and of the metric).
END_MESSAGES = {
    "token_expired": "The token expired: reconnect with a new token (a new ticket)",
    "shutdown": "The server is shutting down: reconnect, with Last-Event-ID",
    "slow_consumer": "The stream fell too far behind its changes: reconnect, with Last-Event-ID",
    "unavailable": "The database is unavailable: reconnect shortly, with Last-Event-ID",
}


# -- positions -----------------------------------------------------------------------


def position_codec(reader: Reader) -> PositionCodec:
    """THE codec of stream positions (`id:`, Last-Event-ID, last_event_id): the
    deployment's sealed positions (`shared.position`), as every other route gives them;
    `decode` raises BadPosition (a ValueError) on a token the service did not issue."""
    return reader.codec


# -- the statements ------------------------------------------------------------------

_LIVE = catalog.LIVE
_N = len(catalog.PROJECTIONS)
# A change's columns: position, owner, task, version, event type, the stored document.
_CHANGE = "tx_id::text AS tx, notification_id AS nid, user_id, task_id, version, event_type, doc"
# Only a task's latest version in the snapshot: its document is the state after it.
_LATEST = (
    f"NOT EXISTS (SELECT 1 FROM {_LIVE.history} l"
    " WHERE l.user_id = h.user_id AND l.task_id = h.task_id AND l.version > h.version)"
)

# The hub's read: the checkpoint; the next events after $1/$2 up to it (at most $4, in
# the global order); how many there were and the last one; and the changes among them
# of the users in $3.
HUB_CHANGES = (
    f"WITH p AS ({position_sql()}),"
    " scanned AS ("
    f"  SELECT e.tx_id, e.notification_id, e.originator_id FROM {catalog.EVENTS_TABLE} e, p"
    f"  WHERE p.cp_n >= {_N}"
    "   AND (e.tx_id, e.notification_id) > ($1::text::xid8, $2::bigint)"
    "   AND (e.tx_id, e.notification_id) <= (p.cp_tx_id::xid8, p.cp_position)"
    "  ORDER BY e.tx_id, e.notification_id LIMIT $4),"
    " last AS (SELECT tx_id::text AS tx, notification_id AS nid FROM scanned"
    "  ORDER BY tx_id DESC, notification_id DESC LIMIT 1),"
    " changes AS ("
    "  SELECT s.tx_id, s.notification_id, h.user_id, h.task_id, h.version, h.event_type, t.doc"
    "  FROM scanned s"
    f"  CROSS JOIN LATERAL (SELECT {owner_sql(catalog.EVENTS_TABLE, 's')} AS owner) o"
    f"  JOIN {_LIVE.history} h ON h.user_id = o.owner AND h.position = s.notification_id"
    f"  LEFT JOIN {_LIVE.tasks} t ON t.user_id = h.user_id AND t.task_id = h.task_id"
    f"  WHERE o.owner = ANY($3::text[]) AND {_LATEST})"
    " SELECT p.cp_n, p.cp_tx_id, p.cp_position, (SELECT count(*) FROM scanned) AS scanned,"
    "  (SELECT tx FROM last) AS last_tx, (SELECT nid FROM last) AS last_nid,"
    f"  c.{_CHANGE.replace(', ', ', c.')}"
    " FROM p LEFT JOIN changes c ON true ORDER BY c.tx_id, c.notification_id"
)

# A stream's gap: the checkpoint, and the changes of user $1 after $2/$3 up to it (at
# most $4, in the global order), each task at its latest version.
GAP_CHANGES = (
    f"WITH p AS ({position_sql()})"
    " SELECT p.cp_n, p.cp_tx_id, p.cp_position,"
    f"  c.{_CHANGE.replace(', ', ', c.')}"
    " FROM p LEFT JOIN LATERAL ("
    "  SELECT e.tx_id, e.notification_id, h.user_id, h.task_id, h.version, h.event_type, t.doc"
    f"  FROM {_LIVE.history} h"
    f"  JOIN {catalog.EVENTS_TABLE} e ON e.notification_id = h.position"
    f"  LEFT JOIN {_LIVE.tasks} t ON t.user_id = h.user_id AND t.task_id = h.task_id"
    f"  WHERE p.cp_n >= {_N} AND h.user_id = $1"
    "   AND (e.tx_id, e.notification_id) > ($2::text::xid8, $3::bigint)"
    "   AND (e.tx_id, e.notification_id) <= (p.cp_tx_id::xid8, p.cp_position)"
    f"   AND {_LATEST}"
    "  ORDER BY e.tx_id, e.notification_id LIMIT $4) c ON true"
    " ORDER BY c.tx_id, c.notification_id"
)

_CHECKPOINT = position_sql()


# -- the frames ----------------------------------------------------------------------


def frame(event: str, data: bytes, event_id: str | None = None) -> bytes:
    """One event: `id:` (if any), `event:`, and the data, a line each (JSON text has no
    raw line breaks, but a `data:` per line keeps any text intact)."""
    lines = [b"id: " + event_id.encode()] if event_id is not None else []
    lines.append(b"event: " + event.encode())
    lines.extend(b"data: " + line for line in data.split(b"\n"))
    return b"\n".join(lines) + b"\n\n"


HEARTBEAT = b": keep-alive\n\n"


@dataclass(frozen=True, slots=True)
class Change:
    position: Position
    user_id: str
    frame: bytes


def _change(row: asyncpg.Record, codec: Any) -> Change | None:
    """The change a row of HUB_CHANGES or GAP_CHANGES names; None when it has none."""
    if row["tx"] is None:
        return None
    position = Position(int(row["tx"]), row["nid"])
    token = codec.encode(position)
    if row["event_type"] == DELETED or row["doc"] is None:
        data = orjson.dumps({"id": str(row["task_id"]), "user_id": row["user_id"],
                             "version": row["version"]})
        return Change(position, row["user_id"], frame("task_deleted", data, token))
    return Change(position, row["user_id"], frame("task", row["doc"].encode(), token))


# -- the hub -------------------------------------------------------------------------


class TooManyStreams(ApiError):
    status, code, default_message = 429, "TOO_MANY_REQUESTS", "Too many open streams"


@dataclass(eq=False)
class Subscriber:
    """One open stream: its user, its waiting changes (bounded), why it ended."""

    user_id: str
    limit: int
    changes: deque[Change] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    ended: str | None = None

    def push(self, change: Change) -> None:
        if self.ended is not None:
            return
        if len(self.changes) >= self.limit:
            self.end("slow_consumer")
            return
        self.changes.append(change)
        self.wake.set()

    def end(self, reason: str) -> None:
        if self.ended is None:
            self.ended = reason
            self.changes.clear()
            self.wake.set()


class StreamHub:
    """Every open stream of this process, and the one reader of their changes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tickets = Tickets(ticket_key(settings))
        self._users: dict[str, set[Subscriber]] = {}
        self.open = 0
        self._position: Position | None = None  # where the hub's next read starts
        self._fetching = False
        self._settled = asyncio.Event()  # set while the next read's start is known
        self._task: asyncio.Task[None] | None = None
        self._reader: Reader | None = None
        self.closing: str | None = None
        self._signals: dict[int, tuple[Any, Any]] = {}
        self.reads = 0  # statements the hub ran (for the tests and the benchmark)

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """In the server's lifespan: end the streams as soon as a stop signal arrives.
        uvicorn waits for every open response before the lifespan's shutdown, and a
        stream never ends by itself: so each handler of INT, TERM and HUP installed by
        then (uvicorn's) first ends the streams, then does what it did."""
        self._settled = asyncio.Event()  # of this server's event loop
        if threading.current_thread() is not threading.main_thread():
            return  # signals go to the main thread's handlers only
        loop = asyncio.get_running_loop()
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            previous = signal.getsignal(sig) if sig is not None else None
            if not callable(previous):
                continue

            def handler(signum: int, frame: Any, previous: Any = previous) -> None:
                # In an empty context: the signal interrupts whatever task runs (a
                # request's, say), and drain must not log under that request's id.
                loop.call_soon_threadsafe(self.drain, "shutdown", context=contextvars.Context())
                previous(signum, frame)

            signal.signal(sig, handler)
            self._signals[sig] = (previous, handler)

    def drain(self, reason: str) -> None:
        """End every stream (`end` event with `reason`); refuse new ones (503)."""
        if self.closing is None:
            log.info("ending %d open streams (%s)", self.open, reason)
        self.closing = reason
        for subscribers in list(self._users.values()):
            for subscriber in subscribers:
                subscriber.end(reason)

    async def close(self) -> None:
        self.drain("shutdown")
        if threading.current_thread() is threading.main_thread():
            for sig, (previous, handler) in self._signals.items():
                if signal.getsignal(sig) is handler:
                    signal.signal(sig, previous)
        self._signals.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- streams -------------------------------------------------------------------

    def admit(self, user_id: str, reader: Reader) -> Subscriber:
        """A new stream of `user_id`, or 429 / 503 past the caps."""
        if self.closing is not None:
            raise ServiceUnavailable("The server is shutting down: reconnect")
        if self.open >= self.settings.stream_max_per_process:
            raise ServiceUnavailable(
                "This server holds as many streams as it may (STREAM_MAX_PER_PROCESS):"
                " try again shortly")
        mine = self._users.setdefault(user_id, set())
        if len(mine) >= self.settings.stream_max_per_user:
            if not mine:
                del self._users[user_id]
            raise TooManyStreams(
                f"At most {self.settings.stream_max_per_user} open streams per user"
                " (STREAM_MAX_PER_USER): close one first",
                headers={"Retry-After": "5"})
        subscriber = Subscriber(user_id, self.settings.stream_buffer_events)
        mine.add(subscriber)
        self.open += 1
        STREAMS_OPEN.set(self.open)
        if self._task is None or self._task.done():
            self._reader = reader
            self._position = None
            self._settled.clear()
            self._task = asyncio.create_task(self._follow(), name="stream-hub")
        return subscriber

    def leave(self, subscriber: Subscriber, reason: str) -> None:
        mine = self._users.get(subscriber.user_id)
        if mine is None or subscriber not in mine:
            return
        mine.discard(subscriber)
        if not mine:
            del self._users[subscriber.user_id]
        self.open -= 1
        STREAMS_OPEN.set(self.open)
        STREAMS_ENDED.labels(reason).inc()

    async def coverage(self, timeout: float) -> Position | None:
        """Where the hub's next read starts: a subscriber admitted before this call gets
        every change after it from the hub. None if not known within `timeout`."""
        deadline = time.monotonic() + timeout
        while self._position is None or self._fetching:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), left)
        return self._position

    # -- the one reader ------------------------------------------------------------

    async def _follow(self) -> None:
        reader = self._reader
        assert reader is not None
        codec = position_codec(reader)
        delay = 0.2
        try:
            while self._users and self.closing is None:
                try:
                    if self._position is None:
                        async with reader.connection() as conn:
                            row = await conn.fetchrow(_CHECKPOINT)
                        self._position = position_from(row[0], row[1], row[2])
                        self._settled.set()
                        continue
                    after = Position(self._position.tx_id, self._position.notification_id + 1)
                    if not await reader.watch.wait_for(after, HUB_WAIT):
                        continue
                    await self._read(reader, codec)
                    delay = 0.2
                except (TimeoutError, *DATABASE_DOWN) as e:
                    log.warning("the stream hub cannot read the changes (%r); again in %.1fs",
                                e, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        except Exception:  # never silently: the streams would go quiet
            log.exception("the stream hub stopped; ending its streams")
            for subscribers in list(self._users.values()):
                for subscriber in subscribers:
                    subscriber.end("unavailable")
        finally:
            if self._task is asyncio.current_task():
                self._task = None
                self._position = None
                self._settled.clear()

    async def _read(self, reader: Reader, codec: Any) -> None:
        """Read and hand out every change after the hub's position, page by page."""
        assert self._position is not None
        self._fetching = True
        self._settled.clear()
        try:
            users = list(self._users)
            full = True
            while full:
                lo = self._position
                async with reader.for_streams(users) as conn:
                    rows = await conn.fetch(HUB_CHANGES, str(lo.tx_id), lo.notification_id,
                                            users, HUB_PAGE)
                self.reads += 1
                head = rows[0]
                full = head["scanned"] >= HUB_PAGE
                if full:
                    hi = Position(int(head["last_tx"]), head["last_nid"])
                else:
                    hi = max(lo, position_from(head[0], head[1], head[2]))
                for row in rows:
                    change = _change(row, codec)
                    if change is None:
                        continue
                    for subscriber in list(self._users.get(change.user_id, ())):
                        subscriber.push(change)
                self._position = hi
        finally:
            self._fetching = False
            self._settled.set()


# -- one stream ----------------------------------------------------------------------


class _Gone(Exception):
    """The client went away, or blocked a write too long: nothing more can be sent."""


class EventStream(Response):
    """The `text/event-stream` answer of one stream (see the module)."""

    media_type = "text/event-stream"

    def __init__(self, hub: StreamHub, subscriber: Subscriber, reader: Reader, codec: Any,
                 resume: Position | None, token_expires: float) -> None:
        self.status_code = 200
        self.background = None
        # No Content-Length; no caching or transforming by proxies; nginx: do not buffer.
        self.init_headers({"Cache-Control": "no-cache, no-transform",
                           "X-Accel-Buffering": "no"})
        self.hub = hub
        self.subscriber = subscriber
        self.reader = reader
        self.codec = codec
        self.resume = resume
        self.token_expires = token_expires
        settings = hub.settings
        self.heartbeat = settings.stream_heartbeat_seconds
        self.send_timeout = settings.stream_send_timeout
        self.retry_ms = settings.stream_retry_ms
        self._send: Send | None = None
        self._last_write = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._send = send
        watcher = asyncio.create_task(self._watch(receive))
        reason = "disconnected"
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            await self._write(b"retry: %d\n\n" % self.retry_ms)
            floor = await self._join()
            reason = await self._live(floor)
            if reason != "disconnected":
                message = END_MESSAGES.get(reason, reason)
                await self._write(frame("end", orjson.dumps(
                    {"reason": reason, "message": message})))
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except _Gone as gone:
            reason = str(gone) or "disconnected"
        finally:
            watcher.cancel()
            self.hub.leave(self.subscriber, reason)

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.subscriber.end("disconnected")
                return

    async def _write(self, data: bytes) -> None:
        assert self._send is not None
        if self.subscriber.ended == "disconnected":
            raise _Gone("disconnected")
        try:
            await asyncio.wait_for(self._send(
                {"type": "http.response.body", "body": data, "more_body": True}),
                self.send_timeout)
        except TimeoutError:
            log.warning("dropped a stream of user %s: a write blocked for %gs"
                        " (STREAM_SEND_TIMEOUT)", self.subscriber.user_id, self.send_timeout)
            self.subscriber.end("slow_consumer")
            raise _Gone("slow_consumer") from None
        except OSError:  # the client went away
            raise _Gone("disconnected") from None
        self._last_write = time.monotonic()

    async def _heartbeat_if_due(self) -> None:
        if time.monotonic() - self._last_write >= self.heartbeat:
            await self._write(HEARTBEAT)

    async def _join(self) -> Position:
        """Register behind the hub, read the gap if the client is behind it, say
        `ready`: the position from which the hub's changes follow without a gap."""
        start = None
        while start is None:
            if self.subscriber.ended is not None:
                return ZERO  # `_live` ends the stream at once
            start = await self.hub.coverage(self.heartbeat)
            await self._heartbeat_if_due()
        floor = start
        if self.resume is not None and self.resume < start:
            try:
                floor = await self._gap(self.resume)
            except (TimeoutError, *DATABASE_DOWN) as e:
                log.warning("a stream could not read its gap (%r): ending it", e)
                self.subscriber.end("unavailable")
                return ZERO
        floor = max(floor, start, self.resume or ZERO)
        token = self.codec.encode(floor)
        await self._write(frame("ready", orjson.dumps(
            {"position": token, "resumed": self.resume is not None}), token))
        return floor

    async def _gap(self, after: Position) -> Position:
        """Send the user's changes after `after`, page by page, each page in a snapshot
        taken after the hub's start was known; the last page's checkpoint."""
        cursor = after
        while True:
            async with self.reader.for_streams([self.subscriber.user_id]) as conn:
                rows = await conn.fetch(GAP_CHANGES, self.subscriber.user_id,
                                        str(cursor.tx_id), cursor.notification_id, GAP_PAGE)
            head = rows[0]
            checkpoint = position_from(head[0], head[1], head[2])
            sent = 0
            for row in rows:
                change = _change(row, self.codec)
                if change is None:
                    continue
                await self._write(change.frame)
                STREAM_CHANGES.inc()
                cursor = change.position
                sent += 1
            if sent < GAP_PAGE:
                return max(checkpoint, cursor)

    async def _live(self, floor: Position) -> str:
        """Write the hub's changes after `floor` as they come, a heartbeat when idle;
        until the stream ends: the reason."""
        subscriber = self.subscriber
        while True:
            subscriber.wake.clear()
            while subscriber.changes:
                change = subscriber.changes.popleft()
                if change.position <= floor:
                    continue  # in the gap read already
                await self._write(change.frame)
                STREAM_CHANGES.inc()
                floor = change.position
            if subscriber.ended is not None:
                return subscriber.ended
            token_left = self.token_expires - time.time()
            if token_left <= 0:
                subscriber.end("token_expired")
                continue
            idle = self.heartbeat - (time.monotonic() - self._last_write)
            try:
                await asyncio.wait_for(subscriber.wake.wait(), max(0.0, min(idle, token_left)))
            except TimeoutError:
                await self._heartbeat_if_due()


# -- the routes ----------------------------------------------------------------------

router = APIRouter(prefix="/api", tags=["streams"])

_STREAM_DOC = (
    "Server-Sent Events of the caller's task changes (docs/streams.md). Each change:"
    " `id:` its position, `event: task` with the task's document after it, or"
    " `event: task_deleted` with `{id, user_id, version}`. Then `event: ready` once"
    " caught up, `: keep-alive` comments when idle, and `event: end` with `{reason,"
    " message}` before the server ends it (`token_expired`, `shutdown`, `slow_consumer`,"
    " `unavailable`). Resume with `Last-Event-ID` or `last_event_id`: every change"
    " after it, none before. Authenticate with `Authorization: Bearer` or, from an"
    " `EventSource`, with `ticket` (POST .../stream/tickets)."
)
_TOO_MANY = "At most 10 open streams per user (STREAM_MAX_PER_USER): close one first"
StreamResponses: dict[int | str, dict[str, Any]] = {
    200: {"description": "The stream", "content": {"text/event-stream": {
        "schema": {"type": "string"},
        "example": 'retry: 2000\n\nid: p3.7hcHxvBkVWiKqbNhHpmCiClt2FOJflqPKSmXoMbIXnk\nevent: task\ndata: {"id":"0b6f1c2e-'
                   '5d4a-4e3b-9c8d-7a6b5c4d3e2f","title":"Buy milk",...}\n\n'}}},
    # JSON, not the stream's media type: the envelope of a refused stream.
    # (shared.apidoc.merge puts an example in each but the 429's, given here.)
    **{status: {"description": phrase, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}}
       for status, phrase in ((401, "Unauthorized"), (403, "Forbidden"),
                              (422, "Unprocessable Content"), (503, "Service Unavailable"))},
    429: {"description": "Too Many Requests", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorEnvelope"},
        "example": {"error": {"code": "TOO_MANY_REQUESTS", "message": _TOO_MANY},
                    "detail": _TOO_MANY, "meta": {
                        "timestamp": "2026-01-02T03:04:05.678901+00:00",
                        "request_id": "5f0c6a4f2b7e4c1d9a3e8b6d7c5a4f3e"}}}}},
}
_ACCEPTED = frozenset({"ticket", "last_event_id"})

Ticket = Annotated[str | None, Query(max_length=2048, description=(
    "A stream ticket (POST /api/tasks/stream/tickets), for EventSource: single use,"
    " within a minute"))]
LastEventId = Annotated[str | None, Query(max_length=256, description=(
    "Resume after this position (an `id:` of an earlier stream); Last-Event-ID wins"))]
LastEventIdHeader = Annotated[str | None, Header(alias="Last-Event-ID", max_length=256)]


def hub_of(request: Request) -> StreamHub:
    return request.app.state.streams  # type: ignore[no-any-return]


async def _open(request: Request, path_user_id: str | None, ticket: str | None,
                last_event_id: str | None, header_id: str | None) -> EventStream:
    hub = hub_of(request)
    unknown = sorted(set(request.query_params.keys()) - _ACCEPTED)
    if unknown:
        listed = ", ".join(sorted(_ACCEPTED))
        raise ValidationFailed("Unknown query parameter", details={
            name[:64]: f"unknown query parameter; accepted: {listed}" for name in unknown[:10]})
    authorization = request.headers.get("authorization")
    if authorization or ticket is None:
        user_id = await request.app.state.authenticator.user_id(authorization)
        token_expires = _token_expiry(authorization or "")
    else:
        redeemed = hub.tickets.redeem(ticket)
        user_id, token_expires = redeemed.user_id, redeemed.token_expires
    request.state.user_id = user_id
    if path_user_id is not None and path_user_id != user_id:
        raise Forbidden("You do not have access to this user's tasks")
    reader: Reader = await request.app.state.open_reader()
    codec = position_codec(reader)
    resume = None
    token = header_id if header_id is not None else last_event_id
    if token is not None and token.strip():
        try:
            resume = codec.decode(token)
        except ValueError:
            raise ValidationFailed("Invalid position", details={
                "last_event_id": "not a position this service issued"}) from None
    subscriber = hub.admit(user_id, reader)
    return EventStream(hub, subscriber, reader, codec, resume, token_expires)


def _token_expiry(authorization: str) -> float:
    """The `exp` of a bearer token already verified."""
    token = authorization.partition(" ")[2].strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    return float(claims["exp"])


@router.get("/tasks/stream", status_code=200, response_class=EventStream,
            responses=StreamResponses,
            summary="Stream the caller's task changes (SSE)", description=_STREAM_DOC)
async def stream_tasks(request: Request, ticket: Ticket = None,
                       last_event_id: LastEventId = None,
                       last_event_id_header: LastEventIdHeader = None) -> EventStream:
    return await _open(request, None, ticket, last_event_id, last_event_id_header)


@router.get("/{path_user_id}/tasks/stream", status_code=200, response_class=EventStream,
            responses=StreamResponses, summary="Stream the user's task changes (SSE)",
            description=_STREAM_DOC + " The path's user must be the token's (else 403).")
async def stream_user_tasks(path_user_id: str, request: Request, ticket: Ticket = None,
                            last_event_id: LastEventId = None,
                            last_event_id_header: LastEventIdHeader = None) -> EventStream:
    return await _open(request, path_user_id, ticket, last_event_id, last_event_id_header)


class TicketOut(BaseModel):
    ticket: str = Field(description="Pass as `?ticket=` to the stream, once, before it expires")
    expires_at: DateTime = Field(description="ISO 8601, UTC")
    expires_in: float = Field(description="Seconds from now")


_TICKET_DOC = (
    "A single-use ticket for one stream connection within a minute, for `EventSource`"
    " (which cannot send an Authorization header): `new EventSource(`/api/tasks/stream?"
    "ticket=${ticket}`)`. The stream ends when the token this was bought with expires."
)


def _issue(request: Request, user_id: str) -> Envelope:
    expires_at_token = _token_expiry(request.headers.get("authorization") or "")
    ticket, expires = hub_of(request).tickets.issue(user_id, expires_at_token)
    return Envelope({"ticket": ticket,
                     "expires_at": datetime.fromtimestamp(expires, UTC).isoformat(),
                     "expires_in": round(max(0.0, expires - time.time()), 3)},
                    status_code=201, headers={"Cache-Control": "no-store"})


@router.post("/tasks/stream/tickets", status_code=201,
             response_model=DataEnvelope[TicketOut],
             responses=error_responses(401, 413, 422, 503),
             summary="A ticket for one stream connection (EventSource)",
             description=_TICKET_DOC)
async def stream_ticket(request: Request, user_id: CurrentUser) -> Envelope:
    return _issue(request, user_id)


@router.post("/{path_user_id}/tasks/stream/tickets", status_code=201,
             response_model=DataEnvelope[TicketOut],
             responses=error_responses(401, 403, 413, 422, 503),
             summary="A ticket for one stream connection of the user (EventSource)",
             description=_TICKET_DOC + " The path's user must be the token's (else 403).")
async def stream_user_ticket(path_user_id: str, request: Request,
                             user_id: CurrentUser) -> Envelope:
    if path_user_id != user_id:
        raise Forbidden("You do not have access to this user's tasks")
    return _issue(request, user_id)


__all__ = ["EventStream", "StreamHub", "TooManyStreams", "position_codec", "router"]
