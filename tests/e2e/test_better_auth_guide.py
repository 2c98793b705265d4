"""docs/better-auth.md against a real Better Auth (the npm package, pinned in
tests/support/node.py): the guide's server config (the block marked
`<!-- tested: auth.ts -->`) type-checks and runs, and its tokens pass `taskctl auth
check` with the service settings the guide gives (BETTER_AUTH_URL, JWT_ISSUER and
JWT_AUDIENCE its base URL), with EdDSA and with ES512 keys; its rotation section holds
(an existing key without expiresAt never rotates, a changed keyPairConfig.alg does not
replace it, expiring the row does, the old key staying published). The guide's
troubleshooting table has a row for every refusal reason."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.auth import REASONS
from shared.settings import SETTING_NAMES, Settings
from taskctl.authcheck import check
from tests.support.node import node, node_modules
from tests.support.process import Proc, free_port

pytestmark = pytest.mark.slow
GUIDE = Path(__file__).resolve().parents[2] / "docs" / "better-auth.md"
OUR_LINE = "  // database, emailAndPassword, socialProviders...: as your app has them\n"

SERVER = r"""
import { createServer } from "node:http";
import { toNodeHandler } from "better-auth/node";
import { auth } from "./auth.mjs";

createServer(toNodeHandler(auth)).listen(Number(process.env.PORT), "127.0.0.1");
"""

ROTATION = r"""
import { betterAuth } from "better-auth";
import { memoryAdapter } from "better-auth/adapters/memory";
import { jwt } from "better-auth/plugins";

const db = { user: [], session: [], account: [], verification: [], jwks: [] };
const make = (jwks) => betterAuth({
  baseURL: "http://127.0.0.1:9", secret: process.env.AUTH_SECRET,
  database: memoryAdapter(db), plugins: [jwt({ jwks })], telemetry: { enabled: false },
});
const header = async (auth) => {
  const { token } = await auth.api.signJWT({ body: { payload: { sub: "u" } } });
  return JSON.parse(Buffer.from(token.split(".")[0], "base64url"));
};
const first = await header(make({}));                   // a key without expiresAt
const rotating = make({ rotationInterval: 1 });         // rotation turned on later
await new Promise((resolve) => setTimeout(resolve, 1500));
const afterInterval = await header(rotating);
const switched = await header(make({ keyPairConfig: { alg: "ES256" } }));
for (const row of db.jwks) if (!row.expiresAt) row.expiresAt = new Date();  // the guide's fix
const next = await header(rotating);
const published = (await rotating.api.getJwks()).keys.map((k) => k.kid);
console.log(JSON.stringify({ first, afterInterval, switched, next, published }));
"""


def guide_block(name: str) -> str:
    match = re.search(rf"<!-- tested: {re.escape(name)} -->\n```ts\n(.*?)\n```", GUIDE.read_text(),
                      re.S)
    assert match, f"docs/better-auth.md has no code block marked tested: {name}"
    return match.group(1) + "\n"


def runnable(block: str, alg: str) -> str:
    """The guide's config with the app's own parts (its database, its sign-in method)
    filled in for the test, and the key algorithm under test."""
    assert OUR_LINE in block
    block = block.replace(OUR_LINE, "  database: memoryAdapter(DB),\n"
                                    "  emailAndPassword: { enabled: true },\n"
                                    "  telemetry: { enabled: false },\n")
    if alg != "EdDSA":
        block = block.replace('keyPairConfig: { alg: "EdDSA", crv: "Ed25519" }',
                              f'keyPairConfig: {{ alg: "{alg}" }}')
    header = ('import { memoryAdapter } from "better-auth/adapters/memory";\n'
              "const DB = { user: [], session: [], account: [], verification: [], jwks: [] };\n")
    return header + block


def project(tmp_path: Path) -> Path:
    (tmp_path / "node_modules").symlink_to(node_modules())
    (tmp_path / "package.json").write_text('{"type": "module"}\n')
    return tmp_path


def payload(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def test_the_guides_config_type_checks(tmp_path: Path) -> None:
    folder = project(tmp_path)
    (folder / "auth.ts").write_text(runnable(guide_block("auth.ts"), "EdDSA"))
    tsconfig = {"compilerOptions": {"strict": True, "target": "ES2022", "module": "NodeNext",
                                    "moduleResolution": "NodeNext", "types": ["node"],
                                    "skipLibCheck": True, "noEmit": True},
                "files": ["auth.ts"]}
    (folder / "tsconfig.json").write_text(json.dumps(tsconfig))
    tsc = [node(), str(folder / "node_modules" / "typescript" / "bin" / "tsc"), "-p", "."]
    checked = subprocess.run(tsc, cwd=folder, capture_output=True, text=True, timeout=240)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("alg", ["EdDSA", "ES512"])
async def test_the_guides_config_and_settings_accept_its_tokens(
    tmp_path: Path, alg: str
) -> None:
    folder = project(tmp_path)
    (folder / "auth.mjs").write_text(runnable(guide_block("auth.ts"), alg))
    (folder / "server.mjs").write_text(SERVER)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = Proc([node(), "server.mjs"], folder / "auth.log",
                  {**os.environ, "PORT": str(port), "BETTER_AUTH_URL": base,
                   "BETTER_AUTH_SECRET": secrets.token_urlsafe(32)}, cwd=folder)
    try:
        server.wait_http(f"{base}/api/auth/jwks")
        with httpx.Client(base_url=base, headers={"Origin": base}, timeout=30) as browser:
            avatar = "data:image/png;base64," + "iVBORw0KGgo" * 560  # a 6 KB image
            signed_up = browser.post("/api/auth/sign-up/email", json={
                "email": f"{alg.lower()}@example.com", "password": "correct horse battery",
                "name": "Guide", "image": avatar})
            assert signed_up.status_code == 200, signed_up.text
            user_id = signed_up.json()["user"]["id"]
            token = browser.get("/api/auth/token").json()["token"]
        # The service configured as the guide's section 2 says.
        settings = Settings(environment="production", better_auth_url=base,
                            jwt_issuer=base, jwt_audience=base)
        lines: list[str] = []
        status = await check(settings, token, out=lines.append)
    finally:
        server.stop()
    out = "\n".join(lines)
    assert status == 0, out + server.output()
    assert f"accepted: the APIs act as user {user_id!r}" in out
    assert f"ok    algorithm: {alg}" in out
    claims = payload(token)
    assert (claims["iss"], claims["aud"], claims["sub"]) == (base, base, user_id)
    assert "image" not in claims and claims["email"] == f"{alg.lower()}@example.com"
    assert len(token) < 1024  # definePayload: the avatar stays out of the token


def test_the_guides_rotation_section_holds(tmp_path: Path) -> None:
    folder = project(tmp_path)
    (folder / "rotation.mjs").write_text(ROTATION)
    ran = subprocess.run([node(), "rotation.mjs"], cwd=folder, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "AUTH_SECRET": secrets.token_urlsafe(32)})
    assert ran.returncode == 0, ran.stdout + ran.stderr
    out = json.loads(ran.stdout.strip().splitlines()[-1])
    assert out["afterInterval"]["kid"] == out["first"]["kid"]  # no rotation
    assert out["switched"] == out["first"]  # a new keyPairConfig.alg replaces nothing
    assert out["next"]["kid"] != out["first"]["kid"]  # expired by hand: a new key
    assert set(out["published"]) == {out["first"]["kid"], out["next"]["kid"]}  # grace period


def test_the_troubleshooting_table_has_every_reason_and_names_real_settings() -> None:
    text = GUIDE.read_text()
    rows = re.findall(r"^\| `([a-z_]+)`", text, re.M)
    assert set(REASONS) <= set(rows), sorted(set(REASONS) - set(rows))
    named = set(re.findall(r"`((?:JWT|JWKS|BETTER_AUTH|MAX_TOKEN)_[A-Z_]+)`", text))
    assert named and named <= SETTING_NAMES, sorted(named - SETTING_NAMES)
    first_command = re.search(r"```sh\n(.*?)\n", text, re.S)
    assert first_command and first_command.group(1).startswith("taskctl auth check")
    # The settings table's defaults are the service's.
    for name, default in re.findall(r"^\| `([A-Z_]+)` \| `([^`]+)` \|", text, re.M):
        value = Settings.model_fields[name.lower()].default
        assert (value if isinstance(value, str) else format(value, "g")) == default, name
