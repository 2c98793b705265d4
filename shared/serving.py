"""How the APIs are served with uvicorn (`taskctl command-api`, `query-api`, `dev`, and the
benchmark's variants of them), and what that direct path guards against without the
gateway. In the kernel so the benchmark, which may not import `taskctl`, serves alike.

uvicorn alone (its httptools protocol, which `uvicorn[standard]` picks) answers malformed
HTTP itself with a plain-text 400, reads request headers of any size, and times nothing
out before a first response: a client that connects and sends nothing, or trickles its
headers or its body, holds its connection for ever (slowloris). `GuardedHttpToolsProtocol`
is that protocol with:

- the 400 in the `{error, detail, meta}` envelope the APIs use;
- the request line and headers bounded: at most MAX_HEADER_BYTES (431), and complete
  within HTTP_HEADER_TIMEOUT seconds of the connection opening or of the request's
  first byte (408; a connection that has sent nothing of a request is just closed);
- the body complete within HTTP_BODY_TIMEOUT seconds of the headers, else the request
  is never executed (the app sees a disconnect: `shared.http.RequestContext` drops it),
  the client gets a 408 and the connection is closed; after an answer given before the
  body was read (a 413, a 401) the rest of the body gets no longer either.

Every refusal closes the connection (after a short lingering read, so the client reads
the answer rather than a reset). What this does not do is the gateway's job (nginx,
deploy/nginx.conf; docs/operations.md, "The direct path"): limit connections per client
or in all, rate-limit, buffer bodies, speak TLS.

It overrides uvicorn internals (the parser callbacks, `send_400_response`, the request
cycle's flags): tests/e2e/test_direct_http.py drives a real uvicorn process with raw
sockets, so an uvicorn that changes them fails there."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import orjson

from shared.settings import Settings

log = logging.getLogger("taskservice.http")

# Request line and headers together: a token of MAX_TOKEN_BYTES and the rest fit.
MAX_HEADER_BYTES = 64 * 1024
# uvicorn's default, stated: the gateway drops idle upstream connections sooner (4 s).
KEEP_ALIVE_SECONDS = 5
# After a refusal, how long the rest of what the client sends is read and discarded
# before the connection closes (closing with unread data would reset it, and the client
# could lose the answer).
LINGER_SECONDS = 1.0
# The APIs' rule for a client's X-Request-ID (shared.http).
_SANE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
# What the class overrides or reads of uvicorn's.
_UVICORN_HOOKS = ("connection_made", "connection_lost", "data_received", "send_400_response",
                  "on_message_begin", "on_url", "on_header", "on_headers_complete", "on_body",
                  "on_message_complete")

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # no httptools: uvicorn falls back to h11
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


def envelope(status: int, code: str, message: str, request_id: str,
             default_headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole HTTP/1.1 error response in the envelope, closing the connection."""
    body = orjson.dumps({"error": {"code": code, "message": message}, "detail": message,
                         "meta": {"timestamp": datetime.now(UTC).isoformat(),
                                  "request_id": request_id}})
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()]
    head += [name + b": " + value + b"\r\n" for name, value in default_headers]
    head.append(b"content-type: application/json\r\ncontent-length: %d\r\n"
                b"x-request-id: %s\r\nconnection: close\r\n\r\n"
                % (len(body), request_id.encode()))
    return b"".join(head) + body


if HttpToolsProtocol is not None:

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with envelopes, a header size limit and header
        and body deadlines (see the module)."""

        header_timeout: float = 10.0
        body_timeout: float = 30.0
        max_header_bytes: int = MAX_HEADER_BYTES

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._phase = "idle"  # between requests; "headers"; "body"
            self._header_bytes = 0  # of this request's line and headers, as parsed
            self._unparsed_bytes = 0  # received while its headers are incomplete
            self._header_timer: asyncio.TimerHandle | None = None
            self._body_timer: asyncio.TimerHandle | None = None
            self._refused = False

        # The connection

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_late)

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_timers()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # lingering: read and discard
            super().data_received(data)
            if self._refused or self.transport.is_closing():
                return
            if self._phase == "headers":  # the parser holds a partial line meanwhile
                self._unparsed_bytes += len(data)
                if self._unparsed_bytes > self.max_header_bytes:
                    self._headers_too_large()
                    return
            # Bytes between requests (a keep-alive connection's next request, or only
            # blank lines): uvicorn's keep-alive timer stopped at the first of them.
            idle = self.cycle is None or self.cycle.response_complete
            if self._phase != "body" and idle and self._header_timer is None:
                self._header_timer = self.loop.call_later(self.header_timeout,
                                                          self._header_late)

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to HTTP its parser refused (it logged a warning)."""
            self._refuse(400, "BAD_REQUEST", "Malformed HTTP request")

        # The parser's callbacks

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._phase, self._header_bytes, self._unparsed_bytes = "headers", 0, 0
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(self.header_timeout,
                                                          self._header_late)

        def on_url(self, url: bytes) -> None:
            self._header_bytes += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_bytes += len(name) + len(value) + 4  # ": " and CRLF
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._cancel_timers()
            if self._refused:
                return
            if self._header_bytes > self.max_header_bytes:
                self._headers_too_large()  # before any app sees the request
                return
            self._phase = "body"
            super().on_headers_complete()
            self._body_timer = self.loop.call_later(self.body_timeout, self._body_late)

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self._refused:
                return
            super().on_message_complete()
            self._phase = "idle"
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        # The deadlines

        def _header_late(self) -> None:
            self._header_timer = None
            if self._refused or self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False  # a response is on its way: close after it
                return
            if self._phase != "headers":
                self.transport.close()  # nothing of a request: nobody to answer
                return
            log.info("refused %s: request headers not complete within %g s (408)",
                     self._peer(), self.header_timeout)
            self._refuse(408, "REQUEST_TIMEOUT",
                         f"Request headers not received within {self.header_timeout:g} s")

        def _body_late(self) -> None:
            self._body_timer = None
            cycle = self.cycle
            if self._refused or self.transport.is_closing() or cycle is None:
                return
            if cycle.response_complete:
                self.transport.close()  # answered without the body; the rest is unwanted
                return
            if cycle.response_started:
                cycle.keep_alive = False
                return
            # Not executed: the app's next receive() is a disconnect, and whatever it
            # might still send is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
            log.info("refused %s %s %s: body not complete within %g s (408), not executed",
                     self._peer(), cycle.scope["method"], cycle.scope["path"],
                     self.body_timeout)
            self._refuse(408, "REQUEST_TIMEOUT",
                         f"Request body not received within {self.body_timeout:g} s",
                         self._client_request_id(cycle.scope))

        # Helpers

        def _headers_too_large(self) -> None:
            log.info("refused %s: request line and headers over %d bytes (431)",
                     self._peer(), self.max_header_bytes)
            self._refuse(431, "HEADERS_TOO_LARGE",
                         f"Request line and headers exceed {self.max_header_bytes} bytes")

        def _refuse(self, status: int, code: str, message: str,
                    request_id: str | None = None) -> None:
            """Answer `status` in the envelope, then stop reading requests: discard what
            the client still sends for LINGER_SECONDS, then close."""
            self._cancel_timers()
            self._refused = True
            self.transport.write(envelope(status, code, message, request_id or uuid.uuid4().hex,
                                          self.server_state.default_headers))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.flow.resume_reading()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)

        def _cancel_timers(self) -> None:
            for timer in (self._header_timer, self._body_timer):
                if timer is not None:
                    timer.cancel()
            self._header_timer = self._body_timer = None

        def _peer(self) -> str:
            return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"

        @staticmethod
        def _client_request_id(scope: dict[str, Any]) -> str | None:
            for name, value in scope.get("headers", ()):
                if name == b"x-request-id" and _SANE_REQUEST_ID.match(value):
                    return value.decode()
            return None


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of uvicorn.run / uvicorn.Config for an API process."""
    options: dict[str, Any] = {"timeout_keep_alive": KEEP_ALIVE_SECONDS,
                               "h11_max_incomplete_event_size": MAX_HEADER_BYTES}
    if HttpToolsProtocol is None:
        log.warning("httptools is not installed: uvicorn serves with h11, without the"
                    " header and body deadlines (HTTP_HEADER_TIMEOUT, HTTP_BODY_TIMEOUT) or"
                    " the envelope on malformed HTTP; install uvicorn[standard]")
        return options
    missing = [name for name in _UVICORN_HOOKS if not hasattr(HttpToolsProtocol, name)]
    if missing:
        log.warning("this uvicorn's httptools protocol lacks %s: the direct path's"
                    " guards may not apply (tests/e2e/test_direct_http.py)", ", ".join(missing))
    options["http"] = type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {
        "header_timeout": settings.http_header_timeout,
        "body_timeout": settings.http_body_timeout,
    })
    return options


def serve(app_path: str, host: str, port: int, settings: Settings) -> None:
    """Serve the uvicorn factory `app_path` as every API process is served (`taskctl
    command-api`, `query-api`, and the benchmark's variants of them, so a comparison is
    of the apps alone): JSON log lines, the guarded protocol, a graceful stop."""
    import uvicorn

    from shared.observability import configure_logging

    configure_logging(settings.log_level)
    uvicorn.run(
        app_path,
        factory=True,
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        log_config=None,  # keep configure_logging's JSON lines
        proxy_headers=True,
        timeout_graceful_shutdown=10,
        **uvicorn_options(settings),  # envelopes and slow-client deadlines (above)
    )
