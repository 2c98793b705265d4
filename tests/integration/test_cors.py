"""CORS on both APIs: an explicit list of origins, credentials, the request headers a
frontend sends, the response headers it reads, and the error envelopes included."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from command_api.app import create_app as create_command_app
from query_api.app import create_app as create_query_app
from shared.cors import ALLOWED_HEADERS, ALLOWED_METHODS, EXPOSED_HEADERS, TRACE_HEADERS
from shared.settings import Settings, SettingsError
from tests.support import TEST_SECRET, bearer, new_user
from tests.support.compose import NGINX_CONF

ALLOWED = "https://app.example.com"
OTHER = "http://127.0.0.1:5173"
EVIL = "https://evil.example.net"


@pytest.fixture(scope="module", params=["command", "query"])
def client(request: pytest.FixtureRequest, settings: Settings) -> Iterator[TestClient]:
    cors = settings.model_copy(update={"cors_origins": f"{ALLOWED}, {OTHER}"})
    factory = create_command_app if request.param == "command" else create_query_app
    app: FastAPI = factory(cors)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def preflight(client: TestClient, origin: str, method: str = "PATCH"):
    return client.options("/api/tasks/00000000-0000-0000-0000-000000000000", headers={
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type, if-match,"
                                          " idempotency-key, x-min-position, x-request-id",
    })


@pytest.mark.parametrize("origin", [ALLOWED, OTHER])
def test_preflight_from_an_allowed_origin_allows_the_frontends_headers(client, origin):
    response = preflight(client, origin)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == origin
    assert response.headers["access-control-allow-credentials"] == "true"
    allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "if-match", "idempotency-key", "x-min-position",
            "x-request-id"} <= allowed
    assert "PATCH" in response.headers["access-control-allow-methods"]


def test_a_disallowed_origin_gets_no_cors_headers(client):
    response = client.get("/api/health", headers={"Origin": EVIL})
    assert response.status_code == 200
    assert not any(h.startswith("access-control-") for h in response.headers)
    refused = preflight(client, EVIL)
    assert "access-control-allow-origin" not in refused.headers


def test_responses_expose_the_headers_a_frontend_reads(client):
    response = client.get("/api/health", headers={"Origin": ALLOWED})
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert response.headers["vary"].lower().find("origin") >= 0
    exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
    assert {"etag", "x-request-id", "x-position"} <= exposed


@pytest.mark.parametrize("case", ["401", "404", "413", "422"])
def test_error_envelopes_carry_cors_headers(client, case):
    origin = {"Origin": ALLOWED}
    writes = "command" in client.app.title
    if case == "401":
        response = client.request("POST" if writes else "GET", "/api/tasks", headers=origin,
                                  json={"title": "x"})
    elif case == "404":
        response = client.get("/api/nowhere", headers=origin)
    elif case == "413":
        response = client.post("/api/tasks", headers={**origin, **bearer(new_user())},
                               content=b"{" + b" " * 70_000 + b"}")
    else:
        response = client.request("PATCH" if writes else "GET", "/api/tasks/not-a-uuid",
                                  headers={**origin, **bearer(new_user())}, json={})
    assert response.status_code == int(case), response.text
    assert "error" in response.json()
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert response.headers["access-control-allow-credentials"] == "true"
    assert response.headers["x-request-id"]


def test_an_unhandled_error_is_a_500_envelope_with_cors_and_request_id(settings: Settings):
    app = create_command_app(settings.model_copy(update={"cors_origins": ALLOWED}))

    @app.get("/api/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    with TestClient(app, raise_server_exceptions=False) as c:
        response = c.get("/api/boom", headers={"Origin": ALLOWED, "X-Request-ID": "r-500"})
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "INTERNAL_ERROR"
    assert response.json()["meta"]["request_id"] == "r-500"
    assert response.headers["x-request-id"] == "r-500"
    assert response.headers["access-control-allow-origin"] == ALLOWED


@pytest.mark.parametrize("value", ["*", "https://*.example.com", "app.example.com",
                                   "https://app.example.com/path"])
def test_settings_refuse_a_wildcard_or_malformed_origin(value):
    with pytest.raises(SettingsError, match="CORS_ORIGINS"):
        Settings.from_env({"CORS_ORIGINS": value, "BETTER_AUTH_SECRET": TEST_SECRET})


def test_settings_read_a_comma_separated_origin_list():
    settings = Settings.from_env({"CORS_ORIGINS": f" {ALLOWED}/ ,{OTHER}",
                                  "BETTER_AUTH_SECRET": TEST_SECRET})
    assert settings.cors_origin_list == [ALLOWED, OTHER]


def test_preflight_allows_the_tracing_headers_browser_sdks_add(client):
    traced = ", ".join(["authorization", "content-type", *TRACE_HEADERS])
    response = client.options("/api/tasks", headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": traced})
    assert response.status_code == 200, response.text
    allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"traceparent", "tracestate", "baggage", "sentry-trace", "b3"} <= allowed
    assert set(TRACE_HEADERS) <= allowed


def test_a_header_not_allowed_is_refused_in_the_envelope_naming_it(client):
    response = client.options("/api/tasks", headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, X-Client-Version, traceparent"})
    assert response.status_code == 400
    body = response.json()
    assert body["error"]["code"] == "CORS_PREFLIGHT_REFUSED"
    assert body["error"]["details"] == {"headers": ["x-client-version"]}
    assert "CORS_ALLOW_HEADERS_EXTRA" in body["detail"]
    assert body["meta"]["request_id"] == response.headers["x-request-id"]
    refused = client.options("/api/tasks", headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "TRACE"})
    assert refused.status_code == 400
    assert refused.json()["error"]["details"] == {"method": "TRACE"}


@pytest.mark.parametrize("factory", [create_command_app, create_query_app])
def test_cors_allow_headers_extra_allows_more_headers(settings: Settings, factory):
    extra = settings.model_copy(update={"cors_origins": ALLOWED,
                                        "cors_allow_headers_extra": " X-Client-Version,x-tenant "})
    with TestClient(factory(extra)) as c:
        response = c.options("/api/tasks", headers={
            "Origin": ALLOWED, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "x-client-version, x-tenant, traceparent"})
    assert response.status_code == 200, response.text
    allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"x-client-version", "x-tenant", "traceparent", "authorization"} <= allowed


@pytest.mark.parametrize("value", ["*", "x-*", "x client", "x:y", "x$y", 'x"y', "-x"])
def test_settings_refuse_a_wildcard_or_malformed_extra_header(value):
    with pytest.raises(SettingsError, match="CORS_ALLOW_HEADERS_EXTRA"):
        Settings.from_env({"CORS_ALLOW_HEADERS_EXTRA": f"x-ok, {value}",
                           "BETTER_AUTH_SECRET": TEST_SECRET})


@pytest.mark.parametrize("value", ['https://app.example.com"', "https://app.example.com;",
                                   "https://$host", "https://a b.com", "https://app.example.com:x",
                                   "https://app..example.com"])
def test_settings_refuse_an_origin_the_gateway_config_could_misread(value):
    with pytest.raises(SettingsError, match="CORS_ORIGINS"):
        Settings.from_env({"CORS_ORIGINS": value, "BETTER_AUTH_SECRET": TEST_SECRET})


@pytest.mark.parametrize("value", ["http://localhost:3000", "https://[::1]:8443",
                                   "https://xn--bcher-kva.example", "http://10.0.0.7"])
def test_settings_accept_names_ports_and_ip_literals(value):
    settings = Settings.from_env({"CORS_ORIGINS": value, "BETTER_AUTH_SECRET": TEST_SECRET})
    assert settings.cors_origin_list == [value]


def _nginx_map(name: str) -> str:
    """The value deploy/nginx.conf's `map ... $name` gives a request it applies to."""
    match = re.search(rf"map [^{{]+\${name} \{{\s*\"\" \"\";\s*default \"([^\"]*)\";",
                      NGINX_CONF.read_text())
    assert match, name
    return match.group(1)


def test_the_gateway_answers_with_the_apis_cors_lists():
    def names(text: str) -> list[str]:
        return [n.strip() for n in text.split(",")]

    assert names(_nginx_map("cors_allow_methods")) == list(ALLOWED_METHODS)
    assert names(_nginx_map("cors_allow_headers")) == list(ALLOWED_HEADERS)
    assert names(_nginx_map("cors_expose_headers")) == list(EXPOSED_HEADERS)
    assert _nginx_map("cors_allow_headers_extra") == "${CORS_ALLOW_HEADERS_EXTRA}"
