"""Chroma, behind the narrow interface the pipeline needs.

Writes go out in slices no larger than the server's ``get_max_batch_size()``.
Records of one document are found through the reserved ``syncd_id`` metadata key,
so chunked documents never leave stale chunks behind. Chroma's upsert merges
metadata, so keys that disappeared are sent as ``None`` (which deletes them).

A sink writes to one collection, by id: :meth:`ChromaSink.collection_id` looks the
name up (and binds the sink to what it finds), and a collection deleted or replaced
while the sink is bound to it raises :class:`~syncd.errors.SinkLostError`, never a
silent write into an empty namesake.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from syncd import hints
from syncd.config import ChromaSettings
from syncd.errors import (
    ConsistencyError,
    SinkFatalError,
    SinkLostError,
    SinkRejectedError,
    SinkUnavailableError,
    SyncdError,
    from_sink,
    slow_answer,
    too_large,
)
from syncd.identity import HASH_KEY, ID_KEY

log = logging.getLogger(__name__)
RecordT = TypeVar("RecordT")

LOOKUP_SLICE = 500  # ids per metadata lookup; keeps `$in` filters small
# The vector values of a write whose size syncd chooses: ~1.6 MB of float32, 1,000
# records of 384 dimensions. Each Chroma write has a fixed cost besides its cost per
# record, which grows with the vector's size: for small vectors the fixed cost dominates
# writes of 1,000 (32 dimensions: 5,461 records a write ran at 1.1-1.6x the rate of 1,000
# a write, bench/NOTES.md), for 384 dimensions and more it does not, and the memory a
# write holds grows with its vectors.
WRITE_FLOATS = 400_000


# What one write may carry, as syncd estimates it (texts as UTF-8, vectors as JSON
# numbers): Chroma's server refuses requests over about 40 MB ("413 Payload too large"),
# and a proxy in front of it may allow less. A write over it is sent in smaller slices;
# a slice refused as too large is split in two and sent again.
WRITE_BYTES = 8 * 1024 * 1024
BYTES_PER_VALUE = 16  # a float32 as JSON, with its comma: at most "-1.2345678e-05,"
BYTES_PER_RECORD = 64  # the id's and the fields' framing
# A write of at least this many bytes that Chroma does not answer within chroma.timeout_s
# is sent again in halves: large texts (Chroma indexes every word) can take a server
# longer than the client waits, and sending the same request again would never end.
SLOW_SPLIT_BYTES = 1024 * 1024
# A record smaller than this refused alone as too large says the limit is wrong, not the
# record: poison is about one document's content, so it is retried as an outage instead.
SMALL_RECORD_BYTES = 64 * 1024


def write_size(dimensions: int | None, max_batch: int, least: int) -> int:
    """Records one write may carry: as many as hold :data:`WRITE_FLOATS` vector values,
    at least ``least`` and at most ``max_batch`` (``least`` while the size is unknown)."""
    if not dimensions:
        return least
    return max(least, min(max_batch, WRITE_FLOATS // dimensions))


@dataclasses.dataclass(frozen=True)
class Upsert:
    id: str
    text: str
    metadata: Mapping[str, Any]  # None values delete keys
    embedding: Sequence[float]
    # The vector as the float32 array Chroma stores, made ahead of the write by
    # :func:`packed`; None: the sink converts ``embedding`` itself.
    vector: Any = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class MetadataUpdate:
    id: str
    metadata: Mapping[str, Any]  # None values delete keys


@dataclasses.dataclass
class WritePlan:
    upserts: list[Upsert] = dataclasses.field(default_factory=list)
    updates: list[MetadataUpdate] = dataclasses.field(default_factory=list)
    deletes: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.upserts) + len(self.updates) + len(self.deletes)


def packed(plan: WritePlan) -> WritePlan:
    """``plan`` with each upsert's vector also as a float32 array, for a later write.

    Chroma stores float32 vectors. Given lists of Python floats, chromadb's client checks
    and converts every value inside ``upsert``, on the thread that writes, while Chroma
    waits for the request; an array it takes as it is. The staged loop packs a batch in
    its planner thread, so the writer only sends it. Without numpy (it comes with
    either Chroma package) the plan is returned as it was.
    """
    if not plan.upserts:
        return plan
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - a dependency of chromadb and chromadb-client
        return plan
    upserts = [
        dataclasses.replace(u, vector=np.asarray(u.embedding, dtype=np.float32))
        for u in plan.upserts
    ]
    return WritePlan(upserts=upserts, updates=plan.updates, deletes=plan.deletes)


def upsert_bytes(u: Upsert) -> int:
    """About what ``u`` adds to a write's request."""
    values = len(u.vector) if u.vector is not None else len(u.embedding)
    return (
        _utf8_bytes(u.text)
        + _metadata_bytes(u.metadata)
        + values * BYTES_PER_VALUE
        + len(u.id)
        + BYTES_PER_RECORD
    )


def update_bytes(u: MetadataUpdate) -> int:
    return _metadata_bytes(u.metadata) + len(u.id) + BYTES_PER_RECORD


def _metadata_bytes(metadata: Mapping[str, Any]) -> int:
    return sum(_utf8_bytes(str(k)) + _utf8_bytes(str(v)) + 8 for k, v in metadata.items())


def _utf8_bytes(text: str) -> int:
    """Bytes of ``text`` in the request's JSON (chromadb sends UTF-8 as it is)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def sized_slices(
    records: Sequence[RecordT], step: int, size: Callable[[RecordT], int]
) -> Iterator[Sequence[RecordT]]:
    """``records`` in order, in slices of at most ``step`` records and
    :data:`WRITE_BYTES` (a record larger than that alone)."""
    start, total = 0, 0
    for index, record in enumerate(records):
        weight = size(record)
        if index > start and (index - start >= step or total + weight > WRITE_BYTES):
            yield records[start:index]
            start, total = index, 0
        total += weight
    if start < len(records):
        yield records[start:]


def _upsert_args(part: Sequence[Upsert]) -> dict[str, Any]:
    return {
        "ids": [u.id for u in part],
        "documents": [u.text for u in part],
        "metadatas": [dict(u.metadata) for u in part],
        "embeddings": _vectors(part),
    }


def _update_args(part: Sequence[MetadataUpdate]) -> dict[str, Any]:
    return {"ids": [u.id for u in part], "metadatas": [dict(u.metadata) for u in part]}


def _delete_args(part: Sequence[str]) -> dict[str, Any]:
    return {"ids": list(part)}


def _id_bytes(record_id: str) -> int:
    return _utf8_bytes(record_id) + 4  # quoted, with a comma


def _vectors(part: Sequence[Upsert]) -> list[Any]:
    """The slice's vectors for chromadb: the arrays :func:`packed` made, else lists."""
    if all(u.vector is not None for u in part):
        return [u.vector for u in part]
    return [list(u.embedding) for u in part]


@dataclasses.dataclass(frozen=True)
class StoredRecord:
    id: str
    metadata: Mapping[str, Any]
    document: str | None = None
    embedding: Sequence[float] | None = None


class Sink(Protocol):
    @property
    def max_batch(self) -> int: ...

    def open(self) -> None:
        """Reach the collection now (a no-op once reached); raises what reaching it raises."""
        ...

    def collection_id(self, *, create: bool = False) -> str | None:
        """The id of the collection the sink's name refers to now, which later calls
        use; None when there is none (``create`` makes it)."""
        ...

    def existing(self, keys: Sequence[str]) -> dict[str, dict[str, Mapping[str, Any]]]:
        """For each document key, its stored records: {key: {record_id: metadata}}."""
        ...

    def write(self, plan: WritePlan) -> None: ...

    def get(
        self, ids: Sequence[str], *, include_embeddings: bool = False
    ) -> list[StoredRecord]: ...

    def scan(self, page: int = 1000) -> Iterator[list[StoredRecord]]: ...

    def delete_all(self) -> int: ...

    def delete_where(self, where: Mapping[str, Any]) -> None: ...

    def count(self) -> int: ...

    def close(self) -> None: ...


def make_client(settings: ChromaSettings) -> Any:
    """An embedded or HTTP Chroma client, telemetry off (no network but ours)."""
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    from syncd import chroma_http, chroma_install

    chromadb = chroma_install.load(settings.mode)
    from chromadb.config import Settings as ChromaClientSettings

    client_settings = ChromaClientSettings(anonymized_telemetry=False)
    try:
        if settings.mode == "embedded":
            os.makedirs(settings.path, exist_ok=True)
            return chromadb.PersistentClient(
                path=settings.path,
                settings=client_settings,
                tenant=settings.tenant,
                database=settings.database,
            )
        headers = {k: v.get_secret_value() for k, v in settings.headers.items()}
        if settings.token is not None:
            headers.setdefault("Authorization", f"Bearer {settings.token.get_secret_value()}")
        return chroma_http.with_timeout(
            lambda: chromadb.HttpClient(
                host=settings.host,
                port=settings.port,
                ssl=settings.ssl,
                headers=headers,
                settings=client_settings,
                tenant=settings.tenant,
                database=settings.database,
            ),
            settings.timeout_s,
            where=f"{settings.host}:{settings.port}",
        )
    except SyncdError:
        raise
    except Exception as exc:
        raise from_sink(exc) from exc


class ChromaSink:
    """One Chroma collection, opened on first use.

    Nothing here talks to Chroma until the pipeline first needs the collection, so
    building a pipeline never fails because Chroma is down: the first call raises
    inside the pipeline's retry loop, which retries it like any other outage.
    Opening checks that an existing collection matches the pipeline (its distance,
    and the dimension of its vectors when ``dimensions`` is known).

    A pipeline first asks :meth:`collection_id` whether the collection its checkpoint
    describes is still there, and only then lets it be created (with ``create``);
    without ``create`` it must exist.

    ``unanswered`` is given the record ids of every write that failed without an
    answer, which Chroma may still apply later (see :mod:`syncd.unanswered`).
    """

    def __init__(
        self,
        client: Callable[[], Any],
        collection: str,
        *,
        distance: str = "cosine",
        create: bool = True,
        dimensions: int | None = None,
        pipeline: str = "PIPELINE",
        unanswered: Callable[[Sequence[str]], None] | None = None,
    ) -> None:
        self._client = client
        self._pipeline = pipeline
        self._unanswered = unanswered
        self.name = collection
        self._distance = distance
        self._create = create
        self._dimensions = dimensions
        self._coll: Any = None
        self._gone = False  # the bound collection was found gone; see _collection
        self._max_batch = 0

    @property
    def max_batch(self) -> int:
        self._collection()
        return self._max_batch

    def open(self) -> None:
        self._collection()

    def collection_id(self, *, create: bool = False) -> str | None:
        opened = self._open(create)
        if opened is None:
            # Still gone if it was: another thread's call must not create a namesake.
            self._coll = None
            return None
        self._gone = False
        self._coll, self._max_batch = opened
        return str(self._coll.id)

    def _collection(self) -> Any:
        # A pipeline binds the collection before its first call (collection_id); other
        # callers open it as they always did, creating it with ``create``. Once the bound
        # collection was found gone, only collection_id() looks the name up again: what
        # the name serves now (another's collection, or the one a rebuild switched it to)
        # is for the caller to judge first, never written into by a call that follows.
        if self._coll is None and (self._gone or self.collection_id(create=self._create) is None):
            raise self._lost()
        return self._coll

    def _open(self, create: bool) -> tuple[Any, int] | None:
        try:
            client = self._client()
            if create:
                coll = client.get_or_create_collection(
                    self.name, embedding_function=None, metadata={"hnsw:space": self._distance}
                )
            else:
                coll = client.get_collection(self.name, embedding_function=None)
            max_batch = int(client.get_max_batch_size())
            check_matches(
                coll,
                distance=self._distance if self._create else None,
                dimensions=self._dimensions,
                pipeline=self._pipeline,
            )
        except Exception as exc:
            if self._create and _is_not_found(exc):
                return None  # for the pipeline to judge (see collection_id)
            error = from_sink(exc, namespace=f"chroma:{self.name}")
            if not self._create and _is_not_found(exc):
                error.hint = (
                    "the pipeline has not created it yet: "
                    f"`{hints.command('run')}` does on its first run"
                )
            raise error from exc
        return coll, max_batch

    def existing(self, keys: Sequence[str]) -> dict[str, dict[str, Mapping[str, Any]]]:
        found: dict[str, dict[str, Mapping[str, Any]]] = {}
        for start in range(0, len(keys), LOOKUP_SLICE):
            part = list(keys[start : start + LOOKUP_SLICE])
            where = {ID_KEY: {"$in": part}} if len(part) > 1 else {ID_KEY: part[0]}
            result = self._call("get", where=where, include=["metadatas"])
            for rid, meta in zip(result["ids"], result["metadatas"] or [], strict=True):
                found.setdefault(str((meta or {}).get(ID_KEY, rid)), {})[rid] = meta or {}
        return found

    def write(self, plan: WritePlan) -> None:
        step = self.max_batch
        for start in range(0, len(plan.deletes), step):
            self._send("delete", plan.deletes[start : start + step], _delete_args, _id_bytes)
        for part in sized_slices(plan.upserts, step, upsert_bytes):
            self._send("upsert", part, _upsert_args, upsert_bytes)
        for part_u in sized_slices(plan.updates, step, update_bytes):
            self._send("update", part_u, _update_args, update_bytes)

    def _send(
        self,
        method: str,
        part: Sequence[RecordT],
        args: Callable[[Sequence[RecordT]], dict[str, Any]],
        size: Callable[[RecordT], int],
    ) -> None:
        """Write ``part``; in two halves if Chroma (or a proxy) refuses it as too large,
        or if it is large (:data:`SLOW_SPLIT_BYTES`) and not answered within
        ``chroma.timeout_s``, down to single records. A record refused alone as too large
        raises with its ``record_id``, so the caller knows whose document is poison (the
        halves before it are written). Other refusals are raised as they come: halving
        them would dead-letter every record of a write refused for what it asks.

        A request that was not answered (timed out, or cut off) may still be applied
        after its halves or its retry, even after a later write of the same records: its
        ids go to ``unanswered``, for the pipeline to look at them again later."""
        try:
            self._call(method, writes=True, **args(part))
            return
        except SinkRejectedError as exc:
            if not too_large(exc):
                raise  # a refusal of what the request says, not of its size
            if len(part) < 2:
                if part and size(part[0]) < SMALL_RECORD_BYTES:
                    raise self._limit_too_low(size(part[0])) from exc
                if part:
                    exc.record_id = getattr(part[0], "id", None)
                raise
            why = "refused a write of %d records as too large"
        except SinkUnavailableError as exc:
            if self._unanswered is not None:
                self._unanswered([str(getattr(r, "id", r)) for r in part])
            if len(part) < 2 or not slow_answer(exc) or sum(map(size, part)) < SLOW_SPLIT_BYTES:
                raise
            why = "did not answer a write of %d records within chroma.timeout_s"
        log.info(
            "Chroma " + why + "; writing it in two",
            len(part),
            extra={"namespace": f"chroma:{self.name}"},
        )
        half = len(part) // 2
        self._send(method, part[:half], args, size)
        self._send(method, part[half:], args, size)

    def _limit_too_low(self, size: int) -> SinkUnavailableError:
        """A request of one small record refused as too large: no document is at fault,
        but a body limit (a proxy in front of Chroma) set far too low. Retried as an
        outage, so a misconfiguration does not dead-letter every document that changes."""
        return SinkUnavailableError(
            f"Chroma (or a proxy in front of it) refused a request of one record, about "
            f"{size:,} bytes, as too large",
            hint="raise the request body limit of the proxy in front of Chroma (e.g. "
            "nginx's client_max_body_size) to at least 10 MB; a running syncd retries "
            "by itself",
            namespace=f"chroma:{self.name}",
        )

    def get(self, ids: Sequence[str], *, include_embeddings: bool = False) -> list[StoredRecord]:
        include = ["metadatas", "documents"] + (["embeddings"] if include_embeddings else [])
        out: list[StoredRecord] = []
        for start in range(0, len(ids), LOOKUP_SLICE):
            result = self._call("get", ids=list(ids[start : start + LOOKUP_SLICE]), include=include)
            out.extend(_records(result, include_embeddings))
        return out

    def scan(self, page: int = 1000) -> Iterator[list[StoredRecord]]:
        """Every record, a page at a time (constant memory).

        The caller may delete records of the page it was given before asking for the
        next (the snapshot's orphan check does). Chroma pages by offset, so the records
        after a deleted one move down: the next page starts after the records of this
        page that are still there, not after all of it, or as many records as were
        deleted would be skipped. Records added meanwhile come after the ones there.
        """
        offset = 0
        while True:
            result = self._call(
                "get", include=["metadatas", "documents"], limit=page, offset=offset
            )
            records = _records(result, False)
            if not records:
                return
            yield records
            offset += self._still_there([r.id for r in records])

    def _still_there(self, ids: Sequence[str]) -> int:
        """How many of these records exist now."""
        found = 0
        for start in range(0, len(ids), LOOKUP_SLICE):
            found += len(
                self._call("get", ids=list(ids[start : start + LOOKUP_SLICE]), include=[])["ids"]
            )
        return found

    def delete_where(self, where: Mapping[str, Any]) -> None:
        self._call("delete", where=dict(where))

    def get_where(self, where: Mapping[str, Any]) -> list[StoredRecord]:
        result = self._call("get", where=dict(where), include=["metadatas", "documents"])
        return _records(result, False)

    def delete_all(self) -> int:
        removed = 0
        while True:
            result = self._call("get", include=[], limit=self.max_batch)
            ids = result["ids"]
            if not ids:
                return removed
            self._call("delete", ids=ids)
            removed += len(ids)

    def count(self) -> int:
        return int(self._call("count"))

    def close(self) -> None:
        """The client is shared and owned by the caller."""

    def _call(self, method: str, *, writes: bool = False, **kwargs: Any) -> Any:
        """Call the collection's ``method``; ``writes``: a write of the plan's records,
        whose refusal may be about them (poison), not about the configuration."""
        coll = self._collection()
        try:
            return getattr(coll, method)(**kwargs)
        except Exception as exc:
            if _is_not_found(exc):
                self._gone = True  # first: another thread may be in _collection()
                self._coll = None  # the next collection_id() looks the name up again
                raise self._lost() from exc
            raise from_sink(exc, records=writes, namespace=f"chroma:{self.name}") from exc

    def _lost(self) -> SinkLostError:
        return SinkLostError(
            f"Chroma collection {self.name!r} was deleted or replaced since syncd opened it",
            namespace=f"chroma:{self.name}",
        )


def check_matches(
    collection: Any, *, distance: str | None, dimensions: int | None, pipeline: str
) -> tuple[str | None, int | None]:
    """Refuse an existing collection made for other vectors: every write would fail, or
    rank by another distance. ``None`` skips a comparison. Returns what was found."""
    name = collection.name
    elsewhere = (
        f"set chroma_collection to a new name and run `{hints.command('snapshot', pipeline)}`"
    )
    space = distance_of(collection)
    if distance is not None and space is not None and space != distance:
        raise SinkFatalError(
            f"Chroma collection {name!r} exists with distance {space!r}, "
            f"but the pipeline says distance = {distance!r}",
            hint=f'set distance = "{space}" to keep it, or {elsewhere}',
            namespace=f"chroma:{name}",
        )
    stored = dimension_of(collection)
    if dimensions is not None and stored is not None and stored != dimensions:
        raise SinkFatalError(
            f"Chroma collection {name!r} holds {stored}-dimensional vectors, "
            f"but the pipeline's embedder makes {dimensions}",
            hint=f"to mirror into another collection, {elsewhere}",
            namespace=f"chroma:{name}",
        )
    return space, stored


def dimension_of(collection: Any) -> int | None:
    """The size of the vectors a collection holds (None while it is empty)."""
    sample = collection.get(limit=1, include=["embeddings"])
    embeddings = sample.get("embeddings")
    return len(embeddings[0]) if embeddings is not None and len(embeddings) > 0 else None


def distance_of(coll: Any) -> str | None:
    """The distance an existing collection was created with (configuration, else metadata)."""
    config = getattr(coll, "configuration_json", None)
    for index in ("hnsw", "spann"):
        section = config.get(index) if isinstance(config, dict) else None
        space = section.get("space") if isinstance(section, dict) else None
        if isinstance(space, str):
            return space
    space = (coll.metadata or {}).get("hnsw:space")
    return space if isinstance(space, str) else None


def _is_not_found(exc: BaseException) -> bool:
    from chromadb.errors import NotFoundError

    return isinstance(exc, NotFoundError)


def _records(result: Mapping[str, Any], with_embeddings: bool) -> list[StoredRecord]:
    ids = result["ids"]
    metas = result.get("metadatas") or [None] * len(ids)
    docs = result.get("documents") or [None] * len(ids)
    embs = result.get("embeddings") if with_embeddings else None
    out = []
    for i, rid in enumerate(ids):
        emb = None if embs is None else [float(x) for x in embs[i]]
        out.append(StoredRecord(id=rid, metadata=metas[i] or {}, document=docs[i], embedding=emb))
    return out


def clear_unwritten(sink: Sink, upserts: Sequence[Upsert], *, pipeline: str) -> None:
    """Delete metadata keys Chroma holds on newly written records that the write did not
    set: the leftovers of a deleted collection (:func:`check_written`). Keys the mapping
    names are cleared by every write already; this catches the ones a nested document
    flattened to (``extra.tags``), which no write can name in advance."""
    written = {u.id: u.metadata for u in upserts}
    if not written:
        return
    stored = {r.id: r.metadata for r in sink.get(list(written))}
    extra = _unwritten_keys(written, stored)
    if extra:
        _delete_keys(sink, extra, pipeline)


def _delete_keys(sink: Sink, extra: Mapping[str, list[str]], pipeline: str) -> None:
    sample = [f"{rid} ({', '.join(keys)})" for rid, keys in list(extra.items())[:3]]
    log.warning(
        "pipeline %s: Chroma holds metadata keys syncd did not write on %d record(s), "
        "e.g. %s; deleting them",
        pipeline,
        len(extra),
        "; ".join(sample),
    )
    sink.write(
        WritePlan(updates=[MetadataUpdate(rid, dict.fromkeys(k)) for rid, k in extra.items()])
    )


def check_written(sink: Sink, plan: WritePlan, *, pipeline: str) -> None:
    """Read a written plan back; raise ConsistencyError when Chroma disagrees with it.

    A record holding metadata keys the plan did not write gets them deleted and is read
    again: deleting a collection with list-valued metadata leaves those values behind in
    Chroma, and a new record that reuses their row inherits them.
    """
    written = {u.id: u.metadata for u in plan.upserts}
    written.update({u.id: u.metadata for u in plan.updates})
    stored = {r.id: r.metadata for r in sink.get(list(written))}
    extra = _unwritten_keys(written, stored)
    if extra:
        _delete_keys(sink, extra, pipeline)
        stored.update({r.id: r.metadata for r in sink.get(list(extra))})
        extra = _unwritten_keys(written, stored)
    gone = sink.get(plan.deletes) if plan.deletes else []
    wrong = [
        rid
        for rid, metadata in written.items()
        if rid in extra or (stored.get(rid) or {}).get(HASH_KEY) != metadata.get(HASH_KEY)
    ]
    if wrong or gone:
        sample_ids = (wrong or [r.id for r in gone])[:5]
        raise ConsistencyError(
            f"read-back after write disagrees for {len(wrong) + len(gone)} record(s), "
            f"e.g. {sample_ids}; not checkpointing",
            pipeline=pipeline,
        )


def _unwritten_keys(
    written: Mapping[str, Mapping[str, Any]], stored: Mapping[str, Mapping[str, Any]]
) -> dict[str, list[str]]:
    """Per record id, the metadata keys Chroma holds that the write did not set."""
    out: dict[str, list[str]] = {}
    for rid, metadata in written.items():
        keys = sorted(
            set(stored.get(rid) or {}) - {k for k, v in metadata.items() if v is not None}
        )
        if keys:
            out[rid] = keys
    return out
