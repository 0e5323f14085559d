"""Repair: make Chroma hold what the pipeline would make of MongoDB now.

Re-applies the documents behind missing and stale records (found by
:mod:`syncd.consistency`) from MongoDB's current state through the pipeline's own
planning code, deletes orphans by id, and re-applies dead letters. Nothing changes
with ``dry_run``.

Repair is safe while the pipeline streams: it writes through
:func:`syncd.settling.apply_until_settled`, which reads each document again after its
write and applies it again while it keeps changing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from syncd import plan as planning
from syncd.consistency import ORPHAN_BATCH, Checker, Drift, Finding, IdIndex, Report
from syncd.deadletter import RetryableDeadLetters
from syncd.identity import base_id
from syncd.progress import Progress
from syncd.progress import start as progress_start
from syncd.settling import SETTLE_TRIES, Applies, Target, apply_until_settled, fetch_current
from syncd.sink import WritePlan
from syncd.source import id_key

log = logging.getLogger(__name__)

__all__ = ["SETTLE_TRIES", "Applies", "RepairReport", "RetryResult", "repair", "retry_dead_letters"]


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
    report = checker.report()
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
        Target(key, collection, doc["_id"], doc)
        for key, (collection, doc) in drift.documents.items()
    ]
    _apply_until_settled(pipeline, targets, result)


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
    current = fetch_current(pipeline, [(c, i) for c, i in (t for t in located.values() if t)])
    targets = []
    for key, target in located.items():
        if target is None:
            continue  # not an id syncd writes: no document, nothing to race with
        collection, source_id = target
        doc = current.get((collection, id_key(source_id)))
        if checker.valid_ids(collection, doc) & by_key[key]:
            targets.append(Target(key, collection, source_id, doc))
    if targets:
        result.changed.add([t.key for t in targets])
        _apply_until_settled(pipeline, targets, result, counted={t.key for t in targets})


def _apply_until_settled(
    pipeline: Applies,
    targets: Sequence[Target],
    result: RepairReport,
    *,
    counted: set[str] | None = None,
) -> None:
    """Apply each document until it holds still (``counted``: keys already reported as
    changed)."""
    settled = apply_until_settled(pipeline, targets)
    result.failed.add(sorted(settled.poisoned_keys))
    result.changed.add([key for key in settled.changed if key not in (counted or ())])
    result.unsettled.add(settled.unsettled)
    if settled.unsettled:
        log.warning(
            "%d document(s) kept changing while repair applied them; left to the running "
            "pipeline, e.g. %s",
            len(settled.unsettled), settled.unsettled[:3],
            extra={"pipeline": pipeline.settings.name},
        )  # fmt: skip


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
    letters: RetryableDeadLetters,
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
    letters: RetryableDeadLetters,
    entries: Sequence[Mapping[str, Any]],
    result: RetryResult,
) -> None:
    current = fetch_current(pipeline, [(e["collection"], e["source_id"]) for e in entries])
    targets = [
        Target(
            key=entry["key"],
            collection=entry["collection"],
            source_id=entry["source_id"],
            document=current.get((entry["collection"], id_key(entry["source_id"]))),
            operation=entry.get("operation") or "retry",
            event=entry.get("event"),
        )
        for entry in entries
    ]
    # The daemon may apply a newer change of the same document meanwhile (and take it
    # off the dead letters): settle, as repair does, so the older state never stays.
    settled = apply_until_settled(pipeline, targets)
    failing = sorted(settled.poisoned_keys)
    fixed = [t.key for t in targets if t.key not in settled.poisoned_keys]
    name = pipeline.settings.name
    if settled.poisoned:
        letters.put_many(name, _latest(settled.poisoned))
    if fixed:
        letters.remove(name, fixed)
    result.retried += len(targets)
    result.fixed.add(fixed)
    result.failing.add(failing)


def _latest(poisoned: Sequence[planning.Poisoned]) -> list[planning.Poisoned]:
    """One entry per key: the last write's error."""
    return list({p.change.key: p for p in poisoned}.values())
