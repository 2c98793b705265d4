"""Composition root of the query API: `create_app(settings)`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from query_api import routes, stream
from query_api.queries import OLDEST_UNPROJECTED, lag_seconds, read_position
from query_api.reader import OwnPositions, PrimaryAway, Reader
from query_api.watch import PositionWatch
from shared.apidoc import install_docs
from shared.auth import Authenticator
from shared.cors import install_cors
from shared.errors import DATABASE_DOWN, ServiceUnavailable
from shared.events import event_time
from shared.health import health_router
from shared.http import RequestContext, install_error_handlers
from shared.observability import Observe, metrics_router
from shared.pools import pool_options, warn_if_pool_over_budget
from shared.position import MissingKey, Position, PositionCodec, load_codec
from shared.settings import Settings

log = logging.getLogger("taskservice.query_api")

APPLICATION_NAME = "taskservice-query-api"


class HeadAsGet:
    """Pure ASGI middleware: answer HEAD like GET, without the body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class ReadSide:
    """Holds the connection pool and the position watch; opens the pool on first use,
    so the API starts (and answers 503) while the database is still down."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dsn = settings.read_database_url or settings.require_database_url()
        self.pool: asyncpg.Pool | None = None
        self.watch: PositionWatch | None = None
        self._started = False
        self._opening: asyncio.Task[None] | None = None
        self.codec: PositionCodec | None = None
        # On a replica, users' latest positions come from the primary (docs/scaling.md).
        self.own_positions: OwnPositions | None = None
        primary = settings.database_url
        if settings.read_database_url and primary and primary != settings.read_database_url:
            self.own_positions = OwnPositions(
                primary,
                pool_size=settings.db_pool_size,
                acquire_timeout=settings.db_pool_timeout,
                pool_options=pool_options(settings, primary, APPLICATION_NAME),
            )

    async def start(self) -> None:
        self._started = True
        self.watch = PositionWatch(self.dsn, connect_timeout=self.settings.db_connect_timeout,
                                   pooled=self.settings.db_transaction_pooler)

    async def open(self) -> Reader:
        if self.watch is None or not self._started:
            raise ServiceUnavailable("Starting up, try again shortly")
        if self.pool is None:
            # One attempt at a time, its outcome shared by every request that came
            # meanwhile: a database that does not answer costs each of them one
            # DB_CONNECT_TIMEOUT at most, not one per request queued before it.
            if self._opening is None or self._opening.done():
                self._opening = asyncio.create_task(self._open_pool())
                self._opening.add_done_callback(
                    lambda t: t.cancelled() or t.exception()  # retrieved, also unawaited
                )
            try:
                await asyncio.shield(self._opening)
            except DATABASE_DOWN as e:
                log.warning("read database unavailable: %s", e)
                raise ServiceUnavailable("Database unavailable, try again shortly") from None
        assert self.pool is not None
        if self.codec is None:
            self.codec = await self._load_codec(self.pool)
        return Reader(self.pool, self.watch, self.settings.read_wait_timeout,
                      self.settings.db_pool_timeout, own_positions=self.own_positions,
                      codec=self.codec)

    @staticmethod
    async def _load_codec(pool: asyncpg.Pool) -> PositionCodec:
        """The deployment's position seal, its key from the database."""
        try:
            async with pool.acquire() as conn:
                return await load_codec(conn)
        except DATABASE_DOWN as e:
            log.warning("read database unavailable: %s", e)
            raise ServiceUnavailable("Database unavailable, try again shortly") from None
        except MissingKey as e:
            log.error("%s", e)
            raise ServiceUnavailable(
                "The database is not initialised for this version", details=str(e)
            ) from None

    async def _open_pool(self) -> None:
        """The pool, its timeouts from the settings (`shared.pools`); warns when it
        (with the watch's LISTEN connection) could exhaust the server's connections."""
        options = pool_options(self.settings, self.dsn, APPLICATION_NAME)
        # No reset query on release (asyncpg's default: `SELECT pg_advisory_unlock_all();
        # CLOSE ALL; UNLISTEN *; RESET ALL`, one more round trip per read): a read leaves
        # no session state to reset. Each is one statement in its own transaction or a
        # transaction of its own (the streams'); the row-level-security user and the
        # streams' role are set local to it (`set_config(..., true)`); LISTEN is the
        # watch's own connection; no advisory lock, no cursor, no SET. asyncpg still
        # rolls back a transaction left open. tests/integration/test_query_routes.py
        # checks every pooled connection after every kind of read. Behind a transaction
        # pooler there is no session state at all.
        options["reset"] = _nothing_to_reset
        pool = await asyncpg.create_pool(
            self.dsn, min_size=1,
            max_size=self.settings.db_pool_size + self.settings.db_max_overflow,
            **options,
        )
        await warn_if_pool_over_budget(
            pool, self.settings, process="query API", beside=1, beside_what="LISTEN"
        )
        self.pool = pool

    async def close(self) -> None:
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._opening
        if self.watch is not None:
            await self.watch.close()
        if self.own_positions is not None:
            await self.own_positions.close()
        pool, self.pool = self.pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (TimeoutError, *DATABASE_DOWN):
                pool.terminate()


async def _nothing_to_reset(_: asyncpg.Connection) -> None:
    """The pool's reset: nothing to reset (asyncpg still rolls back a transaction left
    open before this runs)."""


async def _primary_lag(primary: OwnPositions, position: Position) -> float:
    """Age of the oldest event on the primary after `position` (the replica's read
    tables'), in seconds. A replica's own copy of the events lags with its read tables,
    so only the primary shows how far behind the replica is (replay paused, a lost
    connection to the primary, a slow disk). Raises PrimaryAway."""
    row = await primary.fetchrow(OLDEST_UNPROJECTED, str(position.tx_id),
                                 position.notification_id)
    if row is None:
        return 0.0
    return max(0.0, (datetime.now(UTC) - event_time(row[0])).total_seconds())


def create_app(settings: Settings | None = None, *,
               authenticator: Authenticator | None = None) -> FastAPI:
    """The query API; `authenticator` as for the command API's `create_app`."""
    settings = settings or Settings.from_env()
    side = ReadSide(settings)
    streams = stream.StreamHub(settings)  # the live streams (query_api/stream.py)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await side.start()
        streams.start()
        with contextlib.suppress(ServiceUnavailable):
            await side.open()  # else answer 503 until the database is back
        yield
        await streams.close()
        await side.close()

    app = FastAPI(
        title="Task service: query API",
        version=package_version("taskservice"),
        lifespan=lifespan,
        redirect_slashes=False,
        openapi_url=None,  # /openapi.json and /docs: the service's one document, below
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.authenticator = authenticator or Authenticator(settings)
    app.state.open_reader = side.open
    app.state.read_side = side
    app.state.streams = streams
    install_error_handlers(app, unavailable=DATABASE_DOWN, names=("query API", "command API"))
    app.add_middleware(routes.ReadDispatcher, fastapi=app)  # innermost: after HeadAsGet
    app.add_middleware(HeadAsGet)
    app.add_middleware(Observe, service="query-api")
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes)
    install_cors(app, settings)

    async def ready(_: Request) -> dict[str, Any]:
        reader = await side.open()
        async with reader.connection() as conn:  # DB_POOL_TIMEOUT, as for every read
            position = await read_position(conn)
            lag = await lag_seconds(conn, position)
        measured_on = "read database"
        if side.own_positions is not None:
            with contextlib.suppress(PrimaryAway):
                lag = max(lag, await _primary_lag(side.own_positions, position))
                measured_on = "primary"
        checks = {
            "database": "ok",
            "position": reader.codec.encode(position),
            "listening": reader.watch.listening,
            "lag_seconds": round(lag, 3),
            "lag_measured_on": measured_on,
            "max_lag_seconds": settings.ready_max_lag_seconds,
        }
        if lag > settings.ready_max_lag_seconds:
            raise ServiceUnavailable("The read tables are behind the event store", details=checks)
        return checks

    app.include_router(health_router("query-api", ready))
    app.include_router(stream.router)  # before routes: /tasks/stream is not a task id
    app.include_router(routes.router)
    app.include_router(metrics_router())
    install_docs(app)
    return app
