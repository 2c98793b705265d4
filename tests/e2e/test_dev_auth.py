"""`taskctl dev` with only JWKS_URL set: JWKS tokens work and HS256 stays off, even with
a dev secret recorded by an earlier run in the data folder (HS256 only when a secret is
given). A real `taskctl dev` process and a key server in its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.auth import mint_token
from shared.settings import Settings
from taskctl.dbinit import init_database
from tests.support import TEST_SECRET, PostgresServer
from tests.support.keyserver import KeyServer
from tests.support.process import ROOT, free_port
from tests.support.signing import auth, claims, new_key

pytestmark = pytest.mark.slow


@pytest.fixture
def own_db(pg_server: PostgresServer) -> Iterator[str]:
    url = pg_server.create_database("taskservice_dev_auth")
    init_database(Settings(environment="test", database_url=url, better_auth_secret=TEST_SECRET))
    yield url
    pg_server.drop_database(url)


def test_dev_with_only_jwks_url_turns_no_hs256_on(own_db: str, tmp_path: Path) -> None:
    key = new_key()
    key_server = KeyServer(tmp_path / "keyserver", free_port())
    key_server.set(keys=[key.jwk])
    key_server.start()
    data = tmp_path / ".data"
    data.mkdir()
    old_secret = "left-by-an-earlier-run-0123456789-abcdefghijklmnop"
    (data / "dev-secret").write_text(old_secret)
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("BETTER_AUTH_SECRET", "BETTER_AUTH_URL", "JWT_ISSUER", "JWT_AUDIENCE")}
    env.update(DATABASE_URL=own_db, JWKS_URL=key_server.jwks_url, ENVIRONMENT="development",
               TASKCTL_DATA_DIR=str(data), LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT))
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskctl.cli", "dev", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"{base}/api/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        output = log.read_text()
        assert "No demo tokens" in output and "TOKEN=" not in output, output

        hs256 = mint_token(old_secret, "someone", ttl_seconds=600)
        refused = httpx.post(f"{base}/api/tasks", json={"title": "x"}, headers=auth(hs256))
        assert refused.status_code == 401, refused.text
        accepted = httpx.post(f"{base}/api/tasks", json={"title": "x"},
                              headers=auth(key.token(claims())))
        assert accepted.status_code == 201, accepted.text
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        key_server.stop()
