"""Every value the query API takes is range-checked before it reaches SQL: a bad one is a
422 naming its parameter, never a 5xx. Explicit edge cases, then a Hypothesis property
over the feed's and the list's parameters against the real query app on the test
database (a token whose subject is not a valid string is a 401 on both APIs)."""

from __future__ import annotations

import os
import string
import struct
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from query_api import cursor
from query_api.app import create_app
from query_api.routes import FeedFilter, TaskFilter
from shared import position
from shared.events import EVENT_TOPICS
from shared.position import Position, PositionCodec, Seal
from shared.settings import Settings
from tests.support import TEST_SECRET, bearer, new_user
from tests.support.query import _SESSION_DATABASE, codec_for

# Per property: 300 take about 2 s here; docs/reliability.md has a longer run.
EXAMPLES = int(os.environ.get("RANGE_EXAMPLES", "300"))
USER = new_user()
HEADERS = bearer(USER, ttl_seconds=86_400)  # made at collection: outlive any run of the suite
CALLS: dict[str, int] = {}


@pytest.fixture(scope="module")
def query_client(settings: Settings) -> Iterator[TestClient]:
    """The real query app on the test database; a position in the future is not waited for."""
    fast = settings.model_copy(update={"read_wait_timeout": 0.0})
    with TestClient(create_app(fast), raise_server_exceptions=False) as client:
        yield client


def get(client: TestClient, path: str, params: dict[str, str], **headers: str) -> Any:
    return client.get(path, params=params, headers={**HEADERS, **headers})


def refused_field(response: Any) -> dict[str, str]:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    return error["details"]


# -- dates ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["since", "until"])
@pytest.mark.parametrize(
    "value",
    [
        "9999-12-31T23:59:59-14:00",
        "9999-12-31T23:59:59.999999-00:01",
        "0001-01-01T00:00:00+14:00",
        "0001-01-01T00:00:00.000001+00:01",
    ],
)
def test_a_date_beyond_utc_range_is_a_422_naming_it(
    query_client: TestClient, name: str, value: str
) -> None:
    details = refused_field(get(query_client, "/api/history", {name: value}))
    assert list(details) == [name] and "UTC" in details[name]


@pytest.mark.parametrize(
    "value",
    [
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00",
        "0001-01-01T14:00:00+14:00",
        "9999-12-31T23:59:59.999999Z",
        "9999-12-31T23:59:59.999999",
        "9999-12-31T09:59:59-14:00",
    ],
)
def test_the_extreme_dates_within_range_are_accepted(query_client: TestClient, value: str) -> None:
    for name in ("since", "until"):
        response = get(query_client, "/api/history", {name: value})
        assert response.status_code == 200, response.text


def test_an_offset_date_means_the_same_instant_in_utc() -> None:
    feed = FeedFilter(since="2026-01-01T10:00:00+02:00")  # type: ignore[arg-type]
    assert feed.since == datetime(2026, 1, 1, 8, tzinfo=UTC)
    assert feed.since.utcoffset() == timedelta(0)


# -- numbers, strings, cursors, positions ------------------------------------------------


def _sealed(purpose: str, prefix: str, layout: str, a: int, b: int) -> str:
    """A token sealed with the session database's key, holding any two 64-bit values
    (bigger ones wrap): what the service would accept as its own."""
    values = [a % 2**64, b % 2**64]
    if layout[1] == "q":  # signed
        values[0] -= 2**64 if values[0] >= 2**63 else 0
    key = codec_for(_SESSION_DATABASE[0]).key
    return Seal(key, purpose, prefix).seal(struct.pack(layout, *values))


def _cursor(micros: int, position: int) -> str:
    return _sealed(cursor.PURPOSE, cursor.PREFIX, ">qQ", micros, position)


def _position(tx_id: int, notification_id: int) -> str:
    return _sealed(position.PURPOSE, position.PREFIX, ">QQ", tx_id, notification_id)


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/api/tasks", {"limit": str(2**63)}, "limit"),
        ("/api/tasks", {"limit": "0"}, "limit"),
        ("/api/tasks", {"offset": str(2**63)}, "offset"),
        ("/api/tasks", {"offset": "-1"}, "offset"),
        ("/api/tasks", {"offset": "9" * 5000}, "offset"),
        ("/api/tasks", {"q": "a\x00b"}, "q"),
        ("/api/tasks", {"q": "x" * 501}, "q"),
        ("/api/history", {"limit": str(-(2**70))}, "limit"),
        ("/api/history", {"task_id": "not-a-uuid"}, "task_id"),
        ("/api/history", {"type": "TaskExploded"}, "type"),
        # Sealed by the service's key (so they open) but holding what it never issues.
        ("/api/history", {"cursor": lambda: _cursor(10**18 - 1, 1)}, "cursor"),
        ("/api/history", {"cursor": lambda: _cursor(-(10**18 - 1), 1)}, "cursor"),
        ("/api/history", {"cursor": lambda: _cursor(0, 2**63)}, "cursor"),
        ("/api/history", {"min_position": lambda: _position(2**63, 1)}, "min_position"),
        ("/api/history", {"min_position": lambda: _position(1, 2**64 - 1)}, "min_position"),
        # The plain formats of earlier versions, and a position sealed under another key.
        ("/api/history", {"min_position": "p2.1.1"}, "min_position"),
        ("/api/history", {"cursor": "YzEuMC4x"}, "cursor"),
        ("/api/history", {"min_position": PositionCodec(os.urandom(32)).encode(Position(1, 1))},
         "min_position"),
    ],
)
def test_out_of_range_values_are_a_422_naming_them(
    query_client: TestClient, path: str, params: dict[str, Any], field: str
) -> None:
    params = {k: v() if callable(v) else v for k, v in params.items()}
    assert field in refused_field(get(query_client, path, params))


def test_the_largest_accepted_values_reach_sql_without_error(query_client: TestClient) -> None:
    largest = {"limit": "1000", "offset": "1000000000", "q": "%_\\" * 166}
    assert get(query_client, "/api/tasks", largest).status_code == 200
    last = _cursor(253402300799999999, 2**63 - 1)  # 9999-12-31T23:59:59.999999Z
    response = get(query_client, "/api/history", {"cursor": last, "limit": "1000"})
    assert response.status_code == 200, response.text
    at_max = {"min_position": _position(2**63 - 1, 2**63 - 1)}
    assert get(query_client, "/api/history", at_max).status_code == 200


def test_a_lone_surrogate_never_reaches_sql() -> None:
    # A URL cannot carry one (a percent-encoded one decodes to U+FFFD); the models refuse
    # it all the same, as PostgreSQL's text cannot hold it.
    with pytest.raises(ValidationError, match="q"):
        TaskFilter(q="a\ud800")


# -- the token's subject and time claims, on both APIs ----------------------------------


def _signed(claims: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {jwt.encode(claims, TEST_SECRET, algorithm='HS256')}"}


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"sub": "u\ud800"}, id="lone-surrogate-sub"),
        pytest.param({"sub": "\udc00"}, id="lone-low-surrogate-sub"),
        pytest.param({"exp": str(int(time.time()) + 300)}, id="numeric-text-exp"),
        pytest.param({"nbf": "0"}, id="numeric-text-nbf"),
        pytest.param({"iat": "0"}, id="numeric-text-iat"),
        pytest.param({"exp": 10**400}, id="exp-beyond-float"),
    ],
)
def test_a_validly_signed_token_with_a_bad_claim_is_a_401_on_both_apis(
    query_client: TestClient, command_client: TestClient, claims: dict[str, Any]
) -> None:
    now = int(time.time())
    headers = _signed({"sub": new_user(), "iat": now, "exp": now + 300, **claims})
    for response in (
        query_client.get("/api/tasks", headers=headers),
        query_client.get("/api/history", headers=headers),
        command_client.post("/api/tasks", json={"title": "t"}, headers=headers),
    ):
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "UNAUTHORIZED"


# -- the property: no 5xx, whatever the parameters ---------------------------------------
#
# An out-of-range value only reaches SQL when every other parameter is valid (any
# invalid one is a 422 first), so each example gives one or two parameters a hostile
# value and the others a valid one or none.

# Every Unicode category a URL can carry (a lone surrogate has no UTF-8 form).
ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
HUGE = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, 1, -1, 1000, 1001, 10**9, 10**9 + 1, 2**31, 2**63 - 1, 2**63, 2**64]),
)
NUMBER = st.one_of(HUGE.map(str), st.floats().map(str), ANY_TEXT)
OFFSETS = st.one_of(
    st.sampled_from([timedelta(hours=h) for h in (14, -14, 12, -12)]
                    + [timedelta(hours=23, minutes=59), -timedelta(hours=23, minutes=59)]),
    st.timedeltas(min_value=-timedelta(hours=23, minutes=59),
                  max_value=timedelta(hours=23, minutes=59)),
).map(lambda d: timezone(timedelta(minutes=d // timedelta(minutes=1))))
EDGE_DATES = st.one_of(  # within a day of the ends of Python's (and UTC's) range
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(1, 1, 2)),
    st.datetimes(min_value=datetime(9999, 12, 30, 23, 59), max_value=datetime.max),
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_MICROS = (datetime.min.replace(tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)
MAX_MICROS = (datetime.max.replace(tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)


def _iso(d: datetime, tz: timezone | None) -> str:
    return d.replace(tzinfo=tz).isoformat()


VALID_DATE = st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat())
DATE = st.one_of(
    st.builds(_iso, EDGE_DATES, OFFSETS),
    st.builds(_iso, EDGE_DATES, st.none()),
    st.builds(_iso, st.datetimes(), OFFSETS),
    HUGE.map(str),
    st.sampled_from(["infinity", "-infinity", "epoch", "now", "0000-01-01T00:00:00Z",
                     "10000-01-01T00:00:00Z", "2026-02-30T00:00:00Z", "2026-01-01T24:00:00Z",
                     "2026-01-01T00:00:00+24:00", "2026-01-01T00:00:00-99:99"]),
    ANY_TEXT,
)
VALID_CURSOR = st.builds(_cursor, st.integers(MIN_MICROS, MAX_MICROS), st.integers(0, 2**63 - 1))
CURSOR = st.one_of(
    VALID_CURSOR,
    st.builds(_cursor, HUGE, HUGE),
    st.builds(_cursor,
              st.integers(MIN_MICROS - 10**6, MIN_MICROS + 10**6)
              | st.integers(MAX_MICROS - 10**6, MAX_MICROS + 10**6),
              st.integers(2**63 - 3, 2**63 + 3)),
    st.text(string.ascii_letters + string.digits + "-_=.", max_size=60),
    ANY_TEXT,
)
VALID_POSITION = st.builds(_position, st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1))
POSITION = st.one_of(
    VALID_POSITION,
    st.builds(_position, HUGE, HUGE),
    st.builds(_position, st.integers(2**63 - 3, 2**64), st.integers(0, 2**64)),
    st.builds(lambda a, b: f"p2.{a}.{b}", HUGE, HUGE),
    ANY_TEXT,
)
VALID_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
                     max_size=500)

FEED_VALID = {
    "since": VALID_DATE,
    "until": VALID_DATE,
    "type": st.sampled_from(list(EVENT_TOPICS)),
    "task_id": st.uuids().map(str),
    "limit": st.integers(1, 1000).map(str),
    "cursor": VALID_CURSOR,
    "min_position": VALID_POSITION,
}
FEED_HOSTILE = {
    "since": DATE,
    "until": DATE,
    "type": ANY_TEXT,
    "task_id": st.one_of(st.uuids().map(str), ANY_TEXT),
    "limit": NUMBER,
    "cursor": CURSOR,
    "min_position": POSITION,
}
LIST_VALID = {
    "status": st.sampled_from(["all", "pending", "completed"]),
    "q": VALID_TEXT,
    "sort": st.sampled_from(["created_at", "-created_at", "updated_at", "-updated_at",
                             "title", "-title"]),
    "limit": st.integers(1, 1000).map(str),
    "offset": st.integers(0, 10**9).map(str),
    "min_position": VALID_POSITION,
}
LIST_HOSTILE = {
    "status": ANY_TEXT,
    "q": st.one_of(ANY_TEXT, st.text(max_size=600).filter(lambda t: "\x00" not in t),
                   st.just("%_\\" * 166)),
    "sort": ANY_TEXT,
    "limit": NUMBER,
    "offset": NUMBER,
    "min_position": POSITION,
}


@st.composite
def requests(
    draw: st.DrawFn, valid: dict[str, st.SearchStrategy[str]],
    hostile: dict[str, st.SearchStrategy[str]],
) -> dict[str, str]:
    targets = draw(st.sets(st.sampled_from(sorted(hostile)), min_size=1, max_size=2))
    params: dict[str, str] = {}
    for name in valid:
        value = draw(hostile[name] if name in targets else st.one_of(st.none(), valid[name]))
        if value is not None:
            params[name] = value
    return params


def _never_5xx(response: Any, params: dict[str, str]) -> None:
    status = response.status_code
    CALLS[str(status)] = CALLS.get(str(status), 0) + 1
    assert status < 500, (params, response.text)
    assert status in (200, 422), (params, response.text)
    if status == 422:
        details = response.json()["error"]["details"]
        assert details and set(details) <= set(params) | {"X-Min-Position"}, (params, details)


PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPERTY
@given(params=requests(FEED_VALID, FEED_HOSTILE))
def test_the_feed_never_answers_5xx(query_client: TestClient, params: dict[str, str]) -> None:
    _never_5xx(get(query_client, "/api/history", params), params)


@PROPERTY
@given(params=requests(LIST_VALID, LIST_HOSTILE))
def test_the_list_never_answers_5xx(query_client: TestClient, params: dict[str, str]) -> None:
    for path in ("/api/tasks", f"/api/{USER}/tasks"):
        _never_5xx(get(query_client, path, params), params)


@PROPERTY
@given(position=POSITION)
def test_a_min_position_header_never_answers_5xx(query_client: TestClient, position: str) -> None:
    raw = position.encode("utf-8")  # a header is bytes; the server reads them as latin-1
    if any(c in raw for c in b"\r\n\x00"):
        return  # no HTTP server passes these on in a header value
    response = query_client.get("/api/stats", headers={**HEADERS, "X-Min-Position": raw})
    _never_5xx(response, {"min_position": position})


def test_zz_the_properties_reached_sql_and_refusals_alike() -> None:
    """Run after the properties (file order): both outcomes were exercised."""
    if not CALLS:
        pytest.skip("the properties did not run")
    assert CALLS.get("200", 0) > EXAMPLES // 4 and CALLS.get("422", 0) > EXAMPLES // 4, CALLS


@pytest.mark.parametrize("path, params", [
    ("/api/tasks", {"search": "milk"}),
    ("/api/tasks", {"skip": "10", "limit": "5"}),
    ("/api/stats", {"verbose": "1"}),
    ("/api/history", {"page": "2"}),
])
def test_an_unknown_query_parameter_name_is_a_422_naming_the_accepted_ones(
        query_client, path, params):
    response = query_client.get(path, params=params, headers=bearer(new_user()))
    assert response.status_code == 422, response.text
    body = response.json()
    unknown = next(name for name in params if name != "limit")
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert "accepted: " in body["error"]["details"][unknown]
    assert "min_position" in body["error"]["details"][unknown]
    assert body["detail"] == "Unknown query parameter"


@pytest.mark.parametrize("path, query, repeated", [
    ("/api/tasks", "limit=1&limit=2", ["limit"]),
    ("/api/tasks", "q=milk&q=eggs&status=all&status=pending", ["q", "status"]),
    ("/api/history", "type=TaskCreated&type=TaskDeleted", ["type"]),
    ("/api/stats", "min_position=a&min_position=b", ["min_position"]),
])
def test_a_single_valued_parameter_given_twice_is_a_422_naming_it(
        query_client, path, query, repeated):
    response = query_client.get(f"{path}?{query}", headers=bearer(new_user()))
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["detail"] == "Repeated query parameter"
    assert sorted(body["error"]["details"]) == repeated


def test_tag_may_be_repeated(query_client):
    response = query_client.get("/api/tasks?tag=work&tag=home&limit=5",
                                headers=bearer(new_user()))
    assert response.status_code == 200, response.text
