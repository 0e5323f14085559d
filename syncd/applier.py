"""Apply coalesced changes to Chroma: plan, embed, write, read back, settle dead letters.

The one place that turns :class:`~syncd.plan.Change` objects into records in Chroma.
The streaming loop, the snapshot, ``syncd repair`` and ``syncd dlq retry`` all apply
through it; what differs between them is only where the stored records come from
(``lookup``): Chroma itself, Chroma once an in-flight write of the same key is done
(:mod:`syncd.staging`), or Chroma with its hashes distrusted (:mod:`syncd.repair`).

Applying is two steps, so that planning a batch (reading documents, looking up stored
records, embedding) can overlap the write of the batch before it: :meth:`plan` writes
nothing, :meth:`write` does not read MongoDB. :meth:`write_changes` does both.
It never touches the checkpoint: that is :mod:`syncd.checkpointing`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from syncd import identity, lookups
from syncd import plan as planning
from syncd.config import PipelineSettings
from syncd.deadletter import DeadLetters
from syncd.embedder import Embedder
from syncd.errors import SinkRejectedError, SourceFatalError
from syncd.mapping import Mapper
from syncd.sink import Sink, WritePlan, check_written, clear_unwritten
from syncd.telemetry import PipelineTelemetry

log = logging.getLogger(__name__)

Stage = Callable[[str], AbstractContextManager[None]]


@dataclasses.dataclass
class Planned:
    """Changes planned against the records stored when they were looked up."""

    changes: list[planning.Change]  # with the documents the plan was made from
    result: planning.PlanResult

    @property
    def poisoned(self) -> list[planning.Poisoned]:
        return self.result.poisoned


def merged(plans: Sequence[Planned]) -> Planned:
    """One plan that writes all of ``plans``, whose keys must be disjoint: their records
    differ, so the order of the writes among them does not matter."""
    write = WritePlan()
    result = planning.PlanResult(plan=write, poisoned=[], embedded=0, keys_written=[])
    changes: list[planning.Change] = []
    for planned in plans:
        part = planned.result
        write.upserts.extend(part.plan.upserts)
        write.updates.extend(part.plan.updates)
        write.deletes.extend(part.plan.deletes)
        result.poisoned.extend(part.poisoned)
        result.embedded += part.embedded
        result.keys_written.extend(part.keys_written)
        changes.extend(planned.changes)
    return Planned(changes=changes, result=result)


@dataclasses.dataclass
class Embedding:
    """Changes planned but for their vectors, which an embedding API is computing."""

    changes: list[planning.Change]
    drafted: planning.Draft
    write_if_poisoned: bool

    def cancel(self) -> None:
        """Drop the requests not sent yet: the plan is not needed any more."""
        self.drafted.cancel()

    def answered(self) -> bool:
        """Its vectors are all back: finishing it will not wait for the API."""
        pending = self.drafted.pending
        return pending is None or pending.done()


class Applier:
    def __init__(
        self,
        settings: PipelineSettings,
        *,
        source: lookups.Fetcher,
        sink: Sink,
        mapper: Mapper,
        embedder: Embedder | None,
        telemetry: PipelineTelemetry,
        dead_letters: DeadLetters | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.sink = sink
        self.mapper = mapper
        self.embedder = embedder
        self.telemetry = telemetry
        self.dead_letters = dead_letters

    @property
    def prefixed(self) -> bool:
        """Record ids carry their collection (a pipeline with ``collections = [...]``)."""
        return identity.prefixed(self.settings)

    @property
    def dead_lettering(self) -> bool:
        return self.settings.on_error == "dead_letter" and self.dead_letters is not None

    def write_changes(
        self,
        changes: Sequence[planning.Change],
        *,
        write_if_poisoned: bool = True,
        lookup: planning.ExistingLookup | None = None,
        counts: dict[str, int] | None = None,
    ) -> planning.PlanResult:
        """Map, embed and write coalesced changes; poisoned ones are returned, not written.

        An update that came without its document (``full_document = "whenAvailable"``
        without post-images) is applied from the document as it is now: only a delete,
        or a lookup that finds nothing, removes records. Under ``on_error =
        "dead_letter"`` the records of a poisoned document are removed (the caller
        parks the change); dead letters of documents applied here are removed. With
        ``write_if_poisoned`` false, nothing is written when any change is poison (the
        caller halts and writes only what came before it). ``lookup`` says what Chroma
        holds (default: the sink); ``counts`` (the checkpoint's) counts what is applied.
        """
        planned = self.plan(changes, write_if_poisoned=write_if_poisoned, lookup=lookup)
        if planned.poisoned and not write_if_poisoned:
            return planned.result
        self.write(planned, counts=counts, refused_as_poison=write_if_poisoned)
        return planned.result

    def plan(
        self,
        changes: Sequence[planning.Change],
        *,
        write_if_poisoned: bool = True,
        lookup: planning.ExistingLookup | None = None,
        stage: Stage | None = None,
    ) -> Planned:
        """Read what the changes need from MongoDB and Chroma, map and embed; write nothing.

        ``stage`` times the parts (default: the telemetry's stages of the open batch).
        """
        stage = stage or self.telemetry.stage
        lookup = lookup or self.sink
        changes = lookups.with_documents(self.source, changes)
        result = self._build(changes, lookup, stage)
        return self._settle(changes, result, write_if_poisoned, lookup, stage)

    def plan_ahead(
        self,
        changes: Sequence[planning.Change],
        *,
        write_if_poisoned: bool,
        lookup: planning.ExistingLookup,
        stage: Stage,
    ) -> Planned | Embedding:
        """As :meth:`plan`, but texts for an embedding API are only sent: the requests
        run on while the caller goes on, and :meth:`finish` (in the writer, once
        everything before is written) waits for them and completes the plan. A batch
        with a document that cannot be mapped is planned whole, as :meth:`plan` does."""
        changes = lookups.with_documents(self.source, changes)
        drafted = planning.draft(
            changes, mapper=self.mapper, sink=lookup, prefixed=self.prefixed, stage=stage
        )
        if not drafted.poisoned and planning.send(drafted, self.embedder):
            return Embedding(list(changes), drafted, write_if_poisoned)
        result = planning.complete(drafted, embedder=self.embedder, sink=lookup, stage=stage)
        return self._settle(changes, result, write_if_poisoned, lookup, stage)

    def finish(self, embedding: Embedding) -> Planned:
        """Wait for the vectors :meth:`plan_ahead` asked for and complete its plan, in the
        open batch's trace. Everything before it is written, so Chroma itself says what it
        holds when an input the API refused has its document read and planned again."""
        pending = embedding.drafted.pending

        @contextmanager
        def stage(name: str) -> Iterator[None]:
            nonlocal pending
            if name != "embed" or pending is None:
                with self.telemetry.stage(name):
                    yield
                return
            sent, pending = pending, None  # a second plan (after a refusal) times its own
            error: BaseException | None = None
            try:
                yield
            except BaseException as exc:
                error = exc
                raise
            finally:  # the embed stage began when its requests were sent
                seconds, ended = sent.elapsed(), time.time_ns()
                self.telemetry.stage_at("embed", sent.started_ns, ended, seconds, error)

        result = planning.complete(
            embedding.drafted, embedder=self.embedder, sink=self.sink, stage=stage
        )
        return self._settle(
            embedding.changes, result, embedding.write_if_poisoned, self.sink, stage
        )

    def _settle(
        self,
        changes: Sequence[planning.Change],
        result: planning.PlanResult,
        write_if_poisoned: bool,
        lookup: planning.ExistingLookup,
        stage: Stage,
    ) -> Planned:
        """Plan the poisoned documents again from what MongoDB holds now (a newer version
        may map); under dead-lettering, their records are removed."""
        if result.poisoned:
            remove = write_if_poisoned and self.dead_lettering
            bad = {p.change.key for p in result.poisoned}
            changes = lookups.refetched(self.source, changes, bad)
            result = self._build(changes, lookup, stage, remove_poisoned=remove)
        if result.embedded:
            self.telemetry.embedded(result.embedded)
        return Planned(list(changes), result)

    def write(
        self,
        planned: Planned,
        *,
        counts: dict[str, int] | None = None,
        refused_as_poison: bool | None = None,
        clean_new: bool = False,
    ) -> None:
        """Write a plan, read it back under ``consistency = "strong"``, settle dead letters.

        ``clean_new``: read back the metadata of the records upserted (under ``strong``
        every record is) and delete keys the write did not set, which Chroma can hand a
        new record from a deleted collection. A snapshot asks for it: it is how a
        collection lost or deleted is filled again, into the rows the old one left.

        ``counts`` (the checkpoint's, by operation) counts the changes applied. A record
        Chroma refuses alone joins the plan's poisoned with ``refused_as_poison`` (by
        default under dead-lettering), else it is raised (:meth:`_write_refusing`).
        """
        result = planned.result
        if refused_as_poison is None:
            refused_as_poison = self.dead_lettering
        with self.telemetry.stage("write"):
            self._write_refusing(planned, refused_as_poison)
        if self.settings.consistency == "strong":
            with self.telemetry.stage("readback"):
                self.read_back(result.plan)
        elif clean_new and result.plan.upserts:
            with self.telemetry.stage("readback"):
                clear_unwritten(self.sink, result.plan.upserts, pipeline=self.settings.name)
        self._settle_dead_letters(result.keys_written)
        applied = Counter(change.operation for change in planned.changes)
        for operation, n in applied.items():  # one metric update per operation, not per change
            self.telemetry.applied(operation, n)
            if counts is not None:
                counts[operation] = counts.get(operation, 0) + n

    def _write_refusing(self, planned: Planned, as_poison: bool) -> None:
        """Write the plan. A record Chroma refuses alone (too large even for a request of
        its own: :meth:`syncd.sink.ChromaSink.write`) is poison for its document: the rest is
        written without it. With ``as_poison`` it joins the plan's poisoned (the caller
        parks it, or reports it), else the refusal is raised once the rest is written,
        naming the document (a halt). Under dead-lettering its records are removed; else
        they are kept, as a halted pipeline keeps a poison document's old records, unless
        the plan had other records of it (chunks), which may have been written."""
        result = planned.result
        refused: list[planning.Poisoned] = []
        while True:
            try:
                self.sink.write(result.plan)
                break
            except SinkRejectedError as exc:
                change = _refused_change(planned.changes, exc)
                if change is None or any(p.change.key == change.key for p in refused):
                    raise
                exc.document_id = change.source_id
                exc.namespace = f"{self.settings.database}.{change.collection}"
                refused.append(planning.Poisoned(change, exc))
                # Other records of the document (chunks) may have gone out in the halves
                # before the refused one: a document half new, half old must not stay
                # searchable, so its records go whatever on_error says.
                ids = [u.id for u in result.plan.upserts] + [u.id for u in result.plan.updates]
                partial = any(
                    identity.base_id(rid) == change.key and rid != exc.record_id for rid in ids
                )
                remove = self.dead_lettering or partial
                stored = self.sink.existing([change.key]) if remove else {}
                result.plan = _without_document(result.plan, change.key, stored)
        if not refused:
            return
        log.warning(
            "Chroma refused the records of %d document(s), e.g. _id %r: %s",
            len(refused), refused[0].change.source_id, refused[0].error.message,
            extra=_extra(self.settings),
        )  # fmt: skip
        if not as_poison:
            raise refused[0].error
        keys = {p.change.key for p in refused}
        result.poisoned.extend(refused)
        result.keys_written = [key for key in result.keys_written if key not in keys]

    def _build(
        self,
        changes: Sequence[planning.Change],
        lookup: planning.ExistingLookup,
        stage: Stage,
        *,
        remove_poisoned: bool = False,
    ) -> planning.PlanResult:
        return planning.build(
            changes,
            mapper=self.mapper,
            embedder=self.embedder,
            sink=lookup,
            prefixed=self.prefixed,
            stage=stage,
            remove_poisoned=remove_poisoned,
        )

    def read_back(self, plan: WritePlan) -> None:
        """Strong consistency: what Chroma returns must be what was written."""
        check_written(self.sink, plan, pipeline=self.settings.name)

    # --- dead letters ---------------------------------------------------------------

    def put_dead_letters(self, poisoned: Sequence[planning.Poisoned]) -> None:
        """Park poisoned changes (their records were removed when they were planned)."""
        if self.dead_letters is None:
            raise SourceFatalError("no dead-letter store", pipeline=self.settings.name)
        self.dead_letters.put_many(self.settings.name, poisoned)
        self.telemetry.dead_lettered([(p.change.key, p.error) for p in poisoned])

    def _settle_dead_letters(self, written: Sequence[str]) -> None:
        """Remove the dead letters of documents that a later change has now applied."""
        if self.dead_letters is not None and written:
            settled = self.dead_letters.settle(self.settings.name, written)
            if settled:
                log.info(
                    "removed %d dead letter(s): their documents were applied since",
                    settled, extra=_extra(self.settings),
                )  # fmt: skip


def _refused_change(
    changes: Sequence[planning.Change], exc: SinkRejectedError
) -> planning.Change | None:
    """The change whose record Chroma refused alone, if it is one of ``changes``."""
    if exc.record_id is None:
        return None
    key = identity.base_id(exc.record_id)
    return next((change for change in changes if change.key == key), None)


def _without_document(
    plan: WritePlan, key: str, stored: Mapping[str, Mapping[str, Any]]
) -> WritePlan:
    """``plan`` without what it writes or deletes of document ``key``; ``stored``: the
    records it has in Chroma, to delete instead."""
    deletes = [rid for rid in plan.deletes if identity.base_id(rid) != key]
    deletes.extend(stored.get(key, {}))
    return WritePlan(
        upserts=[u for u in plan.upserts if identity.base_id(u.id) != key],
        updates=[u for u in plan.updates if identity.base_id(u.id) != key],
        deletes=deletes,
    )


def _extra(settings: PipelineSettings) -> dict[str, Any]:
    return {"pipeline": settings.name}
