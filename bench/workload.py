"""Deterministic documents and change sets shared by every contender.

Needs only numpy and pymongo, so the LangChain runner (in its own environment) can
import it too. Vectors are a function of the text, so a text change is a vector change
and a metadata-only change keeps both.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

WORDS = [
    "river",
    "stone",
    "lantern",
    "orbit",
    "meadow",
    "cipher",
    "harbor",
    "quartz",
    "ember",
    "willow",
    "signal",
    "canyon",
    "falcon",
    "prism",
    "tundra",
    "velvet",
    "beacon",
    "glacier",
    "mosaic",
    "thunder",
    "cobalt",
    "saffron",
    "delta",
    "compass",
    "lattice",
    "ripple",
    "summit",
    "harvest",
    "nebula",
    "timber",
]

USER_METADATA = ("title", "tags", "n", "group")


def text_for(i: int, version: int = 0) -> str:
    rng = np.random.default_rng(i * 1_000 + version)
    words = " ".join(WORDS[k] for k in rng.integers(0, len(WORDS), 24))
    return f"document {i} version {version}: {words}"


def vector_for(text: str, dims: int) -> list[float]:
    rng = np.random.default_rng(zlib.crc32(text.encode()))
    v = rng.standard_normal(dims)
    v /= np.linalg.norm(v)
    return [float(x) for x in v.astype(np.float32)]


def document(i: int, *, dims: int = 384, version: int = 0, n: int = 0) -> dict[str, Any]:
    body = text_for(i, version)
    doc: dict[str, Any] = {
        "_id": i,
        "title": f"title {i}",
        "body": body,
        "tags": [WORDS[i % len(WORDS)], WORDS[(i * 7) % len(WORDS)]],
        "n": n,
        "group": i % 10,
    }
    if dims:
        doc["vec"] = vector_for(body, dims)
    return doc


def user_metadata(doc: dict[str, Any]) -> dict[str, Any]:
    return {key: doc[key] for key in USER_METADATA if key in doc}


def pipeline_table(
    name: str, database: str, collection: str, *, dims: int = 384, **overrides: Any
) -> dict[str, Any]:
    """A syncd pipeline for the bench documents; the vector comes from the document."""
    table: dict[str, Any] = {
        "name": name,
        "database": database,
        "collection": collection,
        "mapping": {"text": "body", "metadata": list(USER_METADATA)},
        "embedder": {"kind": "field", "field": "vec", "dimensions": dims},
    }
    table.update(overrides)
    return table


def op_time(client: Any) -> Any:
    """The server's latest operation time (a bson Timestamp)."""
    return client.admin.command("ping")["operationTime"]


def insert_docs(coll: Any, ids: range, *, dims: int, slice_size: int = 5_000) -> None:
    for start in range(ids.start, ids.stop, slice_size):
        stop = min(start + slice_size, ids.stop)
        coll.insert_many([document(i, dims=dims) for i in range(start, stop)], ordered=True)


def insert_fresh(client: Any, coll: Any, n: int, *, dims: int) -> tuple[Any, Any]:
    """Empty `coll` and insert documents 0..n-1: the operation times before and after,
    the stretch of the change stream a drain replays."""
    coll.drop()
    start = op_time(client)
    insert_docs(coll, range(n), dims=dims)
    return start, op_time(client)


def write_change_set(
    coll: Any, inserts: int, text_updates: int, meta_updates: int, deletes: int, *, dims: int
) -> dict[str, int]:
    """Inserts, then text updates, metadata-only updates and deletes spread over them.

    Every update is a separate update_one, as an application would issue it.
    """
    insert_docs(coll, range(inserts), dims=dims)
    step = max(1, inserts // max(1, text_updates))
    for k in range(text_updates):
        i = (k * step) % inserts
        body = text_for(i, 1)
        update: dict[str, Any] = {"body": body}
        if dims:
            update["vec"] = vector_for(body, dims)
        coll.update_one({"_id": i}, {"$set": update})
    for k in range(meta_updates):
        i = (k * step + 1) % inserts
        coll.update_one({"_id": i}, {"$set": {"n": k + 1, "title": f"retitled {i}"}})
    for k in range(deletes):
        i = (k * 2 * step + 2) % inserts
        coll.delete_one({"_id": i})
    return {
        "insert": inserts,
        "text_update": text_updates,
        "meta_update": meta_updates,
        "delete": deletes,
    }


def wait_for(predicate: Any, timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
