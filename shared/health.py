"""`GET /api/health` (alive) and `GET /api/ready` (can serve), for both APIs.

Ready means the app's own check passes (its database) and, when the app verifies
tokens against a key set (`app.state.authenticator`, shared.auth), that one has been
fetched. The router's lifespan starts and stops that authenticator, so its key set is
fetched from start-up on (a failure is not fatal: /api/ready says so, and requests get
503 until a fetch works)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from shared.errors import ServiceUnavailable
from shared.http import Envelope

ReadyCheck = Callable[[Request], Awaitable[dict[str, Any]]]


@asynccontextmanager
async def _authenticator(app: FastAPI) -> AsyncIterator[None]:
    authenticator = getattr(app.state, "authenticator", None)
    if authenticator is not None:
        await authenticator.start()
    try:
        yield
    finally:
        if authenticator is not None:
            await authenticator.close()


def health_router(service: str, ready_check: ReadyCheck) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["health"], lifespan=_authenticator)

    @router.get("/health")
    async def health() -> Response:
        return Envelope({"status": "healthy", "service": service})

    @router.get("/ready")
    async def ready(request: Request) -> Response:
        try:
            checks = await ready_check(request)
        except ServiceUnavailable:
            raise
        except Exception as e:  # any failure here means "not ready"
            raise ServiceUnavailable("Not ready", details={"database": type(e).__name__}) from None
        authenticator = getattr(request.app.state, "authenticator", None)
        if authenticator is not None:
            problem = authenticator.problem()
            if problem is not None:
                raise ServiceUnavailable("Not ready: no authentication keys",
                                         details={**checks, "auth": problem})
            checks = {**checks, "auth": "ok"}
        return Envelope({"status": "ready", "service": service, **checks})

    return router
