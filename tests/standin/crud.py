"""CRUD commands: insert, update, delete, findAndModify, find, count, distinct, aggregate."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from itertools import islice
from typing import Any

from mongoeco.core.aggregation.stages import apply_pipeline
from mongoeco.core.expression_context import ExpressionExecutionContext
from mongoeco.core.filtering import QueryEngine, compile_filter
from mongoeco.core.operators import UpdateEngine
from mongoeco.core.projections import apply_projection
from mongoeco.core.sorting import sort_documents
from mongoeco.core.upserts import seed_upsert_document
from mongoeco.errors import OperationFailure
from mongoeco.types import ObjectId, Regex
from store import (
    ARRAY,
    BINARY,
    BOOL,
    DATE,
    MAX_KEY,
    MIN_KEY,
    NAN,
    NULL,
    NUMBER,
    OBJECT,
    OBJECT_ID,
    STRING,
    TIMESTAMP,
    Collection,
    CommandError,
    Store,
    deep_copy,
    id_key,
    order_key,
    same_value,
)

# Comparison operators a range read of the _id index serves by bisection.
_RANGE_OPS = frozenset({"$gt", "$gte", "$lt", "$lte"})
# Types whose ranges MongoDB does not bracket to one type (MinKey, MaxKey), or where null,
# objects and arrays bring rules of their own: those bounds are left to the matcher.
_UNBRACKETED = frozenset({MIN_KEY, NULL, OBJECT, ARRAY, MAX_KEY})


class _Max:
    """Sorts after every key: (key, _MAX) bounds all index entries whose order key is key."""

    def __lt__(self, other: object) -> bool:
        return False

    def __gt__(self, other: object) -> bool:
        return True


_MAX = _Max()


def _points(cond: Any) -> list[Any] | None:
    """The ``_id`` values an equality or ``$in`` condition allows, or None for other conditions."""
    if isinstance(cond, dict) and any(k.startswith("$") for k in cond):
        if set(cond) == {"$eq"}:
            cond = cond["$eq"]
        elif set(cond) == {"$in"} and isinstance(cond["$in"], list):
            values = cond["$in"]
            if any(
                isinstance(v, Regex)
                or (isinstance(v, dict) and any(str(k).startswith("$") for k in v))
                for v in values
            ):
                return None
            return values
        else:
            return None
    if isinstance(cond, Regex | list):
        return None
    return [cond]


# $type aliases and codes whose values all fall in one bracket of the _id order, and the
# sets of them that cover a bracket wholly (then the index range is the condition).
_TYPE_BRACKETS: dict[Any, int] = {
    **dict.fromkeys(("double", 1, "int", 16, "long", 18, "decimal", 19, "number"), NUMBER),
    **dict.fromkeys(("minKey", -1), MIN_KEY),
    **dict.fromkeys(("null", 10), NULL),
    **dict.fromkeys(("string", 2, "symbol", 14), STRING),
    **dict.fromkeys(("object", 3), OBJECT),
    **dict.fromkeys(("maxKey", 127), MAX_KEY),
    **dict.fromkeys(("binData", 5), BINARY),
    **dict.fromkeys(("objectId", 7), OBJECT_ID),
    **dict.fromkeys(("bool", 8), BOOL),
    **dict.fromkeys(("date", 9), DATE),
    **dict.fromkeys(("timestamp", 17), TIMESTAMP),
}
_NUMBER_TYPES = (("double", 1), ("int", 16), ("long", 18), ("decimal", 19))


def _type_bracket(types: Any) -> tuple[int, bool] | None:
    """The one bracket of the _id order a ``$type`` condition's values can fall in, and
    whether it allows the whole bracket; None when it spans several or names others."""
    names = types if isinstance(types, list) else [types]
    names = [getattr(n, "value", n) for n in names]  # codes may come as BSON integers
    if not names or any(isinstance(n, bool) or n not in _TYPE_BRACKETS for n in names):
        return None
    brackets = {_TYPE_BRACKETS[n] for n in names}
    if len(brackets) != 1:
        return None
    bracket = brackets.pop()
    whole = (
        bracket != NUMBER
        or "number" in names
        or all(any(alias in names for alias in aliases) for aliases in _NUMBER_TYPES)
    )
    return bracket, whole


def _bounds(cond: Any) -> tuple[list[tuple[str, tuple[Any, ...]]], bool] | None:
    """(operator, order key) of each range operator of an operator condition on ``_id``, and
    whether they are all of it; None when it has none or one the index cannot bracket.

    The operators of one condition must all hold, so the range narrows the index walk
    whatever else the condition says: the rest (``$ne``, ...) is checked on each document
    walked, as MongoDB's fetch stage does after its ``_id`` index scan. A ``$type`` of one
    bracket narrows it to that bracket, as MongoDB's index bounds for ``$type`` do
    (``("$type", (bracket,))``), and leaves nothing to check when it allows all of it.
    """
    if (
        not isinstance(cond, dict)
        or not cond
        or not all(isinstance(op, str) and op.startswith("$") for op in cond)
    ):
        return None
    out = []
    exact = True
    for op, value in cond.items():
        if op == "$type":
            bracket = _type_bracket(value)
            if bracket is not None:
                out.append((op, (bracket[0],)))
            exact = exact and bracket is not None and bracket[1]
            continue
        if op not in _RANGE_OPS:
            exact = False
            continue
        key = order_key(value)
        if key is None or key[0] in _UNBRACKETED or key == NAN:
            return None
        out.append((op, key))
    return (out, exact) if out else None


def _id_conditions(flt: dict[str, Any]) -> list[Any]:
    """Conditions on ``_id`` that every match must meet: at top level and under ``$and``."""
    found = [flt["_id"]] if "_id" in flt else []
    parts = flt.get("$and")
    if isinstance(parts, list):
        for part in parts:
            if isinstance(part, dict):
                found += _id_conditions(part)
    return found


def _id_direction(sort: Any) -> int | None:
    """1 or -1 for a sort led by ``_id`` (unique, so later keys never matter), else None."""
    if not sort:
        return None
    name, direction = next(iter(sort.items()))
    raw = getattr(direction, "value", direction)
    if name == "_id" and type(raw) in (int, float) and raw in (1, -1):
        return int(raw)
    return None


def _in_id_order(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = [order_key(d["_id"]) for d in docs]
    if any(k is None for k in keys):
        return docs
    return [d for _, d in sorted(zip(keys, docs, strict=True), key=lambda kd: kd[0])]


def _id_plan(
    coll: Collection, flt: dict[str, Any], direction: int | None
) -> tuple[Iterable[dict[str, Any]], bool] | None:
    """Documents that can match ``flt``, in ``_id`` order, as MongoDB reads them from the ``_id``
    index; and whether they all match (nothing left for the matcher). None: scan instead."""
    conds = _id_conditions(flt)
    points: dict[Any, Any] | None = None
    ranges: list[tuple[str, tuple[Any, ...]]] = []
    for cond in conds:
        values = _points(cond)
        if values is not None:
            keys = dict.fromkeys(id_key(v) for v in values)
            points = keys if points is None else {k: None for k in keys if k in points}
            continue
        bounds = _bounds(cond)
        if bounds is not None:
            ranges += bounds[0]
    exact = len(flt) == 1 and len(conds) == 1 and "_id" in flt
    if points is not None:
        docs = _in_id_order([coll.docs[k] for k in points if k in coll.docs])
        if direction == -1:
            docs.reverse()
        return docs, exact and _points(flt["_id"]) is not None
    if not ranges and direction is None:
        return None
    order = coll.ordered_ids()
    if order is None:
        return None
    lo, hi = 0, len(order)
    for op, key in ranges:
        if op == "$type":  # the bracket, NaN included: it is a double
            lo = max(lo, bisect_left(order, (key,)))
            hi = min(hi, bisect_left(order, ((key[0] + 1,),)))
            continue
        # Type bracketing: {$gt: 5} matches numbers only, {$lt: "m"} strings only.
        bracket = (NUMBER, 1) if key[0] == NUMBER else (key[0],)
        lo = max(lo, bisect_left(order, (bracket,)))
        hi = min(hi, bisect_left(order, ((key[0] + 1,),)))
        if op == "$gt":
            lo = max(lo, bisect_right(order, (key, _MAX)))
        elif op == "$gte":
            lo = max(lo, bisect_left(order, (key,)))
        elif op == "$lt":
            hi = min(hi, bisect_left(order, (key,)))
        else:
            hi = min(hi, bisect_right(order, (key, _MAX)))
    whole = _bounds(flt["_id"]) if exact else None  # the filter is one range and nothing else
    exact_range = not flt or (whole is not None and whole[1])
    if lo >= hi:
        return [], exact_range
    docs_by_key = coll.docs
    if direction == -1:
        entries: Iterable[Any] = (order[i] for i in range(hi - 1, lo - 1, -1))
    else:
        entries = (order[i] for i in range(lo, hi))
    # Lazily, so a page stops reading the index once it is full.
    return (docs_by_key[k] for _, k in entries), exact_range


def find_docs(
    coll: Collection | None,
    flt: dict[str, Any] | None,
    sort: Any = None,
    skip: int = 0,
    limit: int = 0,
) -> list[dict[str, Any]]:
    """The documents matching ``flt``, sorted, skipped and limited as a find does."""
    if coll is None:
        return []
    flt = flt or {}
    direction = _id_direction(sort)
    plan = _id_plan(coll, flt, direction)
    in_order = plan is not None and (not sort or direction is not None)
    if plan is None:
        candidates: Iterable[dict[str, Any]] = list(coll.docs.values())
        exact = not flt
    else:
        candidates, exact = plan
    if not exact:
        try:
            compiled = compile_filter(flt)
        except OperationFailure as exc:
            raise CommandError(2, "BadValue", str(exc)) from exc
        match = QueryEngine.match_plan
        candidates = (d for d in candidates if match(d, compiled))
    try:
        if in_order:
            return list(islice(candidates, skip, skip + limit if limit else None))
        docs = list(candidates)
    except OperationFailure as exc:
        raise CommandError(2, "BadValue", str(exc)) from exc
    if sort:
        docs = sort_documents(docs, sort_spec(sort))
    return docs[skip : skip + limit] if limit else docs[skip:]


def select(
    coll: Collection | None, flt: dict[str, Any] | None, limit: int = 0
) -> list[dict[str, Any]]:
    return find_docs(coll, flt, limit=limit)


def sort_spec(sort: dict[str, Any] | None) -> list[tuple[str, Any]] | None:
    return list(sort.items()) if sort else None


def query(coll: Collection | None, body: dict[str, Any], filter_key: str = "filter") -> list[Any]:
    skip = int(body.get("skip") or 0)
    limit = abs(int(body.get("limit") or 0))
    docs = find_docs(coll, body.get(filter_key), body.get("sort"), skip, limit)
    projection = body.get("projection") or body.get("fields")
    if projection:
        docs = [apply_projection(d, projection, selector_filter=body.get(filter_key)) for d in docs]
    return docs


def _is_operator_update(update: Any) -> bool:
    return isinstance(update, list) or any(k.startswith("$") for k in update)


def _immutable_id() -> CommandError:
    return CommandError(
        66,
        "ImmutableField",
        "Performing an update on the path '_id' would modify the immutable field '_id'",
    )


_SHARED_CONTEXT = ExpressionExecutionContext()


def _context(update: Any) -> ExpressionExecutionContext | None:
    # mongoeco prepares a new expression context per call, which dominates a small update.
    # Only $currentDate and pipeline updates read the clock ($$NOW), so only they need one.
    if isinstance(update, list) or "$currentDate" in update:
        return None
    return _SHARED_CONTEXT


def _top_level_set(doc: dict[str, Any], update: Any) -> dict[str, Any] | None:
    """$set/$unset of top-level fields, the common case, without mongoeco's general machinery."""
    if isinstance(update, list) or not update or set(update) - {"$set", "$unset"}:
        return None
    fields = [k for spec in update.values() if isinstance(spec, dict) for k in spec]
    if (
        len(fields) != sum(len(spec) for spec in update.values())
        or len(set(fields)) != len(fields)
        or any(not k or "." in k or k.startswith("$") or k == "_id" for k in fields)
    ):
        return None
    new = dict(doc)
    # MongoDB 5+ applies an operator's fields in lexicographic order, so new ones land sorted.
    to_set = update.get("$set", {})
    for key in sorted(to_set):
        new[key] = to_set[key]
    for key in update.get("$unset", {}):
        new.pop(key, None)
    return new


def apply_update(
    doc: dict[str, Any], update: Any, flt: dict[str, Any], array_filters: Any = None
) -> dict[str, Any]:
    if not _is_operator_update(update):
        if "_id" in update and not same_value(update["_id"], doc["_id"]):
            raise _immutable_id()
        return {"_id": doc["_id"], **{k: v for k, v in update.items() if k != "_id"}}
    simple = _top_level_set(doc, update)
    if simple is not None:
        return simple
    new = deep_copy(doc)
    try:
        UpdateEngine.apply_update(
            new,
            update,
            selector_filter=flt,
            array_filters=array_filters,
            variables=_context(update),
        )
    except OperationFailure as exc:
        raise CommandError(getattr(exc, "code", None) or 2, "BadValue", str(exc)) from exc
    if "_id" not in new or not same_value(new["_id"], doc["_id"]):
        raise _immutable_id()
    return new


def upsert_document(update: Any, flt: dict[str, Any], array_filters: Any = None) -> dict[str, Any]:
    if not _is_operator_update(update):
        doc = dict(update)
        if "_id" not in doc:
            seed: dict[str, Any] = {}
            seed_upsert_document(seed, {"_id": flt["_id"]} if "_id" in flt else {})
            doc = {"_id": seed.get("_id", ObjectId()), **doc}
        return doc
    doc = {}
    seed_upsert_document(doc, flt)
    try:
        UpdateEngine.apply_update(
            doc, update, selector_filter=flt, array_filters=array_filters, is_upsert_insert=True
        )
    except OperationFailure as exc:
        raise CommandError(getattr(exc, "code", None) or 2, "BadValue", str(exc)) from exc
    if "_id" not in doc:
        doc = {"_id": ObjectId(), **doc}
    return doc


def _dup_key(coll: Collection, doc: dict[str, Any]) -> CommandError:
    return CommandError(
        11000,
        "DuplicateKey",
        f"E11000 duplicate key error collection: {coll.db}.{coll.name} "
        f"index: _id_ dup key: {{ _id: {doc['_id']!r} }}",
    )


def insert_doc(store: Store, coll: Collection, doc: dict[str, Any]) -> None:
    # MongoDB refuses these _id types (BadValue); snapshots scan _id by the others.
    for kind, what in ((Regex, "a regex"), (list, "an array")):
        if isinstance(doc["_id"], kind):
            raise CommandError(2, "BadValue", f"can't use {what} for _id")
    if id_key(doc["_id"]) in coll.docs:
        raise _dup_key(coll, doc)
    check_unique(coll, doc)
    store.insert(coll, doc)


def _index_key(doc: dict[str, Any], spec: dict[str, Any]) -> tuple[Any, ...] | None:
    values = []
    present = False
    for path in spec["key"]:
        found, value = QueryEngine._get_field_value(doc, path)
        present |= found
        values.append(id_key(value if found else None))
    if spec.get("sparse") and not present:
        return None
    return tuple(values)


def check_unique(coll: Collection, doc: dict[str, Any]) -> None:
    """Enforce unique secondary indexes (by scanning: they are rare and small in tests)."""
    for spec in coll.indexes:
        if not spec.get("unique") or spec["name"] == "_id_":
            continue
        if spec.get("partialFilterExpression") and not QueryEngine.match(
            doc, spec["partialFilterExpression"]
        ):
            continue
        key = _index_key(doc, spec)
        if key is None:
            continue
        own = id_key(doc["_id"])
        for other_key, other in coll.docs.items():
            if (
                other_key != own
                and _index_key(other, spec) == key
                and not (
                    spec.get("partialFilterExpression")
                    and not QueryEngine.match(other, spec["partialFilterExpression"])
                )
            ):
                raise CommandError(
                    11000,
                    "DuplicateKey",
                    f"E11000 duplicate key error collection: {coll.db}.{coll.name}"
                    f" index: {spec['name']} dup key: {key!r}",
                )


def _write_error(index: int, exc: CommandError) -> dict[str, Any]:
    return {"index": index, "code": exc.code, "codeName": exc.code_name, "errmsg": str(exc)}


def cmd_insert(store: Store, db: str, body: dict[str, Any]) -> dict[str, Any]:
    coll = store.ensure(db, body["insert"])
    errors, n = [], 0
    for i, given in enumerate(body.get("documents", [])):
        doc = given if "_id" in given else {"_id": ObjectId(), **given}
        try:
            insert_doc(store, coll, doc)
            n += 1
        except CommandError as exc:
            errors.append(_write_error(i, exc))
            if body.get("ordered", True):
                break
    reply: dict[str, Any] = {"n": n}
    if errors:
        reply["writeErrors"] = errors
    return reply


def _update_one_statement(
    store: Store, db: str, name: str, stmt: dict[str, Any], index: int, reply: dict[str, Any]
) -> None:
    flt, update = stmt.get("q") or {}, stmt["u"]
    array_filters = stmt.get("arrayFilters")
    coll = store.get(db, name)
    docs = select(coll, flt, limit=0 if stmt.get("multi") else 1)
    if not docs and stmt.get("upsert"):
        coll = coll or store.ensure(db, name)
        doc = upsert_document(update, flt, array_filters)
        insert_doc(store, coll, doc)
        reply["n"] += 1
        reply.setdefault("upserted", []).append({"index": index, "_id": doc["_id"]})
        return
    for doc in docs:
        assert coll is not None
        new = apply_update(doc, update, flt, array_filters)
        check_unique(coll, new)
        reply["n"] += 1
        if store.replace(coll, doc, new, as_update=_is_operator_update(update)) is not None:
            reply["nModified"] += 1


def cmd_update(store: Store, db: str, body: dict[str, Any]) -> dict[str, Any]:
    reply: dict[str, Any] = {"n": 0, "nModified": 0}
    errors = []
    for i, stmt in enumerate(body.get("updates", [])):
        try:
            _update_one_statement(store, db, body["update"], stmt, i, reply)
        except CommandError as exc:
            errors.append(_write_error(i, exc))
            if body.get("ordered", True):
                break
    if errors:
        reply["writeErrors"] = errors
    return reply


def cmd_delete(store: Store, db: str, body: dict[str, Any]) -> dict[str, Any]:
    coll = store.get(db, body["delete"])
    n = 0
    for stmt in body.get("deletes", []):
        docs = select(coll, stmt.get("q") or {}, limit=1 if stmt.get("limit") else 0)
        for doc in docs:
            assert coll is not None
            store.delete(coll, doc)
            n += 1
    return {"n": n}


def cmd_find_and_modify(store: Store, db: str, body: dict[str, Any]) -> dict[str, Any]:
    name = body.get("findAndModify") or body.get("findandmodify")
    coll = store.get(db, name)
    flt = body.get("query") or {}
    docs = find_docs(coll, flt, body.get("sort"), limit=1)
    fields = body.get("fields")
    show = lambda d: apply_projection(d, fields) if fields and d is not None else d  # noqa: E731
    if body.get("remove"):
        if not docs:
            return {"lastErrorObject": {"n": 0}, "value": None}
        assert coll is not None
        store.delete(coll, docs[0])
        return {"lastErrorObject": {"n": 1}, "value": show(docs[0])}
    update = body.get("update")
    if update is None:
        raise CommandError(9, "FailedToParse", "Either an update or remove=true must be specified")
    array_filters = body.get("arrayFilters")
    if not docs:
        if not body.get("upsert"):
            return {"lastErrorObject": {"n": 0, "updatedExisting": False}, "value": None}
        coll = coll or store.ensure(db, name)
        doc = upsert_document(update, flt, array_filters)
        insert_doc(store, coll, doc)
        return {
            "lastErrorObject": {"n": 1, "updatedExisting": False, "upserted": doc["_id"]},
            "value": show(doc) if body.get("new") else None,
        }
    assert coll is not None
    new = apply_update(docs[0], update, flt, array_filters)
    check_unique(coll, new)
    store.replace(coll, docs[0], new, as_update=_is_operator_update(update))
    return {
        "lastErrorObject": {"n": 1, "updatedExisting": True},
        "value": show(new if body.get("new") else docs[0]),
    }


def cmd_count(store: Store, db: str, body: dict[str, Any]) -> dict[str, Any]:
    coll = store.get(db, body["count"])
    if not body.get("query") and not body.get("skip") and not body.get("limit"):
        return {"n": len(coll.docs) if coll else 0}
    return {"n": len(query(coll, {**body, "projection": None}, "query"))}


def cmd_distinct(store: Store, db: str, body: dict[str, Any]) -> dict[str, Any]:
    coll = store.get(db, body["distinct"])
    seen: dict[Any, Any] = {}
    for doc in select(coll, body.get("query")):
        for value in QueryEngine.extract_values(doc, body["key"]):
            for item in value if isinstance(value, list) else [value]:
                seen.setdefault(id_key(item), item)
    return {"values": list(seen.values())}


def _count_tail(stages: list[dict[str, Any]]) -> tuple[int, int, str, Any] | None:
    """Skip, limit (0: none), field and group ``_id`` of a tail that only counts documents,
    ``[{$skip: s}?, {$limit: l}?, {$group: {_id: 1, n: {$sum: 1}}}]`` as count_documents
    sends it; None for any other tail (mongoeco runs those)."""
    if not stages:
        return None
    *head, last = stages
    ops = [next(iter(stage)) if len(stage) == 1 else None for stage in head]
    if ops not in ([], ["$skip"], ["$limit"], ["$skip", "$limit"]):
        return None
    counts = {}
    for stage, op in zip(head, ops, strict=True):
        value = stage[op]
        if type(value) is not int or value < (1 if op == "$limit" else 0):
            return None
        counts[op] = value
    group = last.get("$group") if len(last) == 1 else None
    if (
        not isinstance(group, dict)
        or len(group) != 2
        or "_id" not in group
        or type(group["_id"]) not in (int, type(None))
    ):
        return None
    field = next(k for k in group if k != "_id")
    acc = group[field]
    if (
        field.startswith("$")
        or "." in field
        or not isinstance(acc, dict)
        or list(acc) != ["$sum"]
        or type(acc["$sum"]) is not int
        or acc["$sum"] != 1
    ):
        return None
    return counts.get("$skip", 0), counts.get("$limit", 0), field, group["_id"]


def run_pipeline(
    store: Store, coll: Collection | None, pipeline: list[dict[str, Any]]
) -> list[Any]:
    stages = list(pipeline)
    match = stages.pop(0)["$match"] if stages and "$match" in stages[0] else None
    counting = _count_tail(stages) if stages else None
    if counting is not None and not match:
        docs: list[Any] | None = None  # only the number is needed, and it is at hand
        total = len(coll.docs) if coll else 0
    else:
        docs = (
            select(coll, match) if match is not None else (list(coll.docs.values()) if coll else [])
        )
        total = len(docs)
    if counting is not None:
        skip, limit, field, group_id = counting
        n = max(0, total - skip)
        n = min(n, limit) if limit else n
        return [{"_id": group_id, field: n}] if n else []
    assert docs is not None
    for stage in stages:
        if "$out" in stage or "$merge" in stage:
            raise CommandError(115, "CommandNotSupported", "$out and $merge are not supported")
    if not stages:
        return docs

    def resolver(name: str) -> list[Any]:
        other = store.get(coll.db if coll else "", name)
        return list(other.docs.values()) if other else []

    try:
        return apply_pipeline(docs, stages, collection_resolver=resolver)
    except OperationFailure as exc:
        raise CommandError(getattr(exc, "code", None) or 2, "BadValue", str(exc)) from exc
