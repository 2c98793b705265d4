"""compose.yaml's services as real processes, with the commands and environment the file
gives them (hosts mapped to 127.0.0.1, ports replaced by free ones consistently), behind
the REAL nginx running deploy/nginx.conf: one origin for reads and writes."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from shared import apidoc
from shared.settings import Settings
from taskctl.dbinit import PASSWORD_VARIABLES, ROLES
from tests.support import TEST_SECRET, PostgresServer, as_role, bearer, new_user
from tests.support.compose import (
    gateway_conf,
    load_compose,
    nginx_for_test,
    service_environment,
)
from tests.support.process import Proc, free_port, require_binary

pytestmark = pytest.mark.slow
APIS = ("command-api", "query-api")


@dataclass
class Stack:
    gateway: str
    ports: dict[str, int]
    metrics_ports: list[int]
    procs: dict[str, Proc] = field(default_factory=dict)


# What .env gives compose. The role passwords go unused: the test server trusts
# 127.0.0.1, so each service connects as the role compose names without one.
ORIGIN = "https://app.example.com"  # a frontend on another origin
COMPOSE_ENV = {"POSTGRES_PASSWORD": "unused-here", "BETTER_AUTH_SECRET": TEST_SECRET,
               "DATA_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
               "CORS_ORIGINS": f"http://127.0.0.1:5173, {ORIGIN}/",
               "CORS_ALLOW_HEADERS_EXTRA": "X-Client-Version",
               **{variable: "unused-here" for variable in PASSWORD_VARIABLES.values()}}


def process_env(service: dict, database_url: str, **extra: str) -> dict[str, str]:
    env = service_environment(service)
    assert "@postgres:5432/" in env["DATABASE_URL"]  # the compose host, mapped below
    user = urlsplit(env["DATABASE_URL"]).username
    if user in ROLES:  # as compose connects it; init as the test server's owner
        env["DATABASE_URL"] = as_role(database_url, user)
    else:
        env["DATABASE_URL"] = database_url
    for variable in PASSWORD_VARIABLES.values():
        env.pop(variable, None)  # so db init sets none
    return {"PATH": os.environ.get("PATH", ""), **env, **extra}


def taskctl(command: list[str], port: int | None = None) -> list[str]:
    """The service's command, run from this checkout, listening on 127.0.0.1:`port`."""
    assert command[0] == "taskctl"
    args = list(command[1:])
    if "--host" in args:
        args[args.index("--host") + 1] = "127.0.0.1"
    if port is not None:
        args[args.index("--port") + 1] = str(port)
    return [sys.executable, "-m", "taskctl.cli", *args]


def healthcheck(service: dict, port: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the service's compose health check command here, on the substituted port."""
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python"
    args = [re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", a) for a in test[2:]]
    return subprocess.run([sys.executable, *args], env=env, timeout=10, capture_output=True)


def start_gateway(nginx: str, prefix: Path, upstreams: dict[str, int]) -> tuple[Proc, str]:
    """nginx on deploy/nginx.conf as the gateway container renders it from COMPOSE_ENV,
    in front of `upstreams` (service name -> port on 127.0.0.1)."""
    listen = free_port()
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_for_test(gateway_conf(COMPOSE_ENV), prefix, listen, upstreams))
    proc = Proc([nginx, "-p", str(prefix), "-c", str(conf), "-e", "stderr"],
                prefix.parent / f"{prefix.name}.log")
    return proc, f"http://127.0.0.1:{listen}"


@pytest.fixture(scope="module")
def stack(pg_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    nginx = require_binary("nginx", "/usr/sbin/nginx")
    tmp = tmp_path_factory.mktemp("gateway")
    compose = load_compose(COMPOSE_ENV)
    services = compose["services"]
    url = pg_server.create_database("taskservice_gateway")
    stack = Stack(gateway="", ports={name: free_port() for name in APIS},
                  metrics_ports=[free_port() for _ in range(services["projector"]["deploy"]["replicas"])])
    try:
        # The init job first, as compose orders it.
        init = subprocess.run(taskctl(services["init"]["command"]),
                              env=process_env(services["init"], url), timeout=60,
                              capture_output=True, text=True)
        assert init.returncode == 0, init.stdout + init.stderr

        for name in APIS:
            env = process_env(services[name], url)
            stack.procs[name] = Proc(taskctl(services[name]["command"], stack.ports[name]),
                                     tmp / f"{name}.log", env)
        for i, port in enumerate(stack.metrics_ports):
            env = process_env(services["projector"], url, METRICS_HOST="127.0.0.1",
                              METRICS_PORT=str(port))
            stack.procs[f"projector-{i}"] = Proc(taskctl(services["projector"]["command"]),
                                                 tmp / f"projector-{i}.log", env)

        stack.procs["nginx"], stack.gateway = start_gateway(nginx, tmp / "nginx", stack.ports)

        for name in APIS:
            stack.procs[name].wait_http(f"http://127.0.0.1:{stack.ports[name]}/api/health")
        for i, port in enumerate(stack.metrics_ports):
            stack.procs[f"projector-{i}"].wait_http(f"http://127.0.0.1:{port}/health")
        stack.procs["nginx"].wait_http(f"{stack.gateway}/healthz")
        yield stack
    finally:
        for name, proc in stack.procs.items():
            proc.stop(signal.SIGQUIT if name == "nginx" else signal.SIGTERM)
        pg_server.drop_database(url)
    for name, proc in stack.procs.items():
        assert "Traceback" not in proc.output(), f"{name}:\n{proc.output()}"


def test_compose_health_checks_pass_against_the_running_services(stack: Stack):
    compose = load_compose(COMPOSE_ENV)
    env = {"PATH": os.environ.get("PATH", "")}
    for name in APIS:
        result = healthcheck(compose["services"][name], stack.ports[name], env)
        assert result.returncode == 0, result.stderr
    for port in stack.metrics_ports:
        result = healthcheck(compose["services"]["projector"], port,
                             {**env, "METRICS_PORT": str(port)})
        assert result.returncode == 0, result.stderr
    # ...and fail when nothing answers.
    dead = healthcheck(compose["services"]["command-api"], free_port(), env)
    assert dead.returncode != 0


def test_writes_then_reads_its_writes_through_one_origin(stack: Stack):
    with httpx.Client(base_url=stack.gateway, headers=bearer(new_user()), timeout=10) as client:
        created = client.post("/api/tasks", json={"title": "through the gateway"})
        assert created.status_code == 201, created.text
        task = created.json()["data"]
        changed = client.patch(f"/api/tasks/{task['id']}", json={"completed": True},
                               headers={"If-Match": created.headers["ETag"]})
        assert changed.status_code == 200, changed.text
        read = client.get(f"/api/tasks/{task['id']}",
                          headers={"X-Min-Position": changed.headers["X-Position"]})
        assert read.status_code == 200, read.text
        assert read.json()["meta"]["stale"] is False
        assert read.json()["data"] == changed.json()["data"]
        assert read.json()["data"]["completed"] is True
        assert "position" in read.json()["meta"]  # answered by the query API
        head = client.head("/api/tasks")
        assert head.status_code == 200 and head.content == b""


def test_a_body_over_max_body_bytes_gets_413_in_the_envelope(stack: Stack):
    headers = {**bearer(new_user()), "X-Request-ID": "gw-big-body"}
    big = httpx.post(f"{stack.gateway}/api/tasks", headers=headers, timeout=10,
                     json={"title": "x", "description": "y" * 100_000})
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert big.json()["detail"] == big.json()["error"]["message"]  # the gateway's own page
    assert big.headers["X-Request-ID"] == "gw-big-body"
    assert big.json()["meta"]["request_id"] == "gw-big-body"
    # Just under the limit, the body reaches the API (which judges its content: 422).
    near = httpx.post(f"{stack.gateway}/api/tasks", headers=bearer(new_user()), timeout=10,
                      json={"title": "x", "description": "y" * 60_000})
    assert near.status_code == 422, near.text
    assert "description" in near.json()["error"]["details"]


def cors_headers(response: httpx.Response) -> dict[str, list[str]]:
    return {name: response.headers.get_list(name) for name in response.headers
            if name.startswith("access-control-")}


def names(values: list[str]) -> set[str]:
    return {n.strip().lower() for v in values for n in v.split(",")}


def test_the_gateways_own_answers_carry_the_apis_cors_headers(stack: Stack):
    origin = {"Origin": ORIGIN}
    with httpx.Client(base_url=stack.gateway, timeout=10) as client:
        api = client.get("/api/tasks", headers={**origin, **bearer(new_user())})
        own = {
            413: client.post("/api/tasks", content=b"{" + b" " * 100_000 + b"}",
                             headers={**origin, **bearer(new_user()),
                                      "Content-Type": "application/json"}),
            404: client.get("/metrics", headers=origin),
        }
        assert api.status_code == 200, api.text
        assert cors_headers(api)["access-control-allow-origin"] == [ORIGIN]  # the API's, once
        for status, response in own.items():
            assert response.status_code == status, response.text
            assert response.json()["error"]["code"] in ("PAYLOAD_TOO_LARGE", "NOT_FOUND")
            headers = cors_headers(response)
            assert headers["access-control-allow-origin"] == [ORIGIN], status
            assert headers["access-control-allow-credentials"] == ["true"]
            assert names(headers["access-control-expose-headers"]) == names(
                cors_headers(api)["access-control-expose-headers"])
            assert "origin" in response.headers["vary"].lower()
        # The other listed origin gets its own echoed; one not listed gets no CORS at all.
        other = client.get("/metrics", headers={"Origin": "http://127.0.0.1:5173"})
        assert other.headers["access-control-allow-origin"] == "http://127.0.0.1:5173"
        for evil in ("https://evil.example.net", "https://app.example.com.evil.net",
                     "https://app.example.co", "null"):
            refused = client.get("/metrics", headers={"Origin": evil})
            assert refused.status_code == 404
            assert cors_headers(refused) == {}, evil


def test_while_an_api_is_down_a_page_still_reads_the_503(stack: Stack, tmp_path: Path):
    """A gateway whose APIs do not answer: it approves an allowed origin's preflight
    itself (the same lists as the API's), so the request then reads the 503 envelope."""
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, traceparent,"
                                                   " x-client-version"}
    up = httpx.options(f"{stack.gateway}/api/tasks", headers=preflight, timeout=10)
    assert up.status_code == 200, up.text  # answered by the command API
    nginx = require_binary("nginx", "/usr/sbin/nginx")
    dead = {name: free_port() for name in APIS}  # nothing listens there
    proc, gateway = start_gateway(nginx, tmp_path / "nginx", dead)
    try:
        proc.wait_http(f"{gateway}/healthz")
        down = httpx.options(f"{gateway}/api/tasks", headers=preflight, timeout=10)
        assert down.status_code == 204
        assert down.headers["access-control-allow-origin"] == ORIGIN
        assert down.headers["access-control-allow-credentials"] == "true"
        safelisted = {"accept", "accept-language", "content-language"}  # Starlette lists them
        for header in ("access-control-allow-headers", "access-control-allow-methods"):
            got = names(down.headers.get_list(header))
            assert got == names(up.headers.get_list(header)) - safelisted, header
        assert {"traceparent", "x-client-version"} <= names(
            down.headers.get_list("access-control-allow-headers"))
        for method in ("GET", "POST"):
            response = httpx.request(method, f"{gateway}/api/tasks", timeout=10,
                                     headers={"Origin": ORIGIN, **bearer(new_user())},
                                     json={"title": "x"} if method == "POST" else None)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
            assert response.headers["access-control-allow-origin"] == ORIGIN
            assert "retry-after" in names(response.headers.get_list(
                "access-control-expose-headers"))
            assert response.headers["retry-after"] == "1"
        # An origin not listed: no approval, no CORS header.
        refused = httpx.options(f"{gateway}/api/tasks", timeout=10,
                                headers={**preflight, "Origin": "https://evil.example.net"})
        assert refused.status_code == 503 and cors_headers(refused) == {}
    finally:
        proc.stop(signal.SIGQUIT)


def test_a_token_of_max_token_bytes_gets_through_the_gateway(stack: Stack):
    """nginx's default header line buffer (8k) would refuse a token the APIs accept."""
    env = service_environment(load_compose(COMPOSE_ENV)["services"]["command-api"])
    limit = Settings.from_env(env).max_token_bytes
    response = httpx.get(f"{stack.gateway}/api/tasks", timeout=10,
                         headers={"Authorization": "Bearer " + "a" * limit})
    assert response.status_code == 401, response.text  # the API's refusal, not nginx's 400
    assert response.json()["error"]["code"] == "UNAUTHORIZED"


def test_request_id_is_passed_both_ways(stack: Stack):
    own = f"gw-{uuid.uuid4().hex}"
    for method in ("GET", "POST"):
        response = httpx.request(method, f"{stack.gateway}/api/tasks", timeout=10,
                                 headers={**bearer(new_user()), "X-Request-ID": own},
                                 json={"title": "with an id"} if method == "POST" else None)
        assert response.status_code in (200, 201), response.text
        assert response.headers["X-Request-ID"] == own
        assert response.json()["meta"]["request_id"] == own
    # An unusable id is replaced by the gateway's own, which the API then uses.
    response = httpx.get(f"{stack.gateway}/api/tasks", timeout=10,
                         headers={**bearer(new_user()), "X-Request-ID": "not ok!"})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])
    assert response.json()["meta"]["request_id"] == response.headers["X-Request-ID"]


def test_metrics_are_not_reachable_through_the_gateway(stack: Stack):
    for path in ("/metrics", "/metrics/", "/api/../metrics", "/redoc", "/openapi.yaml"):
        response = httpx.get(f"{stack.gateway}{path}", timeout=10)
        assert response.status_code == 404, (path, response.text)
        assert "http_requests_total" not in response.text
    # ...while each service serves them on its own port.
    for name in APIS:
        metrics = httpx.get(f"http://127.0.0.1:{stack.ports[name]}/metrics", timeout=10)
        assert f'http_requests_total{{method="GET",route="/api/health",service="{name}"' in (
            metrics.text
        )


def test_the_one_openapi_document_and_swagger_ui_are_served(stack: Stack):
    document = httpx.get(f"{stack.gateway}/openapi.json", timeout=10)
    assert document.status_code == 200, document.text
    assert document.json() == json.loads(apidoc.DOCUMENT.read_text())
    paths = document.json()["paths"]
    assert {"get", "post"} <= set(paths["/api/tasks"])  # both APIs' routes, one document
    docs = httpx.get(f"{stack.gateway}/docs/", timeout=10)
    assert docs.status_code == 200 and "SwaggerUIBundle" in docs.text
    assert "url: '/openapi.json'" in docs.text


def test_every_operation_of_both_contracts_and_the_allow_of_both_apis(stack: Stack):
    user = new_user()
    with httpx.Client(base_url=stack.gateway, headers=bearer(user), timeout=10) as client:
        for base in ("/api/tasks", f"/api/{user}/tasks"):
            tid = client.post(base, json={"title": "t"}).json()["data"]["id"]
            put = client.put(f"{base}/{tid}", json={"title": "put"})
            assert put.status_code == 200 and put.json()["data"]["title"] == "put", put.text
            patch = client.patch(f"{base}/{tid}", json={"title": "patched"})
            assert patch.status_code == 200 and patch.json()["data"]["title"] == "patched"
            toggled = client.patch(f"{base}/{tid}/complete")
            assert toggled.status_code == 200 and toggled.json()["data"]["completed"] is True
            assert client.delete(f"{base}/{tid}").status_code == 204
        for method, path, allow in (
            ("PUT", "/api/tasks", "GET, HEAD, POST"),
            ("POST", f"/api/tasks/{uuid.uuid4()}", "DELETE, GET, HEAD, PATCH, PUT"),
            ("GET", f"/api/{user}/tasks/{uuid.uuid4()}/complete", "PATCH"),
            ("DELETE", "/api/stats", "GET, HEAD"),
        ):
            refused = client.request(method, path)
            assert refused.status_code == 405, (method, path, refused.text)
            assert refused.headers["Allow"] == allow, (method, path)
            assert refused.json()["detail"] == refused.json()["error"]["message"]


def test_one_projector_is_active_and_reports_its_position(stack: Stack):
    httpx.post(f"{stack.gateway}/api/tasks", headers=bearer(new_user()), timeout=10,
               json={"title": "counted"}).raise_for_status()
    roles = []
    for port in stack.metrics_ports:
        roles.append(httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["data"]["role"])
    assert sorted(roles) == ["active", "standby"]
    active = stack.metrics_ports[roles.index("active")]
    metrics = httpx.get(f"http://127.0.0.1:{active}/metrics", timeout=5).text
    position = re.search(r'^projector_position\{projection="task_views"\} (\S+)$', metrics, re.M)
    assert position and float(position.group(1)) > 0, metrics
    assert re.search(r"^projector_batch_events_count (\S+)$", metrics, re.M)


def test_a_frontend_that_never_sends_a_position_reads_its_writes_at_once(stack: Stack):
    """Separate command, query and projector processes behind the gateway: a create,
    then at once a get and a list with no header, 200 times: every task visible."""
    with httpx.Client(base_url=stack.gateway, headers=bearer(new_user()), timeout=10) as client:
        ids: list[str] = []
        for i in range(200):
            created = client.post("/api/tasks", json={"title": f"seen {i}"})
            assert created.status_code == 201, created.text
            task = created.json()["data"]
            ids.append(task["id"])
            got = client.get(f"/api/tasks/{task['id']}")
            assert got.status_code == 200, (i, got.text)
            assert got.json()["data"] == task and got.json()["meta"]["stale"] is False
            listed = client.get("/api/tasks", params={"limit": 1})
            assert listed.json()["data"] == [task], (i, listed.text)
            assert listed.json()["meta"]["total"] == i + 1
