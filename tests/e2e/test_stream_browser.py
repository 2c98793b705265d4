"""A REAL headless Chromium, on a page of another origin, follows the live stream of task
changes with docs/frontend.md's `followTasks` (EventSource with a stream ticket; the
guide's block type-checked with tsc --strict and compiled, as written) through the
REAL nginx gateway (deploy/nginx.conf) in front of the command API, the query API and
the projector as separate processes.

It sees a task created through the API within a second; then the query API is stopped
(SIGTERM: the page gets `end` with reason `shutdown`), tasks are created while it is
down, it is started again, more are created: the page reconnects by itself with a new
ticket and its last id, and has seen every task exactly once, in order."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.auth import mint_token
from shared.settings import Settings
from taskctl.dbinit import PASSWORD_VARIABLES, init_database
from tests.support import TEST_SECRET, PostgresServer, bearer, new_user
from tests.support.compose import gateway_conf, nginx_for_test
from tests.support.node import node, node_modules
from tests.support.process import Proc, free_port, require_binary
from tests.support.query import codec_for

pytestmark = pytest.mark.slow

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "frontend.md"
TSCONFIG = {
    "compilerOptions": {
        "strict": True, "target": "ES2022", "module": "ES2022", "moduleResolution": "Bundler",
        "lib": ["ES2022", "DOM"], "types": [], "outDir": "out", "noEmitOnError": True,
    },
    "files": ["tasks-api.ts", "task-stream.ts"],
}

# The page: docs/frontend.md's followTasks (compiled from the guide), reporting what it
# sees to the page's own origin (POST /report), numbered (reports may arrive out of order).
PAGE = """<!doctype html>
<html><body><pre id="log"></pre>
<script type="module">
import { followTasks } from "./out/task-stream.js";
const API = %(api)s, TOKEN = %(token)s;
let seq = 0;
function report(what) {
  what.n = ++seq;
  fetch("/report", {method: "POST", body: JSON.stringify(what)});
}
followTasks(API, async () => TOKEN, {
  onTask: (task, id) => report({type: "task", id, task}),
  onDeleted: (task, id) => report({type: "task_deleted", id, task}),
  onReady: (id) => report({type: "ready", id}),
  onEnd: (reason) => report({type: "end", reason}),
});
</script></body></html>
"""


def guide_block(name: str) -> str:
    """The code block right after `<!-- tested: NAME -->` in the guide."""
    match = re.search(rf"<!-- tested: {re.escape(name)} -->\n```ts\n(.*?)\n```",
                      GUIDE.read_text(), re.S)
    assert match, f"docs/frontend.md has no code block marked tested: {name}"
    return match.group(1) + "\n"


def compile_guide(root: Path) -> None:
    """The guide's task-stream.ts (and the tasks-api.ts it takes its Task type from),
    type-checked with tsc --strict as a browser project and compiled into root/out."""
    modules = node_modules()
    (root / "tasks-api.ts").write_text(guide_block("tasks-api.ts"))
    (root / "task-stream.ts").write_text(guide_block("task-stream.ts"))
    (root / "tsconfig.json").write_text(json.dumps(TSCONFIG))
    checked = subprocess.run([node(), str(modules / "typescript" / "bin" / "tsc"), "-p", "."],
                             cwd=root, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr


class Reports:
    def __init__(self) -> None:
        self.items: list[tuple[float, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)

    def add(self, item: dict[str, Any]) -> None:
        with self.arrived:
            self.items.append((time.monotonic(), item))
            self.arrived.notify_all()

    def wait_for(self, predicate: Any, timeout: float, what: str) -> tuple[float, dict]:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                for at, item in self.items:
                    if predicate(item):
                        return at, item
                left = deadline - time.monotonic()
                assert left > 0, f"the page reported no {what} in {timeout}s: {self.items}"
                self.arrived.wait(left)

    def of(self, kind: str) -> list[dict[str, Any]]:
        """The page's reports of `kind`, in the order the page made them."""
        with self.lock:
            return sorted((item for _, item in self.items if item["type"] == kind),
                          key=lambda item: item["n"])


@pytest.fixture
def page(tmp_path: Path) -> Iterator[tuple[Path, int, Reports]]:
    root = tmp_path / "site"
    root.mkdir()
    reports = Reports()

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            reports.add(json.loads(body))
            self.send_response(204)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, server.server_address[1], reports
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def database(pg_server: PostgresServer) -> Iterator[str]:
    url = pg_server.create_database()
    init_database(Settings(environment="test", database_url=url, better_auth_secret=TEST_SECRET))
    yield url
    pg_server.drop_database(url)


def service(command: list[str], env: dict[str, str], log: Path, health: str | None) -> Proc:
    proc = Proc([sys.executable, "-m", "taskctl.cli", *command], log, env)
    if health:
        proc.wait_http(health)
    return proc


def test_a_browser_follows_the_stream_through_the_gateway_and_resumes_after_a_restart(
    database: str, page: tuple[Path, int, Reports], tmp_path: Path
):
    root, page_port, reports = page
    origin = f"http://127.0.0.1:{page_port}"
    env = {**os.environ, "DATABASE_URL": database, "ENVIRONMENT": "test",
           "BETTER_AUTH_SECRET": TEST_SECRET, "LOG_LEVEL": "WARNING", "CORS_ORIGINS": origin,
           "STREAM_HEARTBEAT_SECONDS": "2", "STREAM_RETRY_MS": "250"}
    command_port, query_port, metrics_port = free_port(), free_port(), free_port()
    procs: list[Proc] = []
    chromium = None
    try:
        procs.append(service(["command-api", "--host", "127.0.0.1", "--port", str(command_port)],
                             env, tmp_path / "command.log",
                             f"http://127.0.0.1:{command_port}/api/health"))
        procs.append(service(["projector", "--metrics-port", str(metrics_port)], env,
                             tmp_path / "projector.log", None))
        query_args = ["query-api", "--host", "127.0.0.1", "--port", str(query_port)]
        query = service(query_args, env, tmp_path / "query-1.log",
                        f"http://127.0.0.1:{query_port}/api/health")
        procs.append(query)

        nginx = require_binary("nginx", "/usr/sbin/nginx")
        gw_env = {"POSTGRES_PASSWORD": "unused-here", "BETTER_AUTH_SECRET": TEST_SECRET,
                  "CORS_ORIGINS": origin, "DATA_MASTER_KEY": "unused-here",
                  **{variable: "unused-here" for variable in PASSWORD_VARIABLES.values()}}
        listen = free_port()
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_for_test(gateway_conf(gw_env), prefix, listen,
                                       {"command-api": command_port, "query-api": query_port}))
        gateway = Proc([nginx, "-p", str(prefix), "-c", str(conf), "-e", "stderr"],
                       tmp_path / "nginx.log")
        procs.append(gateway)
        api = f"http://127.0.0.1:{listen}"
        gateway.wait_http(f"{api}/healthz")

        user = new_user()
        compile_guide(root)
        (root / "index.html").write_text(PAGE % {
            "api": json.dumps(api), "token": json.dumps(mint_token(TEST_SECRET, user))})
        browser = require_binary("chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
        chromium = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'p'}",
             "--remote-debugging-port=0", f"{origin}/index.html"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        reports.wait_for(lambda r: r["type"] == "ready", 30, "ready")

        client = httpx.Client(base_url=api, headers=bearer(user), timeout=10)
        created: list[tuple[str, str]] = []  # (task id, position)

        def create(title: str) -> float:
            response = client.post("/api/tasks", json={"title": title})
            assert response.status_code == 201, response.text
            acknowledged = time.monotonic()
            created.append((response.json()["data"]["id"], response.headers["X-Position"]))
            return acknowledged

        # Live: within a second of the command's acknowledgement (the report's own
        # round trip from the page included).
        for i in range(3):
            acknowledged = create(f"live {i}")
            task_id = created[-1][0]
            seen_at, seen = reports.wait_for(
                lambda r, t=task_id: r["type"] == "task" and r["task"]["id"] == t, 5, "task")
            assert seen_at - acknowledged < 1.0, (i, seen_at - acknowledged)
            assert seen["id"] == created[-1][1]

        # The query API stops (SIGTERM): the page is told, and reconnects by itself.
        # (uvicorn re-raises the signal once it has shut down: -SIGTERM is its clean exit.)
        # Promptly: the streams end at the signal, not after uvicorn's graceful timeout.
        stopping = time.monotonic()
        assert query.stop(signal.SIGTERM, timeout=15) in (0, -signal.SIGTERM), query.output()
        assert time.monotonic() - stopping < 3, query.output()
        reports.wait_for(lambda r: r["type"] == "end" and r["reason"] == "shutdown", 5, "end")
        for i in range(3):
            create(f"while down {i}")
        time.sleep(1)  # the page retries meanwhile (its tickets fail with 503)
        query = service(query_args, env, tmp_path / "query-2.log",
                        f"http://127.0.0.1:{query_port}/api/health")
        procs.append(query)
        for i in range(2):
            create(f"after {i}")

        last = created[-1][0]
        reports.wait_for(lambda r: r["type"] == "task" and r["task"]["id"] == last, 20, "last")
        time.sleep(0.5)  # anything repeated would come by now
        tasks = reports.of("task")
        assert [t["task"]["id"] for t in tasks] == [t for t, _ in created]  # once each, in order
        assert [t["id"] for t in tasks] == [p for _, p in created]
        decode = codec_for(database).decode
        assert [decode(t["id"]) for t in tasks] == sorted(decode(t["id"]) for t in tasks)
        assert len(reports.of("ready")) >= 2  # it did reconnect
        client.close()
    finally:
        if chromium is not None:
            os.killpg(chromium.pid, signal.SIGKILL)  # its own session: only what it started
            chromium.wait(10)
        for proc in reversed(procs):
            proc.stop(signal.SIGQUIT if proc.proc.args[0].endswith("nginx") else signal.SIGTERM)
