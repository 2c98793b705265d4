"""A REAL headless Chromium, on a page served from another origin (another 127.0.0.1
port), calls the command API with preflighted requests (PATCH with If-Match and
Authorization) and reads the responses and their exposed headers: CORS as a browser
enforces it, error envelopes included; with a tracing SDK's headers too, and through the
real nginx gateway, whose own 413 and 503 the page reads as such."""

from __future__ import annotations

import html
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shared.auth import mint_token
from taskctl.dbinit import PASSWORD_VARIABLES
from tests.support import TEST_SECRET, new_user
from tests.support.compose import gateway_conf, nginx_for_test
from tests.support.process import Proc, free_port, require_binary

pytestmark = pytest.mark.slow

PAGE = """<!doctype html>
<html><body><pre id="result">pending</pre>
<script>
var API = %(api)s, TOKEN = %(token)s;
function call(method, path, headers, body) {
  var x = new XMLHttpRequest();
  x.open(method, API + path, false);  // synchronous: done before the DOM is dumped
  for (var k in headers) x.setRequestHeader(k, headers[k]);
  x.send(body === undefined ? null : JSON.stringify(body));
  return {status: x.status, body: x.responseText,
          etag: x.getResponseHeader("ETag"), request_id: x.getResponseHeader("X-Request-ID"),
          position: x.getResponseHeader("X-Position")};
}
var out = {};
try {
  var auth = {"Authorization": "Bearer " + TOKEN, "Content-Type": "application/json"};
  out.created = call("POST", "/api/tasks", auth, {title: "from the browser"});
  var id = JSON.parse(out.created.body).data.id;
  out.patched = call("PATCH", "/api/tasks/" + id, Object.assign({}, auth,
      {"If-Match": out.created.etag, "X-Request-ID": "browser-patch-1",
       "Idempotency-Key": "browser-key-1"}), {completed: true});
  out.stale = call("PATCH", "/api/tasks/" + id, Object.assign({}, auth,
      {"If-Match": out.created.etag}), {title: "too late"});
} catch (e) { out.error = String(e); }
document.getElementById("result").textContent = JSON.stringify(out);
</script></body></html>
"""


# fetch(), as a frontend with a tracing SDK (OpenTelemetry, Sentry) sends it: the SDK's
# headers on every call. Chromium dumps the DOM once the virtual time budget is spent;
# virtual time stands still while a fetch is pending.
TRACED_PAGE = """<!doctype html>
<html><body><pre id="result">pending</pre>
<script>
var API = %(api)s, GATEWAY = %(gateway)s, TOKEN = %(token)s;
var TRACE = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
             "tracestate": "congo=t61rcWkgMzE", "baggage": "userId=alice,isProduction=false",
             "sentry-trace": "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1"};
async function call(base, method, path, headers, body) {
  try {
    var r = await fetch(base + path, {method: method, headers: headers, body: body});
    return {status: r.status, body: await r.text(), request_id: r.headers.get("X-Request-ID"),
            retry_after: r.headers.get("Retry-After")};
  } catch (e) { return {error: String(e)}; }
}
(async function () {
  var headers = Object.assign({"Authorization": "Bearer " + TOKEN,
                               "Content-Type": "application/json"}, TRACE);
  var out = {};
  out.traced = await call(API, "POST", "/api/tasks", headers,
                          JSON.stringify({title: "traced"}));
  out.traced_via_gateway = await call(GATEWAY, "POST", "/api/tasks", headers,
                                      JSON.stringify({title: "traced, via the gateway"}));
  out.too_large = await call(GATEWAY, "POST", "/api/tasks", headers,
                             JSON.stringify({title: "x", description: "y".repeat(100000)}));
  out.unavailable = await call(GATEWAY, "GET", "/api/tasks", headers);
  out.not_allowed = await call(API, "GET", "/api/tasks",
                               Object.assign({"X-Not-Allowed": "1"}, headers));
  document.getElementById("result").textContent = JSON.stringify(out);
})();
</script></body></html>
"""


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def page_server(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    root = tmp_path / "site"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def command_api(database_url: str, origin: str, log: Path) -> tuple[Proc, str]:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "ENVIRONMENT": "test",
           "BETTER_AUTH_SECRET": TEST_SECRET, "LOG_LEVEL": "WARNING", "CORS_ORIGINS": origin}
    proc = Proc([sys.executable, "-m", "taskctl.cli", "command-api", "--host", "127.0.0.1",
                 "--port", str(port)], log, env)
    base = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{base}/api/health")
    return proc, base


def dump_dom(url: str, profile: Path, timeout: float = 60, *extra: str) -> str:
    chromium = require_binary("chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
    proc = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
         *extra, "--dump-dom", url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
        proc.communicate(timeout=10)
        raise AssertionError(f"chromium did not finish in {timeout}s") from None
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


def run_page(root: Path, page_port: int, api: str, token: str, profile: Path,
             page: str = PAGE, **values: str) -> dict:
    (root / "index.html").write_text(page % {
        "api": json.dumps(api), "token": json.dumps(token),
        **{k: json.dumps(v) for k, v in values.items()}})
    extra = ("--virtual-time-budget=20000",) if page is not PAGE else ()
    dom = dump_dom(f"http://127.0.0.1:{page_port}/index.html", profile, 60, *extra)
    match = re.search(r'<pre id="result">(.*?)</pre>', dom, re.S)
    assert match, dom
    return json.loads(html.unescape(match.group(1)))


def test_a_browser_on_another_origin_reads_responses_and_exposed_headers(
    database_url: str, page_server: tuple[Path, int], tmp_path: Path
):
    root, page_port = page_server
    proc, api = command_api(database_url, f"http://127.0.0.1:{page_port}", tmp_path / "api.log")
    try:
        out = run_page(root, page_port, api, mint_token(TEST_SECRET, new_user()),
                       tmp_path / "profile")
    finally:
        proc.stop()
    assert "error" not in out, out
    assert out["created"]["status"] == 201
    assert out["created"]["etag"] == '"v1"'
    patched = out["patched"]
    assert patched["status"] == 200, patched
    assert json.loads(patched["body"])["data"]["completed"] is True
    assert patched["etag"] == '"v2"'
    assert patched["request_id"] == "browser-patch-1"
    assert patched["position"].startswith("p3.")  # sealed (shared/position.py)
    # The error envelope is readable too: it carries the CORS headers.
    assert out["stale"]["status"] == 412
    assert json.loads(out["stale"]["body"])["error"]["code"] == "PRECONDITION_FAILED"
    assert out["stale"]["request_id"]


def test_a_browser_on_an_origin_not_listed_cannot_read_anything(
    database_url: str, page_server: tuple[Path, int], tmp_path: Path
):
    root, page_port = page_server
    proc, api = command_api(database_url, "https://someone-else.example.com",
                            tmp_path / "api.log")
    try:
        out = run_page(root, page_port, api, mint_token(TEST_SECRET, new_user()),
                       tmp_path / "profile")
    finally:
        proc.stop()
    # The preflight fails: the browser reports a network error, and shows nothing.
    assert "NetworkError" in out.get("error", ""), out
    assert "created" not in out


def gateway(api_port: int, origin: str, prefix: Path) -> tuple[Proc, str]:
    """The real nginx on deploy/nginx.conf as compose renders it with
    CORS_ORIGINS=`origin`: writes to the command API on `api_port`, reads to a query API
    that is down (nothing listens on its port)."""
    nginx = require_binary("nginx", "/usr/sbin/nginx")
    env = {"POSTGRES_PASSWORD": "unused-here", "BETTER_AUTH_SECRET": TEST_SECRET,
           "CORS_ORIGINS": origin, "DATA_MASTER_KEY": "unused-here",
           **{variable: "unused-here" for variable in PASSWORD_VARIABLES.values()}}
    listen = free_port()
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_for_test(gateway_conf(env), prefix, listen,
                                   {"command-api": api_port, "query-api": free_port()}))
    proc = Proc([nginx, "-p", str(prefix), "-c", str(conf), "-e", "stderr"],
                prefix.parent / "nginx.log")
    base = f"http://127.0.0.1:{listen}"
    proc.wait_http(f"{base}/healthz")
    return proc, base


def test_a_traced_page_passes_its_preflights_and_reads_the_gateways_own_errors(
    database_url: str, page_server: tuple[Path, int], tmp_path: Path
):
    root, page_port = page_server
    origin = f"http://127.0.0.1:{page_port}"
    api_proc, api = command_api(database_url, origin, tmp_path / "api.log")
    procs = [api_proc]
    try:
        gw_proc, gw = gateway(int(api.rsplit(":", 1)[1]), origin, tmp_path / "nginx")
        procs.append(gw_proc)
        out = run_page(root, page_port, api, mint_token(TEST_SECRET, new_user()),
                       tmp_path / "profile", TRACED_PAGE, gateway=gw)
    finally:
        for proc in reversed(procs):
            proc.stop(signal.SIGQUIT if proc is not api_proc else signal.SIGTERM)
    # The tracing SDK's headers pass the preflight, on the API and through the gateway.
    assert out["traced"]["status"] == 201, out
    assert json.loads(out["traced"]["body"])["data"]["title"] == "traced"
    assert out["traced_via_gateway"]["status"] == 201, out
    # nginx's own 413 and 503 (the query API is down) are read as such, not as a
    # network error, with their envelope and exposed headers.
    too_large = out["too_large"]
    assert too_large["status"] == 413, out
    assert json.loads(too_large["body"])["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert too_large["request_id"] == json.loads(too_large["body"])["meta"]["request_id"]
    unavailable = out["unavailable"]
    assert unavailable["status"] == 503, out
    assert json.loads(unavailable["body"])["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert unavailable["retry_after"] == "1"
    # A header neither the API nor CORS_ALLOW_HEADERS_EXTRA allows fails its preflight.
    assert "error" in out["not_allowed"] and "status" not in out["not_allowed"], out
