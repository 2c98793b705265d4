"""Per-user data keys: the personal fields of stored events, sealed so that deleting a
user's keys erases them (crypto-shredding) while the event store stays append-only.

- **What is sealed.** The free-text fields of task events (`SEALED_FIELDS`: title,
  description, each tag) are stored as `sealed:2:<key ref><base64(nonce, AES-GCM
  ciphertext and tag)>`, a plain JSON string: the eventsourcing library still reads
  every stored event (the sealed fields read as those strings); everything else
  (owner, actor, completion, priority, due date, times) stays as it was. The field's
  name is the AEAD's associated data, so a sealed title cannot pass for a description.
  The key ref is the key id's 16 bytes as 22 characters of unpadded URL-safe base64:
  a reader finds a value's key by slicing the string, before decoding anything (a
  replay opens millions). The rest is standard base64 with its padding, which the C
  decoder reads with no translation. Values in the first format, `sealed:1:<base64(key
  id, nonce, ciphertext and tag)>`, still open.
- **Data keys** (`DATA_KEYS_TABLE`): one or more 256-bit AES keys per user, each stored
  wrapped (AES-GCM) by a master key, with the id of the master key that wrapped it.
  New events use the user's newest key; every key of theirs still opens what it
  sealed. `taskctl users forget` deletes them all: what they sealed is then noise.
- **Master keys** (`MasterKeys`): DATA_MASTER_KEY, a comma-separated list of 32-byte
  keys (base64 or hex), the first wrapping new keys and every one unwrapping; in
  development and tests, absent, a random one `taskctl db init` keeps in
  `DEV_MASTER_TABLE`; in production it must be set (docs/privacy.md).
- **Opening** (`KeyRing`): a sealed value names its key; a ring holds the unwrapped
  keys a process has seen and, before each use that must not outlive an erasure, is
  refreshed from the table (`load`): a key that is gone opens nothing, and the event
  reads as erased (`open_data` says so).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID, uuid4

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

DATA_KEYS_TABLE = "user_data_keys"
DEV_MASTER_TABLE = "dev_master_key"
SEALED_PREFIX = "sealed:2:"  # what sealing writes
SEALED_PREFIX_1 = "sealed:1:"  # the first format, still opened
SEALED_PREFIXES = (SEALED_PREFIX, SEALED_PREFIX_1)
# In SQL: a value in either format (a plaintext title starting so is taken as sealed).
SEALED_PATTERN = "^sealed:[12]:"
SEALED_FIELDS = ("title", "description", "tags")
KEY_BYTES = 32
NONCE_BYTES = 12
_ID_BYTES = 16
_WRAP_CONTEXT = b"taskservice data key\x00"

DATA_KEYS_DDL = (
    f"CREATE TABLE IF NOT EXISTS {DATA_KEYS_TABLE} ("
    " key_id uuid PRIMARY KEY, user_id text NOT NULL, master_id text NOT NULL,"
    " wrapped bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT clock_timestamp())",
    f"CREATE INDEX IF NOT EXISTS {DATA_KEYS_TABLE}_user_idx"
    f" ON {DATA_KEYS_TABLE} (user_id, created_at DESC)",
    f"CREATE TABLE IF NOT EXISTS {DEV_MASTER_TABLE} ("
    " id smallint PRIMARY KEY CHECK (id = 1), key bytea NOT NULL,"
    " created_at timestamptz NOT NULL DEFAULT now())",
)
SELECT_KEYS = (
    f"SELECT key_id, user_id, master_id, wrapped FROM {DATA_KEYS_TABLE}"
    " WHERE key_id = ANY($1::uuid[])"
)
SELECT_ALL_KEYS = f"SELECT key_id, user_id, master_id, wrapped FROM {DATA_KEYS_TABLE}"
SELECT_NEWEST_KEY = (
    f"SELECT key_id, user_id, master_id, wrapped FROM {DATA_KEYS_TABLE}"
    " WHERE user_id = $1 ORDER BY created_at DESC, key_id LIMIT 1"
)
INSERT_KEY = (
    f"INSERT INTO {DATA_KEYS_TABLE} (key_id, user_id, master_id, wrapped) VALUES ($1, $2, $3, $4)"
)
SELECT_DEV_MASTER = f"SELECT key FROM {DEV_MASTER_TABLE} WHERE id = 1"
# In an append's statement: the key its events are sealed with still exists. (No row
# lock: an append whose statement began before an erasure committed may still commit
# after it, sealed with a deleted key; it is erased with the rest. A lock would cost
# every append a heap write, a WAL record and, with concurrent appends, a multixact.)
KEY_HELD = "EXISTS (SELECT 1 FROM " + DATA_KEYS_TABLE + " k WHERE k.key_id = {key})"


class MasterKeyError(Exception):
    """No usable master key, or a data key wrapped by a master key not configured."""


def parse_master_keys(text: str) -> list[bytes]:
    """DATA_MASTER_KEY's keys: comma-separated, each 32 bytes as base64 (standard or
    URL-safe, padding optional) or 64 hex digits."""
    keys = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key = _decode_key(part)
        if key is None:
            raise MasterKeyError(
                "DATA_MASTER_KEY must be 32-byte keys, base64 or hex, comma-separated; make"
                ' one with `python -c "import secrets; print(secrets.token_urlsafe(32))"`'
            )
        keys.append(key)
    if not keys:
        raise MasterKeyError("DATA_MASTER_KEY holds no key")
    return keys


def _decode_key(text: str) -> bytes | None:
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        key = base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4),
                               validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == KEY_BYTES else None


def master_id(key: bytes) -> str:
    """A master key's public name (it cannot be turned back into the key)."""
    return hashlib.sha256(b"taskservice master key\x00" + key).hexdigest()[:16]


@dataclass(frozen=True)
class MasterKeys:
    """The master keys: the first wraps, every one unwraps."""

    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys or any(len(k) != KEY_BYTES for k in self.keys):
            raise MasterKeyError("a master key is 32 bytes")

    @property
    def current(self) -> str:
        return master_id(self.keys[0])

    def _by_id(self, wanted: str) -> bytes:
        for key in self.keys:
            if master_id(key) == wanted:
                return key
        raise MasterKeyError(
            f"a data key is wrapped by master key {wanted}, which DATA_MASTER_KEY does not"
            " hold: add it to the list (docs/privacy.md, 'Rotating the master key')"
        )

    def wrap(self, user_id: str, key_id: UUID, data_key: bytes) -> tuple[str, bytes]:
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(self.keys[0]).encrypt(nonce, data_key, _wrap_context(user_id, key_id))
        return self.current, nonce + sealed

    def unwrap(self, user_id: str, key_id: UUID, wrapped_by: str, wrapped: bytes) -> bytes:
        key = self._by_id(wrapped_by)
        try:
            return AESGCM(key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:],
                                       _wrap_context(user_id, key_id))
        except InvalidTag:
            raise MasterKeyError(f"data key {key_id} does not open with master key"
                                 f" {wrapped_by}: the stored key is damaged") from None


def _wrap_context(user_id: str, key_id: UUID) -> bytes:
    return _WRAP_CONTEXT + key_id.bytes + user_id.encode()


def key_ref(key_id: UUID) -> str:
    """How a sealed value names its key: the id's bytes, 22 characters."""
    return base64.urlsafe_b64encode(key_id.bytes).decode()[:_REF_CHARS]


@functools.lru_cache(maxsize=4096)  # a ref per data key: a command's load names one or two
def _ref_id(ref: str) -> UUID:
    try:
        return UUID(bytes=base64.urlsafe_b64decode(ref + "=="))
    except (binascii.Error, ValueError):
        raise ValueError("a sealed value whose key ref is not base64: damaged") from None


@dataclass(frozen=True)
class DataKey:
    key_id: UUID
    user_id: str
    aead: AESGCM
    ref: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ref", key_ref(self.key_id))

    def seal(self, name: str, text: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self.aead.encrypt(nonce, text.encode(), name.encode())
        return SEALED_PREFIX + self.ref + binascii.b2a_base64(nonce + sealed,
                                                               newline=False).decode()


def new_data_key(user_id: str) -> tuple[DataKey, bytes]:
    """A fresh key for `user_id` and its raw bytes (to be wrapped, never stored bare)."""
    raw = AESGCM.generate_key(bit_length=8 * KEY_BYTES)
    return DataKey(uuid4(), user_id, AESGCM(raw)), raw


def is_sealed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(SEALED_PREFIXES)


_START = len(SEALED_PREFIX)  # both formats' prefixes are as long
_REF_CHARS = 22
_REF_END = _START + _REF_CHARS
# The first format's key id: the first 18 bytes of its payload's first 24 characters.
_ID_END_1 = _START + 24
# Each sealed field with its associated data.
_AAD = tuple((name, name.encode()) for name in SEALED_FIELDS)


def _damaged() -> ValueError:
    return ValueError("a sealed value that is not base64: damaged")


def _ref(value: str) -> str | bytes:
    """What a ring finds `value`'s key by: its ref (the format now written), or, in
    the first format, the key id's bytes."""
    if value.startswith(SEALED_PREFIX):
        return value[_START:_REF_END]
    try:
        return binascii.a2b_base64(value[_START:_ID_END_1])[:_ID_BYTES]
    except binascii.Error:
        raise _damaged() from None


def _id_of(ref: str | bytes) -> UUID:
    return _ref_id(ref) if isinstance(ref, str) else UUID(bytes=ref)


def sealed_key_id(value: str) -> UUID:
    return _id_of(_ref(value))


def key_ids(datas: Iterable[dict[str, Any]]) -> set[UUID]:
    """The ids of the keys that sealed `datas`' fields. (On a replay's path: each value's
    key ref is a slice, and only the distinct ones are decoded.)"""
    refs: set[str | bytes] = set()
    for data in datas:
        for name in SEALED_FIELDS:
            value = data.get(name)
            if value.__class__ is str:
                if value.startswith(SEALED_PREFIX):
                    refs.add(value[_START:_REF_END])
                elif value.startswith(SEALED_PREFIX_1):
                    refs.add(_ref(value))
            elif value and value.__class__ is list:  # (most tag lists are empty)
                for v in value:
                    if isinstance(v, str) and v.startswith(SEALED_PREFIXES):
                        refs.add(_ref(v))
    return {_id_of(ref) for ref in refs}


def seal_fields(key: DataKey, fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` with its personal ones sealed by `key` (others as they are)."""
    out = dict(fields)
    for name in SEALED_FIELDS:
        value = out.get(name)
        if isinstance(value, str) and not is_sealed(value):
            out[name] = key.seal(name, value)
        elif isinstance(value, list):
            out[name] = [key.seal(name, v) if isinstance(v, str) and not is_sealed(v) else v
                         for v in value]
    return out


class Erased(Exception):
    """A sealed value whose key is gone: its user was forgotten."""


@dataclass
class KeyRing:
    """The data keys a process has opened, by id. `load` refreshes the ids a batch
    needs from the table (a key that is gone is dropped); `open` uses what it holds."""

    master: MasterKeys
    # Where the master keys come from again when a key is wrapped by one not held (the
    # development key, remade by a fresh `db init`); None: DATA_MASTER_KEY, fixed.
    reload_master: Callable[[Any], Awaitable[MasterKeys]] | None = None
    keys: dict[UUID, DataKey] = field(default_factory=dict)
    _wrapped: dict[UUID, bytes] = field(default_factory=dict)
    # `keys` by how sealed values name them: their ref, and their id's bytes (the first
    # format's).
    _by_ref: dict[str | bytes, DataKey] = field(default_factory=dict)

    def add_row(self, key_id: UUID, user_id: str, wrapped_by: str, wrapped: bytes) -> DataKey:
        held = self.keys.get(key_id)
        if held is not None and self._wrapped.get(key_id) == wrapped:
            return held
        raw = self.master.unwrap(user_id, key_id, wrapped_by, wrapped)
        key = DataKey(key_id, user_id, AESGCM(raw))
        self.keys[key_id] = key
        self._wrapped[key_id] = wrapped
        self._by_ref[key.ref] = key
        self._by_ref[key_id.bytes] = key
        return key

    async def load(self, conn: Any, ids: Iterable[UUID]) -> None:
        """Hold exactly the keys of `ids` that the table has now (one query)."""
        wanted = list(set(ids))
        if not wanted:
            return
        rows = await conn.fetch(SELECT_KEYS, wanted)
        await self._add_rows(conn, rows)
        found = {row[0] for row in rows}
        for key_id in wanted:
            if key_id not in found:
                self.drop(key_id)

    async def load_all(self, conn: Any) -> None:
        """Hold every key the table has now, and no other."""
        rows = await conn.fetch(SELECT_ALL_KEYS)
        found = {row[0] for row in rows}
        for key_id in [k for k in self.keys if k not in found]:
            self.drop(key_id)
        await self._add_rows(conn, rows)

    async def _add_rows(self, conn: Any, rows: Iterable[Any]) -> None:
        rows = list(rows)
        try:
            for row in rows:
                self.add_row(row[0], row[1], row[2], row[3])
        except MasterKeyError:
            if self.reload_master is None:
                raise
            self.master = await self.reload_master(conn)
            for row in rows:
                self.add_row(row[0], row[1], row[2], row[3])

    def drop(self, key_id: UUID) -> None:
        key = self.keys.pop(key_id, None)
        self._wrapped.pop(key_id, None)
        if key is not None:
            self._by_ref.pop(key.ref, None)
            self._by_ref.pop(key_id.bytes, None)

    def drop_user(self, user_id: str) -> None:
        for key_id in [k for k, key in self.keys.items() if key.user_id == user_id]:
            self.drop(key_id)

    def open(self, name: str, value: str) -> str:
        """The plaintext of a sealed value; raises Erased if its key is not held."""
        text = self._open(name.encode(), value)
        if text is None:
            raise Erased(name)
        return text

    def _open(self, aad: bytes, value: str) -> str | None:
        """`value` opened; None if its key is not held."""
        try:
            if value.startswith(SEALED_PREFIX):
                key = self._by_ref.get(value[_START:_REF_END])
                payload = binascii.a2b_base64(value[_REF_END:])
            else:
                payload = binascii.a2b_base64(value[_START:])
                key = self._by_ref.get(payload[:_ID_BYTES])
                payload = payload[_ID_BYTES:]
        except binascii.Error:
            raise _damaged() from None
        if key is None:
            return None
        try:
            return key.aead.decrypt(payload[:NONCE_BYTES], payload[NONCE_BYTES:], aad).decode()
        except InvalidTag:
            raise ValueError(f"a sealed {aad.decode()} does not open with its key: damaged"
                             ) from None

    def open_data(self, data: dict[str, Any]) -> bool:
        """Open `data`'s sealed fields in place; False (and those fields None, a sealed
        tag list empty) if any key is gone: the event is erased."""
        erased = False
        for name, aad in _AAD:
            value = data.get(name)
            if value.__class__ is str:
                if value.startswith(SEALED_PREFIXES):
                    data[name] = text = self._open(aad, value)
                    erased = erased or text is None
            elif value and value.__class__ is list:  # (most tag lists are empty)
                texts, gone = [], False
                for v in value:
                    if is_sealed(v):
                        v = self._open(aad, v)
                        gone = gone or v is None
                    texts.append(v)
                data[name] = [] if gone else texts
                erased = erased or gone
        return not erased


async def dev_or_configured(conn: Any) -> MasterKeys:
    """For runners without settings (tests, benchmarks): DATA_MASTER_KEY from the
    environment, else the database's development key. The processes pass theirs."""
    return await load_master_keys(conn, os.environ.get("DATA_MASTER_KEY") or None, "development")


def default_ring(master: MasterKeys, configured: str | None) -> KeyRing:
    """A ring on `master`; one that can reload the development key if not `configured`."""
    return KeyRing(master, reload_master=None if configured else dev_or_configured)


async def load_master_keys(conn: Any, configured: str | None, environment: str) -> MasterKeys:
    """DATA_MASTER_KEY's keys; unset outside production, the development key `db init`
    made (then DATA_MASTER_KEY may not be set later without it: docs/privacy.md)."""
    if configured:
        return MasterKeys(tuple(parse_master_keys(configured)))
    if environment == "production":
        raise MasterKeyError(
            "DATA_MASTER_KEY is not set: in production the users' data keys are wrapped by"
            ' a master key of yours (`python -c "import secrets;'
            ' print(secrets.token_urlsafe(32))"`; docs/privacy.md)'
        )
    key = await conn.fetchval(SELECT_DEV_MASTER)
    if key is None:
        raise MasterKeyError(f"no development master key in {DEV_MASTER_TABLE}:"
                             " run `taskctl db init`")
    return MasterKeys((bytes(key),))


_RINGS: dict[tuple[str, str], KeyRing] = {}


def _database_of(conn: Any) -> tuple[str, str]:
    return str(conn._addr), str(conn._params.database)


def use_ring(conn: Any, ring: KeyRing) -> None:
    """Open the sealed fields of `conn`'s database with `ring` in this process (the
    processes pass the one their settings give); else `ring_for` makes one."""
    _RINGS[_database_of(conn)] = ring


async def ring_for(conn: Any) -> KeyRing:
    """This process's ring for `conn`'s database (an asyncpg connection): `use_ring`'s,
    or one from DATA_MASTER_KEY or the development key (`dev_or_configured`)."""
    ring = _RINGS.get(_database_of(conn))
    if ring is None:
        ring = KeyRing(await dev_or_configured(conn), reload_master=dev_or_configured)
        _RINGS[_database_of(conn)] = ring
    return ring
