"""docs/frontend.md's fetch wrapper, as written: the code block marked
`<!-- tested: tasks-api.ts -->` is extracted from the page, type-checked with
`tsc --strict` twice (with Node's types, and as a browser project with DOM types) and
run under Node against
the live one-origin app with minted tokens: create (with a token refreshed after a 401),
an Idempotency-Key replayed, list, PATCH with If-Match and a stale one's 412, PUT,
/complete toggled and set, get, a 422's detail and details, DELETE's 204, the 404 after
it, and a token refused twice signing the user out."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from shared.auth import mint_token
from shared.settings import Settings
from taskctl.dev import create_dev_app
from tests.support import TEST_SECRET, new_user
from tests.support.live import serve
from tests.support.node import node, node_modules

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


def test_the_guides_fetch_wrapper_works_against_the_live_service(
    settings: Settings, tmp_path: Path
):
    modules = node_modules()
    (tmp_path / "node_modules").symlink_to(modules)
    (tmp_path / "package.json").write_text('{"type": "module"}\n')
    (tmp_path / "tsconfig.json").write_text(json.dumps(TSCONFIG))
    (tmp_path / "tasks-api.ts").write_text(guide_block("tasks-api.ts"))
    (tmp_path / "main.ts").write_text(DRIVER)
    checked = subprocess.run([node(), str(modules / "typescript" / "bin" / "tsc"), "-p", "."],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
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
