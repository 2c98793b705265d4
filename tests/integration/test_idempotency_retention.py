"""Idempotency-Keys are kept at least 24 hours, then `taskctl db purge-idempotency`
forgets them (the table would otherwise grow with every keyed command)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psycopg
import pytest
from fastapi.testclient import TestClient

from shared.catalog import IDEMPOTENCY_TABLE
from shared.settings import Settings
from taskctl.cli import purge_idempotency
from tests.support import bearer, new_user


def keyed_create(client: TestClient, user: str, key: str) -> str:
    response = client.post(
        "/api/tasks", json={"title": key}, headers={**bearer(user), "Idempotency-Key": key}
    )
    assert response.status_code == 201, response.text
    return response.json()["data"]["id"]


def test_purge_forgets_only_keys_older_than_the_retention(
    command_client: TestClient, settings: Settings, database_url: str
):
    user = new_user()
    old_id = keyed_create(command_client, user, "old-key")
    fresh_id = keyed_create(command_client, user, "fresh-key")
    with psycopg.connect(database_url) as conn:
        conn.execute(
            f"UPDATE {IDEMPOTENCY_TABLE} SET created_at = now() - interval '25 hours'"
            " WHERE user_id = %s AND key = 'old-key'",
            (user,),
        )

    removed = purge_idempotency(settings)

    assert removed >= 1
    with psycopg.connect(database_url) as conn:
        keys = {r[0] for r in conn.execute(
            f"SELECT key FROM {IDEMPOTENCY_TABLE} WHERE user_id = %s", (user,))}
    assert keys == {"fresh-key"}
    # The fresh key still answers a retry with the first response; the old one is a new command.
    assert keyed_create(command_client, user, "fresh-key") == fresh_id
    assert keyed_create(command_client, user, "old-key") != old_id


def test_purge_refuses_a_retention_under_24_hours(settings: Settings):
    with pytest.raises(ValueError, match="24 hours"):
        purge_idempotency(settings, older_than_hours=1)


def test_the_cli_purges_and_reports(database_url: str):
    env = {**os.environ, "DATABASE_URL": database_url}
    run = subprocess.run(
        [sys.executable, "-m", "taskctl.cli", "db", "purge-idempotency"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("forgot ")
    refused = subprocess.run(
        [sys.executable, "-m", "taskctl.cli", "db", "purge-idempotency", "--older-than-hours", "2"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode != 0 and "24 hours" in refused.stderr


def age_key(database_url: str, user: str, key: str, hours: float) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            f"UPDATE {IDEMPOTENCY_TABLE} SET created_at = now() - make_interval(hours => %s)"
            " WHERE user_id = %s AND key = %s",
            (hours, user, key),
        )


def keys_of(database_url: str, user: str) -> set[str]:
    with psycopg.connect(database_url) as conn:
        return {r[0] for r in conn.execute(
            f"SELECT key FROM {IDEMPOTENCY_TABLE} WHERE user_id = %s", (user,))}


def test_the_command_api_forgets_expired_keys_by_itself(settings: Settings, database_url: str):
    from command_api.app import create_app

    fast = settings.model_copy(update={"idempotency_purge_interval": 0.2})
    with TestClient(create_app(fast), raise_server_exceptions=False) as client:
        user = new_user()
        keyed_create(client, user, "expired-key")
        keyed_create(client, user, "kept-key")
        age_key(database_url, user, "expired-key", 25)
        deadline = time.monotonic() + 10
        while "expired-key" in keys_of(database_url, user) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert keys_of(database_url, user) == {"kept-key"}


def test_the_async_purge_works_in_batches_and_refuses_a_short_retention(
    settings: Settings, database_url: str, command_client: TestClient
):
    from tests.support.commands import LoopThread

    user = new_user()
    for n in range(5):
        keyed_create(command_client, user, f"batch-{n}")
        age_key(database_url, user, f"batch-{n}", 30)
    keyed_create(command_client, user, "recent")
    with LoopThread(settings) as loop:
        with pytest.raises(ValueError, match="24 hours"):
            loop.run(loop.store.purge_idempotency(23))
        removed = loop.run(loop.store.purge_idempotency(24, batch=2))
    assert removed is not None and removed >= 5  # other tests' old keys may go too
    assert keys_of(database_url, user) == {"recent"}
