"""HTTP plumbing both APIs share: envelopes, the error handlers, and request context
(request id, trailing slashes, body size limit)."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.apidoc import allowed_methods
from shared.errors import (
    ApiError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    ValidationFailed,
)

log = logging.getLogger("taskservice.http")

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def meta(**extra: Any) -> dict[str, Any]:
    return {"timestamp": now_iso(), "request_id": REQUEST_ID.get(), **extra}


class Json(JSONResponse):
    """JSON rendered by orjson: the bytes `json.dumps(..., ensure_ascii=False,
    separators=(",", ":"))` gives, faster."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class Envelope(Json):
    """A JSON response whose body is ``{data, meta}``."""

    def __init__(
        self,
        data: Any,
        *,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        **meta_extra: Any,
    ) -> None:
        super().__init__({"data": data, "meta": meta(**meta_extra)}, status_code, headers)


def error_response(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: Mapping[str, str] | None = None,
    meta_extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    # `detail` repeats the message at the top level, where FastAPI's default errors put
    # it and where most fetch wrappers look for it.
    return Json({"error": error, "detail": message, "meta": meta(**(meta_extra or {}))},
                status, dict(headers or {}))


def render_error(exc: ApiError) -> JSONResponse:
    """The error's envelope, with its status and headers."""
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers,
                          exc.meta)


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "path", "query", "header")]
    if not parts:
        return str(loc[0]) if loc else "request"
    return ".".join(parts)


def validation_details(errors: Any) -> dict[str, str]:
    details: dict[str, str] = {}
    for err in errors:
        name = _field_name(tuple(err.get("loc", ())))
        if err.get("type") == "json_invalid":
            name, message = "body", "Malformed JSON"
        elif err.get("type") == "extra_forbidden":
            message = "Unknown field"
        else:
            message = str(err.get("msg", "Invalid value"))
            if err.get("type") == "value_error":  # our validators' own text, shown as is
                message = message.removeprefix("Value error, ")
        details.setdefault(name, message)
    return details


def install_error_handlers(
    app: FastAPI, unavailable: tuple[type[BaseException], ...] = (), *,
    names: tuple[str, str] | None = None,
) -> None:
    """Render every error in the ``{error, meta}`` envelope; no handler turns a
    failure into a success, and nothing unexpected leaks beyond INTERNAL_ERROR.
    `names`: (this API, the other API), for a 405 of a method only the other serves."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return render_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        return render_error(ValidationFailed(details=validation_details(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        elsewhere = None
        if exc.status_code in (404, 405):
            # A path of the service, a method neither API has on it: 405, and `Allow`
            # names the methods of both APIs (this process knows only its own).
            allowed = allowed_methods(request.scope["path"])
            if allowed and request.method not in allowed:
                return render_error(MethodNotAllowed(headers={"Allow": ", ".join(allowed)}))
            if allowed and names is not None:
                # The other API's method: a request sent straight to this API's port (the
                # gateway and `taskctl dev` route by method). The status is this
                # process's (404, or 405 with its own `Allow`); the message says where.
                elsewhere = (f"{request.method} {request.scope['path']} is served by the"
                             f" {names[1]}, not this {names[0]}: send requests through the"
                             " gateway (or taskctl dev), which routes each method to its API")
        if exc.status_code == 404:
            return render_error(NotFound(elsewhere or "Route not found"))
        if exc.status_code == 405:
            return render_error(MethodNotAllowed(elsewhere, headers=dict(exc.headers or {})))
        if exc.status_code == 400:
            return render_error(
                ValidationFailed("Malformed request body", details={"body": "Malformed body"})
            )
        return error_response(exc.status_code, "ERROR", str(exc.detail), headers=exc.headers)

    async def _unavailable(_: Request, exc: Exception) -> Response:
        log.warning("database unavailable: %s: %s", type(exc).__name__, exc)
        return render_error(ServiceUnavailable("Database unavailable, try again shortly"))

    for exc_type in unavailable:
        app.add_exception_handler(exc_type, _unavailable)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return render_error(ApiError())


async def render_with_handlers(app: FastAPI, request: Request, exc: Exception) -> Response:
    """`exc` as `app`'s exception handlers render it, looked up by class as Starlette
    looks them up: for the dispatchers that serve hot routes without Starlette's
    routing (`command_api.routes.CommandDispatcher`, `query_api.routes.ReadDispatcher`).
    Re-raised when only the catch-all would take it (`RequestContext` then logs it and
    answers 500)."""
    handlers = app.exception_handlers
    for cls in type(exc).__mro__:
        if cls is Exception:
            break
        handler = handlers.get(cls)
        if handler is not None:
            response = await handler(request, exc)
            assert isinstance(response, Response)
            return response
    raise exc


class RequestContext:
    """Pure ASGI middleware: request id in and out, trailing slash folded away without
    a redirect, and request bodies capped before any route reads them."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        content_length = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _SANE_REQUEST_ID.match(candidate):
                    request_id = candidate
            elif name == b"content-length":
                content_length = value
        request_id = request_id or uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        path: str = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            stripped = path.rstrip("/") or "/"
            scope = {**scope, "path": stripped, "raw_path": stripped.encode()}

        raw_id = request_id.encode()
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                headers.append((b"x-request-id", raw_id))
                message = {**message, "headers": headers}
            await send(message)

        try:
            too_large = False
            if content_length is not None:
                try:
                    too_large = int(content_length) > self.max_body_bytes
                except ValueError:
                    too_large = True
            if not too_large and scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
                body, too_large = await self._read_body(receive)
                if body is None:
                    # The client went away before its body was complete: a partial body
                    # is never executed, and there is nobody to answer.
                    log.info("request dropped: client disconnected before the body ended")
                    return
                receive = replay_body(body, receive)
            if too_large:
                response = render_error(
                    PayloadTooLarge(f"Request body exceeds {self.max_body_bytes} bytes")
                )
                await response(scope, receive, send_with_id)
                return
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                # Rendered here rather than by Starlette's outermost ServerErrorMiddleware,
                # so the 500 envelope carries X-Request-ID and the CORS headers too.
                if started:
                    raise
                log.exception("unhandled error")
                response = render_error(ApiError())
                await response(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)

    async def _read_body(self, receive: Receive) -> tuple[bytes | None, bool]:
        """The whole body and whether it is too large; None for the body when the
        client disconnected before its last chunk."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None, False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False


def replay_body(body: bytes, receive: Receive) -> Callable[[], Awaitable[Message]]:
    """A `receive` that hands out `body` (already read) once, then defers to `receive`."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or REQUEST_ID.get()
