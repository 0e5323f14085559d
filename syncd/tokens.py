"""Decode MongoDB change-stream resume tokens, and build high-water-mark tokens.

A token's ``_data`` is the hex of a KeyString (version V1, ascending order) that
MongoDB builds from a list of BSON values; see ``ResumeToken(const ResumeTokenData&)``
in ``src/mongo/db/pipeline/resume_token.cpp``. In order:

    clusterTime, version, [tokenType (v1+)], txnOpIndex, [fromInvalidate (v1+)],
    uuid (null from v2 on when absent), eventIdentifier (documentKey in v0/v1;
    {operationType, documentKey | operationDescription} in v2), [fragmentNum (v2)]

KeyString keeps only values, not their exact BSON types. Where the type matters
(int vs. long vs. double) the server returns ``_typeBits`` beside ``_data``; when a
caller has only the hex string we infer the natural type (int, or float when the
value has a fraction), which is what operators want to read anyway. Decimal128
values are rare in document keys and need the full decimal continuation logic of
``key_string.cpp``; they are reported as unsupported rather than decoded wrongly.
"""

from __future__ import annotations

import json
import math
import string
import struct
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import bson
from bson import json_util
from bson.codec_options import CodecOptions
from bson.datetime_ms import DatetimeMS
from bson.int64 import Int64
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.objectid import ObjectId

# KeyString canonical type bytes (namespace CType in key_string.cpp). Numbers spend
# the range 30..51 so that the type byte alone orders them by magnitude class.
_MIN_KEY, _UNDEFINED, _NULL, _STRING, _OBJECT, _ARRAY = 10, 15, 20, 60, 70, 80
_BINDATA, _OID, _FALSE, _TRUE, _DATE, _TIMESTAMP, _MAX_KEY = 90, 100, 110, 111, 120, 130, 240
_UNSUPPORTED = {140: "regex", 150: "DBPointer", 160: "JavaScript code", 170: "code with scope"}
_NAN, _NEG_LARGE, _NEG_1B, _NEG_SMALL = 30, 31, 39, 40  # 8- to 1-byte negatives: 32..39
_ZERO, _POS_SMALL, _POS_1B, _POS_LARGE = 41, 42, 43, 51  # 1- to 8-byte positives: 43..50
_END, _LESS, _GREATER = 0x04, 0x01, 0xFE  # end of key; query-only discriminators

# TypeBits numeric codes (TypeBits in key_string.h); all-zero bits mean "int".
_TB_INT, _TB_LONG, _TB_DOUBLE, _TB_DECIMAL = 0, 1, 2, 3
_TB_NEGATIVE_DOUBLE_ZERO = 0x18  # 5-bit code that follows the 0b11 zero prefix in V1

_VALUELESS: dict[int, Any] = {_MIN_KEY: MinKey(), _MAX_KEY: MaxKey(), _NULL: None, _UNDEFINED: None}
_TOKEN_TYPES = {0: "highWaterMark", 128: "event"}
_MAX_DEPTH = 200  # twice BSON's own nesting limit: stops hostile input, not real keys
_U64 = (1 << 64) - 1
_TZ_AWARE: CodecOptions[Any] = CodecOptions(tz_aware=True)


class InvalidResumeToken(ValueError):
    """The input is not a resume token this decoder understands; the message says why."""


@dataclass(frozen=True)
class DecodedToken:
    """The fields of one resume token, named as in MongoDB's ``ResumeTokenData``."""

    cluster_time: bson.Timestamp
    version: int
    token_type: int | None  # 0 = high-water mark, 128 = event; None for v0 tokens
    txn_op_index: int
    from_invalidate: bool
    uuid: uuid.UUID | None
    document_key: Any | None
    event_identifier: Any | None
    raw_fields: list[Any]
    fragment_num: int | None = None  # v2 tokens of events split into fragments

    def cluster_time_iso(self) -> str:
        """The cluster time's seconds as ISO-8601 UTC, e.g. ``2024-01-02T03:04:05Z``."""
        moment = datetime.fromtimestamp(self.cluster_time.time, tz=UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict whose keys are always present, in this order.

        ``clusterTime``: ``{"t": seconds, "i": increment, "iso": cluster_time_iso()}``;
        ``version``: 0, 1 or 2; ``tokenType``: ``"event"``, ``"highWaterMark"`` or
        None (v0); ``txnOpIndex``: int; ``fromInvalidate``: bool; ``uuid``: canonical
        string or None; ``documentKey`` and ``eventIdentifier``: relaxed Extended JSON
        or None; ``fragmentNum``: int or None.
        """
        ts = self.cluster_time
        return {
            "clusterTime": {"t": ts.time, "i": ts.inc, "iso": self.cluster_time_iso()},
            "version": self.version,
            "tokenType": None if self.token_type is None else _TOKEN_TYPES[self.token_type],
            "txnOpIndex": self.txn_op_index,
            "fromInvalidate": self.from_invalidate,
            "uuid": None if self.uuid is None else str(self.uuid),
            "documentKey": _extended_json(self.document_key),
            "eventIdentifier": _extended_json(self.event_identifier),
            "fragmentNum": self.fragment_num,
        }


def decode_resume_token(token: str | bytes | Mapping[str, Any]) -> DecodedToken:
    """Decode a resume token given as hex, raw KeyString bytes or ``{"_data": ...}``.

    A mapping may carry ``_typeBits`` (as the server sends it); it then fixes the
    exact numeric types inside the document key. Raises InvalidResumeToken.
    """
    data, type_bits = _token_bytes(token)
    fields = _Reader(data, _TypeBits(type_bits)).read_top_level()
    return _interpret(data, fields)


def token_cluster_time(token: str | bytes | Mapping[str, Any]) -> bson.Timestamp:
    """Only the leading cluster time; cheap, and tolerant of a damaged tail."""
    data, _ = _token_bytes(token)
    if len(data) < 9:
        raise _invalid(data, "too short to hold a cluster time (needs 9 bytes)")
    return _timestamp(data[1:9])


def encode_high_water_mark(ts: bson.Timestamp, *, version: Literal[1, 2] = 2) -> str:
    """The hex ``_data`` of the high-water-mark token MongoDB itself emits for ``ts``.

    Byte for byte what ``ResumeToken::makeHighWaterMarkToken`` produces (the server
    sends such tokens as ``postBatchResumeToken``), so ``resumeAfter``/``startAfter``
    treat it as a point in time: no matching event is needed, only oplog history
    reaching back to ``ts``. Version 2 needs MongoDB 6.0+; pass 1 for older servers.
    """
    if version not in (1, 2):
        raise ValueError(f"high-water-mark tokens exist in versions 1 and 2, not {version}")
    body = bytes([_TIMESTAMP]) + struct.pack(">II", ts.time, ts.inc)
    body += bytes([_POS_1B, version << 1, _ZERO, _ZERO, _FALSE])  # version, type 0, index 0
    if version >= 2:
        body += bytes([_NULL])  # v2 spells out the missing collection UUID
    return (body + bytes([_END])).hex().upper()


# -- input handling ---------------------------------------------------------------


def _token_bytes(token: object) -> tuple[bytes, bytes | None]:
    type_bits: bytes | None = None
    if isinstance(token, Mapping):
        if "_data" not in token:
            raise InvalidResumeToken("not a resume token: the mapping has no '_data' field")
        raw_bits = token.get("_typeBits")
        if raw_bits is not None:
            if not isinstance(raw_bits, bytes):
                raise InvalidResumeToken("not a resume token: '_typeBits' is not binary data")
            type_bits = bytes(raw_bits)
        token = token["_data"]
    if isinstance(token, bytes):  # also bson.Binary: the BinData _data of 3.6-era tokens
        data = bytes(token)
    elif isinstance(token, str):
        data = _unhex(token.strip())
    else:
        raise InvalidResumeToken(
            f"not a resume token: expected hex text, got {type(token).__name__}"
        )
    if not data:
        raise InvalidResumeToken("not a resume token: it is empty")
    if data[0] != _TIMESTAMP:
        raise _invalid(data, f"starts with byte 0x{data[0]:02X}, not 0x82 (a cluster time)")
    return data, type_bits


def _unhex(text: str) -> bytes:
    # Checked by hand because bytes.fromhex() also skips spaces inside the text.
    bad = next((c for c in text if c not in string.hexdigits), None)
    if bad is not None:
        raise InvalidResumeToken(f"not a resume token: {bad!r} is not a hex digit")
    if len(text) % 2:
        raise InvalidResumeToken(f"not a resume token: odd hex length {len(text)}")
    return bytes.fromhex(text)


def _invalid(data: bytes, why: str) -> InvalidResumeToken:
    shown = data[:12].hex().upper() + ("..." if len(data) > 12 else "")
    return InvalidResumeToken(f"not a resume token ({shown}): {why}")


def _timestamp(eight: bytes) -> bson.Timestamp:
    seconds, increment = struct.unpack(">II", eight)
    return bson.Timestamp(seconds, increment)


# -- the token layout (ResumeToken::getData) --------------------------------------


def _interpret(data: bytes, fields: list[Any]) -> DecodedToken:
    def need(ok: bool, why: str) -> None:
        if not ok:
            raise _invalid(data, why)

    def count(value: Any) -> bool:  # the server insists on a NumberInt >= 0
        return type(value) is int and value >= 0

    values = iter(fields)

    def take() -> Any:  # None once the fields run out; the checks below then say which
        return next(values, None)

    cluster_time, version = take(), take()  # byte 0 proved the first is a Timestamp
    need(type(version) is int and version in (0, 1, 2), f"version is {version!r}, not 0-2")
    token_type = take() if version >= 1 else None
    ok_type = version == 0 or (type(token_type) is int and token_type in _TOKEN_TYPES)
    need(ok_type, f"token type is {token_type!r}, expected 0 or 128")
    txn_op_index = take()
    need(count(txn_op_index), f"txnOpIndex is {txn_op_index!r}, expected an int >= 0")
    from_invalidate = take() if version >= 1 else False
    need(isinstance(from_invalidate, bool), f"fromInvalidate is {from_invalidate!r}, not a bool")

    rest = list(values)
    need(bool(rest) or version < 2, "v2 token lacks its UUID-or-null field")
    collection_uuid = _parse_uuid(rest.pop(0), need) if rest else None
    need(token_type != 0 or not rest, "high-water-mark token carries an event identifier")
    need(
        bool(rest) or token_type != 128 or version < 2, "v2 event token lacks its event identifier"
    )
    identifier = rest.pop(0) if rest else None
    need(identifier is None or isinstance(identifier, dict), "event identifier is not a document")
    fragment_num = rest.pop(0) if rest and version >= 2 else None
    need(fragment_num is None or count(fragment_num), f"fragmentNum is {fragment_num!r}")
    need(not rest, f"{len(rest)} unexpected trailing value(s)")

    # v0/v1 tokens hold the bare documentKey; v2 wraps it with the operation type.
    document_key = identifier.get("documentKey") if version >= 2 and identifier else identifier
    return DecodedToken(
        cluster_time=cluster_time,
        version=version,
        token_type=token_type,
        txn_op_index=txn_op_index,
        from_invalidate=from_invalidate,
        uuid=collection_uuid,
        document_key=document_key,
        event_identifier=identifier if version >= 2 else None,
        raw_fields=fields,
        fragment_num=fragment_num,
    )


def _parse_uuid(value: Any, need: Callable[[bool, str], None]) -> uuid.UUID | None:
    if value is None:
        return None
    ok = isinstance(value, bson.Binary) and value.subtype == 4 and len(value) == 16
    need(ok, f"collection UUID is {value!r}, expected BinData subtype 4 or null")
    return uuid.UUID(bytes=bytes(value))


def _extended_json(value: Any) -> Any:
    if value is None:
        return None
    return json.loads(json_util.dumps(value, json_options=json_util.RELAXED_JSON_OPTIONS))


# -- KeyString decoding (toBsonSafe / toBsonValue in key_string.cpp) ---------------


class _TypeBits:
    """Reads TypeBits, the side channel holding exact numeric and string types.

    Serialized (TypeBits::resetFromBuffer): empty or 0x00 = all zeros; one byte
    below 0x80 = those 8 bits; 0x80|n then n bytes; 0x80 then a little-endian
    uint32 length then the bytes. Bits are consumed least significant first.
    """

    def __init__(self, raw: bytes | None) -> None:
        self.explicit, self._pos, raw = raw is not None, 0, raw or b"\x00"
        if raw[0] < 0x80:
            self._bits = raw[:1]
        elif raw[0] > 0x80:
            self._bits = raw[1 : 1 + (raw[0] & 0x7F)]
        else:
            self._bits = raw[5 : 5 + int.from_bytes(raw[1:5], "little")]

    def bit(self) -> int:
        byte, offset = divmod(self._pos, 8)
        self._pos += 1
        return (self._bits[byte] >> offset) & 1 if byte < len(self._bits) else 0

    def numeric(self) -> int | None:
        """The numeric type code, or None when no type bits were supplied at all."""
        if not self.explicit:
            return None
        return (self.bit() << 1) | self.bit()

    def zero(self) -> int | None:
        code = self.numeric()
        if code == 0b11:  # V1: negative or decimal zero, three more bits follow
            code = (((code << 1 | self.bit()) << 1 | self.bit()) << 1) | self.bit()
        return code


class _Reader:
    def __init__(self, data: bytes, type_bits: _TypeBits) -> None:
        self.data, self.pos, self.type_bits = data, 0, type_bits

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self.truncated()
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def u64(self, invert: bool = False) -> int:
        value = int.from_bytes(self.take(8), "big")
        return value ^ _U64 if invert else value

    def cstring(self) -> bytes:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise self.truncated()
        chunk = self.data[self.pos : end]
        self.pos = end + 1
        return chunk

    def text(self) -> str:
        # A NUL inside a string is written as 00 FF so that 00 alone can end it.
        raw = self.cstring()
        while self.pos < len(self.data) and self.data[self.pos] == 0xFF:
            self.pos += 1
            raw += b"\x00" + self.cstring()
        return self.utf8(raw)

    def utf8(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error("holds a string that is not UTF-8") from None

    def error(self, why: str) -> InvalidResumeToken:
        return _invalid(self.data, f"{why} (at byte {self.pos})")

    def truncated(self) -> InvalidResumeToken:
        return _invalid(self.data, f"truncated: {len(self.data)} bytes end inside a value")

    def read_top_level(self) -> list[Any]:
        fields: list[Any] = []
        while True:
            ctype = self.byte()
            if ctype in (_LESS, _GREATER):  # only in query bounds; harmless to skip
                ctype = self.byte()
            if ctype == _END:
                break
            fields.append(self.value(ctype, 0))
        if self.pos != len(self.data):
            raise self.error(f"{len(self.data) - self.pos} bytes follow the end marker")
        return fields

    def document(self, depth: int) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        while self.byte() != 0:  # generic type byte, used only for ordering
            name = self.utf8(self.cstring())
            doc[name] = self.value(self.byte(), depth + 1)
        return doc

    def value(self, ctype: int, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise self.error("nests deeper than BSON allows")
        if _NAN <= ctype <= _POS_LARGE:
            return self.number(ctype)
        if ctype in _VALUELESS:
            return _VALUELESS[ctype]
        if ctype in (_FALSE, _TRUE):
            return ctype == _TRUE
        if ctype == _STRING:
            self.type_bits.bit()  # String or Symbol; Python has one str for both
            return self.text()
        if ctype == _OBJECT:
            return self.document(depth)
        if ctype == _ARRAY:
            items = []
            while (element := self.byte()) != 0:
                items.append(self.value(element, depth + 1))
            return items
        if ctype == _TIMESTAMP:
            return _timestamp(self.take(8))
        if ctype == _DATE:  # offset binary: the sign bit is flipped so bytes sort
            millis = self.u64() ^ (1 << 63)
            return _datetime(millis - (1 << 64) if millis >= 1 << 63 else millis)
        if ctype == _OID:
            return ObjectId(self.take(12))
        if ctype == _BINDATA:
            size = self.byte()
            if size == 0xFF:
                size = int.from_bytes(self.take(4), "big")
            subtype = self.byte()
            return bson.Binary(self.take(size), subtype)
        if ctype in _UNSUPPORTED:  # legal, but never seen in a document key in practice
            raise self.error(f"holds a {_UNSUPPORTED[ctype]}, which this decoder does not decode")
        raise self.error(f"has unknown KeyString type byte 0x{ctype:02X}")

    # Numbers: KeyString stores every number as its value, tagged by magnitude class.
    # Negative numbers reuse the positive layout with every payload bit inverted.

    def number(self, ctype: int) -> Any:
        if ctype == _ZERO:
            return self.zero()
        kind = self.type_bits.numeric()
        if kind == _TB_DECIMAL:
            raise self.error("holds a Decimal128 value, which this decoder does not decode")
        if ctype == _NAN:
            return math.nan
        negative = ctype < _ZERO
        if ctype in (_NEG_LARGE, _POS_LARGE):
            return self.large(negative, kind)
        if ctype in (_NEG_SMALL, _POS_SMALL):
            return self.small(negative)
        return self.integer(ctype, negative, kind)

    def zero(self) -> Any:
        code = self.type_bits.zero()
        zeros = {None: 0, _TB_INT: 0, _TB_LONG: Int64(0), _TB_DOUBLE: 0.0}
        if code == _TB_NEGATIVE_DOUBLE_ZERO:
            return -0.0
        if code not in zeros:
            raise self.error("holds a Decimal128 zero, which this decoder does not decode")
        return zeros[code]

    def integer(self, ctype: int, negative: bool, kind: int | None) -> Any:
        size = _NEG_1B - ctype + 1 if negative else ctype - _POS_1B + 1
        encoded = int.from_bytes(self.take(size), "big")
        if negative:
            encoded ^= (1 << (8 * size)) - 1
        whole = encoded >> 1
        if not encoded & 1:  # the low bit says "a fraction follows"
            signed = -whole if negative else whole
            if kind == _TB_DOUBLE:
                return float(signed)
            return Int64(signed) if kind == _TB_LONG else signed
        # V1 fractions fill the value out to 8 bytes: the binary fraction sits below
        # the integer part and its two low bits are the decimal continuation marker.
        frac_size = 8 - size
        fraction = int.from_bytes(self.take(frac_size), "big") if frac_size else 0
        if negative:
            fraction ^= (1 << (8 * frac_size)) - 1
        fixed = (whole << (8 * frac_size)) | fraction
        if frac_size == 0 or fixed & 3:
            raise self.error("holds a Decimal128 value, which this decoder does not decode")
        magnitude = math.ldexp(float(fixed), -8 * frac_size)
        return -magnitude if negative else magnitude

    def small(self, negative: bool) -> float:
        encoded = self.u64(invert=negative)
        prefix = encoded >> 62
        if prefix == 0b11:  # [2**-255, 1): double bits shifted left 2, plus the marker
            marker, bits = encoded & 3, encoded >> 2
            magnitude = _double(bits)
        elif prefix in (0b01, 0b10):  # tinier: exponent lifted by 256 to avoid subnormals
            marker, bits = encoded & 1, (encoded - (1 << 62)) >> 1
            magnitude = math.ldexp(_double(bits), -256)
        else:
            marker, magnitude = 1, 0.0  # below every double: only decimals live here
        if marker:
            raise self.error("holds a Decimal128 value, which this decoder does not decode")
        return -magnitude if negative else magnitude

    def large(self, negative: bool, kind: int | None) -> Any:
        encoded = self.u64(invert=negative)
        if encoded == _U64:
            return -math.inf if negative else math.inf
        if encoded >> 63 or encoded & 1:  # huge decimal, or a decimal continuation
            raise self.error("holds a Decimal128 value, which this decoder does not decode")
        magnitude = _double((encoded >> 1) | (1 << 62))  # restore the implied exponent bit
        if kind == _TB_LONG:  # only -2**63 is stored this way
            return Int64(-(1 << 63))
        return -magnitude if negative else magnitude


def _double(bits: int) -> float:
    value: float = struct.unpack(">d", bits.to_bytes(8, "big"))[0]
    return value


def _datetime(millis: int) -> datetime | DatetimeMS:
    try:
        return DatetimeMS(millis).as_datetime(_TZ_AWARE)
    except (OverflowError, ValueError, OSError):  # outside what datetime can hold
        return DatetimeMS(millis)


def covered_through(token: str | bytes | Mapping[str, Any]) -> bson.Timestamp:
    """The latest cluster time whose events a stream resumed from ``token`` will not repeat.

    An event token covers its own event. A high-water mark at time T promises that no
    event *before* T is still to come, but events at T may be: it covers up to just
    before T. Comparing an operation time with this value (``<=``) therefore says
    whether that operation's change has been seen.
    """
    try:
        decoded = decode_resume_token(token)
    except InvalidResumeToken:
        # A layout this decoder does not know: trust only the leading cluster time and
        # assume the weaker promise of a high-water mark.
        ts = token_cluster_time(token)
    else:
        ts = decoded.cluster_time
        if decoded.token_type != 0:  # an event token covers its own event
            return ts
    if ts.inc > 0:
        return bson.Timestamp(ts.time, ts.inc - 1)
    return bson.Timestamp(max(ts.time - 1, 0), 0xFFFFFFFF)
