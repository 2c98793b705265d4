"""CORS for browser frontends on another origin, the same on both APIs.

Installed last, so it is the outermost of our middleware: the error envelopes that
`RequestContext` (413) and the exception handlers (401, 404, 412, 422, 503...) render
pass through it and carry the CORS headers too, and a browser can read them. The
gateway's own answers (its 404, 413 and 503) carry the same headers: deploy/nginx.conf
repeats ALLOWED_METHODS, ALLOWED_HEADERS and EXPOSED_HEADERS (a test compares them)."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from shared.http import REQUEST_ID, error_response
from shared.settings import Settings

log = logging.getLogger("taskservice.cors")

ALLOWED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# The headers the API reads.
API_HEADERS = (
    "Authorization",
    "Content-Type",
    "If-Match",
    "Idempotency-Key",
    "X-Min-Position",
    "X-Request-ID",
)
# The headers browser tracing and monitoring SDKs add to fetch and XHR calls on their
# own once pointed at an API: allowed by default, so turning one on for this API does not
# make every preflight fail. The API reads none of them; allowing a header only lets a
# page send it (none changes what the API does). More: CORS_ALLOW_HEADERS_EXTRA.
TRACE_HEADERS = (
    # W3C Trace Context and W3C Baggage: OpenTelemetry, Elastic, Grafana Faro,
    # Dynatrace, Datadog, New Relic and Azure all speak them; Sentry sends baggage too.
    "traceparent",
    "tracestate",
    "baggage",
    "sentry-trace",  # Sentry
    # Zipkin B3, single and multi-header (OpenTelemetry's and Datadog's b3 propagators)
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    # Datadog RUM's own propagator
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-origin",
    "x-datadog-sampling-priority",
    "x-datadog-tags",
    "newrelic",  # New Relic's browser agent
    "x-amzn-trace-id",  # AWS X-Ray (CloudWatch RUM)
    "request-id",  # Azure Application Insights (its classic correlation)
    "request-context",
)
ALLOWED_HEADERS = API_HEADERS + TRACE_HEADERS
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

    def preflight_response(self, request_headers: Headers) -> Response:
        """Starlette's answer; a refusal (a method or header not allowed) in the
        envelope, naming what was refused and the setting that allows a header."""
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused: dict[str, object] = {}
        reasons = []
        method = request_headers["access-control-request-method"]
        if method not in self.allow_methods:
            refused["method"] = method
            reasons.append(f"method {method} is not allowed")
        requested = request_headers.get("access-control-request-headers") or ""
        headers = [h for h in (n.strip().lower() for n in requested.split(","))
                   if h and h not in self.allow_headers]
        if headers:
            refused["headers"] = headers
            reasons.append(f"headers not allowed: {', '.join(headers)}"
                           " (CORS_ALLOW_HEADERS_EXTRA allows more)")
        if "access-control-request-private-network" in request_headers:
            refused["private_network"] = True
            reasons.append("private network access is not allowed")
        message = "CORS preflight refused: " + "; ".join(reasons)
        log.info("%s (origin %s)", message, request_headers.get("origin"))
        cors = {k: v for k, v in response.headers.items() if k.startswith("access-control-")}
        request_id = uuid.uuid4().hex  # answered before RequestContext gives one
        token = REQUEST_ID.set(request_id)
        try:
            refusal = error_response(400, "CORS_PREFLIGHT_REFUSED", message, details=refused,
                                     headers={**cors, "X-Request-ID": request_id,
                                              "Vary": "Origin"})
        finally:
            REQUEST_ID.reset(token)
        return refusal


def allowed_headers(settings: Settings) -> list[str]:
    """The request headers a preflight allows: ALLOWED_HEADERS, then
    CORS_ALLOW_HEADERS_EXTRA."""
    known = {h.lower() for h in ALLOWED_HEADERS}
    extra = [h for h in settings.cors_allow_headers_extra_list if h not in known]
    return [*ALLOWED_HEADERS, *dict.fromkeys(extra)]


def install_cors(app: FastAPI, settings: Settings) -> None:
    """Allow `settings.cors_origin_list` (explicit origins only), with credentials."""
    app.add_middleware(
        ExplicitOriginsCORS,
        allow_origins=settings.cors_origin_list,
        allow_credentials=True,
        allow_methods=list(ALLOWED_METHODS),
        allow_headers=allowed_headers(settings),
        expose_headers=list(EXPOSED_HEADERS),
        max_age=PREFLIGHT_MAX_AGE,
    )
