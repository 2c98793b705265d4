"""The sealing of personal fields (`shared.datakeys`): what a sealed value opens with,
what it refuses, and the master keys' settings."""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import uuid

import pytest

from shared.datakeys import (
    SEALED_PREFIX,
    SEALED_PREFIX_1,
    Erased,
    KeyRing,
    MasterKeyError,
    MasterKeys,
    is_sealed,
    key_ids,
    key_ref,
    new_data_key,
    parse_master_keys,
    seal_fields,
    sealed_key_id,
)
from shared.settings import Settings, SettingsError

SECRET = secrets.token_urlsafe(48)


def ring_with(*users: str) -> tuple[KeyRing, dict[str, object]]:
    master = MasterKeys((secrets.token_bytes(32),))
    ring, keys = KeyRing(master), {}
    for user in users:
        key, raw = new_data_key(user)
        by, wrapped = master.wrap(user, key.key_id, raw)
        keys[user] = ring.add_row(key.key_id, user, by, wrapped)
    return ring, keys


def test_a_sealed_field_opens_with_its_key_and_names_it() -> None:
    ring, keys = ring_with("alice")
    sealed = keys["alice"].seal("title", "Buy milk")
    assert sealed.startswith(SEALED_PREFIX) and "Buy milk" not in sealed
    assert sealed_key_id(sealed) == keys["alice"].key_id
    assert ring.open("title", sealed) == "Buy milk"
    assert keys["alice"].seal("title", "Buy milk") != sealed  # a fresh nonce each time


def test_a_sealed_title_does_not_pass_for_a_description() -> None:
    ring, keys = ring_with("alice")
    with pytest.raises(ValueError, match="damaged"):
        ring.open("description", keys["alice"].seal("title", "x"))


def test_a_sealed_value_names_its_key_by_a_ref_before_the_base64_payload() -> None:
    _, keys = ring_with("alice")
    key = keys["alice"]
    sealed = key.seal("title", "Buy milk")
    ref, payload = sealed[9:31], sealed[31:]
    assert ref == key_ref(key.key_id) and base64.urlsafe_b64decode(ref + "==") == key.key_id.bytes
    # nonce (12), ciphertext (as long as the text), tag (16)
    assert len(base64.b64decode(payload, validate=True)) == 12 + len("Buy milk") + 16


def test_a_changed_byte_is_refused() -> None:
    ring, keys = ring_with("alice")
    sealed = keys["alice"].seal("title", "Buy milk")
    head, payload = sealed[:31], sealed[31:]
    raw = bytearray(base64.b64decode(payload))
    raw[-1] ^= 1
    with pytest.raises(ValueError, match="damaged"):
        ring.open("title", head + base64.b64encode(bytes(raw)).decode())
    with pytest.raises(ValueError, match="damaged"):
        ring.open("title", head + payload[:-6] + "*" + payload[-5:])  # not base64
    with pytest.raises(ValueError, match="damaged"):
        key_ids([{"title": SEALED_PREFIX + "!" * 22 + payload}])  # a ref that is not


def _sealed_in_the_first_format(key, name: str, text: str) -> str:
    """What sealing wrote before the key ref: `sealed:1:<base64(id, nonce, ct + tag)>`."""
    nonce = os.urandom(12)
    body = key.aead.encrypt(nonce, text.encode(), name.encode())
    return SEALED_PREFIX_1 + binascii.b2a_base64(key.key_id.bytes + nonce + body,
                                                 newline=False).decode()


def test_values_in_the_first_format_still_open_and_name_their_key() -> None:
    ring, keys = ring_with("alice", "bob")
    first = {"title": _sealed_in_the_first_format(keys["alice"], "title", "Old milk"),
             "tags": [_sealed_in_the_first_format(keys["alice"], "tags", "old")]}
    assert is_sealed(first["title"]) and sealed_key_id(first["title"]) == keys["alice"].key_id
    both = [first, seal_fields(keys["bob"], {"title": "new"})]
    assert key_ids(both) == {keys["alice"].key_id, keys["bob"].key_id}
    assert ring.open("title", first["title"]) == "Old milk"
    with pytest.raises(ValueError, match="damaged"):
        ring.open("description", _sealed_in_the_first_format(keys["alice"], "title", "x"))
    ring.drop_user("alice")
    assert ring.open_data(first) is False and first == {"title": None, "tags": []}


def test_fields_seal_and_open_as_an_event_holds_them() -> None:
    ring, keys = ring_with("alice")
    data = seal_fields(keys["alice"], {"title": "t", "description": None, "tags": ["a", "b"],
                                       "priority": "high", "owner": "alice"})
    assert is_sealed(data["title"]) and data["description"] is None
    assert all(is_sealed(t) for t in data["tags"]) and data["priority"] == "high"
    assert key_ids([data]) == {keys["alice"].key_id}
    assert ring.open_data(data) is True
    assert data == {"title": "t", "description": None, "tags": ["a", "b"], "priority": "high",
                    "owner": "alice"}


def test_without_its_key_an_event_reads_as_erased() -> None:
    ring, keys = ring_with("alice", "bob")
    alice = seal_fields(keys["alice"], {"title": "hers", "tags": ["x"]})
    bob = seal_fields(keys["bob"], {"title": "his"})
    ring.drop_user("alice")
    with pytest.raises(Erased):
        ring.open("title", alice["title"])
    assert ring.open_data(alice) is False and alice == {"title": None, "tags": []}
    assert ring.open_data(bob) is True and bob["title"] == "his"


def test_plaintext_fields_stay_as_they_are() -> None:
    ring, _ = ring_with()
    data = {"title": "stored before sealing", "tags": ["old"]}
    assert ring.open_data(data) is True and data["title"] == "stored before sealing"


@pytest.mark.parametrize("text", [
    base64.b64encode(b"k" * 32).decode(),
    base64.urlsafe_b64encode(b"\xfb" * 32).decode().rstrip("="),
    ("ab" * 32),
])
def test_master_keys_are_32_bytes_as_base64_or_hex(text: str) -> None:
    assert [len(k) for k in parse_master_keys(f"{text}, {text}")] == [32, 32]


@pytest.mark.parametrize("text", ["", "changeme", base64.b64encode(b"k" * 16).decode(), "zz" * 32])
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(MasterKeyError):
        parse_master_keys(text)


def test_the_first_master_key_wraps_and_every_one_unwraps() -> None:
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    key_id, raw = uuid.uuid4(), secrets.token_bytes(32)
    by, wrapped = MasterKeys((old,)).wrap("u", key_id, raw)
    both = MasterKeys((new, old))
    assert both.unwrap("u", key_id, by, wrapped) == raw
    assert both.wrap("u", key_id, raw)[0] == both.current != by
    with pytest.raises(MasterKeyError, match="does not hold"):
        MasterKeys((new,)).unwrap("u", key_id, by, wrapped)
    with pytest.raises(MasterKeyError, match="damaged"):  # bound to its user and id
        both.unwrap("someone else", key_id, by, wrapped)


def test_production_refuses_a_placeholder_or_weak_master_key() -> None:
    for weak in ("replace-with-a-long-random-hex-string", "A" * 43, "00" * 32):
        with pytest.raises(ValueError, match="DATA_MASTER_KEY"):
            Settings(environment="production", better_auth_secret=SECRET, data_master_key=weak)
    good = secrets.token_urlsafe(32)
    assert Settings(environment="production", better_auth_secret=SECRET,
                    data_master_key=good).data_master_key == good
    assert Settings(environment="test", better_auth_secret=SECRET,
                    data_master_key="00" * 32).data_master_key  # outside production: any key


def test_the_command_api_refuses_to_start_without_one_in_production() -> None:
    from command_api.app import create_app

    with pytest.raises(SettingsError, match="DATA_MASTER_KEY is not set"):
        create_app(Settings(environment="production", better_auth_secret=SECRET,
                            database_url="postgresql://x@127.0.0.1:1/x"))


def test_the_projector_refuses_to_start_without_one_in_production(monkeypatch) -> None:
    from projections.projector import main

    monkeypatch.setenv("ENVIRONMENT", "production")
    monkeypatch.delenv("DATA_MASTER_KEY", raising=False)
    assert main("postgresql://x@127.0.0.1:1/x", metrics_port=0) == 2
