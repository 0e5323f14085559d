"""Metadata that Chroma leaves behind never passes for a document's.

Deleting a Chroma collection that holds list-valued metadata leaves those values in
Chroma's storage, and new records that reuse their rows inherit them (chromadb 1.5).
Invariant 3 (exact mirroring) must hold anyway: a record syncd writes carries exactly
the metadata its document maps to, and `consistency = "strong"` reads back and removes
any key it did not write before checkpointing."""

from __future__ import annotations

import uuid
from typing import Any

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd

from .helpers import wait_caught_up
from .mirror import make_mirror
from .oracle import mismatch

FIELDS = ("title", "tags")


def _doc(n: int) -> dict[str, Any]:
    return {"_id": n, "body": f"body {n}", "title": f"title {n}", "vec": [1.0, n / 8, 0.5, -0.5]}


def _leave_phantoms(client: Any, metadata: dict[str, Any], count: int = 50) -> None:
    """Another collection with list-valued metadata, deleted: its values stay behind."""
    name = f"foreign-{uuid.uuid4().hex[:8]}"
    foreign = client.create_collection(name)
    foreign.add(
        ids=[f"x{i}" for i in range(count)],
        embeddings=[[0.1, 0.2, 0.3, 0.4]] * count,
        metadatas=[metadata] * count,
    )
    client.delete_collection(name)


def test_records_written_after_a_deleted_collection_carry_only_their_metadata(
    tmp_path, mongo_uri, mongo_client, chroma_server_factory, syncd_factory
):
    # A server of its own: what the foreign collections leave behind would otherwise
    # reach the records of every later test on the shared server.
    chroma_server = chroma_server_factory()
    m = make_mirror(
        tmp_path, mongo_uri, chroma_server, "phantom", metadata=FIELDS, consistency="strong"
    )
    db, coll_name, cfg, settings = m.db, m.coll, m.cfg, m.settings
    docs = mongo_client[db]["docs"]
    docs.insert_one(_doc(0))
    daemon = syncd_factory(["run"], cfg)
    wait_caught_up(mongo_client, db, settings, "p", 60, "the snapshot")
    client = chroma_server.client()

    # A key of the pipeline's own mapping: every write deletes it when the document
    # lacks it, so it never appears, whatever the consistency level.
    _leave_phantoms(client, {"tags": ["PHANTOM"]})
    docs.insert_many([_doc(n) for n in (1, 2, 3)])
    wait_caught_up(mongo_client, db, settings, "p", 60, "the inserts")
    collection = client.get_collection(coll_name)
    current = list(docs.find())
    assert mismatch(current, collection, metadata_fields=FIELDS) == ""

    # A key outside the mapping: the strong read-back notices it and deletes it
    # before the batch is checkpointed.
    _leave_phantoms(client, {"elsewhere": ["PHANTOM"]})
    docs.insert_many([_doc(n) for n in (4, 5, 6)])
    wait_caught_up(mongo_client, db, settings, "p", 60, "the second inserts")
    current = list(docs.find())
    assert mismatch(current, collection, metadata_fields=FIELDS) == ""

    # Removing a field is mirrored: there is nothing left over for a later $unset to miss.
    docs.update_one({"_id": 1}, {"$set": {"tags": ["real"]}})
    wait_caught_up(mongo_client, db, settings, "p", 60, "the update")
    docs.update_one({"_id": 1}, {"$unset": {"tags": ""}})
    wait_caught_up(mongo_client, db, settings, "p", 60, "the $unset")
    current = list(docs.find())
    assert mismatch(current, collection, metadata_fields=FIELDS) == ""

    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()
    assert "Chroma holds metadata keys syncd did not write" in daemon.output()
    verify = run_syncd(["verify", "p"], cfg)
    assert verify.returncode == ExitCode.OK, verify.stdout + verify.stderr


def test_a_collection_syncd_deletes_leaves_no_metadata_behind(chroma_server_factory):
    """`rebuild --drop-previous` deletes the previous collection: records written later,
    in any collection of the server, must not inherit its list-valued metadata."""
    from syncd import switching

    client = chroma_server_factory().client()
    old = client.create_collection("previous--v1", embedding_function=None)
    count = 1_500  # more than one batch of the emptying
    old.add(
        ids=[f"x{i}" for i in range(count)],
        embeddings=[[0.1, 0.2, 0.3, 0.4]] * count,
        metadatas=[{"tags": ["alpha", f"t{i}"], "title": "old"} for i in range(count)],
    )

    switching.delete(client, "previous--v1")

    assert "previous--v1" not in [c.name for c in client.list_collections()]
    new = client.create_collection("live-one", embedding_function=None)
    new.add(
        ids=[f"y{i}" for i in range(count)],
        embeddings=[[0.4, 0.3, 0.2, 0.1]] * count,
        metadatas=[{"n": i} for i in range(count)],
    )
    stored = new.get(include=["metadatas"])["metadatas"]
    inherited = [m for m in stored if set(m) != {"n"}]
    assert not inherited, f"{len(inherited)} records inherited metadata, e.g. {inherited[:2]}"


def test_a_snapshot_into_a_deleted_collections_rows_leaves_no_nested_key_behind(
    tmp_path, mongo_uri, mongo_client, chroma_server_factory
):
    """`consistency = "eventual"`: a mapping key holding a document flattens to keys
    (`extra.l`) no write can name in advance, so clearing the mapping's keys does not
    reach them. Refilling a deleted collection (`syncd snapshot`, the README's fix for a
    lost one) gave new records another record's `extra.l`, and filtered searches
    returned them."""
    chroma_server = chroma_server_factory()
    m = make_mirror(tmp_path, mongo_uri, chroma_server, "nested", metadata=("extra",))
    docs = mongo_client[m.db]["docs"]
    docs.insert_many(
        [
            {"_id": 1, "body": "one", "vec": [1.0, 0.1, 0.5, -0.5], "extra": {"l": ["a", "b"]}},
            {"_id": 2, "body": "two", "vec": [1.0, 0.2, 0.5, -0.5]},
        ]
    )
    first = run_syncd(["snapshot", "p"], m.cfg, timeout=120)
    assert first.returncode == ExitCode.OK, first.stdout + first.stderr
    client = chroma_server.client()
    client.delete_collection(m.coll)  # lost behind syncd's back
    _leave_phantoms(client, {"extra.l": ["PHANTOM"], "extra.deep.x": [1.0, 2.5]})
    docs.insert_one({"_id": 0, "body": "zero", "vec": [1.0, 0.0, 0.5, -0.5]})

    again = run_syncd(["snapshot", "p"], m.cfg, timeout=120)
    assert again.returncode == ExitCode.OK, again.stdout + again.stderr

    stored = client.get_collection(m.coll).get(include=["metadatas"])
    user = {
        rid: {k: v for k, v in meta.items() if not k.startswith("syncd_")}
        for rid, meta in zip(stored["ids"], stored["metadatas"], strict=True)
    }
    # The README's rules, by hand: a nested document flattens to dotted keys.
    assert user == {"i:0": {}, "i:1": {"extra.l": ["a", "b"]}, "i:2": {}}, user
    verify = run_syncd(["verify", "p"], m.cfg)
    assert verify.returncode == ExitCode.OK, verify.stdout + verify.stderr
