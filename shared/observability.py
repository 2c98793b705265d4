"""Logs and metrics for every process: one JSON line per request and per log record,
and Prometheus metrics at `/metrics` (the `prometheus-client` library)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.http import REQUEST_ID

access_log = logging.getLogger("taskservice.access")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000)

HTTP_REQUESTS = Counter(
    "http_requests_total", "HTTP requests answered", ["service", "method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["service", "method", "route", "status"],
    buckets=LATENCY_BUCKETS,
)
EVENTS_APPENDED = Counter("events_appended_total", "Events appended to the event store")
COMMAND_CONFLICTS = Counter(
    "command_version_conflicts_total",
    "Saves that lost a race for a task's next version and were decided again",
)
IDEMPOTENT_REPLAYS = Counter(
    "command_idempotent_replays_total",
    "Commands answered with the outcome of an earlier request with the same Idempotency-Key",
)
COMMAND_DB_BATCH = Histogram(
    "command_db_batch_items",
    "Commands served by one coalesced database round trip of the command API",
    ["kind"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 500),
)
PROJECTOR_POSITION = Gauge(
    "projector_position", "Event-store notification id the projection has reached", ["projection"]
)
EVENT_STORE_HEAD = Gauge("event_store_head", "Highest notification id in the event store")
PROJECTION_LAG_EVENTS = Gauge(
    "projection_lag_events", "Events committed but not yet projected", ["projection"]
)
PROJECTION_LAG_SECONDS = Gauge(
    "projection_lag_seconds", "Age of the oldest event not yet projected", ["projection"]
)
PROJECTOR_BATCH_SIZE = Histogram(
    "projector_batch_events", "Events applied per projector batch", buckets=BATCH_BUCKETS
)
PROJECTOR_BATCH_SECONDS = Histogram(
    "projector_batch_duration_seconds", "Time to apply one projector batch", buckets=LATENCY_BUCKETS
)
REPLAY_EVENTS = Gauge("replay_events_done", "Events applied by the running replay", ["projection"])
REPLAY_TOTAL = Gauge("replay_events_total", "Events the running replay will apply", ["projection"])
AUTH_REFUSALS = Counter(
    "auth_refusals_total",
    "Requests refused by the bearer-token check, by reason (shared.auth.REASONS;"
    " keys_unavailable answers 503, the others 401)",
    ["reason"],
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra={...}` fields become keys."""

    # `color_message` is uvicorn's copy of the message with ANSI colour codes: noise here.
    _standard = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
        "message", "asctime", "color_message"}

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id:
            line["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in self._standard and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for the whole process, at `level` (from LOG_LEVEL)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # uvicorn's own access log repeats ours, without the user or the route.
    logging.getLogger("uvicorn.access").disabled = True


class Observe:
    """Pure ASGI middleware (inside RequestContext): times each request, counts it by
    route template and status, and writes one access log line."""

    def __init__(self, app: ASGIApp, *, service: str) -> None:
        self.app = app
        self.service = service
        # The labelled children by (method, route, status): `labels()` costs a lock and a
        # tuple per call. Bounded: routes are templates and methods/statuses few.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def _metrics(self, method: str, route: str, status: int) -> tuple[Any, Any]:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            labels = (self.service, method, route, str(status))
            children = HTTP_REQUESTS.labels(*labels), HTTP_LATENCY.labels(*labels)
            if len(self._children) < 10_000:
                self._children[key] = children
        return children

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            if route != "/metrics":
                requests, latency = self._metrics(method, route, status)
                requests.inc()
                latency.observe(elapsed)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "request",
                    extra={
                        "service": self.service,
                        "user_id": scope.get("state", {}).get("user_id"),
                        "method": method,
                        "route": route,
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                    },
                )


def metrics_router() -> APIRouter:
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # stdlib name
        pass


def start_metrics_server(
    host: str, port: int, health: Callable[[], dict[str, Any]]
) -> ThreadingWSGIServer:
    """For processes without an HTTP API (the projector): `/metrics` in the Prometheus
    format and `/health` (200, `{"data": health()}`) on `host:port`, served by a daemon
    thread. Stop it with `.shutdown()`."""
    metrics = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "").rstrip("/")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/health":
            body = json.dumps({"data": health()}).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /health\n"]

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
