"""Change stream resume tokens in MongoDB's KeyString layout.

A token's ``_data`` is the upper-case hex of a KeyString holding, in order: the
cluster time (CType 0x82 then 8 bytes big-endian: seconds, increment), the token
version (2), the token type (0 = high-water mark, 128 = event), txnOpIndex,
fromInvalidate, the collection UUID and the event identifier document
(``{operationType, documentKey}`` in v2 tokens). Because the cluster time leads,
tokens compare in stream order as bytes or as hex strings.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from typing import Any

CTYPE_NUMERIC_ZERO = 0x29
CTYPE_POS_1BYTE = 0x2B
CTYPE_STRING = 0x3C
CTYPE_OBJECT = 0x46
CTYPE_ARRAY = 0x50
CTYPE_BINDATA = 0x5A
CTYPE_OID = 0x64
CTYPE_BOOL_FALSE = 0x6E
CTYPE_BOOL_TRUE = 0x6F
CTYPE_DATE = 0x78
CTYPE_TIMESTAMP = 0x82
CTYPE_NULL = 0x14
CTYPE_END = 0x04

TOKEN_VERSION = 2
HIGH_WATER_MARK = 0
EVENT_TOKEN = 128


class InvalidToken(ValueError):
    """The token is not one this server could have produced."""


@dataclass(frozen=True, slots=True)
class TokenData:
    time: int
    inc: int
    token_type: int
    from_invalidate: bool

    @property
    def ts(self) -> tuple[int, int]:
        return (self.time, self.inc)


def _int(value: int) -> bytes:
    """KeyString integer: zero, or a positive int in the fewest bytes, shifted left once."""
    if value == 0:
        return bytes([CTYPE_NUMERIC_ZERO])
    shifted = value << 1
    size = max(1, (shifted.bit_length() + 7) // 8)
    return bytes([CTYPE_POS_1BYTE + size - 1]) + shifted.to_bytes(size, "big")


def _cstring(text: str) -> bytes:
    return text.encode().replace(b"\x00", b"\x00\xff") + b"\x00"


def _value(value: Any) -> bytes:
    # Deliberately partial: covers the _id types seen in practice, and falls back to
    # a typed, order-preserving-enough encoding for the rest.
    if value is None:
        return bytes([CTYPE_NULL])
    if isinstance(value, bool):
        return bytes([CTYPE_BOOL_TRUE if value else CTYPE_BOOL_FALSE])
    if isinstance(value, str):
        return bytes([CTYPE_STRING]) + _cstring(value)
    if isinstance(value, dict):
        return bytes([CTYPE_OBJECT]) + _object_body(value)
    if isinstance(value, list):
        return bytes([CTYPE_ARRAY]) + b"".join(_value(v) for v in value) + b"\x00"
    if isinstance(value, uuid.UUID):
        return bytes([CTYPE_BINDATA, 16, 4]) + value.bytes
    if type(value).__name__ == "ObjectId":
        return bytes([CTYPE_OID]) + bytes.fromhex(str(value))
    number = getattr(value, "value", value)
    if isinstance(number, int) and number >= 0:
        return _int(number)
    raw = repr(value).encode()
    return bytes([CTYPE_BINDATA, min(len(raw), 255), 0]) + raw[:255]


def _object_body(doc: dict[str, Any]) -> bytes:
    parts = []
    for key, val in doc.items():
        encoded = _value(val)
        parts.append(encoded[:1] + _cstring(key) + encoded)  # type, name, typed value
    return b"".join(parts) + b"\x00"


def encode(
    ts: tuple[int, int],
    *,
    token_type: int = EVENT_TOKEN,
    from_invalidate: bool = False,
    collection_uuid: uuid.UUID | None = None,
    event_id: dict[str, Any] | None = None,
) -> str:
    out = bytearray([CTYPE_TIMESTAMP])
    out += struct.pack(">II", ts[0], ts[1])
    out += _int(TOKEN_VERSION)
    out += _int(token_type)
    out += _int(0)  # txnOpIndex: no multi-document transactions here
    out.append(CTYPE_BOOL_TRUE if from_invalidate else CTYPE_BOOL_FALSE)
    if collection_uuid is not None:
        out += bytes([CTYPE_BINDATA, 16, 4]) + collection_uuid.bytes
    else:
        out.append(CTYPE_NULL)  # v2 tokens always carry the UUID-or-null field
    if event_id is not None:
        out += bytes([CTYPE_OBJECT]) + _object_body(event_id)
    out.append(CTYPE_END)
    return out.hex().upper()


def _read_int(data: bytes, pos: int) -> tuple[int, int]:
    ctype = data[pos]
    if ctype == CTYPE_NUMERIC_ZERO:
        return 0, pos + 1
    size = ctype - CTYPE_POS_1BYTE + 1
    if not 1 <= size <= 8 or pos + 1 + size > len(data):
        raise InvalidToken("bad integer in resume token")
    return int.from_bytes(data[pos + 1 : pos + 1 + size], "big") >> 1, pos + 1 + size


def decode(token: Any) -> TokenData:
    """Decode the leading fields of a resume token document; raise InvalidToken if malformed."""
    if (
        not isinstance(token, dict)
        or set(token) != {"_data"}
        or not isinstance(token["_data"], str)
    ):
        raise InvalidToken("resume token must be a document with a single string '_data' field")
    try:
        data = bytes.fromhex(token["_data"])
    except ValueError as exc:
        raise InvalidToken("resume token '_data' is not hex") from exc
    if len(data) < 13 or data[0] != CTYPE_TIMESTAMP or data[-1] != CTYPE_END:
        raise InvalidToken("resume token does not start with a cluster time")
    time, inc = struct.unpack(">II", data[1:9])
    version, pos = _read_int(data, 9)
    if version != TOKEN_VERSION:
        raise InvalidToken(f"unsupported resume token version {version}")
    token_type, pos = _read_int(data, pos)
    if token_type not in (HIGH_WATER_MARK, EVENT_TOKEN):
        raise InvalidToken(f"unknown resume token type {token_type}")
    _txn_op_index, pos = _read_int(data, pos)
    if pos >= len(data) or data[pos] not in (CTYPE_BOOL_FALSE, CTYPE_BOOL_TRUE):
        raise InvalidToken("resume token lacks fromInvalidate")
    return TokenData(time, inc, token_type, data[pos] == CTYPE_BOOL_TRUE)
