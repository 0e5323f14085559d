"""Turn a run of change events into one write plan for the sink.

Events on the same key are coalesced to the last one (stream order is kept by the
position of each key's last event). The plan deletes records of documents that are
gone or no longer match the filter, re-embeds only records whose text changed, and
sends metadata-only updates (with ``None`` for removed keys) for the rest.

A document that cannot be mapped (poison) has no correct record: when the caller
parks it in the dead-letter store (``remove_poisoned``), the plan deletes what Chroma
holds of it, so the mirror never keeps a stale copy searchable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

from bson.timestamp import Timestamp

from syncd.embedder import Embedder, Pending, submit
from syncd.errors import EmbeddingRejectedError, PoisonError, SyncdError
from syncd.identity import HASH_KEY, TEXT_HASH_KEY, base_id, in_collection, record_key
from syncd.mapping import MappedDocument, Mapper, Record
from syncd.sink import MetadataUpdate, Upsert, WritePlan


class ExistingLookup(Protocol):
    def existing(self, keys: Sequence[str]) -> dict[str, dict[str, Mapping[str, Any]]]: ...


class _NothingStored:
    """Plans as if Chroma held no record of the keys (a re-check of a halted document;
    a snapshot's documents that no write has reached in a collection empty at its start)."""

    def existing(self, keys: Sequence[str]) -> dict[str, dict[str, Mapping[str, Any]]]:
        return {}


NOTHING_STORED: ExistingLookup = _NothingStored()


@dataclasses.dataclass(frozen=True)
class Change:
    """One coalesced change to a document key."""

    key: str
    collection: str
    source_id: Any
    document: Mapping[str, Any] | None  # None: the document is gone (or not visible)
    operation: str
    cluster_time: Timestamp | None
    event: Mapping[str, Any] | None  # the change event, None for snapshot reads


@dataclasses.dataclass
class Poisoned:
    change: Change
    error: SyncdError


@dataclasses.dataclass
class PlanResult:
    plan: WritePlan
    poisoned: list[Poisoned]
    embedded: int  # texts sent to the embedder
    keys_written: list[str]


def coalesce(events: Iterable[Mapping[str, Any]], *, prefixed: bool) -> list[Change]:
    """Keep the last event per key, ordered by where that last event stood in the stream."""
    last: dict[str, Change] = {}
    for event in events:
        source_id = event["documentKey"]["_id"]
        collection = event["ns"]["coll"]
        key = record_key(collection, source_id, prefixed=prefixed)
        operation = event["operationType"]
        document = None if operation == "delete" else event.get("fullDocument")
        last.pop(key, None)
        last[key] = Change(
            key=key,
            collection=collection,
            source_id=source_id,
            document=document,
            operation=operation,
            cluster_time=event.get("clusterTime"),
            event=event,
        )
    return list(last.values())


def build(
    changes: Sequence[Change],
    *,
    mapper: Mapper,
    embedder: Embedder | None,
    sink: ExistingLookup,
    prefixed: bool,
    stage: Callable[[str], AbstractContextManager[None]] = lambda _name: nullcontext(),
    remove_poisoned: bool = False,
) -> PlanResult:
    """``stage("map")``, ``stage("lookup")`` (Chroma) and ``stage("embed")`` time the parts.

    With ``remove_poisoned``, the records of poisoned documents are deleted.
    """
    drafted = draft(changes, mapper=mapper, sink=sink, prefixed=prefixed, stage=stage)
    return complete(
        drafted, embedder=embedder, sink=sink, stage=stage, remove_poisoned=remove_poisoned
    )


@dataclasses.dataclass
class Draft:
    """A plan mapped and looked up, its texts not embedded yet (:func:`complete` does)."""

    changes: Sequence[Change]
    poisoned: list[Poisoned]
    mapped: dict[str, MappedDocument]
    plan: WritePlan
    to_embed: list[tuple[Change, Record, Mapping[str, Any]]]
    pending: Pending | None = None  # vectors of to_embed already asked for (:func:`send`)

    def cancel(self) -> None:
        """Drop the requests not sent yet: their vectors are not needed any more (those
        under way end by themselves, still counted in the embedder's concurrency)."""
        if self.pending is not None:
            self.pending.cancel(wait=False)


def draft(
    changes: Sequence[Change],
    *,
    mapper: Mapper,
    sink: ExistingLookup,
    prefixed: bool,
    stage: Callable[[str], AbstractContextManager[None]] = lambda _name: nullcontext(),
) -> Draft:
    """Map the changes and look up what Chroma holds of them (``stage("map")``,
    ``stage("lookup")``); what cannot be mapped is poisoned."""
    with stage("map"):
        poisoned, mapped = _map(changes, mapper, prefixed)
    bad = {p.change.key for p in poisoned}
    keys = [c.key for c in changes if c.key not in bad]
    with stage("lookup"):
        existing = sink.existing(keys) if keys else {}
    plan, to_embed = _plan_writes(changes, bad, mapped, existing, mapper.metadata_keys)
    return Draft(changes, poisoned, mapped, plan, to_embed)


def send(drafted: Draft, embedder: Embedder | None) -> bool:
    """Ask an embedding API for the draft's vectors now, and return at once (True); False
    when there is nothing to ask or the embedder computes in the caller's thread."""
    if drafted.to_embed and embedder is not None and drafted.pending is None:
        drafted.pending = submit(embedder, [record.text for _, record, _ in drafted.to_embed])
    return drafted.pending is not None


def complete(
    drafted: Draft,
    *,
    embedder: Embedder | None,
    sink: ExistingLookup,
    stage: Callable[[str], AbstractContextManager[None]] = lambda _name: nullcontext(),
    remove_poisoned: bool = False,
) -> PlanResult:
    """Embed what the draft needs (``stage("embed")``; vectors already asked for are
    waited for) and finish the plan; with ``remove_poisoned``, the records of poisoned
    documents are deleted (``sink`` says what Chroma holds of them)."""
    plan, poisoned = drafted.plan, drafted.poisoned
    embedded = 0
    if drafted.to_embed:
        with stage("embed"):
            embedded = _embed(drafted.to_embed, embedder, plan, poisoned, drafted.pending)
    bad = {p.change.key for p in poisoned}
    if bad:
        plan = _without(plan, bad, drafted.mapped)
    if bad and remove_poisoned:
        _delete_records_of(sorted(bad), sink, plan)
    written = [c.key for c in drafted.changes if c.key not in bad]
    return PlanResult(plan=plan, poisoned=poisoned, embedded=embedded, keys_written=written)


_ToEmbed = list[tuple[Change, Record, Mapping[str, Any]]]


def _map(
    changes: Sequence[Change], mapper: Mapper, prefixed: bool
) -> tuple[list[Poisoned], dict[str, MappedDocument]]:
    """Map documents; what cannot be mapped is poisoned."""
    poisoned: list[Poisoned] = []
    mapped: dict[str, MappedDocument] = {}
    for change in changes:
        if change.document is None or not mapper.matches(change.document):
            continue
        try:
            doc = mapper.map(change.document, cluster_time=change.cluster_time)
        except PoisonError as exc:
            poisoned.append(Poisoned(change, exc.with_context(document_id=change.source_id)))
            continue
        mapped[change.key] = in_collection(doc, change.key, change.collection) if prefixed else doc
    return poisoned, mapped


def _plan_writes(
    changes: Sequence[Change],
    bad: set[str],
    mapped: Mapping[str, MappedDocument],
    existing: Mapping[str, Any],
    clear: frozenset[str],
) -> tuple[WritePlan, _ToEmbed]:
    """Plan everything but embeddings against what Chroma holds."""
    plan = WritePlan()
    to_embed: _ToEmbed = []
    for change in changes:
        if change.key in bad:
            continue
        stored = existing.get(change.key, {})
        target = mapped.get(change.key)
        if target is None:
            plan.deletes.extend(stored)
            continue
        new_ids = {r.id for r in target.records}
        plan.deletes.extend(rid for rid in stored if rid not in new_ids)
        for record in target.records:
            old = stored.get(record.id)
            metadata = _with_removals(record.metadata, old, clear)
            if old is not None and old.get(TEXT_HASH_KEY) == record.text_hash:
                if old.get(HASH_KEY) != record.content_hash or _keys_differ(old, record):
                    plan.updates.append(MetadataUpdate(record.id, metadata))
            elif record.embedding is not None:
                plan.upserts.append(Upsert(record.id, record.text, metadata, record.embedding))
            else:
                to_embed.append((change, record, metadata))
    return plan, to_embed


def _embed(
    items: list[tuple[Change, Record, Mapping[str, Any]]],
    embedder: Embedder | None,
    plan: WritePlan,
    poisoned: list[Poisoned],
    asked: Pending | None = None,
) -> int:
    """Vectors for ``items`` (``asked``: those already asked for); an input the API
    refuses poisons its document, and the others are asked for again without it."""
    if not items:
        return 0
    if embedder is None:
        raise PoisonError("record has no embedding and the pipeline has no embedder")
    pending = list(items)
    sent = 0
    while pending:
        texts = [record.text for _, record, _ in pending]
        try:
            vectors = asked.result() if asked is not None else embedder.embed(texts)
            sent += len(texts)
        except EmbeddingRejectedError as exc:
            index = getattr(exc, "input_index", 0)
            change = pending[index][0]
            poisoned.append(Poisoned(change, exc.with_context(document_id=change.source_id)))
            pending = [item for item in pending if item[0].key != change.key]
            asked = None
            continue
        for (_, record, metadata), vector in zip(pending, vectors, strict=True):
            plan.upserts.append(Upsert(record.id, record.text, metadata, vector))
        break
    return sent


def _delete_records_of(keys: list[str], sink: ExistingLookup, plan: WritePlan) -> None:
    planned = set(plan.deletes)
    for records in sink.existing(keys).values():
        plan.deletes.extend(rid for rid in records if rid not in planned)


def _with_removals(
    metadata: Mapping[str, Any], old: Mapping[str, Any] | None, clear: Iterable[str] = ()
) -> dict[str, Any]:
    """New metadata plus ``None`` for every key the stored record has and the new one
    lacks, and for every key in ``clear`` (the mapping's keys) it lacks.

    Chroma merges metadata on upsert and update; ``None`` deletes a key. A record id
    Chroma never held can still come with keys: deleting a collection leaves its
    list-valued metadata behind in Chroma, and a new record reusing the row inherits it.
    """
    merged: dict[str, Any] = dict(metadata)
    for key in [*(old or {}), *clear]:
        if key not in merged:
            merged[key] = None
    return merged


def _keys_differ(old: Mapping[str, Any], record: Record) -> bool:
    return set(old) != set(record.metadata)


def _without(plan: WritePlan, bad: set[str], mapped: Mapping[str, MappedDocument]) -> WritePlan:
    ids = {r.id for key in bad if key in mapped for r in mapped[key].records}
    return WritePlan(
        upserts=[u for u in plan.upserts if u.id not in ids],
        updates=[u for u in plan.updates if u.id not in ids],
        deletes=[d for d in plan.deletes if base_id(d) not in bad],
    )
