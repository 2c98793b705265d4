"""Positions in the event store's global order, and how the API shows them.

The order is (tx_id, notification_id): the id of the transaction that wrote an event,
then the event's own id. Readers take only events of transactions older than every
transaction still running (`tx_id < pg_snapshot_xmin(pg_current_snapshot())`), so an
event that commits late can never appear behind a position a reader has passed.

Clients get a position from a command and hand it back to a query. They see it sealed
(`PositionCodec`): encrypted and authenticated with AES-SIV (RFC 5297, deterministic
authenticated encryption) under the service's key, which `taskctl db init` keeps in the
database (`service_keys`), so every process of one deployment shares it with no setting.
A sealed token shows its holder no count (not how many events everybody wrote), and one
the service did not issue fails to open: a 422. The same seal keeps the feed's cursors.
The token's prefix versions its format.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from shared.catalog import SERVICE_KEYS_TABLE

_MAX = 2**63 - 1
PREFIX = "p3."
PURPOSE = "taskservice position v3"  # what the sealing key is derived for
_PAIR = struct.Struct(">QQ")


class BadPosition(ValueError):
    pass


class BadToken(ValueError):
    """A sealed token this service did not issue (or issued under another key)."""


class Position(NamedTuple):
    """Compare with <, <=: tuples order by transaction id, then notification id."""

    tx_id: int
    notification_id: int

    def __str__(self) -> str:
        return f"{self.tx_id}.{self.notification_id}"


ZERO = Position(0, 0)


class Seal:
    """Opaque, authenticated tokens of short values: `prefix` + base64url of the AES-SIV
    ciphertext (a 16-byte tag, then the value). Deterministic: one value, one token, so
    a retried command answers with the very token it answered with first. What that
    shows a holder is only whether two tokens are equal (for two reads: whether the read
    tables moved in between), never a count."""

    def __init__(self, key: bytes, purpose: str, prefix: str) -> None:
        if len(key) < 32:
            raise ValueError("the sealing key must have at least 32 bytes")
        self._siv = AESSIV(hmac.new(key, purpose.encode(), hashlib.sha256).digest())
        self._purpose = [purpose.encode()]
        self.prefix = prefix

    def seal(self, value: bytes) -> str:
        sealed = self._siv.encrypt(value, self._purpose)
        return self.prefix + base64.urlsafe_b64encode(sealed).decode().rstrip("=")

    def open(self, token: str) -> bytes:
        token = token.strip()
        if not token.startswith(self.prefix) or len(token) > 200:
            raise BadToken
        body = token[len(self.prefix):]
        try:
            raw = base64.urlsafe_b64decode((body + "=" * (-len(body) % 4)).encode("ascii"))
            if base64.urlsafe_b64encode(raw).decode().rstrip("=") != body:
                raise BadToken  # one spelling per token (no spare bits, no padding)
            return self._siv.decrypt(raw, self._purpose)
        except (UnicodeError, ValueError, binascii.Error, InvalidTag):
            raise BadToken from None


class PositionCodec:
    """Positions as clients see them: sealed with the deployment's key."""

    def __init__(self, key: bytes) -> None:
        self._seal = Seal(key, PURPOSE, PREFIX)
        self.key = key
        self._last: tuple[Position, str] | None = None  # reads repeat one checkpoint

    def encode(self, position: Position | None) -> str | None:
        if position is None:
            return None
        last = self._last
        if last is not None and last[0] == position:
            return last[1]
        token = self._seal.seal(_PAIR.pack(position.tx_id, position.notification_id))
        self._last = (position, token)
        return token

    def decode(self, token: str) -> Position:
        try:
            tx_id, notification_id = _PAIR.unpack(self._seal.open(token))
        except (BadToken, struct.error):
            raise BadPosition("not a position this service issued") from None
        if tx_id > _MAX or notification_id > _MAX:
            raise BadPosition("not a position this service issued")
        return Position(tx_id, notification_id)


# The key `taskctl db init` keeps in the database for sealing positions and cursors.
KEY_NAME = "positions"
KEY_SQL = f"SELECT key FROM {SERVICE_KEYS_TABLE} WHERE name = '{KEY_NAME}'"


class MissingKey(RuntimeError):
    """The database has no sealing key: `taskctl db init` has not run since it was added."""


async def load_codec(conn: Any) -> PositionCodec:
    """The deployment's codec, its key read on `conn` (an asyncpg connection)."""
    key = await conn.fetchval(KEY_SQL)
    if key is None:
        raise MissingKey(f"no key {KEY_NAME!r} in {SERVICE_KEYS_TABLE}: run `taskctl db init`")
    return PositionCodec(bytes(key))
