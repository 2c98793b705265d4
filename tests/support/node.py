"""Node.js packages for the tests that run real TypeScript (the generated client, the
frontend guide's code) or serve Swagger UI's files to the browser: installed once from
the npm registry with npm into a gitignored cache (`.data/node`, or
`TASKSERVICE_NODE_CACHE`), pinned here. No Node or no registry is a failure that says
so, never a skip: these tests are the proof that a frontend works."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "typescript": "5.9.3",
    "openapi-typescript": "7.13.0",
    "openapi-fetch": "0.17.0",
    "swagger-ui-dist": "5.35.0",
    "@types/node": "20.19.25",
    # docs/frontend.md's Better Auth set-up, type-checked and run for real.
    "better-auth": "1.7.25",
    "react": "19.3.1",
    "@types/react": "19.3.3",
}


def node() -> str:
    found = shutil.which("node")
    assert found, "Node.js is needed (node on PATH; Node 20 or newer)"
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    assert int(version.lstrip("v").split(".")[0]) >= 20, f"Node 20 or newer, not {version}"
    return found


def node_modules() -> Path:
    """The cache's node_modules with `PACKAGES` installed (npm install on first use)."""
    node()
    npm = shutil.which("npm")
    assert npm, "npm is needed (it comes with Node.js)"
    cache = Path(os.environ.get("TASKSERVICE_NODE_CACHE") or ROOT / ".data" / "node")
    cache.mkdir(parents=True, exist_ok=True)
    manifest = {"name": "taskservice-tests", "private": True, "dependencies": PACKAGES}
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel tests install once
        stamp = cache / "installed.json"
        if not stamp.exists() or json.loads(stamp.read_text()) != manifest:
            (cache / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
            result = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=cache, capture_output=True, text=True, timeout=600,
            )
            assert result.returncode == 0, (
                "npm install failed (is the npm registry reachable? see `npm config get"
                f" registry`):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
            stamp.write_text(json.dumps(manifest))
    return cache / "node_modules"
