"""Client-side evaluation of the MongoDB query subset used in pipeline filters.

The change stream delivers full documents; deciding here whether one still matches
the pipeline filter lets an update that moves a document out of the filter delete
it from Chroma. Semantics follow MongoDB's documentation: array fields match when
any element does, dot paths descend into arrays of subdocuments, missing equals
null, and ordering comparisons only match values of the same BSON type class.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from bson.binary import Binary
from bson.decimal128 import Decimal128
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.objectid import ObjectId
from bson.regex import Regex
from bson.timestamp import Timestamp

from syncd.errors import ConfigError

Predicate = Callable[[Mapping[str, Any]], bool]
ValueTest = Callable[[list[Any]], bool]  # receives every value the path resolves to

_MISSING: Any = object()  # a path that leads nowhere; equal to null for $eq


# --- BSON ordering -------------------------------------------------------------------
#
# Comparison order of BSON types (MongoDB manual, "Comparison/Sort Order"). Query
# operators only compare within one class: {"n": {"$gt": 1}} never matches "2".
_MINKEY, _NULL, _NUMBER, _STRING, _OBJECT, _ARRAY = 1, 2, 3, 4, 5, 6
_BINARY, _OBJECTID, _BOOL, _DATE, _TIMESTAMP, _REGEX, _MAXKEY = 7, 8, 9, 10, 11, 12, 13
_OTHER = 14  # DBRef, Code with scope...: only equal to themselves


def _type_class(value: Any) -> int:
    if value is None or value is _MISSING:
        return _NULL
    if isinstance(value, bool):
        return _BOOL
    if isinstance(value, int | float | Decimal128):
        return _NUMBER
    if isinstance(value, str):
        return _STRING
    if isinstance(value, Mapping):
        return _OBJECT
    if isinstance(value, list | tuple):
        return _ARRAY
    if isinstance(value, bytes | uuid.UUID):
        return _BINARY
    if isinstance(value, ObjectId):
        return _OBJECTID
    if isinstance(value, dt.datetime):
        return _DATE
    if isinstance(value, Timestamp):
        return _TIMESTAMP
    if isinstance(value, re.Pattern | Regex):
        return _REGEX
    if isinstance(value, MinKey):
        return _MINKEY
    if isinstance(value, MaxKey):
        return _MAXKEY
    return _OTHER


def _number(value: Any) -> Decimal:
    if isinstance(value, Decimal128):
        return value.to_decimal()
    return Decimal(value)  # exact for floats, so 0.1 != 0.1000000000000000055...


def _utc(value: dt.datetime) -> dt.datetime:
    # The driver hands out naive UTC datetimes by default; make both forms comparable.
    return value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value


def _binary(value: Any) -> tuple[int, bytes]:
    if isinstance(value, uuid.UUID):
        return 4, value.bytes
    return (value.subtype if isinstance(value, Binary) else 0), bytes(value)


def _compare(a: Any, b: Any) -> int:
    """Total BSON order: -1, 0 or 1. NaN sorts below every other number."""
    ca, cb = _type_class(a), _type_class(b)
    if ca != cb:
        return -1 if ca < cb else 1
    if ca == _NUMBER:
        x, y = _number(a), _number(b)
        if x.is_nan() or y.is_nan():
            return int(y.is_nan()) - int(x.is_nan())
        return (x > y) - (x < y)
    if ca == _OBJECT:
        # Pair by pair in field order: value type, then field name, then value.
        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=False):
            ta, tb = _type_class(va), _type_class(vb)
            step = (ta > tb) - (ta < tb) or (ka > kb) - (ka < kb) or _compare(va, vb)
            if step:
                return step
        return (len(a) > len(b)) - (len(a) < len(b))
    if ca == _ARRAY:
        for va, vb in zip(a, b, strict=False):
            step = _compare(va, vb)
            if step:
                return step
        return (len(a) > len(b)) - (len(a) < len(b))
    if ca == _BINARY:
        (sa, da), (sb, db) = _binary(a), _binary(b)
        key_a, key_b = (len(da), sa, da), (len(db), sb, db)
        return (key_a > key_b) - (key_a < key_b)
    if ca == _DATE:
        x_dt, y_dt = _utc(a), _utc(b)
        return (x_dt > y_dt) - (x_dt < y_dt)
    if ca == _REGEX:
        ra, rb = _regex_key(a), _regex_key(b)
        return (ra > rb) - (ra < rb)
    if ca in (_NULL, _MINKEY, _MAXKEY):
        return 0
    if ca == _OTHER:
        return 0 if a == b else ((repr(a) > repr(b)) - (repr(a) < repr(b))) or 1
    less: bool = a < b
    more: bool = a > b
    return int(more) - int(less)  # str (binary order, no collation), ObjectId, bool, Timestamp


def _regex_key(value: Any) -> tuple[str, int]:
    return (value.pattern, int(value.flags))


def _equal(a: Any, b: Any) -> bool:
    if _type_class(a) != _type_class(b):
        return False
    if isinstance(a, Mapping):  # documents are equal only with the same field order
        return len(a) == len(b) and all(
            ka == kb and _equal(va, vb)
            for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
        )
    return _compare(a, b) == 0


# --- path resolution ----------------------------------------------------------------


def _resolve(value: Any, parts: list[str], i: int = 0) -> list[Any]:
    """Every value a dot path reaches; _MISSING where a branch ends early."""
    if i == len(parts):
        return [value]
    part = parts[i]
    if isinstance(value, Mapping):
        return _resolve(value[part], parts, i + 1) if part in value else [_MISSING]
    if isinstance(value, list):
        found: list[Any] = []
        if part.isdigit():
            index = int(part)
            if index < len(value):
                found += _resolve(value[index], parts, i + 1)
        # Arrays of subdocuments: the same path part applies to each element.
        for element in value:
            if isinstance(element, Mapping):
                found += _resolve(element, parts, i)
        return found or [_MISSING]
    return [_MISSING]


def _candidates(values: list[Any]) -> list[Any]:
    """The resolved values plus, for arrays, their elements (one level, as MongoDB does)."""
    out: list[Any] = []
    for value in values:
        out.append(value)
        if isinstance(value, list):
            out.extend(value)
    return out


# --- value tests ----------------------------------------------------------------------


def _eq_test(operand: Any) -> ValueTest:
    if isinstance(operand, re.Pattern | Regex):
        return _regex_test(_as_pattern(operand))
    if operand is None:
        return lambda values: any(v is None or v is _MISSING for v in _candidates(values))
    return lambda values: any(_equal(v, operand) for v in _candidates(values))


def _order_test(op: str, operand: Any) -> ValueTest:
    accept = {"$gt": (1,), "$gte": (0, 1), "$lt": (-1,), "$lte": (-1, 0)}[op]
    if operand is None:  # only $gte/$lte match, and only null or missing
        return _eq_test(None) if 0 in accept else (lambda values: False)
    cls = _type_class(operand)
    nan = cls == _NUMBER and _number(operand).is_nan()

    def test(values: list[Any]) -> bool:
        for value in _candidates(values):
            if _type_class(value) != cls:
                continue
            if nan or (cls == _NUMBER and _number(value).is_nan()):
                if 0 in accept and _compare(value, operand) == 0:
                    return True
                continue
            if _compare(value, operand) in accept:
                return True
        return False

    return test


def _in_test(op: str, operand: Any) -> ValueTest:
    if not isinstance(operand, list | tuple):
        raise ConfigError(f"filter operator {op} needs an array")
    tests = [_eq_test(item) for item in operand]
    return lambda values: any(test(values) for test in tests)


def _as_pattern(operand: Any, options: str = "") -> re.Pattern[str]:
    if isinstance(operand, re.Pattern):
        return operand
    if isinstance(operand, Regex):
        return re.compile(operand.pattern, _regex_flags(operand.flags))
    if not isinstance(operand, str):
        raise ConfigError("filter operator $regex needs a string pattern")
    try:
        return re.compile(operand, _regex_flags(options))
    except re.error as exc:
        raise ConfigError(f"filter $regex {operand!r} is not a valid pattern: {exc}") from None


def _regex_flags(options: str | int) -> int:
    if isinstance(options, int):
        return options
    table = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE, "u": 0}
    flags = 0
    for letter in options:
        if letter not in table:
            raise ConfigError(f"filter $options has an unknown flag {letter!r}")
        flags |= table[letter]
    return flags


def _regex_test(pattern: re.Pattern[str]) -> ValueTest:
    return lambda values: any(
        isinstance(v, str) and pattern.search(v) is not None for v in _candidates(values)
    )


def _size_test(operand: Any) -> ValueTest:
    if isinstance(operand, bool) or not isinstance(operand, int | float) or operand != int(operand):
        raise ConfigError("filter operator $size needs a whole number")
    return lambda values: any(isinstance(v, list) and len(v) == operand for v in values)


def _all_test(operand: Any) -> ValueTest:
    if not isinstance(operand, list | tuple):
        raise ConfigError("filter operator $all needs an array")
    tests: list[ValueTest] = []
    for item in operand:
        if isinstance(item, Mapping) and list(item) == ["$elemMatch"]:
            tests.append(_elem_match_test(item["$elemMatch"]))
        else:
            tests.append(_eq_test(item))
    # An empty $all matches nothing, as in MongoDB.
    return lambda values: bool(tests) and all(test(values) for test in tests)


def _elem_match_test(operand: Any) -> ValueTest:
    if not isinstance(operand, Mapping):
        raise ConfigError("filter operator $elemMatch needs a document")
    if _is_operator_document(operand) and not any(k in _LOGICAL for k in operand):
        # {"$elemMatch": {"$gte": 80, "$lt": 85}}: conditions on each element itself
        element_test = _operator_test(operand)
        return lambda values: any(
            isinstance(v, list) and any(element_test([e]) for e in v) for v in values
        )
    query = _compile_document(operand)
    return lambda values: any(
        isinstance(v, list) and any(isinstance(e, Mapping) and query(e) for e in v) for v in values
    )


def _not_test(operand: Any) -> ValueTest:
    if isinstance(operand, re.Pattern | Regex):
        inner = _regex_test(_as_pattern(operand))
    elif isinstance(operand, Mapping) and operand and _is_operator_document(operand):
        inner = _operator_test(operand)
    else:
        raise ConfigError("filter operator $not needs an operator document or a regex")
    return lambda values: not inner(values)


def _exists_test(operand: Any) -> ValueTest:
    wanted = bool(operand)
    return lambda values: any(v is not _MISSING for v in values) == wanted


def _negate(test: ValueTest) -> ValueTest:
    return lambda values: not test(values)


def _operator_test(spec: Mapping[str, Any]) -> ValueTest:
    tests: list[ValueTest] = []
    for op, operand in spec.items():
        if op == "$options":
            if "$regex" not in spec:
                raise ConfigError("filter operator $options needs $regex next to it")
            continue
        tests.append(_one_operator(op, operand, spec))
    return lambda values: all(test(values) for test in tests)


def _one_operator(op: str, operand: Any, spec: Mapping[str, Any]) -> ValueTest:
    if op == "$eq":
        # An explicit $eq compares a regex value literally, unlike implicit equality.
        return (
            (lambda vs: any(_equal(v, operand) for v in _candidates(vs)))
            if isinstance(operand, re.Pattern | Regex)
            else _eq_test(operand)
        )
    if op == "$ne":
        return _negate(_eq_test(operand))
    if op in ("$gt", "$gte", "$lt", "$lte"):
        return _order_test(op, operand)
    if op == "$in":
        return _in_test(op, operand)
    if op == "$nin":
        return _negate(_in_test(op, operand))
    if op == "$exists":
        return _exists_test(operand)
    if op == "$regex":
        return _regex_test(_as_pattern(operand, str(spec.get("$options", ""))))
    if op == "$size":
        return _size_test(operand)
    if op == "$all":
        return _all_test(operand)
    if op == "$elemMatch":
        return _elem_match_test(operand)
    if op == "$not":
        return _not_test(operand)
    raise ConfigError(
        f"unsupported filter operator {op}",
        hint="pipeline filters support $eq $ne $gt $gte $lt $lte $in $nin $exists $and $or "
        "$nor $not $regex $options $size $all $elemMatch",
    )


# --- documents --------------------------------------------------------------------------

_LOGICAL = ("$and", "$or", "$nor")


def _is_operator_document(value: Any) -> bool:
    return isinstance(value, Mapping) and any(str(k).startswith("$") for k in value)


def _field_predicate(path: str, condition: Any) -> Predicate:
    parts = path.split(".")
    if _is_operator_document(condition):
        stray = [k for k in condition if not str(k).startswith("$")]
        if stray:
            raise ConfigError(f"filter on {path!r} mixes operators with the field {stray[0]!r}")
        test = _operator_test(condition)
    else:
        test = _eq_test(condition)
    return lambda document: test(_resolve(document, parts))


def _logical_predicate(op: str, operand: Any) -> Predicate:
    if not isinstance(operand, list | tuple) or not operand:
        raise ConfigError(f"filter operator {op} needs a non-empty array of filters")
    parts = [_compile_document(_require_document(op, item)) for item in operand]
    if op == "$and":
        return lambda document: all(p(document) for p in parts)
    if op == "$or":
        return lambda document: any(p(document) for p in parts)
    return lambda document: not any(p(document) for p in parts)


def _require_document(op: str, item: Any) -> Mapping[str, Any]:
    if not isinstance(item, Mapping):
        raise ConfigError(f"filter operator {op} needs documents in its array")
    return item


def _compile_document(spec: Mapping[str, Any]) -> Predicate:
    predicates: list[Predicate] = []
    for key, condition in spec.items():
        if not isinstance(key, str):
            raise ConfigError(f"filter keys must be strings, got {key!r}")
        if key in _LOGICAL:
            predicates.append(_logical_predicate(key, condition))
        elif key == "$comment":
            continue
        elif key.startswith("$"):
            raise ConfigError(
                f"unsupported filter operator {key}",
                hint="top-level filter operators are $and, $or, $nor and $comment",
            )
        else:
            predicates.append(_field_predicate(key, condition))
    return lambda document: all(p(document) for p in predicates)


def compile_filter(spec: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], bool]:
    """Compile a pipeline filter once; unknown operators fail here, at start-up."""
    if not spec:
        return lambda document: True
    return _compile_document(spec)
