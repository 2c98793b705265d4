"""`GET /api/health` (alive) and `GET /api/ready` (can serve), for both APIs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from shared.errors import ServiceUnavailable
from shared.http import Envelope

ReadyCheck = Callable[[Request], Awaitable[dict[str, Any]]]


def health_router(service: str, ready_check: ReadyCheck) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["health"])

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
        return Envelope({"status": "ready", "service": service, **checks})

    return router
