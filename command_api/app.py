"""Composition root of the command API: `create_app(settings)`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request

from command_api import routes
from command_api.fastpath import CommandFastPath
from command_api.handlers import TaskCommands
from command_api.store import AsyncTaskStore
from shared.auth import Authenticator
from shared.cors import install_cors
from shared.errors import DATABASE_DOWN, ServiceUnavailable
from shared.health import health_router
from shared.http import RequestContext, install_error_handlers
from shared.observability import Observe, metrics_router
from shared.settings import Settings

log = logging.getLogger("taskservice.command_api")


class CommandSide:
    """Holds the event store client; opens it on first use, so the API starts (and
    answers 503) while the database is still down."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: AsyncTaskStore | None = None
        self.commands: TaskCommands | None = None
        self._lock: asyncio.Lock | None = None

    async def open(self) -> TaskCommands:
        if self.commands is not None:
            return self.commands
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self.commands is None:
                try:
                    self.store = await AsyncTaskStore.open(self.settings)
                except DATABASE_DOWN as e:
                    log.warning("event store unavailable: %s", e)
                    raise ServiceUnavailable("Database unavailable, try again shortly") from None
                self.commands = TaskCommands(self.store, retries=self.settings.command_retries)
        return self.commands

    async def purge_idempotency_forever(self) -> None:
        """Forget expired Idempotency-Keys every `IDEMPOTENCY_PURGE_INTERVAL` seconds
        (jittered, so a fleet of API processes spreads out; one purges at a time)."""
        interval = self.settings.idempotency_purge_interval
        while True:
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))  # noqa: S311
            try:
                commands = await self.open()
                removed = await commands.store.purge_idempotency(
                    self.settings.idempotency_ttl_hours
                )
            except (ServiceUnavailable, *DATABASE_DOWN) as e:
                log.warning("idempotency purge skipped: %s", e)
                continue
            except Exception:  # noqa: BLE001 - housekeeping must not stop for good
                log.exception("idempotency purge failed")
                continue
            if removed:
                log.info("forgot %d expired Idempotency-Keys", removed)

    async def close(self) -> None:
        store, self.store, self.commands = self.store, None, None
        if store is not None:
            await store.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    side = CommandSide(settings)

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
        version="1.0.0",
        lifespan=lifespan,
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.authenticator = Authenticator(settings)
    app.state.open_commands = side.open
    install_error_handlers(app, unavailable=DATABASE_DOWN)
    if settings.command_fast_path:
        app.add_middleware(CommandFastPath, fastapi=app)  # innermost: inside Observe
    app.add_middleware(Observe, service="command-api")
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes)
    install_cors(app, settings)

    async def ready(_: Request) -> dict[str, Any]:
        commands = await side.open()
        await commands.store.ping()
        return {"database": "ok"}

    app.include_router(health_router("command-api", ready))
    app.include_router(routes.router)
    app.include_router(metrics_router())
    return app
