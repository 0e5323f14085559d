"""The initial copy, with a gap-free handover to streaming.

1. Record the stream position *before* scanning
   (:meth:`syncd.checkpointing.Progress.start_snapshot`).
2. Scan each collection in ``_id`` order, a bounded batch at a time, checkpointing
   the last ``_id`` after each batch is in Chroma, so a restart continues the scan
   (with a slow embedder, a batch is written in parts: see :func:`part_size`).
   Into a collection that was empty when the scan began, the records of documents
   not yet reached are known to be absent, and are not looked up (:class:`Ahead`).
3. Remove records whose documents no longer exist (a re-snapshot over old data). Into a
   collection that was empty when the scan began there are none: each record there was
   written by the scan from a document that existed and matched, and whatever happened
   to that document since is in the stream replayed from the position of step 1.
4. Switch to streaming from the recorded position: events that raced the scan are
   replayed, and replay is idempotent.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from syncd import halts
from syncd import plan as planning
from syncd.applier import Applier, Planned
from syncd.checkpoint import Checkpoint, SnapshotProgress
from syncd.checkpointing import Progress as Checkpointing
from syncd.config import PipelineSettings
from syncd.errors import HaltedError, MappingError, SinkLostError
from syncd.identity import base_id, decode_id, record_key, split_key
from syncd.progress import Progress
from syncd.sink import WritePlan, write_size
from syncd.source import Source, id_key
from syncd.staging import ahead, packed_ahead

log = logging.getLogger(__name__)


class Snapshotter:
    """Copies a pipeline's documents through its applier, saving progress as it goes."""

    def __init__(
        self,
        *,
        source: Source,
        applier: Applier,
        checkpoints: Checkpointing,
        stop: threading.Event,
        heartbeat: Callable[[], None] = lambda: None,
        moved: Callable[[], None] = lambda: None,
    ) -> None:
        self.source = source
        self.applier = applier
        self.checkpoints = checkpoints
        self.settings = applier.settings
        self.sink = applier.sink
        self.telemetry = applier.telemetry
        self.stop = stop
        self.heartbeat = heartbeat
        self.moved = moved  # a part was written and checkpointed

    def run(self, cp: Checkpoint) -> None:
        progress = cp.snapshot or SnapshotProgress()
        self._same_collection(cp, progress)
        if progress.collection is None:  # nothing scanned yet (and nothing written)
            progress.empty_ahead = self.sink.count() == 0
            progress.writing_id, progress.has_writing_id = None, False
        collections = self.settings.source_collections
        if progress.collection in collections:
            collections = collections[collections.index(progress.collection) :]
        reporter = Progress(
            "snapshot",
            pipeline=self.settings.name,
            total=self._estimate(self.settings.source_collections),
            unit="documents checkpointed",  # as `syncd status` and the metrics count them
            initial=progress.scanned,
        )
        self.telemetry.snapshot_progress(progress.scanned, reporter.total)
        with self.telemetry.stage("snapshot"), reporter:
            for collection in collections:
                if progress.collection != collection:
                    progress.collection, progress.last_id, progress.has_last_id = (
                        collection,
                        None,
                        False,
                    )
                    # Every part of the collection before is written: nothing pends.
                    progress.writing_id, progress.has_writing_id = None, False
                self._scan(cp, progress, collection, reporter)
                if self.stop.is_set():
                    reporter.close(finished=False)
                    return
            if not progress.empty_ahead:
                self._remove_orphans()
        cp.phase = "streaming"
        cp.snapshot = None
        cp.token = progress.start_token
        cp.token_is_invalidate = False
        cp.start_at = progress.start_at
        self.checkpoints.save(cp, history_reason=f"snapshot complete: {progress.scanned} documents")
        log.info(
            "snapshot complete: %d documents; streaming from the position recorded before it",
            progress.scanned,
            extra={"pipeline": self.settings.name},
        )

    def _same_collection(self, cp: Checkpoint, progress: SnapshotProgress) -> None:
        """Continue a copy only into the collection it was made in.

        If that collection is gone (or was replaced) since, what was copied is gone with
        it. Asked to rebuild (`syncd snapshot`, ``--resync``, ``on_sink_lost =
        "resnapshot"``), the scan starts over in the collection there now, from the same
        recorded stream position; otherwise that is a lost collection (SinkLostError).
        """
        rebuild = self.checkpoints.resync or self.settings.on_sink_lost == "resnapshot"
        known = cp.chroma_collection_id
        current = self.sink.collection_id(create=rebuild or known is None)
        if known is not None and current != known:
            if not rebuild:
                raise SinkLostError(
                    f"the Chroma collection {self.settings.chroma_collection_name!r} of this "
                    "snapshot was deleted or replaced",
                    pipeline=self.settings.name,
                )
            log.warning(
                "the Chroma collection of this snapshot was deleted or replaced since it "
                "began; copying every document again",
                extra={"pipeline": self.settings.name},
            )
            progress.collection, progress.last_id, progress.has_last_id = None, None, False
            progress.scanned = 0
        cp.chroma_collection_id = current

    def _scan(
        self, cp: Checkpoint, progress: SnapshotProgress, collection: str, reporter: Progress
    ) -> None:
        page = page_size(self.settings, self._dimensions(), self.sink.max_batch)
        scan = self.source.scan(
            collection,
            after_id=progress.last_id,
            has_after=progress.has_last_id,
            batch_size=page,
        )
        # Part N+1 is read, mapped and embedded while part N is written.
        known = Ahead(progress)
        pages = ahead(
            parts(scan, part_size(self.settings, page)),
            lambda docs, stage: known.plan(
                docs,
                lambda lookup: packed_ahead(
                    self.applier.plan(
                        [self._change(collection, doc) for doc in docs], stage=stage, lookup=lookup
                    )
                ),
            ),
            name=f"snapshot-{self.settings.name}",
        )
        try:
            for docs, part, stages in pages:
                self.heartbeat()
                self.telemetry.heartbeat()
                for timed in stages:
                    self.telemetry.stage_at(
                        timed.name, timed.started_ns, timed.ended_ns, timed.seconds, timed.error
                    )
                if part.unread:
                    # Say where this write ends before it begins: after a crash in it,
                    # the records up to there are looked up again.
                    progress.writing_id, progress.has_writing_id = docs[-1]["_id"], True
                    cp.snapshot = progress
                    self.checkpoints.save(cp)
                self.applier.write(part.planned, counts=cp.counts, clean_new=True)
                if part.planned.poisoned:
                    self._poisoned(part.planned.poisoned)
                progress.last_id, progress.has_last_id = docs[-1]["_id"], True
                if part.unread or part.settles:
                    progress.writing_id, progress.has_writing_id = None, False
                progress.scanned += len(docs)
                cp.snapshot = progress
                self.checkpoints.save(cp)
                self.moved()
                reporter.update(progress.scanned)
                self.telemetry.snapshot_progress(progress.scanned, reporter.total)
                if self.stop.is_set():
                    return
        finally:
            pages.close()  # stops the planning thread; what it read ahead is read again

    def _dimensions(self) -> int | None:
        """The size of the vectors, when it is known before any is made."""
        embedder = self.applier.embedder
        if embedder is not None:  # an API's is learned from its first answer
            return embedder.dimensions
        return self.settings.embedder.dimensions  # read from the documents: checked

    def _change(self, collection: str, doc: Mapping[str, Any]) -> planning.Change:
        key = record_key(collection, doc["_id"], prefixed=self.applier.prefixed)
        return planning.Change(
            key=key,
            collection=collection,
            source_id=doc["_id"],
            document=doc,
            operation="snapshot",
            cluster_time=None,
            event=None,
        )

    def _poisoned(self, poisoned: list[planning.Poisoned]) -> None:
        if self.applier.dead_lettering:
            self.applier.put_dead_letters(poisoned)
            return
        first = poisoned[0]
        raise HaltedError(
            f"snapshot halted at a document that cannot be applied: {first.error.message}",
            # A daemon's; `syncd snapshot` and `syncd rebuild` name themselves instead.
            hint=halts.hint(self.settings),
            pipeline=self.settings.name,
            document_id=first.change.source_id,
        ) from first.error

    def _remove_orphans(self) -> None:
        """Delete records whose documents are gone or no longer match the filter."""
        removed = 0
        for page in self.sink.scan():
            by_key: dict[str, list[str]] = {}
            for record in page:
                by_key.setdefault(base_id(record.id), []).append(record.id)
            stale = self._stale_keys(list(by_key))
            ids = [rid for key in stale for rid in by_key[key]]
            if ids:
                self.sink.write(WritePlan(deletes=ids))
                removed += len(ids)
        if removed:
            log.info(
                "snapshot removed %d orphaned records",
                removed,
                extra={"pipeline": self.settings.name},
            )

    def _stale_keys(self, keys: list[str]) -> list[str]:
        """Keys whose documents are gone or filtered out, and ids syncd never writes."""
        by_coll: dict[str, list[tuple[str, Any]]] = {}
        stale: list[str] = []
        for key in keys:
            coll, encoded = split_key(
                key, prefixed=self.applier.prefixed, collection=self.settings.collection or ""
            )
            try:
                by_coll.setdefault(coll, []).append((key, decode_id(encoded)))
            except MappingError:
                stale.append(key)  # not a record id syncd writes: not a mirror of anything
        for coll, wanted in by_coll.items():
            if coll not in self.settings.source_collections:
                stale.extend(key for key, _ in wanted)
                continue
            found = self.source.fetch(coll, [source_id for _, source_id in wanted])
            for key, source_id in wanted:
                doc = found.get(id_key(source_id))
                if doc is None or not self.applier.mapper.matches(doc):
                    stale.append(key)
        return stale

    def _estimate(self, collections: list[str]) -> int | None:
        count = getattr(self.source, "count", None)
        if count is None:
            return None
        try:
            return sum(int(count(c)) for c in collections)
        except Exception:  # noqa: BLE001 - an estimate is optional; the scan reports its own errors
            return None


@dataclasses.dataclass
class Part:
    planned: Planned
    unread: bool  # planned without a lookup: no record of its documents is stored
    settles: bool  # it holds the document a crashed write ended at (``writing_id``)


class Ahead:
    """Which parts of a scan need their stored records looked up.

    Only when the collection was empty as the scan began (``empty_ahead``) can a lookup
    be left out, and then only for documents no write has reached. Parts are written
    one at a time, each announced by its last ``_id`` (``writing_id``) before it is
    written, so after a crash only the documents up to that ``_id`` may have records:
    parts are looked up until the one that holds it has been (if that document was
    deleted since, until the collection's end), and not from the next one on.
    """

    def __init__(self, progress: SnapshotProgress) -> None:
        self.empty = progress.empty_ahead
        self.pending = id_key(progress.writing_id) if progress.has_writing_id else None

    def plan(
        self, docs: list[dict[str, Any]], plan: Callable[[planning.ExistingLookup | None], Planned]
    ) -> Part:
        if self.empty and self.pending is None:
            return Part(plan(planning.NOTHING_STORED), unread=True, settles=False)
        settles = self.pending is not None and any(id_key(d["_id"]) == self.pending for d in docs)
        planned = plan(None)  # the sink's lookup
        if settles:
            self.pending = None
        return Part(planned, unread=False, settles=settles)


# Embedders whose texts take noticeable time (a remote API's latency, a local model's
# computation): a page is written in parts of one round of their requests.
_SLOW_EMBEDDERS = frozenset({"openai", "sentence_transformers"})


DEFAULT_PAGE = 1000


def page_size(settings: PipelineSettings, dimensions: int | None, max_batch: int) -> int:
    """Documents a snapshot reads (and, unless :func:`part_size` splits it, writes) at
    once: ``snapshot_batch_size`` if set, else :func:`syncd.sink.write_size` (at least
    1,000); 1,000 when texts are chunked (a document's records are not known before it is
    mapped)."""
    if settings.snapshot_batch_size is not None:
        return settings.snapshot_batch_size
    if settings.mapping.chunk_size:
        return DEFAULT_PAGE
    return write_size(dimensions, max_batch, DEFAULT_PAGE)


def part_size(settings: PipelineSettings, page: int) -> int:
    """Documents written and checkpointed together: a ``page``, or, with a slow embedder,
    one round of embedding requests (``embedder.batch_size`` times ``embed_concurrency``),
    so that the progress of a page being embedded moves (and a restart redoes less of it)
    instead of standing still until the whole page is done."""
    embedder = settings.embedder
    if embedder.kind not in _SLOW_EMBEDDERS:
        return page
    return max(1, min(page, embedder.batch_size * (embedder.embed_concurrency or 1)))


def parts(pages: Iterable[list[dict[str, Any]]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Each page of the scan in parts of at most ``size`` documents, in ``_id`` order, so
    the last ``_id`` of each part is a place to continue from."""
    for page in pages:
        for start in range(0, len(page), size):
            yield page[start : start + size]
