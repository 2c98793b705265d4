"""Schemathesis fuzzes the command API in-process (its ASGI app on the test database) from
its own OpenAPI document, with a valid token: no 5xx, every response as documented, and
every body in the `{data, meta}` / `{error, meta}` envelope.

The budget is small so the file stays fast; docs/reliability.md has the longer run."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis import GenerationMode
from schemathesis.config import PositiveDataAcceptanceConfig
from schemathesis.specs.openapi import checks as openapi_checks

from command_api.app import create_app
from shared.settings import Settings
from tests.support import TEST_SECRET, bearer, new_user
from tests.support.fuzz import (
    DeferredApp,
    envelope_conformance,
    own_user_and_task,
    send,
    unique_idempotency_key,
)

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "25"))
FUZZ_USER = new_user()
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
# The app serves the service's one document (both APIs); this app answers its writes.
# The one document also holds the query API's stream-ticket POSTs: not this API's.
schema = (schemathesis.openapi.from_asgi("/openapi.json", TARGET)
          .include(method=["POST", "PUT", "PATCH", "DELETE"])
          .exclude(path_regex="/stream/tickets$"))
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES
)
# Data the schema allows must not be rejected as invalid (422): only by who owns what
# (403/404), by versions (409/412) or by state. This keeps the documented schema honest.
schema.config.checks.positive_data_acceptance = PositiveDataAcceptanceConfig(
    expected_statuses=["2XX", 403, 404, 409, 412]
)


@pytest.fixture(scope="module")
def command_app_client(settings: Settings) -> Iterator[TestClient]:
    """The real app on the test database, its lifespan running as in production."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@schema.parametrize()
def test_command_api_answers_as_documented(case, command_app_client: TestClient):
    own_user_and_task(case, FUZZ_USER, command_app_client)
    unique_idempotency_key(case)
    response = send(case, command_app_client, bearer(FUZZ_USER))
    CALLS[(case.operation.label, response.status_code)] += 1
    case.validate_response(response, checks=CHECKS)


def test_the_fuzzer_reached_the_success_paths():
    """Guards the fuzz test above against testing only rejections."""
    statuses = Counter(status for (_, status), n in CALLS.items() for _ in range(n))
    assert sum(statuses.values()) >= MAX_EXAMPLES, statuses
    assert statuses[201] and statuses[200] and statuses[204], statuses
    assert statuses[422] and statuses[404], statuses
    assert not any(status >= 500 for status in statuses), statuses
    print(f"\ncommand API fuzz: {sum(statuses.values())} requests, by status {dict(sorted(statuses.items()))}")



def test_the_documented_title_and_key_are_what_the_routes_accept():
    """Found by the fuzzer: the schema allowed blank or NUL titles, null `title`/`completed`
    in PATCH and any Idempotency-Key, all of which the routes answer with 422."""
    doc = TARGET.app.openapi()
    components = doc["components"]["schemas"]
    title = components["CreateTask"]["properties"]["title"]
    pattern = re.compile(title["pattern"])
    assert pattern.search("  Buy milk ") and not pattern.search("   ")
    assert not pattern.search("Buy\x00milk")
    assert title["maxLength"] == 255 and title["minLength"] == 1
    change = components["ChangeTask"]["properties"]
    assert change["title"]["type"] == "string" and "anyOf" not in change["title"]
    assert change["completed"]["type"] == "boolean" and "anyOf" not in change["completed"]
    params = doc["paths"]["/api/tasks/{task_id}"]["patch"]["parameters"]
    key = next(p for p in params if p["name"] == "Idempotency-Key")
    key_pattern = re.compile(key["schema"]["pattern"])
    assert key_pattern.match("abc-123") and not key_pattern.match("a b") and not key_pattern.match("")
