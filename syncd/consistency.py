"""Verify and repair: does Chroma hold what the pipeline would make of MongoDB now?

A full verify streams both sides in constant memory:

1. MongoDB, each source collection in ``_id`` order a page at a time; every document
   the filter matches is mapped, and its records are looked up in Chroma by id. A
   record that is absent is *missing*; one whose content hash, text or metadata
   differs is *stale*. The expected record ids go to an indexed temporary file
   (:class:`IdIndex`), so memory stays flat however large the collection.
2. Chroma, every record a page at a time; a record whose id pass 1 did not expect is
   a candidate, confirmed against MongoDB's current state: its document is gone, no
   longer matches the filter, cannot be mapped, or no longer produces that record id
   (a chunk that should not exist): it is *orphaned*. Only candidates are fetched from
   MongoDB.

A document that cannot be mapped (poison) is reported as *unmappable*, and it should
have no record at all: the pipeline removes what Chroma held of it when it parks the
change as a dead letter, so a record left over is orphaned (and `syncd explain` says
the same of it). Under ``on_error = "halt"`` the record stays until the document is
fixed, and verify reports that drift.

Records are compared by :func:`syncd.compare.differs` (floats as Chroma stores them).

Repair lives in :mod:`syncd.repair`; nothing here changes data.

Embeddings are not compared: checking them means re-embedding every record, which
costs as much as a snapshot. ``syncd_cluster_time`` is not compared either: it says
which event wrote a record, not what the record holds.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pymongo.database import Database

from syncd import halts, hints
from syncd.compare import differs
from syncd.config import PipelineSettings
from syncd.errors import MappingError, PoisonError, SyncdError, translate_mongo_errors
from syncd.halts import Halt
from syncd.identity import base_id, decode_id, in_collection, prefixed, record_key, split_key
from syncd.mapping import MappedDocument, Mapper, Record
from syncd.progress import Progress
from syncd.progress import start as progress_start
from syncd.sink import Sink, StoredRecord
from syncd.snapshot import DEFAULT_PAGE
from syncd.source import id_key

if TYPE_CHECKING:
    from syncd.pipeline import Pipeline
    from syncd.runtime import Runtime

log = logging.getLogger(__name__)

SAMPLE_IDS = 20  # record ids kept per finding, for the report
ORPHAN_BATCH = 10_000  # orphan ids held before deleting them (repair rescans after)


class Sampled(Protocol):
    def aggregate(self, pipeline: Sequence[Mapping[str, Any]], /) -> Iterable[dict[str, Any]]: ...


class SampleDatabase(Protocol):
    """What a sampled verify reads: ``database[collection].aggregate([{"$sample": ...}])``."""

    def __getitem__(self, collection: str, /) -> Sampled: ...


class DocumentSource(Protocol):
    def scan(
        self,
        collection: str,
        *,
        after_id: Any = None,
        has_after: bool = False,
        batch_size: int = 1000,
        query: Mapping[str, Any] | None = None,
    ) -> Iterator[list[dict[str, Any]]]: ...

    def fetch(self, collection: str, ids: list[Any]) -> dict[str, dict[str, Any]]: ...


# --- reports ----------------------------------------------------------------------


@dataclasses.dataclass
class Finding:
    """How many records are in one kind of trouble, and the first few of their ids."""

    count: int = 0
    sample: list[str] = dataclasses.field(default_factory=list)
    limit: int = SAMPLE_IDS

    def add(self, ids: Sequence[str]) -> None:
        self.count += len(ids)
        room = self.limit - len(self.sample)
        if room > 0:
            self.sample.extend(ids[:room])

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "sample": list(self.sample)}


@dataclasses.dataclass
class Report:
    pipeline: str
    sampled: bool = False
    documents: int = 0  # documents that match the filter and were compared
    records: int = 0  # Chroma records examined for orphans
    missing: Finding = dataclasses.field(default_factory=Finding)
    orphaned: Finding = dataclasses.field(default_factory=Finding)
    stale: Finding = dataclasses.field(default_factory=Finding)
    unmappable: Finding = dataclasses.field(default_factory=Finding)  # keys; see `syncd dlq`
    # keys of documents without records whose change is parked as a dead letter
    dead_lettered: Finding = dataclasses.field(default_factory=Finding)
    # keys of documents whose records are missing or stale because the pipeline is halted
    # at their change: not drift, left to the halt (see syncd.halts)
    halted: Finding = dataclasses.field(default_factory=Finding)
    # the halt holding the pipeline when the verify began (Halt.describe()), if any
    halt: dict[str, Any] | None = None
    seconds: float = 0.0

    @property
    def consistent(self) -> bool:
        return not (self.missing.count or self.orphaned.count or self.stale.count)

    def to_json(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "consistent": self.consistent,
            "sampled": self.sampled,
            "documents": self.documents,
            "records": self.records,
            "missing": self.missing.to_json(),
            "orphaned": self.orphaned.to_json(),
            "stale": self.stale.to_json(),
            "unmappable": self.unmappable.to_json(),
            "dead_lettered": self.dead_lettered.to_json(),
            "halted": self.halted.to_json(),
            "halt": self.halt,
            "seconds": round(self.seconds, 3),
        }


@dataclasses.dataclass
class Drift:
    """What one page of the comparison found, with what repair needs to fix it."""

    missing: list[str] = dataclasses.field(default_factory=list)
    stale: list[str] = dataclasses.field(default_factory=list)
    orphaned: list[str] = dataclasses.field(default_factory=list)
    # document key -> (collection, current document): re-applied by repair
    documents: dict[str, tuple[str, Mapping[str, Any]]] = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.missing or self.stale or self.orphaned)


# --- the comparison -------------------------------------------------------------------


class Checker:
    """Compares one pipeline's MongoDB documents with its Chroma records."""

    def __init__(
        self,
        settings: PipelineSettings,
        *,
        source: DocumentSource,
        sink: Sink,
        mapper: Mapper,
        database: SampleDatabase | None = None,
        page_size: int | None = None,
        parked: Callable[[Sequence[str]], set[str]] | None = None,
        halt: Halt | None = None,
    ) -> None:
        self.settings = settings
        # which of some document keys have a dead letter (their records are expected gone)
        self.parked = parked
        # the halt holding the pipeline: its document's records are left to it
        self.halt = halt
        self.source = source
        self.sink = sink
        self.mapper = mapper
        self.database = database  # for $sample; only sampled verifies need it
        self.page_size = page_size or settings.snapshot_batch_size or DEFAULT_PAGE
        self.prefixed = prefixed(settings)

    # --- full verify -----------------------------------------------------------------

    def _set_parked_apart(self, drift: Drift, report: Report) -> None:
        """Documents whose change the pipeline parked as a dead letter (an embedding
        API refused the text, Chroma refused the record) have their records removed on
        purpose: counted as dead-lettered, not missing, and left to `syncd dlq retry`."""
        assert self.parked is not None
        keys = {base_id(rid) for rid in drift.missing}
        parked = self.parked(sorted(keys))
        if not parked:
            return
        drift.missing = [rid for rid in drift.missing if base_id(rid) not in parked]
        still = set(map(base_id, drift.missing)) | set(map(base_id, drift.stale))
        for key in parked:
            if key not in still:
                drift.documents.pop(key, None)
        report.dead_lettered.add(sorted(parked))

    def report(self, *, sampled: bool = False) -> Report:
        """An empty report of this pipeline, with the halt holding it, if any."""
        halt = self.halt.describe() if self.halt is not None else None
        return Report(self.settings.name, sampled=sampled, halt=halt)

    def _set_halted_apart(self, drift: Drift, report: Report, key: str) -> None:
        """The document the pipeline is halted at keeps what Chroma held before its
        change (or nothing): counted as halted, not missing or stale, and left to the
        halt, which applies it once lifted (re-applying it here would fail the same way)."""
        held = [rid for rid in drift.missing + drift.stale if base_id(rid) == key]
        if not held:
            return
        drift.missing = [rid for rid in drift.missing if base_id(rid) != key]
        drift.stale = [rid for rid in drift.stale if base_id(rid) != key]
        drift.documents.pop(key, None)
        report.halted.add([key])

    def verify(self, *, progress: bool = False) -> Report:
        """Compare everything; ``progress``: show it (a bar on a terminal, else log lines)."""
        started = time.monotonic()
        report = self.report()
        with IdIndex() as index:
            with self.progress("verify", progress) as bar:
                for collection, docs in self.documents():
                    self.compare_documents(collection, docs, report, index=index)
                    bar.advance(len(docs))
            with self.progress("verify records", progress, unit="records") as bar:
                for _ in self.orphans(report, index, progress=bar):
                    pass  # counted in the report
        report.seconds = time.monotonic() - started
        return report

    def progress(self, operation: str, enabled: bool, *, unit: str = "documents") -> Progress:
        """Progress over the source documents, or (``unit="records"``) the Chroma records."""

        def total() -> int | None:
            if unit == "records":
                return self.sink.count()
            count = getattr(self.source, "count", None)
            return sum(count(c) for c in self.settings.source_collections) if count else None

        return progress_start(
            operation, enabled=enabled, pipeline=self.settings.name, total=total, unit=unit
        )

    def documents(self) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        for collection in self.settings.source_collections:
            for docs in self.source.scan(collection, batch_size=self.page_size):
                yield collection, docs

    def compare_documents(
        self,
        collection: str,
        docs: Sequence[Mapping[str, Any]],
        report: Report,
        *,
        extra_records: bool = False,
        index: IdIndex | None = None,
    ) -> Drift:
        """Missing and stale records of these documents (and, if asked, their extra ones).

        ``index`` collects the record ids these documents should have, for :meth:`orphans`.
        """
        drift = Drift()
        expected: dict[str, Record] = {}
        keys: list[str] = []
        for doc in docs:
            if not self.mapper.matches(doc):
                continue
            report.documents += 1
            key = record_key(collection, doc["_id"], prefixed=self.prefixed)
            keys.append(key)
            try:
                mapped = self.expected(collection, doc)
            except PoisonError:
                report.unmappable.add([key])
                continue
            for record in mapped.records:
                expected[record.id] = record
                drift.documents[key] = (collection, doc)
        if index is not None:
            index.add(list(expected))
        stored = {r.id: r for r in self.sink.get(list(expected))} if expected else {}
        for rid, record in expected.items():
            got = stored.get(rid)
            if got is None:
                drift.missing.append(rid)
            elif differs(record, got):
                drift.stale.append(rid)
        if drift.missing and self.parked is not None:
            self._set_parked_apart(drift, report)
        if self.halt is not None and self.halt.has_document:
            self._set_halted_apart(drift, report, self.halt.key or "")
        if extra_records and keys:
            existing = self.sink.existing(keys)
            # A sampled verify examines exactly these Chroma records (a full verify
            # counts the records of its own scan instead).
            report.records += sum(len(records) for records in existing.values())
            for records in existing.values():
                drift.orphaned.extend(rid for rid in records if rid not in expected)
        wanted = {base_id(rid) for rid in drift.missing + drift.stale + drift.orphaned}
        drift.documents = {k: v for k, v in drift.documents.items() if k in wanted}
        report.missing.add(drift.missing)
        report.stale.add(drift.stale)
        report.orphaned.add(drift.orphaned)
        return drift

    def orphans(
        self, report: Report, index: IdIndex, *, progress: Progress | None = None
    ) -> Iterator[list[str]]:
        """Orphaned record ids, a page of Chroma at a time."""
        for page in self.sink.scan(self.page_size):
            report.records += len(page)
            if progress is not None:
                progress.update(report.records)
            known = index.known([r.id for r in page])
            candidates = [r for r in page if r.id not in known]
            found = self.orphans_among(candidates) if candidates else []
            report.orphaned.add(found)
            if found:
                yield found

    def orphans_among(self, records: Sequence[StoredRecord]) -> list[str]:
        by_key: dict[str, list[str]] = {}
        for record in records:
            by_key.setdefault(base_id(record.id), []).append(record.id)
        wanted: dict[str, list[tuple[str, Any]]] = {}
        orphans: list[str] = []
        for key, ids in by_key.items():
            target = self.locate(key)
            if target is None:
                orphans.extend(ids)  # not an id syncd writes, or not one of our collections
            else:
                wanted.setdefault(target[0], []).append((key, target[1]))
        for collection, items in wanted.items():
            found = self.source.fetch(collection, [source_id for _, source_id in items])
            for key, source_id in items:
                valid = self.valid_ids(collection, found.get(id_key(source_id)))
                orphans.extend(rid for rid in by_key[key] if rid not in valid)
        return orphans

    def valid_ids(self, collection: str, doc: Mapping[str, Any] | None) -> set[str]:
        """Record ids the document should have: none when it cannot be mapped."""
        if doc is None or not self.mapper.matches(doc):
            return set()
        try:
            return {r.id for r in self.expected(collection, doc).records}
        except PoisonError:
            return set()

    def locate(self, key: str) -> tuple[str, Any] | None:
        collection, encoded = split_key(
            key, prefixed=self.prefixed, collection=self.settings.collection or ""
        )
        if collection not in self.settings.source_collections:
            return None
        try:
            return collection, decode_id(encoded)
        except MappingError:
            return None

    def expected(self, collection: str, doc: Mapping[str, Any]) -> MappedDocument:
        mapped = self.mapper.map(doc)
        if not self.prefixed:
            return mapped
        key = record_key(collection, doc["_id"], prefixed=True)
        return in_collection(mapped, key, collection)

    # --- sampled verify ---------------------------------------------------------------

    def sample(self, size: int) -> Report:
        """Compare ``size`` random documents (spread over the source collections).

        Finds missing and stale records and extra chunks of those documents; records of
        deleted documents are found only by a full verify.
        """
        started = time.monotonic()
        report = self.report(sampled=True)
        for collection, docs in self.sample_documents(size):
            self.compare_documents(collection, docs, report, extra_records=True)
        report.seconds = time.monotonic() - started
        return report

    def sample_documents(self, size: int) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        if self.database is None:
            raise ValueError("a sampled verify needs the MongoDB database")
        collections = self.settings.source_collections
        share = max(1, size // len(collections))
        for collection in collections:
            with translate_mongo_errors(pipeline=self.settings.name):
                docs = list(self.database[collection].aggregate([{"$sample": {"size": share}}]))
            yield collection, docs

    def recheck(self, drift: Drift) -> Report:
        """Look again at only what ``drift`` named; what still differs is real drift."""
        report = self.report(sampled=True)
        keys = {base_id(rid) for rid in drift.missing + drift.stale}
        wanted: dict[str, list[Any]] = {}
        for key in keys:
            target = self.locate(key)
            if target is not None:
                wanted.setdefault(target[0], []).append(target[1])
        for collection, ids in wanted.items():
            docs = list(self.source.fetch(collection, ids).values())
            self.compare_documents(collection, docs, report, extra_records=True)
        if drift.orphaned:
            report.orphaned.add(self.orphans_among(self.sink.get(drift.orphaned)))
        return report


class IdIndex:
    """A set of strings in an indexed temporary SQLite file: flat memory at any size."""

    SLICE = 500  # bound parameters per query

    def __enter__(self) -> IdIndex:
        self._dir = tempfile.TemporaryDirectory(prefix="syncd-verify-")
        self._db = sqlite3.connect(f"{self._dir.name}/ids.sqlite")
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.execute("CREATE TABLE ids (id TEXT PRIMARY KEY) WITHOUT ROWID")
        return self

    def __exit__(self, *exc: object) -> None:
        self._db.close()
        self._dir.cleanup()

    def add(self, ids: Sequence[str]) -> None:
        self._db.executemany("INSERT OR IGNORE INTO ids VALUES (?)", [(i,) for i in ids])

    def known(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(ids), self.SLICE):
            part = list(ids[start : start + self.SLICE])
            marks = ",".join("?" * len(part))
            query = f"SELECT id FROM ids WHERE id IN ({marks})"
            found.update(row[0] for row in self._db.execute(query, part))
        return found


# --- periodic sampled verify (runs inside the daemon) ------------------------------------


def sample_forever(
    pipeline: Pipeline,
    database: Database[dict[str, Any]],
    *,
    every_s: float,
    size: int,
    stop: threading.Event,
    settle_s: float = 30.0,
) -> None:
    """Verify a random sample every ``every_s`` seconds and report drift to telemetry.

    A change that is still in flight looks like drift, so candidates are checked a
    second time once the pipeline's checkpoint has passed the moment the sample was
    taken; only what still differs is reported. Rounds that cannot settle (the
    pipeline is behind or retrying) report nothing. Meant for a daemon thread.
    """
    checker = pipeline_checker(pipeline, database)
    rng = random.Random()
    # Spread the first round so several pipelines do not sample at the same instant.
    if stop.wait(rng.uniform(0.5, 1.0) * every_s):
        return
    while not stop.is_set():
        try:
            report = sample_once(pipeline, checker, size=size, settle_s=settle_s, stop=stop)
        except SyncdError as exc:
            log.warning(
                "sampled verify skipped: %s", exc, extra={"pipeline": pipeline.settings.name}
            )
        else:
            if report is not None:
                pipeline.telemetry.drift(
                    report.missing.count, report.orphaned.count, report.stale.count
                )
                if not report.consistent:
                    log.warning(
                        "sampled verify found drift: %d missing, %d orphaned, %d stale "
                        "(e.g. %s); run `%s`",
                        report.missing.count,
                        report.orphaned.count,
                        report.stale.count,
                        (report.missing.sample + report.stale.sample + report.orphaned.sample)[:3],
                        hints.command("verify", pipeline.settings.name),
                        extra={"pipeline": pipeline.settings.name},
                    )
        stop.wait(every_s)


def sample_once(
    pipeline: Pipeline,
    checker: Checker,
    *,
    size: int,
    settle_s: float,
    stop: threading.Event,
) -> Report | None:
    """One sampled round: the confirmed drift, or None if the pipeline did not settle."""
    taken_at = pipeline.source.server_time()
    first = Report(pipeline.settings.name, sampled=True)
    drift = Drift()
    for collection, docs in checker.sample_documents(size):
        page = checker.compare_documents(collection, docs, first, extra_records=True)
        drift.missing += page.missing
        drift.stale += page.stale
        drift.orphaned += page.orphaned
    if not drift:
        return first
    deadline = time.monotonic() + settle_s
    while not _passed(pipeline, taken_at):
        if time.monotonic() > deadline or stop.wait(0.5):
            return None
    confirmed = checker.recheck(drift)
    confirmed.documents = first.documents
    return confirmed


def _passed(pipeline: Pipeline, taken_at: Any) -> bool:
    cp = pipeline.checkpoint
    if cp is None or cp.phase != "streaming" or cp.cluster_time is None:
        return False
    return taken_at is None or bool(cp.cluster_time >= taken_at)


def pipeline_checker(
    pipeline: Pipeline, database: Database[dict[str, Any]] | None = None
) -> Checker:
    """A checker over a running pipeline's own source, sink and mapping (``database``:
    for sampled verifies)."""
    store = pipeline.dead_letters
    return Checker(
        pipeline.settings,
        source=pipeline.source,
        sink=pipeline.sink,
        mapper=pipeline.mapper,
        database=database,
        parked=functools.partial(store.parked, pipeline.settings.name) if store else None,
    )


def open_checker(runtime: Runtime, settings: PipelineSettings) -> Checker:
    """A checker over the runtime's clients; the Chroma collection must already exist."""
    return Checker(
        settings,
        source=runtime.source(settings),
        sink=runtime.sink(settings, create=False),
        mapper=Mapper(settings),
        database=runtime.mongo[settings.database],
        parked=functools.partial(runtime.dead_letters(settings).parked, settings.name),
        halt=halts.active(runtime.store.load(settings.name)),
    )
