"""Production refuses a BETTER_AUTH_SECRET that is a known placeholder, too short, a short
piece repeated or of too little estimated entropy, saying how to make a good one; what
the usual generators make is accepted."""

from __future__ import annotations

import base64
import os
import secrets
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.settings import (
    MIN_SECRET_BITS,
    Settings,
    SettingsError,
    estimated_bits,
    repeating_period,
    weak_secret,
)
from tests.support import TEST_SECRET

ENV_EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"


def refusal(secret: str) -> str:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"ENVIRONMENT": "production", "BETTER_AUTH_SECRET": secret})
    message = str(caught.value)
    assert "BETTER_AUTH_SECRET" in message
    assert "openssl rand -base64 48" in message and "secrets.token_urlsafe(48)" in message
    return message


def env_example_placeholders() -> list[str]:
    """The values .env.example ships for its secrets: never usable as one."""
    values = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#") and ("SECRET" in name or "PASSWORD" in name):
            if value:
                values.append(value)
    return values


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        pytest.param("a" * 32, "one character repeated", id="32-a"),
        pytest.param("0" * 32, "one character repeated", id="32-zeros"),
        pytest.param("changeme" * 4, "a piece of 8 characters repeated", id="changeme-x4"),
        pytest.param("ChangeMe" * 6, "a piece of 8 characters repeated", id="changeme-x6-cased"),
        pytest.param("ab" * 20, "a piece of 2 characters repeated", id="ab-x20"),
        pytest.param(("Password123!" * 3)[:32], "a piece of 12 characters", id="cut-short"),
        pytest.param("your-secret-here" * 2, "a piece of 16 characters", id="placeholder-x2"),
        pytest.param("a" * 31 + "b", "too little entropy", id="31-a-and-b"),
        pytest.param("a" * 20 + "bcdefghijklm", "too little entropy", id="mostly-a"),
        pytest.param("replace-with-a-long-random-hex-string", "placeholder", id="env-example"),
        pytest.param("  REPLACE-WITH-A-LONG-RANDOM-HEX-STRING ", "placeholder", id="env-cased"),
        pytest.param("changeme", "placeholder", id="changeme"),
        pytest.param("dev-" + secrets.token_urlsafe(48), "placeholder", id="dev-prefix"),
        pytest.param("short-but-real-7f3a", "shorter than 32", id="short"),
    ],
)
def test_production_refuses_a_weak_secret_and_says_how_to_make_one(
    secret: str, reason: str
) -> None:
    assert reason in refusal(secret)


def test_every_secret_placeholder_of_env_example_is_refused() -> None:
    placeholders = env_example_placeholders()
    assert placeholders  # POSTGRES_PASSWORD's, at least
    for value in placeholders:
        assert "placeholder" in refusal(value), value


def test_the_entropy_refusal_states_the_rule() -> None:
    message = refusal("a" * 31 + "b")
    assert f"fewer than {MIN_SECRET_BITS}" in message
    assert "Shannon entropy" in message and "length" in message


GENERATORS: dict[str, Callable[[], str]] = {
    "openssl rand -base64 48": lambda: base64.b64encode(os.urandom(48)).decode(),
    "openssl rand -base64 32": lambda: base64.b64encode(os.urandom(32)).decode(),
    "openssl rand -hex 32": lambda: secrets.token_hex(32),
    "openssl rand -hex 16": lambda: secrets.token_hex(16),  # 32 characters, the minimum
    "token_urlsafe(48)": lambda: secrets.token_urlsafe(48),
    "token_urlsafe(24)": lambda: secrets.token_urlsafe(24),  # 32 characters
    "uuid4().hex": lambda: uuid.uuid4().hex,
}


@pytest.mark.parametrize("generator", list(GENERATORS))
def test_what_the_usual_generators_make_is_accepted(generator: str) -> None:
    # The lowest estimate seen for 20,000 `openssl rand -hex 16` or uuid4().hex
    # values was about 92 bits, so 500 draws stay clear of the 80-bit bound.
    for _ in range(500):
        secret = GENERATORS[generator]()
        assert weak_secret(secret) is None, secret
    settings = Settings.from_env({"ENVIRONMENT": "production", "BETTER_AUTH_SECRET": secret})
    assert settings.better_auth_secret == secret


@pytest.mark.parametrize(
    "secret",
    [TEST_SECRET, "k3Jx9-Qw7Lp2-Zr8Tn5-Vb4Mc6-Hd1Fs0-Ya", "correct horse battery staple xkcd"],
)
def test_a_secret_of_many_characters_is_accepted(secret: str) -> None:
    assert weak_secret(secret) is None


def test_development_and_test_do_not_check_strength() -> None:
    for environment in ("development", "test"):
        settings = Settings.from_env({"ENVIRONMENT": environment, "BETTER_AUTH_SECRET": "a" * 32})
        assert settings.better_auth_secret == "a" * 32


def test_the_estimate_and_the_period() -> None:
    assert estimated_bits("") == 0.0
    assert estimated_bits("a" * 100) == 0.0
    assert estimated_bits("ab" * 16) == pytest.approx(32.0)
    assert estimated_bits("0123456789abcdef" * 2) == pytest.approx(128.0)
    assert repeating_period("abcabcab") == 3
    assert repeating_period("abcabca") == 3
    assert repeating_period("abcd") is None
    assert repeating_period("aab") is None
