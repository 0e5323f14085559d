"""What every benchmark section gets (sizes, servers, the time budget) and the helpers
they share: views of a store's contents, a syncd drain, a raw batched upsert."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import workload as w
from common import Servers, drain, drop_collection

from syncd import config as syncd_config
from syncd.mapping import Mapper

T = TypeVar("T")


def _size(full: T, quick: T) -> T:
    """A workload's size, and its size in the smoke run (`--quick`)."""
    return field(default=full, metadata={"quick": quick})


@dataclass
class Sizes:
    """Each section's workload: these defaults for `make bench`, the `quick` value beside
    a field for the smoke run (`--quick`)."""

    sink_events: int = _size(20_000, quick=3_000)
    sink_runs: int = 2  # alternating A/B/B/A, each contender on a fresh Chroma server
    alt_inserts: int = _size(2_000, quick=300)
    alt_updates: int = _size(500, quick=100)  # each of text and metadata-only
    alt_deletes: int = _size(250, quick=50)
    alt_runs: int = _size(3, quick=1)
    lag_seconds: float = _size(20.0, quick=5.0)
    memory_small: int = _size(100_000, quick=5_000)
    memory_large: int = _size(1_000_000, quick=20_000)
    memory_docs: int = 100
    snapshot_docs: int = _size(200_000, quick=5_000)
    snapshot_runs: int = 1  # raw upsert then syncd; 2 for A/B/B/A
    savings_docs: int = _size(2_000, quick=300)
    savings_updates: int = _size(2_000, quick=300)
    remote_events: int = _size(4_000, quick=1_000)
    remote_runs: int = _size(2, quick=1)
    model_texts: int = _size(1_000, quick=200)
    model_runs: int = _size(2, quick=1)
    tracing_events: int = _size(5_000, quick=1_000)
    tracing_runs: int = _size(6, quick=1)  # A/B/B/A: runs of one setting differ by 10-30 %
    budget_s: float = 1_110.0  # what the whole run may take; big sections shrink to fit

    @classmethod
    def quick(cls) -> Sizes:
        return cls(**{f.name: f.metadata["quick"] for f in fields(cls) if "quick" in f.metadata})


@dataclass
class Context:
    servers: Servers
    sizes: Sizes
    started: float
    results: dict[str, Any]

    @property
    def mongo(self) -> Any:
        if not hasattr(self, "_mongo"):
            self._mongo = self.servers.mongo_client()
        return self._mongo

    @property
    def chroma(self) -> Any:
        if not hasattr(self, "_chroma"):
            self._chroma = self.servers.chroma_client()
        return self._chroma

    def remaining(self) -> float:
        return self.sizes.budget_s - (time.monotonic() - self.started)


def settings(path: Path) -> Any:
    return syncd_config.load(path, env={})


def mapper(table: dict[str, Any]) -> Mapper:
    """The Mapper of a pipeline table: the records syncd would write, for a baseline."""
    return Mapper(syncd_config.validate({"pipelines": [table]}).pipelines[0])


def _user_view(records: dict[str, Any]) -> dict[str, Any]:
    """id -> (document, user metadata): what every contender must agree on."""
    return {rid: (r["document"], {k: v for k, v in r["metadata"].items()
                                  if not k.startswith("syncd_") and k != "source"})
            for rid, r in records.items()}


def chroma_view(chroma: Any, name: str, *, key: str | None = None) -> dict[str, Any]:
    coll = chroma.get_collection(name)
    out: dict[str, Any] = {}
    offset = 0
    while True:
        got = coll.get(include=["documents", "metadatas"], limit=5_000, offset=offset)
        if not got["ids"]:
            break
        for rid, doc, stored in zip(got["ids"], got["documents"], got["metadatas"],
                                    strict=True):
            meta = stored or {}
            out[meta[key] if key else rid] = {"document": doc, "metadata": meta}
        offset += len(got["ids"])
    return _user_view(out)


def mongo_view(coll: Any) -> dict[str, Any]:
    return {f"i:{d['_id']}": (d["body"], w.user_metadata(d)) for d in coll.find({})}


def compare(expected: dict[str, Any], actual: dict[str, Any]) -> dict[str, int]:
    missing = len(set(expected) - set(actual))
    extra = len(set(actual) - set(expected))
    differ = sum(1 for k in set(expected) & set(actual) if _norm(expected[k]) != _norm(actual[k]))
    return {"records": len(actual), "missing": missing, "extra": extra, "differ": differ}


def _norm(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def syncd_drain(servers: Servers, table: dict[str, Any], start: Any, until: Any,
                **kw: Any) -> dict[str, Any]:
    """bench/drain.py over [start, until] into an empty collection of ``servers``' Chroma."""
    name = table["name"]
    cfg = servers.config(name, [table])
    client = servers.chroma_client()
    drop_collection(client, name)
    return drain(cfg, name, start_at=start, until=until, **kw)


def raw_upsert(chroma: Any, table: dict[str, Any], n: int, *, batch: int,
               dims: int) -> dict[str, Any]:
    """Upsert the records syncd maps from the bench documents 0..n-1 (ids, texts, metadata,
    vectors), ``batch`` at a time, into a new collection with one client: the baseline
    syncd is held to. Only the upsert calls are timed (``wall_s``); mapping a slice happens
    between them, outside the window. ``progress``: (upsert seconds so far, records) after
    each slice, to tell whether the rate falls as the collection grows."""
    drop_collection(chroma, "raw")
    target = chroma.create_collection("raw", embedding_function=None,
                                      metadata={"hnsw:space": "cosine"})
    seconds, records = 0.0, 0
    progress: list[list[float]] = []
    for part in _mapped_slices(table, range(n), batch, dims=dims):
        began = time.perf_counter()
        target.upsert(ids=[r.id for r in part], documents=[r.text for r in part],
                      metadatas=[r.metadata for r in part],
                      embeddings=[r.embedding for r in part])
        seconds += time.perf_counter() - began
        records += len(part)
        progress.append([seconds, records])
    return {"records": records, "wall_s": seconds, "per_s": records / seconds,
            "progress": progress}


def _mapped_slices(table: dict[str, Any], ids: range, size: int, *,
                  dims: int) -> Iterable[list[Any]]:
    """The records syncd maps from the bench documents ``ids``, ``size`` at a time."""
    m = mapper(table)
    part: list[Any] = []
    for i in ids:
        part.extend(m.map(w.document(i, dims=dims)).records)
        while len(part) >= size:
            yield part[:size]
            part = part[size:]
    if part:
        yield part
