"""A TypeScript client generated from the one OpenAPI document, as a frontend would
make it: openapi-typescript (from the npm registry) turns the document the one origin
serves into types, openapi-fetch uses them; a small sample of calls must type-check
with `tsc --strict` (and calls the document does not allow must NOT: each is marked
`@ts-expect-error`, which fails when there is no error), then run under Node against
the live one-origin app (commands and queries in one process)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from shared.auth import mint_token
from shared.settings import Settings
from taskctl.dev import create_dev_app
from tests.support import TEST_SECRET, new_user
from tests.support.live import serve
from tests.support.node import node, node_modules

pytestmark = pytest.mark.slow

SAMPLE = r"""
import createClient from "openapi-fetch";
import type { components, paths } from "./api.js";

type Task = components["schemas"]["TaskOut"];
type ApiError = components["schemas"]["ErrorEnvelope"];

const client = createClient<paths>({
  baseUrl: process.env.API_BASE,
  headers: { Authorization: `Bearer ${process.env.TOKEN}` },
});
const user = process.env.USER_ID as string;

async function main(): Promise<Record<string, unknown>> {
  const created = await client.POST("/api/tasks", {
    body: { title: "Typed call", description: null },
    params: { header: { "Idempotency-Key": "ts-create-1" } },
  });
  if (!created.data) throw new Error(`create: ${created.error?.detail}`);
  const task: Task = created.data.data;

  const listed = await client.GET("/api/tasks", {
    params: { query: { status: "pending", sort: "-created_at", limit: 10 } },
  });
  const titles: string[] = (listed.data?.data ?? []).map((t: Task) => t.title);

  const replaced = await client.PUT("/api/tasks/{task_id}", {
    params: { path: { task_id: task.id }, header: { "If-Match": `"v${task.version}"` } },
    body: { title: "Replaced", description: "by PUT" },
  });
  const toggled = await client.PATCH("/api/{path_user_id}/tasks/{task_id}/complete", {
    params: { path: { path_user_id: user, task_id: task.id } },
  });
  const stale = await client.PATCH("/api/tasks/{task_id}", {
    params: { path: { task_id: task.id }, header: { "If-Match": '"v1"' } },
    body: { completed: false },
  });
  const staleError: ApiError | undefined = stale.error;
  // A read waits for the position a command answered with (X-Position).
  const seen = stale.response.headers.get("X-Position") ?? toggled.response.headers.get("X-Position");
  const history = await client.GET("/api/tasks/{task_id}/history", {
    params: { path: { task_id: task.id }, header: { "X-Min-Position": seen ?? undefined } },
  });
  const removed = await client.DELETE("/api/tasks/{task_id}", {
    params: { path: { task_id: task.id } },
  });
  const gone = await client.GET("/api/tasks/{task_id}", {
    params: {
      path: { task_id: task.id },
      header: { "X-Min-Position": removed.response.headers.get("X-Position") ?? undefined },
    },
  });
  const stats = await client.GET("/api/stats");

  if (process.env.NEVER) {
    // Calls the document does not allow: each line must be a type error.
    // @ts-expect-error title is required
    await client.POST("/api/tasks", { body: { description: "no title" } });
    // @ts-expect-error not a status the list takes
    await client.GET("/api/tasks", { params: { query: { status: "done" } } });
    // @ts-expect-error no such route
    await client.GET("/api/todos");
    // @ts-expect-error the task id is a path parameter, required
    await client.DELETE("/api/tasks/{task_id}", {});
    // @ts-expect-error completed is a boolean
    await client.PATCH("/api/tasks/{task_id}/complete", { params: { path: { task_id: "x" } }, body: { completed: "yes" } });
  }

  return {
    created: created.response.status,
    listed: titles,
    total: listed.data?.meta.total,
    replaced: [replaced.response.status, replaced.data?.data.title, replaced.data?.data.description],
    toggled: [toggled.response.status, toggled.data?.data.completed],
    stale: [stale.response.status, staleError?.error.code, staleError?.detail],
    history: history.data?.data.map((h) => h.type),
    removed: removed.response.status,
    gone: [gone.response.status, gone.error?.detail],
    stats: stats.data?.data,
  };
}

main().then((out) => console.log(JSON.stringify(out)), (e) => { console.error(e); process.exit(1); });
"""

TSCONFIG = {
    "compilerOptions": {
        "strict": True, "target": "ES2022", "module": "NodeNext", "moduleResolution": "NodeNext",
        "outDir": "out", "types": ["node"], "skipLibCheck": False, "noEmitOnError": True,
    },
    "files": ["sample.ts"],
}


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_a_generated_typescript_client_type_checks_and_runs(settings: Settings, tmp_path: Path):
    modules = node_modules()
    (tmp_path / "node_modules").symlink_to(modules)
    (tmp_path / "package.json").write_text('{"type": "module"}\n')
    (tmp_path / "tsconfig.json").write_text(json.dumps(TSCONFIG))
    (tmp_path / "sample.ts").write_text(SAMPLE)
    user = new_user()
    with serve(create_dev_app(settings)) as base:
        # The document the one origin serves, as a frontend's build would fetch it.
        (tmp_path / "openapi.json").write_text(httpx.get(f"{base}/openapi.json").text)
        generated = run([node(), str(modules / "openapi-typescript" / "bin" / "cli.js"),
                         "openapi.json", "-o", "api.d.ts"], tmp_path)
        assert generated.returncode == 0, generated.stdout + generated.stderr
        assert "Idempotency-Key" in (tmp_path / "api.d.ts").read_text()
        checked = run([node(), str(modules / "typescript" / "bin" / "tsc"), "-p", "."], tmp_path)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        ran = run([node(), "out/sample.js"], tmp_path, API_BASE=base, USER_ID=user,
                  TOKEN=mint_token(TEST_SECRET, user))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    out = json.loads(ran.stdout)
    assert out["created"] == 201
    assert out["replaced"] == [200, "Replaced", "by PUT"]
    assert out["toggled"] == [200, True]
    assert out["stale"] == [412, "PRECONDITION_FAILED", "The task has changed since the given ETag"]
    assert out["removed"] == 204
    assert out["gone"] == [404, "Task not found"]
    assert out["history"][0] == "TaskCreated"
    assert isinstance(out["stats"]["total"], int)


def test_a_call_the_document_forbids_does_not_type_check(tmp_path: Path):
    """The check above is not vacuous: without the @ts-expect-error marks, tsc fails."""
    modules = node_modules()
    (tmp_path / "node_modules").symlink_to(modules)
    (tmp_path / "package.json").write_text('{"type": "module"}\n')
    (tmp_path / "tsconfig.json").write_text(json.dumps(TSCONFIG))
    (tmp_path / "openapi.json").write_text(
        (Path(__file__).resolve().parents[2] / "shared" / "openapi.json").read_text())
    (tmp_path / "sample.ts").write_text(SAMPLE.replace("// @ts-expect-error", "// unmarked:"))
    generated = run([node(), str(modules / "openapi-typescript" / "bin" / "cli.js"),
                     "openapi.json", "-o", "api.d.ts"], tmp_path)
    assert generated.returncode == 0, generated.stderr
    checked = run([node(), str(modules / "typescript" / "bin" / "tsc"), "-p", "."], tmp_path)
    assert checked.returncode != 0
    errors = [line for line in checked.stdout.splitlines() if "error TS" in line]
    assert len(errors) >= 5, checked.stdout
