"""Writing documents from a read of MongoDB beside a running pipeline, without racing it.

``syncd repair`` and ``syncd dlq retry`` read documents and apply them while the daemon
may stream the same collection. The daemon may apply a newer change (or a delete)
between such a read and its write, and the write would then put the older state back
with no later event to correct it. So after each write the document is read again: if
it is no longer the one the write was based on (changed, deleted, created, moved in or
out of the filter; compared as whole BSON documents), the new state is applied and the
document looked at again, up to :data:`SETTLE_TRIES` writes. Once a read after an
acknowledged write finds the state that write was based on, any later change to the
document is a change event that the pipeline applies after that write, and a pipeline
write from an older event that lands after it comes from a pipeline that is behind and
still applies the later events in order: the mirror converges. A document still
changing after :data:`SETTLE_TRIES` writes is left to the running pipeline.

These writes always carry the text, embedding and metadata of a record (never a
metadata-only update): a partial write could land on a record the daemon has just
rewritten with another text and leave text and content hashes that disagree, which
the daemon's planner would then trust.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import bson
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

from syncd import lookups
from syncd import plan as planning
from syncd.config import PipelineSettings
from syncd.identity import HASH_KEY, TEXT_HASH_KEY
from syncd.sink import Sink
from syncd.source import id_key

SETTLE_TRIES = 5  # writes of one document before it is left to the running pipeline
# Only for comparing documents: a uuid.UUID inside one must not make us fail.
_EXACT: CodecOptions[dict[str, Any]] = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)


class Applies(Protocol):
    """What settling needs: an :class:`~syncd.applier.Applier` (or a pipeline's)."""

    @property
    def settings(self) -> PipelineSettings: ...

    @property
    def source(self) -> lookups.Fetcher: ...

    @property
    def sink(self) -> Sink: ...

    def write_changes(
        self,
        changes: Sequence[planning.Change],
        *,
        lookup: planning.ExistingLookup | None = None,
    ) -> planning.PlanResult: ...


@dataclasses.dataclass(frozen=True)
class Target:
    """A document to apply, in the state read from MongoDB (None: gone)."""

    key: str
    collection: str
    source_id: Any
    document: Mapping[str, Any] | None
    operation: str = "repair"  # what the first write is recorded as
    event: Any = None


@dataclasses.dataclass
class Settled:
    """What :func:`apply_until_settled` did."""

    poisoned: list[planning.Poisoned] = dataclasses.field(default_factory=list)
    changed: list[str] = dataclasses.field(default_factory=list)  # applied again
    unsettled: list[str] = dataclasses.field(default_factory=list)  # left to the pipeline

    @property
    def poisoned_keys(self) -> set[str]:
        return {p.change.key for p in self.poisoned}


def apply_until_settled(pipeline: Applies, targets: Sequence[Target]) -> Settled:
    """Apply each document until a read after the write finds what the write was based on."""
    settled = Settled()
    pending = list(targets)
    changed: set[str] = set()
    for _ in range(SETTLE_TRIES):
        outcome = _write(pipeline, pending)
        settled.poisoned.extend(outcome.poisoned)
        poisoned = {p.change.key for p in outcome.poisoned}
        written = [t for t in pending if t.key not in poisoned]
        current = fetch_current(pipeline, [(t.collection, t.source_id) for t in written])
        pending = []
        for t in written:
            now = current.get((t.collection, id_key(t.source_id)))
            if exact(now) != exact(t.document):
                pending.append(dataclasses.replace(t, document=now, operation="repair"))
        if not pending:
            break
        settled.changed.extend(t.key for t in pending if t.key not in changed)
        changed.update(t.key for t in pending)
    else:
        settled.unsettled = [t.key for t in pending]
    return settled


def _write(pipeline: Applies, targets: Sequence[Target]) -> planning.PlanResult:
    changes = [
        planning.Change(
            key=t.key,
            collection=t.collection,
            source_id=t.source_id,
            document=t.document,
            operation=t.operation,
            cluster_time=None,
            event=t.event,
        )
        for t in targets
    ]
    return pipeline.write_changes(changes, lookup=_Distrusting(pipeline.sink))


def fetch_current(
    pipeline: Applies, ids: Iterable[tuple[str, Any]]
) -> dict[tuple[str, str], dict[str, Any]]:
    """Documents as they are now, by (collection, id_key of ``_id``)."""
    by_collection: dict[str, list[Any]] = {}
    for collection, source_id in ids:
        by_collection.setdefault(collection, []).append(source_id)
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for collection, source_ids in by_collection.items():
        for key, doc in pipeline.source.fetch(collection, source_ids).items():
            found[(collection, key)] = doc
    return found


def exact(doc: Mapping[str, Any] | None) -> bytes | None:
    """The whole document as BSON: every field, type and value that mapping can see."""
    if doc is None:
        return None
    if isinstance(doc, RawBSONDocument):
        return bytes(doc.raw)
    return bson.encode(doc, codec_options=_EXACT)


class _Distrusting:
    """Chroma's stored records, offered to the planner without their hashes.

    The planner skips records whose stored hashes match and sends metadata-only
    updates when only the text hash does. A record altered in Chroma behind syncd's
    back may still carry the right hashes, and a metadata-only update can land on a
    record the running pipeline has just rewritten with another text. Without hashes
    every record is planned as a full rewrite, and keys it should not have are sent as
    ``None`` (Chroma merges metadata on upsert).
    """

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def existing(self, keys: Sequence[str]) -> dict[str, dict[str, Mapping[str, Any]]]:
        return {
            key: {
                rid: {k: v for k, v in metadata.items() if k not in (HASH_KEY, TEXT_HASH_KEY)}
                for rid, metadata in records.items()
            }
            for key, records in self._sink.existing(keys).items()
        }
