"""One pipeline's traces: a span per batch, a child per stage, a short span per change.

The batch span follows the OpenTelemetry messaging conventions for batch consumers:
named ``process <destination>`` (kind CONSUMER), with ``messaging.operation.name``,
``messaging.destination.name`` (the pipeline's namespace) and
``messaging.consumer.group.name`` (the pipeline). It links to the trace whose W3C
``traceparent`` the application stored in each document.

Each stage is a child: ``syncd.read``, ``syncd.map``, ``syncd.lookup`` (the stored
records' hashes, read from Chroma), ``syncd.embed``, ``syncd.write``,
``syncd.checkpoint``. Each sampled change is a ``syncd.change`` child carrying its
``syncd.document_id`` as a string attribute, which is what trace viewers index
(Phoenix's span filter, Jaeger's tag search). A change that is dead-lettered, halts
the pipeline or whose batch fails has status ERROR and the error's class, and so has
the stage where it failed.

Change spans skip the SDK's ``Span`` object: they are built finished
(:class:`~opentelemetry.sdk.trace.ReadableSpan`) when the batch ends and handed to the
exporting processors, about 5 µs each against 40 µs for a started and ended span,
which keeps tracing every change within the overhead budget. For the same reason a
change's identifiers are redacted once (:class:`ChangeIds`) and shared by its span and
its line in the span log.

A checkpoint that only moves an idle position makes no trace: the stage histogram
counts it and a debug line says so; it becomes a span only when it fails.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import bson
from bson import json_util
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from syncd.errors import EmbeddingRejectedError, SinkRejectedError
from syncd.redact import redact_text, redact_value
from syncd.tracing import record_error

if TYPE_CHECKING:
    from syncd.telemetry import Telemetry

log = logging.getLogger("syncd.telemetry")

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_MAX_ERRORS_PER_STAGE = 10  # exception events recorded on one stage span


@dataclass(frozen=True)
class ChangeEventInfo:
    """What telemetry may know about one change event: identifiers, never content."""

    pipeline: str
    namespace: str
    operation: str
    document_id: str  # the encoded record key
    cluster_time: bson.Timestamp | None
    resume_token: str | None  # the token's _data hex
    traceparent: str | None = None  # W3C traceparent stored in the document, if any


class ChangeIds(NamedTuple):
    """A change's identifiers as telemetry shows them: redacted once, used everywhere."""

    document_id: str  # redacted
    cluster_time: str | None  # "time.inc"

    @classmethod
    def of(cls, info: ChangeEventInfo) -> ChangeIds:
        return cls(redact_text(info.document_id), format_timestamp(info.cluster_time))


@dataclass
class _Change:
    span_id: int
    attributes: dict[str, Any]
    link: Link | None
    started: int
    error: BaseException | None = None


@dataclass
class _Batch:
    span: trace.Span
    context: SpanContext
    stages: dict[str, trace.Span] = field(default_factory=dict)  # latest span of each stage
    ended: list[tuple[trace.Span, int]] = field(default_factory=list)  # ended at batch end
    changes: dict[str, _Change] = field(default_factory=dict)  # by document id
    named: bool = True  # whether the span's name carries the destination
    trace_hex: str = ""  # the batch's trace id and span id, for the span log
    span_hex: str = ""
    sampled: bool = False  # whether the batch's changes get spans: some, or all of them
    every: bool = False
    failures: int = 0
    first_failure: BaseException | None = None


def poison_stage(error: BaseException) -> str:
    """The stage a poison error comes from: mapping, unless the embedder or Chroma refused."""
    if isinstance(error, EmbeddingRejectedError):
        return "embed"
    if isinstance(error, SinkRejectedError):
        return "write"
    return "map"


class PipelineSpans:
    """The spans of one pipeline's loop; only its writer thread calls it (the planner
    thread only records a failed read, a root span of its own)."""

    def __init__(self, owner: Telemetry, name: str, namespace: str) -> None:
        self.name = name
        self.namespace = namespace
        self._owner = owner
        self._batch: _Batch | None = None
        self._last_read: tuple[int, int] | None = None  # start and end (ns) of the last read

    @property
    def in_batch(self) -> bool:
        return self._batch is not None

    def batch_attributes(self, size: int) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "syncd.pipeline": self.name,
            "messaging.system": "mongodb",
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            "messaging.consumer.group.name": self.name,
            "messaging.batch.message_count": size,
        }
        if self.namespace:
            attributes["messaging.destination.name"] = self.namespace
        return attributes

    @contextmanager
    def batch(self, size: int) -> Iterator[None]:
        tracer = self._owner.tracer
        read, self._last_read = self._last_read, None
        span = tracer.start_span(
            f"process {self.namespace}" if self.namespace else "process",
            context=Context(),  # a root, whatever span the caller may be in
            kind=SpanKind.CONSUMER,
            attributes=self.batch_attributes(size),
            start_time=read[0] if read else None,
            record_exception=False,  # the SDK's own recording would keep unredacted text
            set_status_on_exception=False,
        )
        context = span.get_span_context()
        batch = _Batch(span, context, named=bool(self.namespace))
        if context.is_valid:
            batch.trace_hex = trace.format_trace_id(context.trace_id)
            batch.span_hex = trace.format_span_id(context.span_id)
        batch.sampled = context.trace_flags.sampled
        batch.every = batch.sampled and self._owner.settings.event_sample_ratio >= 1
        if read is not None:
            parent = trace.set_span_in_context(span)
            tracer.start_span(
                "syncd.read", parent, attributes={"syncd.pipeline": self.name}, start_time=read[0]
            ).end(end_time=read[1])
        self._batch = batch
        try:
            with _current(span):
                yield
        except BaseException as exc:
            record_error(span, exc)
            self._end(batch, exc)
            raise
        else:
            if batch.first_failure is not None:
                self._mark_failed(span, batch.first_failure, batch.failures)
            self._end(batch, None)

    def read_failed(self, started: int, exc: BaseException) -> None:
        """A failed read is a root span of its own (an empty one leaves none)."""
        span = self._owner.tracer.start_span(
            "syncd.read",
            context=Context(),
            attributes={"syncd.pipeline": self.name},
            start_time=started,
            record_exception=False,
            set_status_on_exception=False,
        )
        record_error(span, exc)
        span.end()

    def read_done(self, started: int, ended: int) -> None:
        self._last_read = (started, ended)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        span = self._owner.tracer.start_span(
            f"syncd.{name}",
            attributes={"syncd.pipeline": self.name},
            record_exception=False,
            set_status_on_exception=False,
        )
        batch = self._batch
        try:
            with _current(span):
                yield
        except BaseException as exc:
            record_error(span, exc)
            raise
        finally:
            if batch is None:
                span.end()
            else:  # kept open until the batch ends, so a poisoned change can still mark it
                batch.stages[name] = span
                batch.ended.append((span, time.time_ns()))

    def stage_at(self, name: str, started: int, ended: int, error: BaseException | None) -> None:
        """A stage that ran before the batch opened (planned ahead), as a child of it."""
        span = self._owner.tracer.start_span(
            f"syncd.{name}",
            attributes={"syncd.pipeline": self.name},
            start_time=started,
            record_exception=False,
            set_status_on_exception=False,
        )
        if error is not None:
            record_error(span, error)
        batch = self._batch
        if batch is None:
            span.end(end_time=ended)
        else:  # kept open until the batch ends, so a poisoned change can still mark it
            batch.stages[name] = span
            batch.ended.append((span, ended))

    @contextmanager
    def idle_checkpoint(self) -> Iterator[None]:
        started = time.time_ns()
        try:
            yield
        except BaseException as exc:
            span = self._owner.tracer.start_span(
                "syncd.checkpoint",
                context=Context(),
                attributes={"syncd.pipeline": self.name, "syncd.idle": True},
                start_time=started,
                record_exception=False,
                set_status_on_exception=False,
            )
            record_error(span, exc)
            span.end()
            raise

    def change(
        self, info: ChangeEventInfo, ids: ChangeIds, link: Link | None, content: str | None
    ) -> tuple[str, str] | None:
        """Record a sampled change of the open batch; return its trace and span id (hex).

        Outside a batch (or unsampled) there is no change span; the ids returned are
        then the batch span's, for the span log.
        """
        if not self.namespace:
            self.namespace = info.namespace
        batch = self._batch
        if batch is None:
            return None
        if not batch.every and not (batch.sampled and self._owner.sampled(info.document_id)):
            return (batch.trace_hex, batch.span_hex) if batch.trace_hex else None
        if link is not None:
            batch.span.add_link(link.context, link.attributes)
        attributes = _change_attributes(info, ids, link)
        if content is not None:
            attributes["syncd.document"] = content
        span_id = random.getrandbits(64) or 1
        batch.changes[info.document_id] = _Change(span_id, attributes, link, time.time_ns())
        return batch.trace_hex, format(span_id, "016x")

    def poisoned(self, document_id: str, error: BaseException) -> None:
        """A change of the open batch failed: its span, its stage and the batch say so."""
        batch = self._batch
        if batch is None:
            return
        batch.failures += 1
        batch.first_failure = batch.first_failure or error
        change = batch.changes.get(document_id)
        if change is not None:
            change.error = error
        stage = batch.stages.get(poison_stage(error))
        if stage is not None and batch.failures <= _MAX_ERRORS_PER_STAGE:
            record_error(stage, error)

    def _end(self, batch: _Batch, error: BaseException | None) -> None:
        self._batch = None
        for span, ended in batch.ended:
            span.end(end_time=ended)
        if self.namespace and not batch.named:  # learnt from the batch's first change
            batch.span.update_name(f"process {self.namespace}")
            batch.span.set_attribute("messaging.destination.name", self.namespace)
        batch.span.end()
        if batch.changes:
            self._emit_changes(batch, error)

    def _emit_changes(self, batch: _Batch, batch_error: BaseException | None) -> None:
        processors = self._owner.span_processors
        if not processors:
            return
        ended = time.time_ns()
        resource, scope = self._owner.resource, self._owner.scope
        trace_id, parent = batch.context.trace_id, batch.context
        failed: dict[BaseException, Status] = {}  # one status text per error, not per change
        for change in batch.changes.values():
            error = change.error or batch_error
            attributes = change.attributes
            status = _OK
            if error is not None:
                attributes["error.type"] = type(error).__qualname__
                status = failed.get(error) or failed.setdefault(error, _error_status(error))
            span = ReadableSpan(
                name="syncd.change",
                context=SpanContext(trace_id, change.span_id, False, _SAMPLED),
                parent=parent,
                resource=resource,
                attributes=attributes,
                links=(change.link,) if change.link is not None else (),
                kind=SpanKind.INTERNAL,
                status=status,
                start_time=change.started,
                end_time=ended,
                instrumentation_scope=scope,
            )
            for processor in processors:
                processor.on_end(span)

    @staticmethod
    def _mark_failed(span: trace.Span, error: BaseException, count: int) -> None:
        what = "change" if count == 1 else "changes"
        span.set_attribute("error.type", type(error).__qualname__)
        span.set_status(
            Status(
                StatusCode.ERROR,
                redact_text(f"{count} {what} not applied; first: {type(error).__name__}: {error}"),
            )
        )


_OK = Status(StatusCode.UNSET)


def _error_status(error: BaseException) -> Status:
    return Status(StatusCode.ERROR, redact_text(f"{type(error).__name__}: {error}"))


def _current(span: trace.Span) -> AbstractContextManager[trace.Span]:
    """Make ``span`` current; errors are recorded by :func:`record_error`, redacted."""
    return trace.use_span(
        span, end_on_exit=False, record_exception=False, set_status_on_exception=False
    )


def _change_attributes(info: ChangeEventInfo, ids: ChangeIds, link: Link | None) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "syncd.pipeline": info.pipeline,
        "syncd.document_id": ids.document_id,
        "syncd.operation": info.operation,
    }
    if ids.cluster_time is not None:
        attributes["syncd.cluster_time"] = ids.cluster_time
    if info.resume_token is not None:
        attributes["messaging.message.id"] = info.resume_token
    database, collection = _namespace_parts(info.namespace)
    if database:
        attributes["db.namespace"] = database
    if collection:
        attributes["db.collection.name"] = collection
    if link is not None and info.traceparent:
        # Also as an attribute: not every backend keeps span links (Phoenix drops them).
        attributes["syncd.traceparent"] = info.traceparent.strip()
    return attributes


@functools.lru_cache(maxsize=256)
def _namespace_parts(namespace: str) -> tuple[str, str]:
    database, _, collection = namespace.partition(".")
    return database, collection


CONTENT_LIMIT = 4096  # characters of a document recorded with telemetry.record_content


def document_content(document: Mapping[str, Any]) -> str:
    """The document as relaxed Extended JSON, credentials redacted, cut at CONTENT_LIMIT."""
    # Secret-named fields are masked whole, at any depth, before the text is scrubbed.
    safe = redact_value(document)
    text = redact_text(json_util.dumps(safe, json_options=json_util.RELAXED_JSON_OPTIONS))
    return text if len(text) <= CONTENT_LIMIT else text[:CONTENT_LIMIT] + "..."


def format_timestamp(ts: bson.Timestamp | None) -> str | None:
    return f"{ts.time}.{ts.inc}" if ts is not None else None


def span_log_record(
    info: ChangeEventInfo,
    ids: ChangeIds,
    span: tuple[str, str] | None,
    link: Link | None,
    safe: Callable[[str], str] = redact_text,
) -> dict[str, Any]:
    """A change's line in the local span log (:mod:`syncd.spanlog`), without its outcome.

    Every value is redacted here, so that the span log need not scrub each line again:
    ``ids`` already are, ``safe`` redacts the pipeline and operation (the caller may
    remember its answers), and times and hex ids are syncd's own.
    """
    record: dict[str, Any] = {
        "time": utc_stamp(time.time()),
        "pipeline": safe(info.pipeline),
        "document_id": ids.document_id,
        "operation": safe(info.operation),
        "cluster_time": ids.cluster_time,
        "trace_id": span[0] if span else None,
        "span_id": span[1] if span else None,
    }
    if link is not None:
        record["linked_trace_id"] = trace.format_trace_id(link.context.trace_id)
        record["linked_span_id"] = trace.format_span_id(link.context.span_id)
    return record


def utc_stamp(now: float) -> str:
    """``2026-12-01T16:00:00.123Z``; the part up to the second is formatted once a second."""
    return f"{_utc_second(int(now))}.{int(now % 1 * 1000):03d}Z"


@functools.lru_cache(maxsize=4)
def _utc_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def outcome_of(document_id: str, failed: Mapping[str, BaseException], outcome: str) -> str:
    """A dead-lettered change's outcome names its error; the others share the batch's."""
    error = failed.get(document_id)
    if error is None:
        return outcome
    return f"dead-lettered: {type(error).__name__}" if outcome == "applied" else outcome
