"""Builds the parts of a process from settings and owns the shared clients.

The CLI holds no logic: every command asks a :class:`Runtime` for the parts it needs
(source, sink, checkpoint store, dead letters, pipelines) and closes it at the end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from syncd import checkpoint, source
from syncd.config import PipelineSettings, Settings

if TYPE_CHECKING:  # the parts that write are imported when they are built: a command that
    # only reads checkpoints (`syncd status`, `tokens show`) loads no Chroma, embedding
    # or tracing client
    from pymongo import MongoClient

    from syncd import sink
    from syncd.applier import Applier
    from syncd.deadletter import DeadLetterStore
    from syncd.embedder import Embedder
    from syncd.pipeline import Pipeline
    from syncd.sink import Sink
    from syncd.telemetry import PipelineTelemetry, Telemetry
    from syncd.unanswered import Unanswered


class Runtime:
    def __init__(self, settings: Settings, telemetry: Telemetry | None = None) -> None:
        self.settings = settings
        self._telemetry = telemetry
        self._mongo: MongoClient[dict[str, Any]] | None = None
        self._chroma: Any = None
        self._store: checkpoint.CheckpointStore | None = None
        self._embedders: dict[str, Embedder | None] = {}

    @property
    def telemetry(self) -> Telemetry:
        """The process's telemetry; without one given, a disabled one made when first asked."""
        if self._telemetry is None:
            from syncd.telemetry import Telemetry

            self._telemetry = Telemetry.disabled()
        return self._telemetry

    @property
    def mongo(self) -> MongoClient[dict[str, Any]]:
        if self._mongo is None:
            self._mongo = source.make_client(self.settings.mongodb)
        return self._mongo

    @property
    def chroma(self) -> Any:
        if self._chroma is None:
            from syncd import sink

            self._chroma = sink.make_client(self.settings.chroma)
        return self._chroma

    @property
    def store(self) -> checkpoint.CheckpointStore:
        if self._store is None:
            self._store = checkpoint.open_store(self.settings.checkpoint, self.mongo)
        return self._store

    def dead_letters(self, pipeline: PipelineSettings) -> DeadLetterStore:
        from syncd.deadletter import DeadLetterStore

        return DeadLetterStore(
            self.mongo, self.settings.checkpoint.database, pipeline.dead_letter_collection
        )

    def source(self, pipeline: PipelineSettings) -> source.ChangeSource:
        return source.ChangeSource(self.mongo, pipeline)

    def sink(
        self,
        pipeline: PipelineSettings,
        *,
        create: bool = True,
        dimensions: int | None = None,
        unanswered: Unanswered | None = None,
    ) -> sink.ChromaSink:
        """The pipeline's collection; Chroma is reached only when it is first used.
        ``unanswered`` notes the records of writes that went unanswered."""
        from syncd import sink

        return sink.ChromaSink(
            lambda: self.chroma,
            pipeline.chroma_collection_name,
            distance=pipeline.distance,
            create=create,
            dimensions=dimensions,
            pipeline=pipeline.name,
            unanswered=unanswered.note if unanswered is not None else None,
        )

    def embedder(self, pipeline: PipelineSettings) -> Embedder | None:
        if pipeline.name not in self._embedders:
            from syncd.embedder import build_embedder

            self._embedders[pipeline.name] = build_embedder(pipeline.embedder)
        return self._embedders[pipeline.name]

    def use_embedder(self, pipeline: str, embedder: Embedder | None) -> None:
        """Give pipeline ``pipeline`` this embedder (a rebuild's, reusing vectors)."""
        self._embedders[pipeline] = embedder

    def pipeline(
        self,
        settings: PipelineSettings,
        *,
        stop: threading.Event | None = None,
        epoch: int | None = 0,
        resync: bool = False,
        telemetry: PipelineTelemetry | None = None,
        heartbeat: Any = None,
        fence: Callable[[], None] | None = None,
    ) -> Pipeline:
        """``fence`` raises LeaseLostError once the pipeline is no longer ours: every
        write to Chroma asks it first (see :class:`syncd.lease.FencedSink`)."""
        from syncd.mapping import Mapper
        from syncd.pipeline import Pipeline
        from syncd.unanswered import Unanswered, settle_delay

        embedder = self.embedder(settings)
        unanswered = Unanswered(settle_delay(self.settings.chroma.timeout_s))
        return Pipeline(
            settings,
            source=self.source(settings),
            sink=self._pipeline_sink(settings, embedder, fence, unanswered),
            unanswered=unanswered,
            store=self.store,
            mapper=Mapper(settings),
            embedder=embedder,
            telemetry=telemetry or self.telemetry.pipeline(settings.name),
            dead_letters=self.dead_letters(settings),
            stop=stop,
            epoch=epoch,
            resync=resync,
            heartbeat=heartbeat,
            traceparent_field=self.settings.telemetry.traceparent_field,
        )

    def applier(self, settings: PipelineSettings) -> Applier:
        """Applies changes outside the streaming loop (``syncd dlq retry``)."""
        from syncd.applier import Applier
        from syncd.mapping import Mapper

        embedder = self.embedder(settings)
        return Applier(
            settings,
            source=self.source(settings),
            sink=self._pipeline_sink(settings, embedder, None),
            mapper=Mapper(settings),
            embedder=embedder,
            telemetry=self.telemetry.pipeline(settings.name),
            dead_letters=self.dead_letters(settings),
        )

    def _pipeline_sink(
        self,
        settings: PipelineSettings,
        embedder: Embedder | None,
        fence: Callable[[], None] | None,
        unanswered: Unanswered | None = None,
    ) -> Sink:
        from syncd.lease import FencedSink

        # A vector read from the document must have embedder.dimensions elements too.
        dimensions = embedder.dimensions if embedder is not None else settings.embedder.dimensions
        chroma = self.sink(settings, dimensions=dimensions, unanswered=unanswered)
        return FencedSink(chroma, fence) if fence is not None else chroma

    def close(self) -> None:
        for embedder in self._embedders.values():
            if embedder is not None:
                embedder.close()
        if self._mongo is not None:
            with source.bookkeeping():  # ends its sessions on a server that may be down
                self._mongo.close()
            self._mongo = None
