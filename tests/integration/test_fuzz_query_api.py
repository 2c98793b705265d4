"""Schemathesis fuzzes the query API in-process (its ASGI app on the test database, with
tasks written through the command side and projected) from its own OpenAPI document,
with a valid token: no 5xx, every response as documented, every body in the envelope.

The budget is small so the file stays fast; docs/reliability.md has the longer run."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis import GenerationMode
from schemathesis.config import PositiveDataAcceptanceConfig
from schemathesis.specs.openapi import checks as openapi_checks

from query_api.app import create_app
from shared.settings import Settings
from tests.support import TEST_SECRET, bearer, new_user
from tests.support.fuzz import DeferredApp, envelope_conformance, own_user_and_task, send
from tests.support.projection import catch_up

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "25"))
FUZZ_USER = new_user()
TASK_IDS: list[str] = []
POSITIONS: list[str] = []
CALLS: Counter[tuple[str, int]] = Counter()

CHECKS = [
    schemathesis.checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
    openapi_checks.positive_data_acceptance,
    envelope_conformance,
]

PLACEHOLDER = Settings(
    environment="test", database_url="postgresql://127.0.0.1:1/none", better_auth_secret=TEST_SECRET
)
TARGET = DeferredApp(create_app(PLACEHOLDER))
# The app serves the service's one document (both APIs); this app answers its reads.
# The task streams answer without end by design (their contract: tests/integration/
# test_stream.py); a fuzzer that reads a response to its end would wait forever.
schema = (schemathesis.openapi.from_asgi("/openapi.json", TARGET).include(method="GET")
          .exclude(path_regex="/stream$"))
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES
)
schema.config.checks.positive_data_acceptance = PositiveDataAcceptanceConfig(
    expected_statuses=["2XX", 403, 404]
)


@pytest.fixture(scope="module")
def query_app_client(
    settings: Settings, command_client: TestClient, database_url: str
) -> Iterator[TestClient]:
    """The fuzz user's tasks (open, completed, renamed, one deleted), projected; then the
    real query app on the test database, its lifespan running as in production."""
    user = bearer(FUZZ_USER)
    for i in range(8):
        created = command_client.post("/api/tasks", json={"title": f"fuzz {i}"}, headers=user)
        assert created.status_code == 201, created.text
        TASK_IDS.append(created.json()["data"]["id"])
    for task_id in TASK_IDS[:3]:
        done = command_client.patch(f"/api/tasks/{task_id}", json={"completed": True}, headers=user)
        assert done.status_code == 200, done.text
    deleted = command_client.delete(f"/api/tasks/{TASK_IDS[-1]}", headers=user)
    assert deleted.status_code == 204, deleted.text
    POSITIONS.append(deleted.headers["X-Position"])
    asyncio.run(catch_up(database_url))

    fast = settings.model_copy(update={"read_wait_timeout": 0.2})
    with TestClient(create_app(fast), raise_server_exceptions=False) as client:
        yield client


def issued_positions(case) -> None:
    """Positive cases name a position the service issued and no cursor: the schema
    documents both as free strings, the routes accept only tokens they issued (422 else)."""
    if case.meta is not None and not case.meta.generation.mode.is_positive:
        return
    if case.query:
        case.query.pop("cursor", None)  # likewise an issued token; first pages only
    for name in ("min_position", "last_event_id"):  # the stream's resume position
        if case.query and name in case.query:
            case.query[name] = POSITIONS[0]
    for name in ("X-Min-Position", "Last-Event-ID"):
        if case.headers and name in case.headers:
            case.headers[name] = POSITIONS[0]


@schema.parametrize()
def test_query_api_answers_as_documented(case, query_app_client: TestClient):
    own_user_and_task(case, FUZZ_USER, task_ids=TASK_IDS)
    issued_positions(case)
    response = send(case, query_app_client, bearer(FUZZ_USER))
    CALLS[(case.operation.label, response.status_code)] += 1
    case.validate_response(response, checks=CHECKS)


def test_the_fuzzer_reached_the_success_paths():
    """Guards the fuzz test above against testing only rejections."""
    statuses = Counter(status for (_, status), n in CALLS.items() for _ in range(n))
    assert sum(statuses.values()) >= MAX_EXAMPLES, statuses
    assert statuses[200] and statuses[422], statuses
    assert not any(status >= 500 for status in statuses), statuses
    print(f"\nquery API fuzz: {sum(statuses.values())} requests, by status {dict(sorted(statuses.items()))}")
