"""The one-origin development app behind `taskctl dev`: the command API, the query
API and the projector in one process, on one port.

Reads (GET, HEAD) go to the query app and everything else to the command app, at the
same paths; one lifespan runs both apps' lifespans and the projector as a background
task. Imports `command_api`, `query_api` and `projections` only inside `create_dev_app`
(this is a composition root)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from starlette.types import Receive, Scope, Send

from shared.settings import Settings

log = logging.getLogger("taskservice.dev")

READ_METHODS = frozenset({"GET", "HEAD"})

Background = Callable[[asyncio.Event], Awaitable[None]]


class MethodDispatch:
    """An ASGI app: reads to `reads`, writes to `writes`, and one lifespan for both
    plus the `background` coroutines (each runs until its stop event is set)."""

    def __init__(self, reads: Any, writes: Any, background: tuple[Background, ...] = ()) -> None:
        self.reads = reads
        self.writes = writes
        self.background = background

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        app = self.reads if scope.get("method") in READ_METHODS else self.writes
        await app(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        stack = AsyncExitStack()
        try:
            for app in (self.writes, self.reads):
                await stack.enter_async_context(app.router.lifespan_context(app))
            for run in self.background:
                stack.push_async_callback(_stop, *_start(run))
        except BaseException as e:  # noqa: BLE001 - reported to the server, which exits
            log.exception("dev app failed to start")
            await stack.aclose()
            await send({"type": "lifespan.startup.failed", "message": repr(e)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        try:
            await stack.aclose()
        except Exception as e:  # noqa: BLE001 - reported to the server
            await send({"type": "lifespan.shutdown.failed", "message": repr(e)})
            return
        await send({"type": "lifespan.shutdown.complete"})


def _start(run: Background) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(run(stop), name=getattr(run, "__name__", "background"))

    def report(done: asyncio.Task[None]) -> None:
        if not done.cancelled() and done.exception() is not None:
            log.critical("background task %s stopped", done.get_name(), exc_info=done.exception())

    task.add_done_callback(report)
    return stop, task


async def _stop(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    try:
        await asyncio.wait_for(asyncio.shield(task), 10)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    except Exception:  # noqa: BLE001, S110 - already logged by its done callback
        pass


def create_dev_app(settings: Settings) -> MethodDispatch:
    from command_api.app import create_app as create_command_app  # noqa: PLC0415
    from projections.projector import run as run_projector  # noqa: PLC0415
    from query_api.app import create_app as create_query_app  # noqa: PLC0415

    dsn = settings.require_database_url()

    async def projector(stop: asyncio.Event) -> None:
        await run_projector(dsn, stop=stop)

    return MethodDispatch(
        reads=create_query_app(settings),
        writes=create_command_app(settings),
        background=(projector,),
    )
