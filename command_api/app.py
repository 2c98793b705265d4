"""Composition root of the command API: `create_app(settings, store=...)`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib.metadata import version as package_version
from typing import Any

from fastapi import FastAPI, Request

from command_api import routes
from command_api.executor import Executor
from command_api.store import PostgresEventStore
from shared.apidoc import install_docs
from shared.auth import Authenticator
from shared.cors import install_cors
from shared.datakeys import MasterKeyError
from shared.errors import DATABASE_DOWN, ServiceUnavailable
from shared.health import health_router
from shared.http import RequestContext, install_error_handlers
from shared.observability import Observe, metrics_router
from shared.position import MissingKey, PositionCodec
from shared.settings import Settings, SettingsError

log = logging.getLogger("taskservice.command_api")

# How the app gets its event store: opened from the settings, on first use.
StoreFactory = Callable[[Settings], Awaitable[PostgresEventStore]]


class CommandSide:
    """Holds the event store and the executor; opens them on first use, so the API
    starts (and answers 503) while the database is still down."""

    def __init__(self, settings: Settings, open_store: StoreFactory) -> None:
        self.settings = settings
        self.open_store = open_store
        self.store: PostgresEventStore | None = None
        self.executor: Executor | None = None
        self.codec: PositionCodec | None = None
        self._lock: asyncio.Lock | None = None

    async def open(self) -> Executor:
        if self.executor is not None:
            return self.executor
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self.executor is None:
                try:
                    if self.store is None:
                        self.store = await self.open_store(self.settings)
                    self.codec = await self.store.position_codec()
                except DATABASE_DOWN as e:
                    log.warning("event store unavailable: %s", e)
                    raise ServiceUnavailable("Database unavailable, try again shortly") from None
                except (MissingKey, MasterKeyError) as e:
                    log.error("%s", e)
                    raise ServiceUnavailable(
                        "The database is not initialised for this version", details=str(e)
                    ) from None
                self.executor = Executor(self.store, retries=self.settings.command_retries)
        return self.executor

    async def purge_idempotency_forever(self) -> None:
        """Forget expired Idempotency-Keys every `IDEMPOTENCY_PURGE_INTERVAL` seconds
        (jittered, so a fleet of API processes spreads out; one purges at a time)."""
        interval = self.settings.idempotency_purge_interval
        while True:
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))
            try:
                await self.open()
                assert self.store is not None
                removed = await self.store.purge_idempotency(self.settings.idempotency_ttl_hours)
            except (ServiceUnavailable, *DATABASE_DOWN) as e:
                log.warning("idempotency purge skipped: %s", e)
                continue
            except Exception:
                log.exception("idempotency purge failed")  # housekeeping must not stop
                continue
            if removed:
                log.info("forgot %d expired Idempotency-Keys", removed)

    async def close(self) -> None:
        store, self.store, self.executor = self.store, None, None
        if store is not None:
            await store.close()


def create_app(
    settings: Settings | None = None, *, store: StoreFactory | None = None,
    authenticator: Authenticator | None = None,
) -> FastAPI:
    """The command API. `store` opens its event store (default: `PostgresEventStore`
    on `settings`); the benchmark passes its own. `authenticator`: one shared with the
    query API when both run in one process (`taskctl dev`), so both see one key set."""
    settings = settings or Settings.from_env()
    if settings.environment == "production" and not settings.data_master_key and store is None:
        raise SettingsError(
            "DATA_MASTER_KEY is not set: in production the users' data keys are wrapped by a"
            ' master key of yours (`python -c "import secrets; print(secrets.token_urlsafe(32))"`;'
            " docs/privacy.md)")
    side = CommandSide(settings, store or PostgresEventStore.open)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            await side.open()
        except ServiceUnavailable:
            pass  # answer 503 until the database is back
        purging = None
        if settings.idempotency_purge_interval > 0:
            purging = asyncio.create_task(side.purge_idempotency_forever())
        yield
        if purging is not None:
            purging.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purging
        await side.close()

    app = FastAPI(
        title="Task service: command API",
        version=package_version("taskservice"),
        lifespan=lifespan,
        redirect_slashes=False,
        openapi_url=None,  # /openapi.json and /docs: the service's one document, below
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.authenticator = authenticator or Authenticator(settings)
    app.state.open_executor = side.open
    app.state.command_side = side
    install_error_handlers(app, unavailable=DATABASE_DOWN, names=("command API", "query API"))
    app.add_middleware(routes.CommandDispatcher, fastapi=app)  # innermost: inside Observe
    app.add_middleware(Observe, service="command-api")
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes)
    install_cors(app, settings)

    async def ready(_: Request) -> dict[str, Any]:
        await side.open()
        assert side.store is not None
        await side.store.ping()
        return {"database": "ok"}

    app.include_router(health_router("command-api", ready))
    app.include_router(routes.router)
    app.include_router(metrics_router())
    install_docs(app)
    return app
