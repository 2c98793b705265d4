"""`taskctl` checks its filters and numbers as the API checks the same parameters: a bad
one is a usage error (status 2) that names what is accepted, before anything connects."""

from __future__ import annotations

import pytest

from shared.events import EVENT_TOPICS
from taskctl.cli import build_parser


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(list(argv))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_an_unknown_event_type_is_refused_naming_every_valid_one(capsys):
    err = refused(capsys, "audit", "--type", "Bogus")
    assert "'Bogus' is not an event type" in err
    for topic in EVENT_TOPICS:
        assert topic in err


@pytest.mark.parametrize("argv, says", [
    (("audit", "--task", "not-a-uuid"), "not a task id"),
    (("audit", "--since", "yesterday"), "not an ISO 8601"),
    (("audit", "--until", "2026-13-01"), "not an ISO 8601"),
    (("audit", "--since", "9999-12-31T23:59:59-14:00"), "out of range"),
    (("audit", "--until", "0001-01-01T00:00:00+14:00"), "out of range"),
    (("audit", "--user", ""), "not a user id"),
    (("export", "--user", "a\x00b"), "not a user id"),
    (("token", "--user", "u", "--ttl", "0"), "out of range"),
    (("token", "--user", "u", "--ttl", "ten"), "not a whole number"),
    (("replay", "--batch-size", "-5"), "out of range"),
    (("replay", "--wait", "nan"), "out of range"),
    (("projector", "--poll-interval", "0"), "out of range"),
    (("dev", "--port", "70000"), "out of range"),
    (("db", "purge-idempotency", "--older-than-hours", "-1"), "out of range"),
])
def test_bad_values_are_usage_errors(capsys, argv, says):
    assert says in refused(capsys, *argv)


def test_good_values_pass_through_unchanged():
    args = build_parser().parse_args([
        "audit", "--type", "TaskCompleted", "--type", "TaskCreated",
        "--task", "0b6b1f0e-55c4-4c55-9d0e-6f1f2f0c1a11",
        "--since", "2026-12-01", "--until", "2026-12-02T09:30:00+01:00", "--user", "auth0|abc"])
    assert args.types == ["TaskCompleted", "TaskCreated"]
    assert args.task == "0b6b1f0e-55c4-4c55-9d0e-6f1f2f0c1a11"
    assert (args.since, args.until, args.user) == (
        "2026-12-01", "2026-12-02T09:30:00+01:00", "auth0|abc")
    assert build_parser().parse_args(["token", "--user", "u", "--ttl", "60"]).ttl == 60
