"""CRUD commands: insert, update, delete, findAndModify, find, count, distinct, aggregate."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
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
from store import Collection, CommandError, Store, deep_copy, id_key, order_key, same_value


def _id_candidates(flt: dict[str, Any]) -> list[Any] | None:
    """Keys of the only documents a filter on ``_id`` equality can match, or None."""
    if "_id" not in flt:
        return None
    value = flt["_id"]
    if isinstance(value, dict) and any(k.startswith("$") for k in value):
        if set(value) == {"$eq"}:
            value = value["$eq"]
        elif set(value) == {"$in"} and isinstance(value["$in"], list):
            if any(isinstance(v, Regex) for v in value["$in"]):
                return None
            return [id_key(v) for v in value["$in"]]
        else:
            return None
    if isinstance(value, Regex | list):
        return None
    return [id_key(value)]


def select(coll: Collection | None, flt: dict[str, Any] | None) -> list[dict[str, Any]]:
    if coll is None:
        return []
    if not flt:
        return list(coll.docs.values())
    keys = _id_candidates(flt)
    if keys is not None:
        seen = dict.fromkeys(keys)
        candidates = [coll.docs[k] for k in seen if k in coll.docs]
        if len(flt) == 1 and not isinstance(flt["_id"], dict):
            return candidates  # plain equality on _id: the key lookup is the whole match
    else:
        candidates = list(coll.docs.values())
    try:
        plan = compile_filter(flt)
        return [d for d in candidates if QueryEngine.match_plan(d, plan)]
    except OperationFailure as exc:
        raise CommandError(2, "BadValue", str(exc)) from exc


def sort_spec(sort: dict[str, Any] | None) -> list[tuple[str, Any]] | None:
    return list(sort.items()) if sort else None


_RANGE_OPS = {"$gt", "$gte", "$lt", "$lte"}


def _id_range(coll: Collection | None, flt: dict[str, Any] | None, sort: Any,
              skip: int, limit: int) -> list[Any] | None:
    """Serve ``{_id: {$gt: x, ...}}`` sorted by ``_id`` (a snapshot scan's page) by bisection."""
    if coll is None or not sort or list(sort.items()) not in ([("_id", 1)], [("_id", -1)]):
        return None
    flt = flt or {}
    bounds = flt.get("_id", {})
    if set(flt) - {"_id"} or not isinstance(bounds, dict) or set(bounds) - _RANGE_OPS:
        return None
    keys = [order_key(v) for v in bounds.values()]
    if any(k is None for k in keys):
        return None
    ordered = coll.ordered_ids()
    if ordered is None:
        return None
    lo, hi = 0, len(ordered)
    for op, key in zip(bounds, keys, strict=True):
        # Type bracketing: a range on numbers never matches strings, and so on.
        lo = max(lo, bisect_left(ordered, ((key[0],),)))
        hi = min(hi, bisect_left(ordered, ((key[0] + 1,),)))
        if op == "$gt":
            lo = max(lo, bisect_right(ordered, (key, _MAX)))
        elif op == "$gte":
            lo = max(lo, bisect_left(ordered, (key,)))
        elif op == "$lt":
            hi = min(hi, bisect_left(ordered, (key,)))
        else:
            hi = min(hi, bisect_right(ordered, (key, _MAX)))
    span = ordered[lo:hi] if sort["_id"] == 1 else ordered[lo:hi][::-1]
    span = span[skip : skip + limit] if limit else span[skip:]
    return [coll.docs[k] for _, k in span]


class _Max:
    def __lt__(self, other: object) -> bool:
        return False

    def __gt__(self, other: object) -> bool:
        return True


_MAX = _Max()


def query(coll: Collection | None, body: dict[str, Any], filter_key: str = "filter") -> list[Any]:
    skip = int(body.get("skip") or 0)
    limit = abs(int(body.get("limit") or 0))
    docs = _id_range(coll, body.get(filter_key), body.get("sort"), skip, limit)
    if docs is None:
        docs = select(coll, body.get(filter_key))
        if body.get("sort"):
            docs = sort_documents(docs, sort_spec(body["sort"]))
        docs = docs[skip : skip + limit] if limit else docs[skip:]
    projection = body.get("projection") or body.get("fields")
    if projection:
        docs = [apply_projection(d, projection, selector_filter=body.get(filter_key)) for d in docs]
    return docs


def _is_operator_update(update: Any) -> bool:
    return isinstance(update, list) or any(k.startswith("$") for k in update)


def _immutable_id() -> CommandError:
    return CommandError(66, "ImmutableField", "Performing an update on the path '_id' would "
                        "modify the immutable field '_id'")


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
    if len(fields) != sum(len(spec) for spec in update.values()) or len(set(fields)) != len(
            fields) or any(not k or "." in k or k.startswith("$") or k == "_id" for k in fields):
        return None
    new = dict(doc)
    # MongoDB 5+ applies an operator's fields in lexicographic order, so new ones land sorted.
    to_set = update.get("$set", {})
    for key in sorted(to_set):
        new[key] = to_set[key]
    for key in update.get("$unset", {}):
        new.pop(key, None)
    return new


def apply_update(doc: dict[str, Any], update: Any, flt: dict[str, Any],
                 array_filters: Any = None) -> dict[str, Any]:
    if not _is_operator_update(update):
        if "_id" in update and not same_value(update["_id"], doc["_id"]):
            raise _immutable_id()
        return {"_id": doc["_id"], **{k: v for k, v in update.items() if k != "_id"}}
    simple = _top_level_set(doc, update)
    if simple is not None:
        return simple
    new = deep_copy(doc)
    try:
        UpdateEngine.apply_update(new, update, selector_filter=flt, array_filters=array_filters,
                                  variables=_context(update))
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
        UpdateEngine.apply_update(doc, update, selector_filter=flt, array_filters=array_filters,
                                  is_upsert_insert=True)
    except OperationFailure as exc:
        raise CommandError(getattr(exc, "code", None) or 2, "BadValue", str(exc)) from exc
    if "_id" not in doc:
        doc = {"_id": ObjectId(), **doc}
    return doc


def _dup_key(coll: Collection, doc: dict[str, Any]) -> CommandError:
    return CommandError(11000, "DuplicateKey",
                        f"E11000 duplicate key error collection: {coll.db}.{coll.name} "
                        f"index: _id_ dup key: {{ _id: {doc['_id']!r} }}")


def insert_doc(store: Store, coll: Collection, doc: dict[str, Any]) -> None:
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
                doc, spec["partialFilterExpression"]):
            continue
        key = _index_key(doc, spec)
        if key is None:
            continue
        own = id_key(doc["_id"])
        for other_key, other in coll.docs.items():
            if other_key != own and _index_key(other, spec) == key and not (
                    spec.get("partialFilterExpression")
                    and not QueryEngine.match(other, spec["partialFilterExpression"])):
                raise CommandError(11000, "DuplicateKey",
                                   f"E11000 duplicate key error collection: {coll.db}.{coll.name}"
                                   f" index: {spec['name']} dup key: {key!r}")


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


def _update_one_statement(store: Store, db: str, name: str, stmt: dict[str, Any],
                          index: int, reply: dict[str, Any]) -> None:
    flt, update = stmt.get("q") or {}, stmt["u"]
    array_filters = stmt.get("arrayFilters")
    coll = store.get(db, name)
    docs = select(coll, flt)
    if not stmt.get("multi"):
        docs = docs[:1]
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
        docs = select(coll, stmt.get("q") or {})
        if stmt.get("limit"):
            docs = docs[:1]
        for doc in docs:
            assert coll is not None
            store.delete(coll, doc)
            n += 1
    return {"n": n}


def cmd_find_and_modify(store: Store, db: str, body: dict[str, Any]) -> dict[str, Any]:
    name = body.get("findAndModify") or body.get("findandmodify")
    coll = store.get(db, name)
    flt = body.get("query") or {}
    docs = select(coll, flt)
    if body.get("sort"):
        docs = sort_documents(docs, sort_spec(body["sort"]))
    fields = body.get("fields")
    show = (lambda d: apply_projection(d, fields) if fields and d is not None else d)  # noqa: E731
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
        return {"lastErrorObject": {"n": 1, "updatedExisting": False, "upserted": doc["_id"]},
                "value": show(doc) if body.get("new") else None}
    assert coll is not None
    new = apply_update(docs[0], update, flt, array_filters)
    check_unique(coll, new)
    store.replace(coll, docs[0], new, as_update=_is_operator_update(update))
    return {"lastErrorObject": {"n": 1, "updatedExisting": True},
            "value": show(new if body.get("new") else docs[0])}


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


def run_pipeline(store: Store, coll: Collection | None,
                 pipeline: list[dict[str, Any]]) -> list[Any]:
    stages = list(pipeline)
    if stages and "$match" in stages[0]:
        docs = select(coll, stages.pop(0)["$match"])
    else:
        docs = list(coll.docs.values()) if coll else []
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
