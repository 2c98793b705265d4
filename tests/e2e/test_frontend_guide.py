"""docs/frontend.md's fetch wrapper, as written: the code block marked
`<!-- tested: tasks-api.ts -->` is extracted from the page, type-checked with
`tsc --strict` twice (with Node's types, and as a browser project with DOM types) and
run under Node against
the live one-origin app with minted tokens: create (with a token refreshed after a 401),
an Idempotency-Key replayed, priority, tags and a due date with the list's filters, list,
PATCH with If-Match and a stale one's 412, PUT (and what it resets),
/complete toggled and set, get, a 422's detail and details, DELETE's 204, the 404 after
it, and a token refused twice signing the user out. Then its 503 retries, against a
server that answers 503 on cue."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from shared.auth import mint_token
from shared.settings import Settings
from taskctl.dev import create_dev_app
from tests.support import TEST_SECRET, new_user
from tests.support.live import serve
from tests.support.node import node, node_modules
from tests.support.process import Proc, free_port

pytestmark = pytest.mark.slow
GUIDE = Path(__file__).resolve().parents[2] / "docs" / "frontend.md"

DRIVER = r"""
import { ApiError, createTasksApi, etag } from "./tasks-api.js";

const base = process.env.API_BASE as string;
const tokens = JSON.parse(process.env.TOKENS as string) as { valid: string; expired: string };
const asked: boolean[] = [];
let signedOut = 0;
// The first token handed out has expired: the wrapper must ask for a fresh one.
const api = createTasksApi(base, async (refresh) => {
  asked.push(refresh);
  return asked.length === 1 ? tokens.expired : tokens.valid;
}, () => { signedOut++; });

async function failure(call: Promise<unknown>) {
  try {
    await call;
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
    return { status: e.status, code: e.code, detail: e.message, details: e.details,
             requestId: e.requestId };
  }
  throw new Error("expected an ApiError");
}

async function main() {
  const out: Record<string, unknown> = {};
  const created = await api.create({ title: "From the guide", description: "first" });
  out.asked = [...asked];
  out.created = created;
  const keyed = await api.create({ title: "Keyed" }, "guide-key-1");
  const replayed = await api.create({ title: "Keyed" }, "guide-key-1");
  out.replayed = [keyed.id === replayed.id, keyed.version === replayed.version];
  const tagged = await api.create({ title: "Tagged", priority: "high", tags: ["Work ", "home"],
                                    due_date: "2026-05-01" });
  out.tagged = [tagged.priority, tagged.tags, tagged.due_date];
  const both = await api.list({ tag: ["work", "home"], priority: "high", sort: "-due_date" });
  const neither = await api.list({ tag: ["work", "elsewhere"] });
  out.filtered = [both.tasks.map((t) => t.title), neither.total];
  const wiped = await api.replace(tagged.id, { title: "Tagged, replaced" });
  out.wiped = [wiped.priority, wiped.tags, wiped.due_date];
  await api.remove(tagged.id);
  const list = await api.list({ status: "pending", sort: "title" });
  out.listed = [list.tasks.map((t) => t.title), list.total];
  const updated = await api.update(created.id, { title: "Renamed" }, { ifMatch: etag(created) });
  out.updated = [updated.title, updated.description, updated.version];
  out.stale = await failure(api.update(created.id, { title: "Late" }, { ifMatch: etag(created) }));
  const replaced = await api.replace(created.id, { title: "Replaced" });
  out.replaced = [replaced.title, replaced.description];
  const toggled = await api.complete(created.id);
  const set = await api.complete(created.id, false, { ifMatch: etag(toggled) });
  out.completed = [toggled.completed, set.completed];
  const read = await api.get(created.id);
  out.read = [read.title, read.completed, read.version === set.version];
  out.done = (await api.list({ status: "completed" })).total;
  out.invalid = await failure(api.create({ title: "   " }));
  out.removed = (await api.remove(created.id)) ?? "no body";
  out.gone = await failure(api.get(created.id));
  out.left = (await api.list()).tasks.map((t) => t.title);
  const refused = createTasksApi(base, async () => tokens.expired, () => { signedOut++; });
  out.unauthorized = await failure(refused.list());
  out.signedOut = signedOut;
  console.log(JSON.stringify(out));
}

main().catch((e) => { console.error(e); process.exit(1); });
"""

TSCONFIG = {
    "compilerOptions": {
        "strict": True, "target": "ES2022", "module": "NodeNext", "moduleResolution": "NodeNext",
        "lib": ["ES2022"], "types": ["node"], "outDir": "out", "noEmitOnError": True,
    },
    "files": ["tasks-api.ts", "main.ts"],
}


def guide_block(name: str) -> str:
    """The code block right after `<!-- tested: NAME -->` in the guide."""
    match = re.search(rf"<!-- tested: {re.escape(name)} -->\n```ts\n(.*?)\n```", GUIDE.read_text(),
                      re.S)
    assert match, f"docs/frontend.md has no code block marked tested: {name}"
    return match.group(1) + "\n"


def compiled(folder: Path, driver: str) -> Path:
    """The guide's tasks-api.ts and `driver` (as main.ts) type-checked with `tsc --strict`
    and built into `folder`/out; the node_modules folder used."""
    modules = node_modules()
    (folder / "node_modules").symlink_to(modules)
    (folder / "package.json").write_text('{"type": "module"}\n')
    (folder / "tsconfig.json").write_text(json.dumps(TSCONFIG))
    (folder / "tasks-api.ts").write_text(guide_block("tasks-api.ts"))
    (folder / "main.ts").write_text(driver)
    checked = subprocess.run([node(), str(modules / "typescript" / "bin" / "tsc"), "-p", "."],
                             cwd=folder, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return modules


def test_the_guides_fetch_wrapper_works_against_the_live_service(
    settings: Settings, tmp_path: Path
):
    modules = compiled(tmp_path, DRIVER)
    # ...and as a browser (Next.js) project compiles it: DOM types, no Node.
    browser = {"compilerOptions": {**TSCONFIG["compilerOptions"], "lib": ["ES2022", "DOM"],
                                   "types": [], "noEmit": True}, "files": ["tasks-api.ts"]}
    (tmp_path / "tsconfig.browser.json").write_text(json.dumps(browser))
    checked = subprocess.run([node(), str(modules / "typescript" / "bin" / "tsc"), "-p",
                              "tsconfig.browser.json"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    user = new_user()
    tokens = {"valid": mint_token(TEST_SECRET, user),
              "expired": mint_token(TEST_SECRET, user, ttl_seconds=-60)}
    with serve(create_dev_app(settings)) as base:
        ran = subprocess.run(
            [node(), "out/main.js"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
            env={**os.environ, "API_BASE": base, "TOKENS": json.dumps(tokens)},
        )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    out = json.loads(ran.stdout)

    assert out["asked"] == [False, True]  # the expired token's 401, then a fresh one
    assert out["created"]["title"] == "From the guide" and out["created"]["user_id"] == user
    assert out["replayed"] == [True, True]  # the same key: applied once
    assert out["tagged"] == ["high", ["work", "home"], "2026-05-01T00:00:00+00:00"]
    assert out["filtered"] == [["Tagged"], 0]  # `tag` repeated: both tags required
    assert out["wiped"] == ["medium", [], None]  # PUT: what is left out, its default
    assert out["listed"] == [["From the guide", "Keyed"], 2]
    assert out["updated"] == ["Renamed", "first", 2]
    stale = out["stale"]
    assert (stale["status"], stale["code"]) == (412, "PRECONDITION_FAILED")
    assert stale["detail"] == "The task has changed since the given ETag"
    assert stale["details"] == {"current_version": 2} and stale["requestId"]
    assert out["replaced"] == ["Replaced", None]
    assert out["completed"] == [True, False]
    assert out["read"] == ["Replaced", False, True]
    assert out["done"] == 0
    invalid = out["invalid"]
    assert (invalid["status"], invalid["code"], invalid["detail"]) == (
        422, "VALIDATION_ERROR", "Validation failed")
    assert "title" in invalid["details"]
    assert out["removed"] == "no body"  # the 204
    assert (out["gone"]["status"], out["gone"]["detail"]) == (404, "Task not found")
    assert out["left"] == ["Keyed"]
    assert out["unauthorized"]["status"] == 401
    assert out["unauthorized"]["detail"] == "Token expired"
    assert out["signedOut"] == 1


RETRY_DRIVER = r"""
import { ApiError, createTasksApi } from "./tasks-api.js";

const api = createTasksApi(process.env.API_BASE as string, async () => "a-token");
const out: Record<string, unknown> = {};
async function status(call: Promise<unknown>) {
  try {
    await call;
    return "ok";
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
    return [e.status, e.message];
  }
}
out.list = (await api.list()).total;  // 503 twice, then the list
out.created = (await api.create({ title: "Keyed" }, "key-1")).title;  // 503, then created
out.update = await status(api.update("t1", { title: "unkeyed" }));  // 503: not sent again
out.get = await status(api.get("t2"));  // 503 three times: the last one thrown
console.log(JSON.stringify(out));
"""


class _Unavailable(BaseHTTPRequestHandler):
    """503 with `Retry-After: 0` for the first `plan[(method, path)]` requests of each,
    then an answer; every request counted in `seen`."""

    plan: ClassVar[dict[tuple[str, str], int]] = {
        ("GET", "/api/tasks"): 2, ("POST", "/api/tasks"): 1,
        ("PATCH", "/api/tasks/t1"): 99, ("GET", "/api/tasks/t2"): 99}
    seen: ClassVar[Counter[tuple[str, str]]] = Counter()

    def _answer(self) -> None:
        key = (self.command, self.path)
        self.seen[key] += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        meta = {"timestamp": "2026-01-01T00:00:00Z", "request_id": "r"}
        if self.seen[key] <= self.plan.get(key, 0):
            status, headers = 503, {"Retry-After": "0"}
            body = {"error": {"code": "SERVICE_UNAVAILABLE", "message": "Database unavailable"},
                    "detail": "Database unavailable", "meta": meta}
        elif self.command == "POST":
            status, headers, body = 201, {}, {"data": {"title": "Keyed"}, "meta": meta}
        else:
            status, headers, body = 200, {}, {"data": [], "meta": {**meta, "total": 0}}
        raw = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {**headers, "Content-Type": "application/json",
                            "Content-Length": str(len(raw))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = do_PATCH = _answer

    def log_message(self, *_: object) -> None:
        pass


def test_the_guides_fetch_wrapper_sends_reads_and_keyed_commands_again_after_a_503(
    tmp_path: Path
):
    compiled(tmp_path, RETRY_DRIVER)

    _Unavailable.seen.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        ran = subprocess.run(
            [node(), "out/main.js"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
            env={**os.environ, "API_BASE": f"http://127.0.0.1:{server.server_address[1]}"})
    finally:
        server.shutdown()
        server.server_close()
    assert ran.returncode == 0, ran.stdout + ran.stderr
    out = json.loads(ran.stdout)
    assert out == {"list": 0, "created": "Keyed", "update": [503, "Database unavailable"],
                   "get": [503, "Database unavailable"]}
    assert _Unavailable.seen == {("GET", "/api/tasks"): 3, ("POST", "/api/tasks"): 2,
                                 ("PATCH", "/api/tasks/t1"): 1, ("GET", "/api/tasks/t2"): 3}


AUTH_SERVER = r"""
import { createServer } from "node:http";
import { betterAuth } from "better-auth";
import { memoryAdapter } from "better-auth/adapters/memory";
import { jwt } from "better-auth/plugins";
import { toNodeHandler } from "better-auth/node";

const port = Number(process.env.PORT);
export const auth = betterAuth({
  baseURL: `http://127.0.0.1:${port}`,
  secret: process.env.AUTH_SECRET,
  database: memoryAdapter({ user: [], session: [], account: [], verification: [], jwks: [] }),
  emailAndPassword: { enabled: true },
  plugins: [jwt()],  // as the guide's lib/auth.ts
  telemetry: { enabled: false },
});
createServer(toNodeHandler(auth)).listen(port, "127.0.0.1");
"""

# A signed-in browser, in Node: Better Auth's client with the guide's jwtClient(), its
# cookies kept by a small jar (and Origin sent, as a browser sends it).
AUTH_DRIVER = r"""
import { createAuthClient } from "better-auth/client";
import { jwtClient } from "better-auth/client/plugins";
import { createTasksApi } from "./out/tasks-api.js";

const authUrl = process.env.AUTH_URL, apiBase = process.env.API_BASE;
const jar = new Map();
async function browserFetch(input, init = {}) {
  const headers = new Headers(init.headers);
  headers.set("origin", authUrl);
  if (jar.size) headers.set("cookie", [...jar].map(([k, v]) => `${k}=${v}`).join("; "));
  const response = await fetch(input, { ...init, headers });
  for (const cookie of response.headers.getSetCookie()) {
    const [pair] = cookie.split(";");
    jar.set(pair.slice(0, pair.indexOf("=")), pair.slice(pair.indexOf("=") + 1));
  }
  return response;
}
const authClient = createAuthClient({
  baseURL: authUrl, plugins: [jwtClient()], fetchOptions: { customFetchImpl: browserFetch },
});
const signedUp = await authClient.signUp.email(
  { email: "guide@example.com", password: "correct horse battery staple", name: "Guide" });
if (signedUp.error) throw new Error(JSON.stringify(signedUp.error));

// The guide's lib/tasks.ts: a token from authClient.token() on every call.
const tasksApi = createTasksApi(apiBase, async () => (await authClient.token()).data?.token ?? null);
const created = await tasksApi.create({ title: "Signed in with Better Auth" });
const listed = await tasksApi.list();

// The two other ways: the set-auth-jwt header of getSession, GET /api/auth/token.
let headerJwt = null;
const session = await authClient.getSession({ fetchOptions: {
  onSuccess: (ctx) => { headerJwt = ctx.response.headers.get("set-auth-jwt"); } } });
const raw = await (await browserFetch(`${authUrl}/api/auth/token`)).json();
const statuses = [];
for (const token of [headerJwt, raw.token]) {
  const r = await fetch(`${apiBase}/api/stats`, { headers: { Authorization: `Bearer ${token}` } });
  statuses.push(r.status);
}
const [header, payload] = raw.token.split(".").slice(0, 2)
  .map((part) => JSON.parse(Buffer.from(part, "base64url").toString()));
console.log(JSON.stringify({ user: session.data.user.id, created, titles: listed.tasks.map((t) => t.title),
                             statuses, alg: header.alg, iss: payload.iss, aud: payload.aud,
                             ttl: payload.exp - payload.iat }));
"""

BROWSER_PROJECT = {
    "compilerOptions": {
        "strict": True, "target": "ES2022", "module": "ESNext", "moduleResolution": "Bundler",
        "lib": ["ES2022", "DOM", "DOM.Iterable"], "types": ["node"], "skipLibCheck": True,
        "noEmit": True, "paths": {"@/lib/*": ["./lib/*"]},
    },
    "include": ["lib"],
}


def test_the_guides_better_auth_set_up_type_checks_and_its_tokens_work(
    settings: Settings, tmp_path: Path
):
    """The guide's lib/auth.ts, lib/auth-client.ts and lib/tasks.ts type-check against the
    real better-auth package (a Next.js-like project); then a real Better Auth server with
    the guide's jwt() plugin signs a user up, and its tokens (authClient.token(), the
    set-auth-jwt header, GET /api/auth/token) work on the service configured as the guide
    says: BETTER_AUTH_URL, with JWT_ISSUER and JWT_AUDIENCE its base URL."""
    modules = node_modules()
    (tmp_path / "node_modules").symlink_to(modules)
    (tmp_path / "package.json").write_text('{"type": "module"}\n')
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in ("auth.ts", "auth-client.ts", "tasks-api.ts", "tasks.ts"):
        (lib / name).write_text(guide_block(name))
    (tmp_path / "tsconfig.json").write_text(json.dumps(BROWSER_PROJECT))
    tsc = [node(), str(modules / "typescript" / "bin" / "tsc")]
    checked = subprocess.run([*tsc, "-p", "."], cwd=tmp_path, capture_output=True, text=True,
                             timeout=180)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    (tmp_path / "tsconfig.json").write_text(json.dumps(TSCONFIG | {"files": ["lib/tasks-api.ts"]}))
    built = subprocess.run([*tsc, "-p", ".", "--rootDir", "lib"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stdout + built.stderr

    (tmp_path / "auth-server.mjs").write_text(AUTH_SERVER)
    (tmp_path / "driver.mjs").write_text(AUTH_DRIVER)
    port = free_port()
    auth_url = f"http://127.0.0.1:{port}"
    server = Proc([node(), "auth-server.mjs"], tmp_path / "auth.log",
                  {**os.environ, "PORT": str(port), "AUTH_SECRET": secrets.token_urlsafe(32)},
                  cwd=tmp_path)
    try:
        server.wait_http(f"{auth_url}/api/auth/jwks")
        service = settings.model_copy(update={
            "better_auth_secret": None, "better_auth_url": auth_url,
            "jwt_issuer": auth_url, "jwt_audience": auth_url})
        with serve(create_dev_app(service)) as base:
            ran = subprocess.run([node(), "driver.mjs"], cwd=tmp_path, capture_output=True,
                                 text=True, timeout=120,
                                 env={**os.environ, "AUTH_URL": auth_url, "API_BASE": base})
    finally:
        server.stop()
    assert ran.returncode == 0, ran.stdout + ran.stderr + server.output()
    out = json.loads(ran.stdout)
    assert out["created"]["user_id"] == out["user"]  # sub: the Better Auth user id
    assert out["titles"] == ["Signed in with Better Auth"]
    assert out["statuses"] == [200, 200]
    assert (out["alg"], out["iss"], out["aud"]) == ("EdDSA", auth_url, auth_url)
    assert out["ttl"] == 15 * 60  # the guide's "15 minutes"
