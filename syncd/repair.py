"""Repair: make Chroma hold what the pipeline would make of MongoDB now.

Re-applies the documents behind missing and stale records (found by
:mod:`syncd.consistency`) from MongoDB's current state through the pipeline's own
planning code, deletes orphans by id, and re-applies dead letters. Nothing changes
with ``dry_run``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

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

    def to_json(self) -> dict[str, Any]:
        return {
            "pipeline": self.verify.pipeline,
            "dry_run": self.dry_run,  # true: reapply and delete say what would be done
            "found": self.verify.to_json(),
            "reapply": self.reapplied.to_json(),
            "delete": self.deleted.to_json(),
            "failed": self.failed.to_json(),
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
        if complete:
            report.records = scan.records
            return


def _reapply(pipeline: Applies, drift: Drift, result: RepairReport) -> None:
    changes = [
        planning.Change(
            key=key,
            collection=collection,
            source_id=doc["_id"],
            document=doc,
            operation="repair",
            cluster_time=None,
            event=None,
        )
        for key, (collection, doc) in drift.documents.items()
    ]
    outcome = pipeline.write_changes(changes, lookup=_Distrusting(pipeline.sink, drift.stored))
    result.failed.add([p.change.key for p in outcome.poisoned])


class _Distrusting:
    """Chroma's stored records, with the stale ones offered without their hashes.

    The planner skips records whose stored hashes match; a record altered in Chroma
    behind syncd's back may still carry the right hashes. Without them it is planned
    as a full rewrite, and keys it should not have are sent as ``None`` (Chroma
    merges metadata on upsert).
    """

    def __init__(self, sink: Sink, stored: Mapping[str, Mapping[str, Any]]) -> None:
        self._sink = sink
        self._stored = stored

    def existing(self, keys: Sequence[str]) -> dict[str, dict[str, Mapping[str, Any]]]:
        found = self._sink.existing(keys)
        wanted = set(keys)
        for rid, metadata in self._stored.items():
            if base_id(rid) in wanted:
                untrusted = {
                    k: v for k, v in metadata.items() if k not in (HASH_KEY, TEXT_HASH_KEY)
                }
                found.setdefault(base_id(rid), {})[rid] = untrusted
        return found


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
