"""The two patterns syncd is measured against, fed by the same change stream.

* ``naive``: one Chroma call per change event (upsert the document, or delete it): the
  loop an application writes when it mirrors changes by hand.
* ``tailer``: the least a mirror can do per batch: each change-stream batch coalesced by
  ``_id`` and written with one upsert (and one delete), no lookup of what is stored, no
  checkpoint: the lag section's hand-written comparison.
* ``langchain``: LangChain's indexing API (``langchain_core.indexing.index`` with a
  ``SQLRecordManager`` and ``langchain_chroma.Chroma``, ``cleanup="incremental"``),
  called once per change-stream batch with the batch's documents coalesced by ``_id``;
  deleted documents are removed through the record manager's keys for their source.
  Runs in .venv-bench (LangChain's own environment).

Both read the change stream from ``--start-at`` until ``--until`` (cluster times) and
print one JSON line: wall seconds, CPU seconds of this process, events read.

    python bench/alternatives.py {naive|langchain} --mongo URI --chroma-port P
        --database DB --collection C --chroma-collection NAME --start-at T.I --until T.I
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

import chromadb
import pymongo
from bson.timestamp import Timestamp
from chromadb.config import Settings
from workload import user_metadata

BATCH = 500  # events per change-stream batch, as syncd's default batch_size


def _ts(text: str) -> Timestamp:
    t, _, i = text.partition(".")
    return Timestamp(int(t), int(i or 0))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def record_id(doc_id: Any) -> str:
    return f"i:{doc_id}"  # syncd's encoding of an integer _id, so contents compare by id


def batches(coll: Any, start: Timestamp, until: Timestamp) -> Iterator[list[dict[str, Any]]]:
    """Change events from ``start`` through ``until``, a driver batch at a time."""
    with coll.watch(start_at_operation_time=start, full_document="updateLookup",
                    batch_size=BATCH, max_await_time_ms=100) as stream:
        batch: list[dict[str, Any]] = []
        while True:
            event = stream.try_next()
            if event is not None:
                batch.append(event)
                if event["clusterTime"] >= until:
                    yield batch
                    return
                if len(batch) >= BATCH:
                    yield batch
                    batch = []
            elif batch:
                yield batch
                batch = []


def naive(coll: Any, target: Any, start: Timestamp, until: Timestamp) -> int:
    events = 0
    for batch in batches(coll, start, until):
        for event in batch:
            events += 1
            key = record_id(event["documentKey"]["_id"])
            doc = event.get("fullDocument")
            if event["operationType"] == "delete" or doc is None:
                target.delete(ids=[key])
            else:
                target.upsert(ids=[key], documents=[doc["body"]],
                              metadatas=[user_metadata(doc)], embeddings=[doc["vec"]])
    return events


def tailer(coll: Any, target: Any, start: Timestamp, until: Timestamp) -> int:
    events = 0
    for batch in batches(coll, start, until):
        events += len(batch)
        latest: dict[str, dict[str, Any] | None] = {}
        for event in batch:
            doc = event.get("fullDocument")
            gone = event["operationType"] == "delete" or doc is None
            latest[record_id(event["documentKey"]["_id"])] = None if gone else doc
        docs = {key: doc for key, doc in latest.items() if doc is not None}
        if docs:
            target.upsert(ids=list(docs), documents=[d["body"] for d in docs.values()],
                          metadatas=[user_metadata(d) for d in docs.values()],
                          embeddings=[d["vec"] for d in docs.values()])
        gone_keys = [key for key, doc in latest.items() if doc is None]
        if gone_keys:
            target.delete(ids=gone_keys)
    return events


def langchain(coll: Any, client: Any, name: str, start: Timestamp, until: Timestamp,
              workdir: Path) -> int:
    from langchain_chroma import Chroma
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.indexing import index

    try:
        from langchain_classic.indexes import SQLRecordManager
    except ImportError:  # older releases kept it in langchain_community
        from langchain_community.indexes import SQLRecordManager  # type: ignore[no-redef]

    class VectorsFromDocuments(Embeddings):
        """The vectors the documents carry (kind = "field" in syncd): no model cost."""

        def __init__(self) -> None:
            self.by_text: dict[str, list[float]] = {}

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return [self.by_text[t] for t in texts]

        def embed_query(self, text: str) -> list[float]:
            return self.by_text[text]

    vectors = VectorsFromDocuments()
    store = Chroma(collection_name=name, client=client, embedding_function=vectors,
                   collection_metadata={"hnsw:space": "cosine"})
    manager = SQLRecordManager(f"chroma/{name}", db_url=f"sqlite:///{workdir / (name + '.db')}")
    manager.create_schema()
    events = 0
    for batch in batches(coll, start, until):
        events += len(batch)
        last: dict[Any, dict[str, Any]] = {}
        for event in batch:  # coalesce: index() would keep two versions of one source
            key = event["documentKey"]["_id"]
            last.pop(key, None)
            last[key] = event
        docs, gone = [], []
        for key, event in last.items():
            doc = event.get("fullDocument")
            if event["operationType"] == "delete" or doc is None:
                gone.append(record_id(key))
                continue
            vectors.by_text[doc["body"]] = doc["vec"]
            docs.append(Document(page_content=doc["body"],
                                 metadata={"source": record_id(key), **user_metadata(doc)}))
        if docs:
            index(docs, manager, store, cleanup="incremental", source_id_key="source",
                  batch_size=BATCH)
        if gone:
            keys = manager.list_keys(group_ids=gone)
            if keys:
                store.delete(keys)
                manager.delete_keys(keys)
        vectors.by_text.clear()
    return events


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["naive", "tailer", "langchain"])
    parser.add_argument("--mongo", required=True)
    parser.add_argument("--chroma-port", type=int, required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--collection", required=True)
    parser.add_argument("--chroma-collection", required=True)
    parser.add_argument("--start-at", required=True)
    parser.add_argument("--until", required=True)
    parser.add_argument("--workdir", type=Path, default=Path("."))
    args = parser.parse_args()
    mongo: Any = pymongo.MongoClient(args.mongo)
    coll = mongo[args.database][args.collection]
    client = chromadb.HttpClient(host="127.0.0.1", port=args.chroma_port,
                                 settings=Settings(anonymized_telemetry=False))
    start, until = _ts(args.start_at), _ts(args.until)
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    if args.kind in ("naive", "tailer"):
        target = client.get_or_create_collection(args.chroma_collection, embedding_function=None,
                                                 metadata={"hnsw:space": "cosine"})
        loop = naive if args.kind == "naive" else tailer
        events = loop(coll, target, start, until)
    else:
        events = langchain(coll, client, args.chroma_collection, start, until, args.workdir)
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    versions = {"chromadb": chromadb.__version__}
    if args.kind == "langchain":
        from importlib.metadata import version

        for package in ("langchain-core", "langchain-chroma", "langchain-classic"):
            versions[package] = version(package)
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "events": events, "versions": versions}))
    mongo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
