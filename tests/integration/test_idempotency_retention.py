"""Idempotency-Keys are kept at least 24 hours, then `taskctl db purge-idempotency`
forgets them (the table would otherwise grow with every keyed command)."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest
from fastapi.testclient import TestClient

from shared.eventstore import IDEMPOTENCY_TABLE, purge_idempotency
from shared.settings import Settings
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
        [sys.executable, "-m", "shared.cli", "db", "purge-idempotency"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("forgot ")
    refused = subprocess.run(
        [sys.executable, "-m", "shared.cli", "db", "purge-idempotency", "--older-than-hours", "2"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode != 0 and "24 hours" in refused.stderr
