"""`/docs` in a REAL headless Chromium, driven over the DevTools protocol as a person
would use it: "Try it out" on a query without a token (401), Authorize with a pasted
token, then Execute a command (POST /api/tasks, its example body) and the query again,
at the one origin (the dev app: both APIs): the requests carry the token and succeed.

The page loads Swagger UI from its CDN (cdn.jsdelivr.net, swagger-ui-dist@5); this
machine has no route there, so those requests are answered by the browser itself
(DevTools `Fetch` interception) with the same files from the npm package
swagger-ui-dist 5 (tests/support/node.py). Everything else is the real page."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from shared.auth import mint_token
from shared.settings import Settings
from taskctl.dev import create_dev_app
from tests.support import TEST_SECRET, new_user
from tests.support.live import serve
from tests.support.node import node_modules
from tests.support.process import free_port, require_binary

pytestmark = pytest.mark.slow
CDN = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/"


class Page:
    """One page target over the DevTools protocol (synchronous): commands, and the
    paused requests to the CDN fulfilled from `assets` while waiting."""

    def __init__(self, ws: ClientConnection, assets: Path) -> None:
        self.ws = ws
        self.assets = assets
        self.next_id = 0
        self.served: list[str] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        wanted = self.next_id
        self.ws.send(json.dumps({"id": wanted, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == wanted:
                assert "error" not in message, (method, message["error"])
                return message.get("result", {})
            if message.get("method") == "Fetch.requestPaused":
                self._fulfil(message["params"])

    def _fulfil(self, paused: dict[str, Any]) -> None:
        url = paused["request"]["url"]
        self.next_id += 1
        name = url.split("?")[0].rsplit("/", 1)[-1]
        path = self.assets / name
        if url.startswith(CDN) and path.is_file():
            kind = "text/css" if name.endswith(".css") else "application/javascript"
            self.served.append(name)
            params = {"requestId": paused["requestId"], "responseCode": 200,
                      "responseHeaders": [{"name": "Content-Type", "value": kind}],
                      "body": base64.b64encode(path.read_bytes()).decode()}
        else:  # the favicon (fastapi.tiangolo.com): nothing
            params = {"requestId": paused["requestId"], "responseCode": 404,
                      "responseHeaders": [], "body": ""}
        self.ws.send(json.dumps({"id": self.next_id, "method": "Fetch.fulfillRequest",
                                 "params": params}))

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expression}\n"
                             + str(self.js("document.body.innerText.slice(0, 3000)")))

    def click(self, selector: str) -> None:
        self.wait_for(f"!!document.querySelector({json.dumps(selector)})")
        self.js(f"document.querySelector({json.dumps(selector)}).click()")


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[str]:
    """A headless Chromium with the DevTools protocol on a free port; its page's URL."""
    binary = require_binary("chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
         f"--remote-debugging-port={port}", "--remote-allow-origins=*", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                pages = [t for t in targets if t["type"] == "page"]
                if pages:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.2)
        yield pages[0]["webSocketDebuggerUrl"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: only what it started
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _operation(page: Page, op_id: str) -> None:
    """Expand the operation, Try it out, Execute; wait for the live response."""
    block = f"#operations-{op_id}"
    page.click(f"{block} .opblock-summary-control")
    page.click(f"{block} .try-out__btn")
    page.click(f"{block} .execute")
    page.wait_for(f"!!document.querySelector('{block} .live-responses-table tr.response .response-col_status')")


def _response(page: Page, op_id: str) -> dict[str, Any]:
    block = f"#operations-{op_id}"
    return page.js(f"""(() => {{
        const b = document.querySelector('{block}');
        return {{
          status: b.querySelector('.live-responses-table tr.response .response-col_status').innerText.trim(),
          body: b.querySelector('.live-responses-table .response-col_description pre.microlight,'
                                + ' .live-responses-table .highlight-code pre')?.innerText ?? '',
          curl: b.querySelector('.curl-command, .curl')?.innerText ?? '',
        }};
    }})()""")


def test_swagger_ui_try_it_out_works_with_a_pasted_token(settings: Settings, chromium: str):
    assets = node_modules() / "swagger-ui-dist"
    user = new_user()
    token = mint_token(TEST_SECRET, user)
    with serve(create_dev_app(settings)) as base, connect(chromium, max_size=None) as ws:
        page = Page(ws, assets)
        page.call("Fetch.enable", patterns=[{"urlPattern": "https://*"}])
        page.call("Runtime.enable")
        page.call("Page.enable")
        page.call("Page.navigate", url=f"{base}/docs")
        page.wait_for("!!document.querySelector('.swagger-ui .information-container')")
        assert page.js("document.title") == "Task service - Swagger UI"
        assert set(page.served) >= {"swagger-ui-bundle.js", "swagger-ui.css"}
        # Every route of both APIs is on the page.
        ops = page.js("[...document.querySelectorAll('.opblock')].map(e => e.id)")
        assert {"operations-commands-create_task_api_tasks_post",
                "operations-queries-list_tasks_api_tasks_get",
                "operations-commands-replace_task_api_tasks__task_id__put"} <= set(ops), ops

        # Without a token, the query is refused (so the token below is what works).
        _operation(page, "queries-list_tasks_api_tasks_get")
        refused = _response(page, "queries-list_tasks_api_tasks_get")
        assert refused["status"] == "401", refused
        assert json.loads(refused["body"])["detail"] == "Authorization header required"

        # Authorize: paste the token into the bearerAuth field.
        page.click(".auth-wrapper .authorize")
        page.wait_for("!!document.querySelector('.modal-ux input')")
        page.js("document.querySelector('.modal-ux input').focus()")
        page.call("Input.insertText", text=token)
        page.click(".modal-ux .modal-btn.auth.authorize")
        page.wait_for("document.querySelector('.modal-ux').innerText.includes('Authorized')")
        page.click(".modal-ux .btn-done")

        _operation(page, "commands-create_task_api_tasks_post")  # its example body
        created = _response(page, "commands-create_task_api_tasks_post")
        assert created["status"] == "201", created
        assert f"Authorization: Bearer {token}" in created["curl"], created["curl"]
        task = json.loads(created["body"])["data"]
        assert task["title"] == "Buy milk" and task["user_id"] == user

        listed_block = "#operations-queries-list_tasks_api_tasks_get"
        page.click(f"{listed_block} .execute")  # the same form again, now authorized
        page.wait_for(f"document.querySelector('{listed_block} tr.response"
                      " .response-col_status')?.innerText.trim() === '200'")
        listed = _response(page, "queries-list_tasks_api_tasks_get")
        assert listed["status"] == "200", listed
        assert f"Authorization: Bearer {token}" in listed["curl"]
        assert json.loads(listed["body"])["meta"]["request_id"]
