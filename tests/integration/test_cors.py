"""CORS on both APIs: an explicit list of origins, credentials, the request headers a
frontend sends, the response headers it reads, and the error envelopes included."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from command_api.app import create_app as create_command_app
from query_api.app import create_app as create_query_app
from shared.settings import Settings, SettingsError
from tests.support import TEST_SECRET, bearer, new_user

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
