"""Catalog commands: create, collMod, drop, dropDatabase, renameCollection, indexes, listings."""

from __future__ import annotations

from typing import Any

from mongoeco.core.filtering import QueryEngine
from store import CommandError, Store


def _namespace_not_found(ns: str) -> CommandError:
    return CommandError(26, "NamespaceNotFound", f"ns not found: {ns}")


def cmd_create(store: Store, db: str, body: dict[str, Any]) -> dict[str, Any]:
    name = body["create"]
    if store.get(db, name) is not None:
        raise CommandError(48, "NamespaceExists", f"Collection {db}.{name} already exists.")
    options = {
        k: v
        for k, v in body.items()
        if k in ("changeStreamPreAndPostImages", "capped", "size", "max", "validator")
    }
    store.ensure(db, name, options)
    return {}


def cmd_coll_mod(store: Store, db: str, body: dict[str, Any]) -> dict[str, Any]:
    coll = store.get(db, body["collMod"])
    if coll is None:
        raise _namespace_not_found(f"{db}.{body['collMod']}")
    if "changeStreamPreAndPostImages" in body:
        coll.options["changeStreamPreAndPostImages"] = body["changeStreamPreAndPostImages"]
        store.save_meta(coll)
    return {}


def cmd_drop(store: Store, db: str, body: dict[str, Any]) -> dict[str, Any]:
    coll = store.get(db, body["drop"])
    if coll is None:
        # MongoDB 7 reports success for a missing collection.
        return {}
    nindexes = len(coll.indexes)
    store.drop(coll)
    return {"nIndexesWas": nindexes, "ns": f"{db}.{body['drop']}"}


def cmd_drop_database(store: Store, db: str, body: dict[str, Any]) -> dict[str, Any]:
    store.drop_database(db)
    return {"dropped": db}


def cmd_rename(store: Store, db: str, body: dict[str, Any]) -> dict[str, Any]:
    if db != "admin":
        raise CommandError(
            13, "Unauthorized", "renameCollection may only be run against the admin database."
        )
    src, dst = body["renameCollection"], body["to"]
    src_db, _, src_name = src.partition(".")
    dst_db, _, dst_name = dst.partition(".")
    coll = store.get(src_db, src_name)
    if coll is None:
        raise CommandError(26, "NamespaceNotFound", f"Source collection {src} does not exist")
    if src == dst:
        raise CommandError(20, "IllegalOperation", "Can't rename a collection to itself")
    target = store.get(dst_db, dst_name)
    if target is not None:
        if not body.get("dropTarget"):
            raise CommandError(48, "NamespaceExists", "target namespace exists")
        store.drop(target)
    store.rename(coll, dst_db, dst_name)
    return {}


def cmd_create_indexes(store: Store, db: str, body: dict[str, Any]) -> dict[str, Any]:
    existed = store.get(db, body["createIndexes"]) is not None
    coll = store.ensure(db, body["createIndexes"])
    before = len(coll.indexes)
    names = {ix["name"] for ix in coll.indexes}
    for spec in body.get("indexes", []):
        if spec.get("name") not in names:
            coll.indexes.append({"v": 2, **spec})
            names.add(spec.get("name"))
    if len(coll.indexes) != before:
        store.save_meta(coll)
    return {
        "numIndexesBefore": before,
        "numIndexesAfter": len(coll.indexes),
        "createdCollectionAutomatically": not existed,
    }


def cmd_drop_indexes(store: Store, db: str, body: dict[str, Any]) -> dict[str, Any]:
    coll = store.get(db, body["dropIndexes"])
    if coll is None:
        raise _namespace_not_found(f"{db}.{body['dropIndexes']}")
    before = len(coll.indexes)
    which = body.get("index")
    if which == "*":
        coll.indexes = coll.indexes[:1]
    else:
        keep = [
            ix
            for ix in coll.indexes
            if ix["name"] == "_id_" or (ix["name"] != which and ix["key"] != which)
        ]
        if len(keep) == before:
            raise CommandError(27, "IndexNotFound", f"index not found with name [{which}]")
        coll.indexes = keep
    store.save_meta(coll)
    return {"nIndexesWas": before}


def list_indexes(store: Store, db: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    coll = store.get(db, body["listIndexes"])
    if coll is None:
        raise _namespace_not_found(f"{db}.{body['listIndexes']}")
    return list(coll.indexes)


def list_collections(store: Store, db: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for coll in store.dbs.get(db, {}).values():
        entry: dict[str, Any] = {"name": coll.name, "type": "collection"}
        if not body.get("nameOnly"):
            entry.update(
                {
                    "options": dict(coll.options),
                    "info": {"readOnly": False, "uuid": coll.uuid},
                    "idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"},
                }
            )
        if not body.get("filter") or QueryEngine.match(entry, body["filter"]):
            out.append(entry)
    return out


def cmd_list_databases(store: Store, db: str, body: dict[str, Any]) -> dict[str, Any]:
    dbs = [
        {
            "name": name,
            "sizeOnDisk": 4096 * (1 + sum(len(c.docs) for c in colls.values())),
            "empty": False,
        }
        for name, colls in store.dbs.items()
    ]
    if body.get("filter"):
        dbs = [d for d in dbs if QueryEngine.match(d, body["filter"])]
    if body.get("nameOnly"):
        dbs = [{"name": d["name"]} for d in dbs]
    return {"databases": dbs, "totalSize": sum(d.get("sizeOnDisk", 0) for d in dbs)}
