"""Resume-token decoding against tokens published by MongoDB and by public projects.

Each vector names where it was published and what the publisher shows beside it
(the event's clusterTime, collectionUUID, documentKey), so the decoder is checked
against MongoDB's own output rather than against itself. A small KeyString encoder,
written from the encoding half of key_string.cpp, drives the property tests; it is
first checked to reproduce real server tokens byte for byte.
"""

from __future__ import annotations

import math
import struct
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

import bson
import pytest
from bson.int64 import Int64
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.objectid import ObjectId
from hypothesis import given
from hypothesis import strategies as st

from syncd.tokens import (
    InvalidResumeToken,
    decode_resume_token,
    encode_high_water_mark,
    token_cluster_time,
)

# MongoDB manual, "Change Streams" > "Resume Tokens from Change Events"
# (https://www.mongodb.com/docs/manual/changestreams/#resume-tokens): an insert with
# clusterTime Timestamp(1666193824, 1), wallTime 2022-10-19T15:37:04.604Z,
# collectionUUID ab1154ac-acd8-49a4-8c61-756d70d3b21f, _id 635019a078be67426d7cf4d2.
DOCS_EVENT = (
    "82635019A0000000012B042C0100296E5A1004AB1154ACACD849A48C61756D70D3B21F463C6F706572"
    "6174696F6E54797065003C696E736572740046646F63756D656E744B65790046645F69640064635019"
    "A078BE67426D7CF4D2000004"
)
# Same page, "Resume Tokens from aggregate" and "... from getMore": postBatchResumeTokens.
DOCS_AGGREGATE_PBRT = "8263515EAC000000022B0429296E1404"
DOCS_GETMORE_PBRT = "8263515979000000022B0429296E1404"

# mongodb-js/mongodb-resumetoken-decoder, test/index.ts (the decoder MongoDB's manual
# points to): a v1 high-water mark decoded there as Timestamp(1630496062, 2), and a v2
# insert decoded as Timestamp(1651836794, 1), UUID bffdb617-..., _id 6275077a....
NPM_V1_HWM = "82612F653E000000022B0229296E04"
NPM_V2_EVENT = (
    "826275077A000000012B042C0100296E5A1004BFFDB617400E486099007C0E0048B305463C6F706572"
    "6174696F6E54797065003C696E736572740046646F63756D656E744B65790046645F69640064627507"
    "7A2F3159F971E405C6000004"
)
# Same file, "tiny double" case: _id {foo: [...]} built from +-2e307 and +-2e-307. That
# case's expected header fields are copied from the case above; the hex itself is a v1
# token at 0x65523992, which is what we assert.
NPM_DOUBLES = (
    "8265523992000000012B022C0100296E5A1004754B35D306B342E8BA0A3DE71005B66446465F6964004650"
    "666F6F0050337F78F63E7958E8661F808709C186A717992A6083F43058818C1A289F7C0BCFA77E73E5000000"
    "04"
)
# mongodb-labs/mongosh-snippets, snippets/resumetoken/README.md: a v1 (MongoDB 4.2-5.x) insert.
SNIPPET_V1_EVENT = (
    "82612F617F000000012B022C0100296E5A100492EF51FC540B4ED5AC1D50BA2C9C519C46645F696400"
    "64612F617F37A5DD163BA238230004"
)
# MongoDB Community Forums, "Change stream resume token long form and short form"
# (t/314845): an insert shown with clusterTime Timestamp({t: 1741186978, i: 25}) and
# _id 67c867a2fb1cbcd579f4e4de, then the driver's cached high-water mark a second later.
FORUM_EVENT = (
    "8267C867A2000000192B042C0100296E5A1004D3284E04D8914467A2160201812E4C4C463C6F70657261"
    "74696F6E54797065003C696E736572740046646F63756D656E744B65790046645F6964006467C867A2FB"
    "1CBCD579F4E4DE000004"
)
FORUM_HWM = "8267C867A3000000012B0429296E1404"
# powersync-ja/powersync-service, modules/module-mongodb/test/src/resume_token.test.ts:
# an update whose _id is the string "checkpoint", asserted there as t=1739895288, i=50.
POWERSYNC_UPDATE = (
    "8267B4B1F8000000322B042C0100296E5A10041831DD5EEE2B4D6495A610E5430872B6463C6F706572"
    "6174696F6E54797065003C7570646174650046646F63756D656E744B657900463C5F6964003C636865"
    "636B706F696E7400000004"
)


def test_docs_change_event_decodes_to_the_documented_fields() -> None:
    token = decode_resume_token({"_data": DOCS_EVENT})
    assert token.cluster_time == bson.Timestamp(1666193824, 1)
    assert token.cluster_time_iso() == "2022-10-19T15:37:04Z"  # wallTime, to the second
    assert (token.version, token.token_type, token.txn_op_index) == (2, 128, 0)
    assert token.from_invalidate is False
    assert token.uuid == uuid.UUID("ab1154ac-acd8-49a4-8c61-756d70d3b21f")
    oid = ObjectId("635019a078be67426d7cf4d2")
    assert token.document_key == {"_id": oid}
    assert token.event_identifier == {"operationType": "insert", "documentKey": {"_id": oid}}
    assert token.fragment_num is None
    assert len(token.raw_fields) == 7


def test_to_json_has_the_documented_shape() -> None:
    assert decode_resume_token(DOCS_EVENT).to_json() == {
        "clusterTime": {"t": 1666193824, "i": 1, "iso": "2022-10-19T15:37:04Z"},
        "version": 2,
        "tokenType": "event",
        "txnOpIndex": 0,
        "fromInvalidate": False,
        "uuid": "ab1154ac-acd8-49a4-8c61-756d70d3b21f",
        "documentKey": {"_id": {"$oid": "635019a078be67426d7cf4d2"}},
        "eventIdentifier": {
            "operationType": "insert",
            "documentKey": {"_id": {"$oid": "635019a078be67426d7cf4d2"}},
        },
        "fragmentNum": None,
    }


@pytest.mark.parametrize(
    ("hex_token", "seconds", "increment"),
    [
        # The page prints the reply's $clusterTime as i: 1; the token itself says 2,
        # and Debezium's tests of this same token read (1666277036, 2) too.
        (DOCS_AGGREGATE_PBRT, 1666277036, 2),
        (DOCS_GETMORE_PBRT, 1666275705, 2),
        (FORUM_HWM, 1741186979, 1),
        ("826811D298000000012B0429296E1404", 1745998488, 1),  # powersync, case (1)
    ],
)
def test_v2_high_water_marks(hex_token: str, seconds: int, increment: int) -> None:
    token = decode_resume_token(hex_token)
    assert token.cluster_time == bson.Timestamp(seconds, increment)
    assert token.to_json()["tokenType"] == "highWaterMark"
    assert (token.version, token.txn_op_index, token.from_invalidate) == (2, 0, False)
    assert (token.uuid, token.document_key, token.event_identifier) == (None, None, None)
    assert token.raw_fields[-1] is None  # v2 writes the absent UUID as an explicit null


def test_v1_high_water_mark_from_the_reference_decoder() -> None:
    token = decode_resume_token(NPM_V1_HWM)
    assert token.cluster_time == bson.Timestamp(1630496062, 2)
    assert (token.version, token.token_type, token.txn_op_index) == (1, 0, 0)
    assert (token.from_invalidate, token.uuid, token.document_key) == (False, None, None)


def test_v2_event_from_the_reference_decoder() -> None:
    token = decode_resume_token(NPM_V2_EVENT)
    assert token.cluster_time == bson.Timestamp(1651836794, 1)
    assert token.uuid == uuid.UUID("bffdb617-400e-4860-9900-7c0e0048b305")
    assert token.event_identifier == {
        "operationType": "insert",
        "documentKey": {"_id": ObjectId("6275077a2f3159f971e405c6")},
    }


def test_v1_event_puts_the_document_key_last() -> None:
    token = decode_resume_token(SNIPPET_V1_EVENT)
    assert (token.version, token.token_type) == (1, 128)
    assert token.uuid == uuid.UUID("92ef51fc-540b-4ed5-ac1d-50ba2c9c519c")
    assert token.document_key == {"_id": ObjectId("612f617f37a5dd163ba23823")}
    assert token.event_identifier is None
    # The driver made that ObjectId in the same second the insert committed.
    assert token.cluster_time == bson.Timestamp(0x612F617F, 1)


def test_forum_event_matches_the_event_shown_beside_it() -> None:
    token = decode_resume_token(FORUM_EVENT)
    assert token.cluster_time == bson.Timestamp(1741186978, 25)
    assert token.document_key == {"_id": ObjectId("67c867a2fb1cbcd579f4e4de")}
    assert FORUM_HWM > FORUM_EVENT  # tokens sort in stream order as hex strings


def test_string_document_key() -> None:
    token = decode_resume_token(POWERSYNC_UPDATE)
    assert token.cluster_time == bson.Timestamp(1739895288, 50)
    assert token.event_identifier == {
        "operationType": "update",
        "documentKey": {"_id": "checkpoint"},
    }


def test_doubles_at_both_ends_of_the_range() -> None:
    token = decode_resume_token(NPM_DOUBLES)
    assert token.cluster_time == bson.Timestamp(0x65523992, 1)
    assert token.document_key == {"_id": {"foo": [2e307, -2e307, 2e-307, -2e-307]}}


def test_inputs_in_every_accepted_form_agree() -> None:
    as_hex = decode_resume_token(DOCS_EVENT)
    assert decode_resume_token(DOCS_EVENT.lower()) == as_hex
    assert decode_resume_token(bytes.fromhex(DOCS_EVENT)) == as_hex
    assert decode_resume_token({"_data": bson.Binary(bytes.fromhex(DOCS_EVENT))}) == as_hex


def test_fast_path_reads_only_the_cluster_time() -> None:
    assert token_cluster_time(FORUM_EVENT) == bson.Timestamp(1741186978, 25)
    assert token_cluster_time({"_data": FORUM_EVENT[:18]}) == bson.Timestamp(1741186978, 25)
    with pytest.raises(InvalidResumeToken, match="too short"):
        token_cluster_time(FORUM_EVENT[:16])


@pytest.mark.parametrize("version", [1, 2])
def test_high_water_mark_round_trip(version: Literal[1, 2]) -> None:
    ts = bson.Timestamp(1741186979, 1)
    token = decode_resume_token(encode_high_water_mark(ts, version=version))
    assert token.cluster_time == ts
    assert token.version == version
    assert token.to_json()["tokenType"] == "highWaterMark"


def test_synthesized_high_water_marks_equal_the_servers_own() -> None:
    # Byte-identical to postBatchResumeTokens that MongoDB 6.0+ (v2) and 4.2-5.x (v1) sent.
    assert encode_high_water_mark(bson.Timestamp(1666277036, 2)) == DOCS_AGGREGATE_PBRT
    assert encode_high_water_mark(bson.Timestamp(1741186979, 1)) == FORUM_HWM
    assert encode_high_water_mark(bson.Timestamp(1630496062, 2), version=1) == NPM_V1_HWM


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("", "empty"),
        ("8263515EAC000000022B0429296E140", "odd hex length 31"),
        ("8263515EAC000000022B0429296E14zz", "'z' is not a hex digit"),
        ("8263515EAC00 0000022B0429296E1404", "' ' is not a hex digit"),
        ("FF0102030405060708", "starts with byte 0xFF"),
        ("8263515EAC000000022B0429296E14", "truncated"),
        ("8263515EAC00000002", "truncated"),
        (DOCS_EVENT[:-30], "truncated"),
        (DOCS_AGGREGATE_PBRT + "00", "1 bytes follow the end marker"),
        ("8263515EAC000000022B0604", "version is 3"),
        ("8263515EAC000000022B042B0A296E1404", "token type is 5"),
        ("8263515EAC000000022B0429296E04", "lacks its UUID-or-null"),
        ("8263515EAC000000022B042C0100296E1404", "event token lacks its event identifier"),
        ("8263515EAC000000022B0429296E14460004", "high-water-mark token carries"),
        ("8263515EAC000000022B0429296E0704", "unknown KeyString type byte 0x07"),
        ({"data": "82"}, "no '_data' field"),
        (12345, "expected hex text, got int"),
    ],
)
def test_garbage_is_rejected_with_a_one_line_reason(bad: Any, reason: str) -> None:
    with pytest.raises(InvalidResumeToken) as caught:
        decode_resume_token(bad)
    message = str(caught.value)
    assert reason in message
    assert "\n" not in message
    assert isinstance(caught.value, ValueError)


def test_decimal128_is_reported_not_misread() -> None:
    # A 1-byte integer with a fraction whose low bits (the decimal continuation marker)
    # say "decimal": only a Decimal128 is written this way.
    number = bytes([0x2B, 0x03]) + bytes(6) + b"\x02"
    body = bytes.fromhex("82612F653E000000022B0229296E") + number + b"\x04"
    with pytest.raises(InvalidResumeToken, match="Decimal128"):
        decode_resume_token(body)


# -- property tests through a small KeyString encoder --------------------------------
# Written from the encoding half of key_string.cpp (_appendInteger, _appendPreshifted-
# IntegerPortion, _appendDoubleWithoutTypeBits, _appendSmallDouble, _appendLargeDouble,
# _appendStringLike), which the decoder never shares code with.

U64 = (1 << 64) - 1


def _flip(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data)


def _bits(x: float) -> int:
    value: int = struct.unpack(">Q", struct.pack(">d", x))[0]
    return value


def _preshifted(value: int, negative: bool) -> bytes:
    size = (value.bit_length() + 7) // 8
    payload = value.to_bytes(size, "big")
    if negative:
        return bytes([0x27 - (size - 1)]) + _flip(payload)
    return bytes([0x2B + size - 1]) + payload


def _large(x: float) -> bytes:
    encoded = (_bits(x) << 1) & U64 & ~(1 << 63) if math.isfinite(x) else U64
    payload = encoded.to_bytes(8, "big")
    return bytes([0x33]) + payload if x > 0 else bytes([0x1F]) + _flip(payload)


def _small(x: float) -> bytes:
    magnitude = abs(x)
    if magnitude >= 2.0**-255:
        encoded = _bits(magnitude) << 2
    else:
        encoded = (_bits(magnitude * 2.0**256) << 1) + (1 << 62)
    payload = encoded.to_bytes(8, "big")
    return bytes([0x28]) + _flip(payload) if x < 0 else bytes([0x2A]) + payload


def ks_integer(n: int) -> bytes:
    if n == -(1 << 63):
        return _large(float(n))
    return b"\x29" if n == 0 else _preshifted(abs(n) << 1, n < 0)


def ks_double(x: float) -> bytes:
    magnitude, negative = abs(x), x < 0
    if math.isnan(x):
        return b"\x1e"
    if magnitude == 0:
        return b"\x29"
    if magnitude < 1:
        return _small(x)
    if magnitude >= 2.0**63:
        return _large(x)
    whole = int(magnitude)
    if whole == magnitude:
        return _preshifted(whole << 1, negative)
    frac_bytes = (64 - (whole << 1).bit_length()) // 8
    encoded = int(magnitude * 256.0**frac_bytes) + ((whole + 1) << (8 * frac_bytes))
    assert encoded & 3 == 0
    payload = encoded.to_bytes(8, "big")
    if negative:
        return bytes([0x20 + frac_bytes]) + _flip(payload)
    return bytes([0x32 - frac_bytes]) + payload


def ks_string(s: str) -> bytes:
    return b"\x3c" + s.encode().replace(b"\x00", b"\x00\xff") + b"\x00"


def type_bits(bits: list[int]) -> bytes:
    packed = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        packed[i // 8] |= bit << (i % 8)
    if len(packed) == 1 and packed[0] < 0x80:
        return bytes(packed)
    return bytes([0x80 | len(packed)]) + bytes(packed)


def event_token(ts: bson.Timestamp, coll: uuid.UUID, op: str, key_ctype: int, key: bytes) -> str:
    """A v2 event token around a document key {_id: <key>}, as ResumeToken() lays it out."""
    header = b"\x82" + struct.pack(">II", ts.time, ts.inc) + b"\x2b\x04\x2c\x01\x00\x29\x6e"
    ident = b"\x46" + b"\x3coperationType\x00" + ks_string(op)
    ident += b"\x46documentKey\x00\x46" + bytes([key_ctype]) + b"_id\x00" + key + b"\x00\x00"
    return (header + b"\x5a\x10\x04" + coll.bytes + ident + b"\x04").hex().upper()


def test_the_test_encoder_reproduces_real_tokens() -> None:
    docs = event_token(
        bson.Timestamp(1666193824, 1),
        uuid.UUID("ab1154ac-acd8-49a4-8c61-756d70d3b21f"),
        "insert",
        0x64,
        b"\x64" + bytes.fromhex("635019a078be67426d7cf4d2"),
    )
    assert docs == DOCS_EVENT
    doubles = b"".join(ks_double(x) for x in (2e307, -2e307, 2e-307, -2e-307))
    assert doubles.hex().upper() in NPM_DOUBLES


def test_every_value_type_a_document_key_can_hold() -> None:
    def date(millis: int) -> bytes:
        return b"\x78" + ((millis % (1 << 64)) ^ (1 << 63)).to_bytes(8, "big")

    blob = bytes(range(256)) * 4  # over 254 bytes: the length takes the 0xFF + uint32 form
    elements = [
        b"\x6f",
        b"\x6e",
        b"\x14",
        b"\x0a",
        b"\xf0",
        date(1_700_000_000_123),
        date(-86_400_000),
        b"\x5a\xff" + len(blob).to_bytes(4, "big") + b"\x00" + blob,
        b"\x5a\x03\x80abc",
        b"\x82" + struct.pack(">II", 5, 6),
        ks_string("x\x00y"),
        b"\x46\x1enested\x00" + ks_integer(-300) + b"\x00",
    ]
    key = b"\x46\x50a\x00\x50" + b"".join(elements) + b"\x00\x00"
    got = _key_of(event_token(TS, COLL, "insert", 0x46, key), None)
    assert got == {
        "a": [
            True,
            False,
            None,
            MinKey(),
            MaxKey(),
            datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC),
            datetime(1969, 12, 31, tzinfo=UTC),
            bson.Binary(blob, 0),
            bson.Binary(b"abc", 0x80),
            bson.Timestamp(5, 6),
            "x\x00y",
            {"nested": -300},
        ]
    }


def _key_of(hex_token: str, bits: list[int] | None) -> Any:
    token: dict[str, Any] = {"_data": hex_token}
    if bits is not None:
        token["_typeBits"] = bson.Binary(type_bits(bits))
    key = decode_resume_token(token).document_key
    assert key is not None, hex_token
    return key["_id"]


TS = bson.Timestamp(1700000000, 7)
COLL = uuid.UUID(int=0x1234)
# Type bits in value order: version, tokenType, txnOpIndex (ints: 00 each), the
# operationType string (0), then the key's own bits.
PREFIX_BITS = [0, 0, 0, 0, 0, 0, 0]


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_longs_round_trip_with_their_type(n: int) -> None:
    got = _key_of(event_token(TS, COLL, "insert", 30, ks_integer(n)), [*PREFIX_BITS, 0, 1])
    assert got == n
    assert isinstance(got, Int64)


@given(st.integers(min_value=-(2**31), max_value=2**31 - 1))
def test_ints_round_trip_without_type_bits(n: int) -> None:
    got = _key_of(event_token(TS, COLL, "delete", 30, ks_integer(n)), None)
    assert got == n
    assert type(got) is int


@given(st.floats(allow_nan=False))
def test_doubles_round_trip_with_their_type(x: float) -> None:
    bits = [1, 1, 0, 0, 0] if x == 0 and math.copysign(1, x) < 0 else [1, 0]
    got = _key_of(event_token(TS, COLL, "update", 30, ks_double(x)), [*PREFIX_BITS, *bits])
    assert isinstance(got, float)
    assert got == x
    assert math.copysign(1, got) == math.copysign(1, x)


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300))
def test_doubles_without_type_bits_keep_their_value(x: float) -> None:
    assert _key_of(event_token(TS, COLL, "update", 30, ks_double(x)), None) == x


@given(st.text())
def test_strings_round_trip(s: str) -> None:
    assert _key_of(event_token(TS, COLL, "replace", 60, ks_string(s)), None) == s


@given(st.integers(min_value=0, max_value=2**32 - 1), st.integers(0, 2**32 - 1))
def test_high_water_marks_round_trip(seconds: int, increment: int) -> None:
    ts = bson.Timestamp(seconds, increment)
    token = decode_resume_token(encode_high_water_mark(ts))
    assert (token.cluster_time, token.token_type) == (ts, 0)
    assert token_cluster_time(encode_high_water_mark(ts)) == ts
