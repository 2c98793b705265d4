"""CORS for browser frontends on another origin, the same on both APIs.

Installed last, so it is the outermost of our middleware: the error envelopes that
`RequestContext` (413) and the exception handlers (401, 404, 412, 422, 503...) render
pass through it and carry the CORS headers too, and a browser can read them."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Receive, Scope, Send

from shared.settings import Settings

ALLOWED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
ALLOWED_HEADERS = (
    "Authorization",
    "Content-Type",
    "If-Match",
    "Idempotency-Key",
    "X-Min-Position",
    "X-Request-ID",
)
EXPOSED_HEADERS = ("ETag", "X-Request-ID", "X-Position", "Retry-After")
PREFLIGHT_MAX_AGE = 600


class ExplicitOriginsCORS(CORSMiddleware):
    """Starlette's CORS, except that a request from an origin not on the list gets no
    CORS header at all (Starlette still adds Allow-Credentials and Expose-Headers), and
    its preflight goes on to the app like any OPTIONS request."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            origin = Headers(scope=scope).get("origin")
            if origin is None or not self.is_allowed_origin(origin):
                await self.app(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def install_cors(app: FastAPI, settings: Settings) -> None:
    """Allow `settings.cors_origin_list` (explicit origins only), with credentials."""
    app.add_middleware(
        ExplicitOriginsCORS,
        allow_origins=settings.cors_origin_list,
        allow_credentials=True,
        allow_methods=list(ALLOWED_METHODS),
        allow_headers=list(ALLOWED_HEADERS),
        expose_headers=list(EXPOSED_HEADERS),
        max_age=PREFLIGHT_MAX_AGE,
    )
