"""BSON codec options that decode straight into mongoeco's value types and back.

pymongo's C codec does the walking; only the few types mongoeco models differently
(ObjectId, Int64, Timestamp, Regex, Decimal128) go through a Python hook. UUIDs use the
standard representation, so binary subtype 4 becomes ``uuid.UUID`` as mongoeco expects.
"""

from __future__ import annotations

import decimal
from typing import Any

import bson
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions, TypeDecoder, TypeEncoder, TypeRegistry
from mongoeco.core.bson_scalars import BsonDecimal128, BsonDouble, BsonInt32, BsonInt64
from mongoeco.types import Decimal128, ObjectId, Regex, Timestamp, UndefinedType
from mongoeco.wire.bson_bridge import decode_wire_value, encode_wire_value

_FAST_ENCODE: dict[type, Any] = {
    Timestamp: lambda v: bson.Timestamp(v.time, v.inc),
    BsonInt64: lambda v: bson.Int64(v.value),
    BsonInt32: lambda v: v.value,
    BsonDouble: lambda v: v.value,
}


def _encoder(python_type: type) -> TypeEncoder:
    convert = _FAST_ENCODE.get(python_type, encode_wire_value)
    attrs = {"python_type": python_type, "transform_python": staticmethod(convert)}
    return type(f"Encode{python_type.__name__}", (TypeEncoder,), attrs)()


_FAST_DECODE: dict[type, Any] = {
    bson.ObjectId: lambda v: ObjectId(v.binary),
    bson.Int64: lambda v: BsonInt64(int(v)),
    bson.Timestamp: lambda v: Timestamp(v.time, v.inc),
}


def _decoder(bson_type: type) -> TypeDecoder:
    convert = _FAST_DECODE.get(bson_type, decode_wire_value)
    attrs = {"bson_type": bson_type, "transform_bson": staticmethod(convert)}
    return type(f"Decode{bson_type.__name__}", (TypeDecoder,), attrs)()


_ENCODED: tuple[Any, ...] = (
    Timestamp,
    BsonInt64,
    BsonInt32,
    BsonDouble,
    BsonDecimal128,
    Decimal128,
    Regex,
    UndefinedType,
    decimal.Decimal,
)
_DECODED: tuple[Any, ...] = (bson.ObjectId, bson.Int64, bson.Timestamp, bson.Regex, bson.Decimal128)

CODEC: CodecOptions[dict[str, Any]] = CodecOptions(
    document_class=dict,
    uuid_representation=UuidRepresentation.STANDARD,
    type_registry=TypeRegistry([_encoder(t) for t in _ENCODED] + [_decoder(t) for t in _DECODED]),
)


def encode(doc: Any) -> bytes:
    return bson.encode(doc, codec_options=CODEC)


def decode(data: bytes) -> dict[str, Any]:
    return bson.decode(data, codec_options=CODEC)
