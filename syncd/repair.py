"""Repair: make Chroma hold what the pipeline would make of MongoDB now.

Re-applies the documents behind missing and stale records (found by
:mod:`syncd.consistency`) from MongoDB's current state through the pipeline's own
planning code, deletes orphans by id, and re-applies dead letters. Nothing changes
with ``dry_run``.

Repair is safe while the pipeline streams. Each write is based on a read of the
document; the daemon may apply a newer change (or a delete) between that read and the
write, and the write would then put the older state back with no later event to
correct it. So after each write repair reads the document again: if it is no longer
the one the write was based on (changed, deleted, created, moved in or out of the
filter; compared as whole BSON documents), repair applies the new state and looks
again, up to :data:`SETTLE_TRIES` writes. Once a read after an acknowledged write
finds the state that write was based on, any later change to the document is a
change event that the pipeline applies after that write, and a pipeline write from an
older event that lands after it comes from a pipeline that is behind and still applies
the later events in order: the mirror converges. A document still changing after
:data:`SETTLE_TRIES` writes is left to the running pipeline and reported.

Repair's upserts always carry the text, embedding and metadata of a record (never a
metadata-only update): a partial write could land on a record the daemon has just
rewritten with another text and leave text and content hashes that disagree, which
the daemon's planner would then trust.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import bson
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

from syncd import lookups
from syncd import plan as planning
from syncd.config import PipelineSettings
from syncd.consistency import ORPHAN_BATCH, Checker, Drift, Finding, IdIndex, Report
from syncd.deadletter import DeadLetterStore
from syncd.identity import HASH_KEY, TEXT_HASH_KEY, base_id
from syncd.progress import Progress
from syncd.progress import start as progress_start
from syncd.sink import Sink, WritePlan
from syncd.source import id_key

log = logging.getLogger(__name__)

SETTLE_TRIES = 5  # writes of one document before it is left to the running pipeline
# Only for comparing documents: a uuid.UUID inside one must not make us fail.
_EXACT: CodecOptions[dict[str, Any]] = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)


class Applies(Protocol):
    """What repair needs: an :class:`~syncd.applier.Applier` (or a pipeline's)."""

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


# --- repair ----------------------------------------------------------------------------


@dataclasses.dataclass
class RepairReport:
    verify: Report
    dry_run: bool
    reapplied: Finding = dataclasses.field(default_factory=Finding)  # document keys
    deleted: Finding = dataclasses.field(default_factory=Finding)  # record ids
    failed: Finding = dataclasses.field(default_factory=Finding)  # keys that are poison now
    # keys whose document changed while repair applied it, and were applied again
    changed: Finding = dataclasses.field(default_factory=Finding)
    # keys still changing after SETTLE_TRIES writes: left to the running pipeline
    unsettled: Finding = dataclasses.field(default_factory=Finding)

    def to_json(self) -> dict[str, Any]:
        return {
            "pipeline": self.verify.pipeline,
            "dry_run": self.dry_run,  # true: reapply and delete say what would be done
            "found": self.verify.to_json(),
            "reapply": self.reapplied.to_json(),
            "delete": self.deleted.to_json(),
            "failed": self.failed.to_json(),
            "changed": self.changed.to_json(),
            "still_changing": self.unsettled.to_json(),
        }


def repair(
    pipeline: Applies, checker: Checker, *, dry_run: bool = False, progress: bool = False
) -> RepairReport:
    """Fix exactly what a verify finds: re-apply documents, delete orphans.

    ``progress``: show it (a bar on a terminal, else log lines).
    """
    started = time.monotonic()
    report = Report(pipeline.settings.name)
    result = RepairReport(verify=report, dry_run=dry_run)
    with IdIndex() as index:
        with checker.progress("repair", progress) as bar:
            for collection, docs in checker.documents():
                drift = checker.compare_documents(collection, docs, report, index=index)
                if drift.documents:
                    result.reapplied.add(list(drift.documents))
                    if not dry_run:
                        _reapply(pipeline, drift, result)
                bar.advance(len(docs))
        with checker.progress("repair records", progress, unit="records") as bar:
            _remove_orphans(pipeline, checker, index, result, dry_run=dry_run, progress=bar)
    report.seconds = time.monotonic() - started
    return result


def _remove_orphans(
    pipeline: Applies,
    checker: Checker,
    index: IdIndex,
    result: RepairReport,
    *,
    dry_run: bool,
    progress: Progress,
) -> None:
    report = result.verify
    while True:
        # Deleting while paging Chroma by offset would skip records, so orphans are
        # deleted after the scan; past ORPHAN_BATCH, delete and scan again.
        scan = Report(report.pipeline)
        pending: list[str] = []
        complete = True
        progress.update(0)
        for found in checker.orphans(scan, index, progress=progress):
            result.deleted.add(found)
            report.orphaned.add(found)
            if not dry_run:
                pending.extend(found)
                if len(pending) >= ORPHAN_BATCH:
                    complete = False
                    break
        if pending:
            pipeline.sink.write(WritePlan(deletes=pending))
            _recheck_deleted(pipeline, checker, pending, result)
        if complete:
            report.records = scan.records
            return


def _reapply(pipeline: Applies, drift: Drift, result: RepairReport) -> None:
    targets = [
        _Target(key, collection, doc["_id"], doc)
        for key, (collection, doc) in drift.documents.items()
    ]
    _apply_until_settled(pipeline, targets, result)


@dataclasses.dataclass(frozen=True)
class _Target:
    """A document to apply, in the state read from MongoDB (None: gone)."""

    key: str
    collection: str
    source_id: Any
    document: Mapping[str, Any] | None


def _recheck_deleted(
    pipeline: Applies, checker: Checker, deleted: Sequence[str], result: RepairReport
) -> None:
    """After deleting orphans: apply the documents that want one of those ids now.

    A record was confirmed orphaned against a read of its document; if the pipeline
    applied a change since (the document was created again, or came back into the
    filter), the delete removed a record the document should have.
    """
    by_key: dict[str, set[str]] = {}
    for rid in deleted:
        by_key.setdefault(base_id(rid), set()).add(rid)
    located = {key: checker.locate(key) for key in by_key}
    current = _current(pipeline, [(c, i) for c, i in (t for t in located.values() if t)])
    targets = []
    for key, target in located.items():
        if target is None:
            continue  # not an id syncd writes: no document, nothing to race with
        collection, source_id = target
        doc = current.get((collection, id_key(source_id)))
        if checker.valid_ids(collection, doc) & by_key[key]:
            targets.append(_Target(key, collection, source_id, doc))
    if targets:
        result.changed.add([t.key for t in targets])
        _apply_until_settled(pipeline, targets, result, counted={t.key for t in targets})


def _apply_until_settled(
    pipeline: Applies,
    targets: Sequence[_Target],
    result: RepairReport,
    *,
    counted: set[str] | None = None,
) -> None:
    """Apply each document until a read after the write finds what the write was based on.

    ``counted``: keys already reported as changed.
    """
    counted = set(counted or ())
    pending = list(targets)
    for _ in range(SETTLE_TRIES):
        written = _write(pipeline, pending, result)
        current = _current(pipeline, [(t.collection, t.source_id) for t in written])
        pending = []
        for t in written:
            now = current.get((t.collection, id_key(t.source_id)))
            if _exact(now) != _exact(t.document):
                pending.append(dataclasses.replace(t, document=now))
        if not pending:
            return
        result.changed.add([t.key for t in pending if t.key not in counted])
        counted.update(t.key for t in pending)
    result.unsettled.add([t.key for t in pending])
    log.warning(
        "%d document(s) kept changing while repair applied them; left to the running "
        "pipeline, e.g. %s",
        len(pending), [t.key for t in pending[:3]], extra={"pipeline": pipeline.settings.name},
    )  # fmt: skip


def _write(pipeline: Applies, targets: Sequence[_Target], result: RepairReport) -> list[_Target]:
    """Apply these states; the targets written (what is poison now is not)."""
    changes = [
        planning.Change(
            key=t.key,
            collection=t.collection,
            source_id=t.source_id,
            document=t.document,
            operation="repair",
            cluster_time=None,
            event=None,
        )
        for t in targets
    ]
    outcome = pipeline.write_changes(changes, lookup=_Distrusting(pipeline.sink))
    poisoned = {p.change.key for p in outcome.poisoned}
    result.failed.add(sorted(poisoned))
    return [t for t in targets if t.key not in poisoned]


def _current(
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


def _exact(doc: Mapping[str, Any] | None) -> bytes | None:
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


# --- dead letters -----------------------------------------------------------------------


@dataclasses.dataclass
class RetryResult:
    retried: int = 0
    fixed: Finding = dataclasses.field(default_factory=Finding)
    failing: Finding = dataclasses.field(default_factory=Finding)

    def to_json(self) -> dict[str, Any]:
        return {
            "retried": self.retried,
            "fixed": self.fixed.to_json(),
            "failing": self.failing.to_json(),
        }


def retry_dead_letters(
    pipeline: Applies,
    letters: DeadLetterStore,
    keys: Sequence[str] | None = None,
    *,
    chunk: int = 100,
    progress: bool = False,
) -> RetryResult:
    """Re-apply dead-lettered documents from their current MongoDB state.

    What applies now leaves the store; what is still poison stays, with its attempt
    count raised and its latest error. A document deleted since is applied as a delete.
    """
    name = pipeline.settings.name
    result = RetryResult()
    if keys is None:
        entries: Iterator[dict[str, Any]] = letters.list(name)
    else:
        entries = (e for e in (letters.get(name, k) for k in keys) if e is not None)
    bar = progress_start(
        "dlq retry",
        enabled=progress,
        pipeline=name,
        total=lambda: len(keys) if keys is not None else letters.count(name),
        unit="dead letters",
    )
    with bar:
        batch: list[dict[str, Any]] = []
        for entry in entries:
            batch.append(entry)
            if len(batch) >= chunk:
                _retry(pipeline, letters, batch, result)
                bar.advance(len(batch))
                batch = []
        if batch:
            _retry(pipeline, letters, batch, result)
            bar.advance(len(batch))
    return result


def _retry(
    pipeline: Applies,
    letters: DeadLetterStore,
    entries: Sequence[Mapping[str, Any]],
    result: RetryResult,
) -> None:
    by_collection: dict[str, list[Any]] = {}
    for entry in entries:
        by_collection.setdefault(entry["collection"], []).append(entry["source_id"])
    current = {
        collection: pipeline.source.fetch(collection, ids)
        for collection, ids in by_collection.items()
    }
    changes = [
        planning.Change(
            key=entry["key"],
            collection=entry["collection"],
            source_id=entry["source_id"],
            document=current[entry["collection"]].get(id_key(entry["source_id"])),
            operation=entry.get("operation") or "retry",
            cluster_time=None,
            event=entry.get("event"),
        )
        for entry in entries
    ]
    outcome = pipeline.write_changes(changes)
    failing = [p.change.key for p in outcome.poisoned]
    fixed = [c.key for c in changes if c.key not in set(failing)]
    name = pipeline.settings.name
    if outcome.poisoned:
        letters.put_many(name, outcome.poisoned)
    if fixed:
        letters.remove(name, fixed)
    result.retried += len(changes)
    result.fixed.add(fixed)
    result.failing.add(failing)
