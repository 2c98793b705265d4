"""Schemathesis fuzzes the one origin (the dev app: command API, query API and projector
in one process) from the one document it serves, every operation of both APIs, with a
valid token: no 5xx, every response as documented, every body in the envelope. This is
the document a frontend's generated client is built from.

The budget is small so the file stays fast (FUZZ_MAX_EXAMPLES for a longer run)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis import GenerationMode
from schemathesis.config import PositiveDataAcceptanceConfig
from schemathesis.specs.openapi import checks as openapi_checks

from shared.settings import Settings
from taskctl.dev import create_dev_app
from tests.support import TEST_SECRET, bearer, new_user
from tests.support.fuzz import (
    DeferredApp,
    envelope_conformance,
    own_user_and_task,
    send,
    unique_idempotency_key,
)

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "10"))
FUZZ_USER = new_user()
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
# The task streams answer without end by design (their contract: tests/integration/
# test_stream.py); a fuzzer that reads a response to its end would wait forever.
schema = schemathesis.openapi.from_asgi(
    "/openapi.json", DeferredApp(create_dev_app(PLACEHOLDER))).exclude(path_regex="/stream$")
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES
)
schema.config.checks.positive_data_acceptance = PositiveDataAcceptanceConfig(
    expected_statuses=["2XX", 403, 404, 409, 412]
)


@pytest.fixture(scope="module")
def dev_app_client(settings: Settings) -> Iterator[TestClient]:
    """The real one-origin app on the test database, its lifespan (and projector) running."""
    fast = settings.model_copy(update={"read_wait_timeout": 0.2})
    with TestClient(create_dev_app(fast), raise_server_exceptions=False) as client:
        created = client.post("/api/tasks", json={"title": "fuzz"}, headers=bearer(FUZZ_USER))
        assert created.status_code == 201, created.text
        POSITIONS.append(created.headers["X-Position"])
        yield client


def issued_tokens(case) -> None:
    """Positive cases name a position the service issued and no cursor (the schema
    documents both as free strings; the routes accept only tokens they issued)."""
    if case.meta is not None and not case.meta.generation.mode.is_positive:
        return
    if case.query:
        case.query.pop("cursor", None)
        for name in ("min_position", "last_event_id"):  # the stream's resume position
            if name in case.query:
                case.query[name] = POSITIONS[0]
    for name in ("X-Min-Position", "Last-Event-ID"):
        if case.headers and name in case.headers:
            case.headers[name] = POSITIONS[0]


@schema.parametrize()
def test_the_one_origin_answers_as_its_document_says(case, dev_app_client: TestClient):
    own_user_and_task(case, FUZZ_USER, dev_app_client)
    unique_idempotency_key(case)
    issued_tokens(case)
    response = send(case, dev_app_client, bearer(FUZZ_USER))
    CALLS[(case.operation.label, response.status_code)] += 1
    case.validate_response(response, checks=CHECKS)


def test_the_fuzzer_reached_every_operation_and_the_success_paths():
    """Guards the fuzz test above against testing only rejections or only one API."""
    statuses = Counter(status for (_, status), n in CALLS.items() for _ in range(n))
    operations = {label for label, _ in CALLS}
    assert len(operations) == len(list(schema.get_all_operations())), operations
    assert statuses[200] and statuses[201] and statuses[204] and statuses[422], statuses
    assert not any(status >= 500 for status in statuses), statuses
    print(f"\none-origin fuzz: {sum(statuses.values())} requests over {len(operations)}"
          f" operations, by status {dict(sorted(statuses.items()))}")
