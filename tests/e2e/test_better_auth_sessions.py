"""AUTH_SESSION_TOKENS against a real Better Auth (the npm package) with its bearer()
plugin and no jwt(): the session token it hands out (`set-auth-token`) is accepted as
its user, through `taskctl auth check` too, and refused once the user signs out."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import httpx
import pytest

from shared.auth import Authenticator
from shared.errors import ApiError
from shared.settings import Settings
from taskctl.authcheck import check
from tests.support.node import node, node_modules
from tests.support.process import Proc, free_port

pytestmark = pytest.mark.slow

SERVER = r"""
import { createServer } from "node:http";
import { betterAuth } from "better-auth";
import { memoryAdapter } from "better-auth/adapters/memory";
import { bearer } from "better-auth/plugins";
import { toNodeHandler } from "better-auth/node";

const auth = betterAuth({
  baseURL: process.env.BETTER_AUTH_URL,
  secret: process.env.BETTER_AUTH_SECRET,
  database: memoryAdapter({ user: [], session: [], account: [], verification: [] }),
  emailAndPassword: { enabled: true },
  plugins: [bearer()],
  telemetry: { enabled: false },
});
createServer(toNodeHandler(auth)).listen(Number(process.env.PORT), "127.0.0.1");
"""


async def test_a_real_better_auth_session_token_is_accepted_until_sign_out(
    tmp_path: Path,
) -> None:
    (tmp_path / "node_modules").symlink_to(node_modules())
    (tmp_path / "package.json").write_text('{"type": "module"}\n')
    (tmp_path / "server.mjs").write_text(SERVER)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = Proc([node(), "server.mjs"], tmp_path / "auth.log",
                  {**os.environ, "PORT": str(port), "BETTER_AUTH_URL": base,
                   "BETTER_AUTH_SECRET": secrets.token_urlsafe(32)}, cwd=tmp_path)
    settings = Settings(environment="production", better_auth_url=base,
                        auth_session_tokens="only", auth_session_cache_seconds=0)
    try:
        server.wait_http(f"{base}/api/auth/ok")
        with httpx.Client(base_url=base, headers={"Origin": base}, timeout=30) as browser:
            signed_up = browser.post("/api/auth/sign-up/email", json={
                "email": "bearer@example.com", "password": "correct horse battery",
                "name": "Bearer"})
            assert signed_up.status_code == 200, signed_up.text
            user_id = signed_up.json()["user"]["id"]
            token = signed_up.headers["set-auth-token"]
        assert token.count(".") == 1  # token.signature: no JWT

        authenticator = Authenticator(settings)
        assert await authenticator.user_id(f"Bearer {token}") == user_id
        lines: list[str] = []
        assert await check(settings, token, out=lines.append) == 0, "\n".join(lines)
        assert lines[-1] == f"accepted: the APIs act as user {user_id!r}"

        signed_out = httpx.post(f"{base}/api/auth/sign-out", timeout=30,
                                headers={"Origin": base, "Authorization": f"Bearer {token}"})
        assert signed_out.status_code == 200, signed_out.text
        with pytest.raises(ApiError) as caught:
            await authenticator.user_id(f"Bearer {token}")
        assert (caught.value.status, caught.value.message) == (401, "Invalid token")
    finally:
        server.stop()
    assert "Error" not in server.output(), server.output()
