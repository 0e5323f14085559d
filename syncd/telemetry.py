"""Traces, metrics, health and the local span log, behind one object the pipeline calls.

Everything here is optional: :meth:`Telemetry.disabled` returns an instance whose
spans go nowhere and that opens no port and no file, and the pipeline behaves the
same with it.

Traces: one root span ``syncd.batch`` (kind CONSUMER) per batch, a child span per
stage (``syncd.read``, ``syncd.map``, ``syncd.embed``, ``syncd.write``,
``syncd.checkpoint``, ...) and, for a sampled share of events, a ``syncd.event`` span
event on the batch span with the change's identifiers. As the messaging conventions
have it for batch processing, the batch span links to the trace whose W3C
``traceparent`` the application stored in each document (exporters:
:mod:`syncd.tracing`). Span events rather than a span per change: a span costs the SDK
several times what an event does, and at thousands of changes a second that is the
difference between tracing being affordable or not. No span attribute carries
credentials or document content unless ``telemetry.record_content`` is on.

Metrics (:class:`syncd.health.Metrics`) live on a registry owned by the instance and
are served with ``/healthz`` and ``/readyz`` by :class:`syncd.health.HealthServer`.
Every event's identifiers and trace ids also go to the local span log
(:mod:`syncd.spanlog`) with the outcome of its batch.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import bson
from bson import json_util
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from syncd import __version__
from syncd.config import Settings, TelemetrySettings
from syncd.errors import classify
from syncd.health import HealthServer, Metrics
from syncd.redact import redact_text
from syncd.spanlog import SpanLog
from syncd.tracing import record_error, remote_link, tracer_provider

log = logging.getLogger("syncd.telemetry")

STATES = ("starting", "snapshotting", "streaming", "retrying", "halted", "stopped")
_READY_STATES = frozenset({"snapshotting", "streaming"})
_LOOP_STATES = frozenset({"starting", "snapshotting", "streaming", "retrying"})


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


class PipelineTelemetry:
    """Telemetry for one pipeline; safe to call from its loop and from the HTTP thread."""

    def __init__(self, owner: Telemetry, name: str, namespace: str) -> None:
        self.name = name
        self._owner = owner
        self._namespace = namespace
        self._metrics = owner.metrics
        self._lock = threading.Lock()
        self._state = "starting"
        self._reason: str | None = None
        self._before_retry = "streaming"
        self._attempts = 0
        self._repeats: dict[str, tuple[float, int]] = {}  # error message -> (logged at, since)
        self._last_beat = time.monotonic()
        self._last_checkpoint: float | None = None
        self._checkpoint_time: int | None = None  # cluster time (s) of the stored checkpoint
        self._pending: list[dict[str, Any]] | None = None  # span log records of the open batch
        self._batch_span: trace.Span | None = None  # the open batch's span
        self._last_read: tuple[int, int] | None = None  # start and end (ns) of the last read
        self._show_state()
        self._metrics.ready.labels(name).set_function(lambda: float(self.ready()))
        self._metrics.heartbeat_age.labels(name).set_function(
            lambda: time.monotonic() - self._last_beat
        )

    # --- traces ------------------------------------------------------------

    @contextmanager
    def batch(self, size: int) -> Iterator[None]:
        attributes: dict[str, Any] = {
            "syncd.pipeline": self.name,
            "messaging.system": "mongodb",
            "messaging.operation.type": "process",
            "messaging.batch.message_count": size,
        }
        if self._namespace:
            attributes["messaging.destination.name"] = self._namespace
        read, self._last_read = self._last_read, None
        with self._owner.tracer.start_as_current_span(
            "syncd.batch",
            context=Context(),  # a root, whatever span the caller may be in
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            start_time=read[0] if read else None,
            record_exception=False,  # the SDK's own recording would keep unredacted text
            set_status_on_exception=False,
        ) as span:
            if read is not None:
                self._owner.tracer.start_span(
                    "syncd.read", attributes={"syncd.pipeline": self.name}, start_time=read[0]
                ).end(end_time=read[1])
            self._pending = []
            self._batch_span = span
            try:
                yield
            except BaseException as exc:
                record_error(span, exc)
                self._write_span_log(f"failed: {type(exc).__name__}")
                raise
            else:
                self._write_span_log("applied")
            finally:
                self._batch_span = None
                if self._namespace and "messaging.destination.name" not in attributes:
                    span.set_attribute("messaging.destination.name", self._namespace)

    @contextmanager
    def read(self) -> Iterator[None]:
        """Time a read of the change stream; the next :meth:`batch` gets it as a child span.

        The batch size is known only after the read, so its span is recorded afterwards.
        An empty read leaves no span (an idle stream would otherwise make a trace every
        ``batch_max_wait_ms``); a failed read is a root span of its own.
        """
        self._last_read = None
        started = time.time_ns()
        try:
            yield
        except BaseException as exc:
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
            raise
        self._last_read = (started, time.time_ns())

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with self._owner.tracer.start_as_current_span(
            f"syncd.{name}",
            attributes={"syncd.pipeline": self.name},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            except BaseException as exc:
                record_error(span, exc)
                raise

    def event(self, info: ChangeEventInfo, document: Any = None) -> None:
        """Record one change of the open batch: a span event and a link on the batch span.

        Outside a batch, the event goes to the current span, if any. ``document`` (the
        change's full document) is recorded only when ``telemetry.record_content`` is on.
        """
        if not self._namespace:
            self._namespace = info.namespace
        link = remote_link(info.traceparent)
        span = self._batch_span or trace.get_current_span()
        if span.is_recording() and self._owner.sampled(info.document_id):
            attributes = _event_attributes(info, link)
            if isinstance(document, Mapping) and self._owner.settings.record_content:
                attributes["syncd.document"] = _content(document)
            span.add_event("syncd.event", attributes=attributes)
            if link is not None:
                span.add_link(link.context, link.attributes)
        self._log_event(info, span.get_span_context(), link)

    # --- metrics -----------------------------------------------------------

    def applied(self, operation: str, count: int) -> None:
        self._metrics.applied.labels(self.name, operation).inc(count)

    def batch_done(self, size: int, seconds: float) -> None:
        self._metrics.batch_size.labels(self.name).observe(size)
        self._metrics.batch_seconds.labels(self.name).observe(seconds)

    def lag(self, cluster_time: bson.Timestamp) -> None:
        self._metrics.lag.labels(self.name).set(max(0.0, time.time() - cluster_time.time))

    def checkpointed(self, cluster_time: bson.Timestamp | None) -> None:
        if cluster_time is not None:
            self._metrics.checkpoint_ts.labels(self.name).set(cluster_time.time)
            self._checkpoint_time = cluster_time.time
            self.refresh_headroom()
        if self._last_checkpoint is None:
            self._metrics.checkpoint_age.labels(self.name).set_function(
                lambda: time.monotonic() - (self._last_checkpoint or 0.0)
            )
        self._last_checkpoint = time.monotonic()

    def refresh_headroom(self) -> None:
        """How long until the checkpoint would leave the oplog: its age above the oldest entry."""
        start = self._owner.oplog_start
        if start is not None and self._checkpoint_time is not None:
            self._metrics.headroom.labels(self.name).set(self._checkpoint_time - start)

    def dead_lettered(self, count: int) -> None:
        self._metrics.dead_letters.labels(self.name).inc(count)

    def embedded(self, inputs: int) -> None:
        self._metrics.embedding_inputs.labels(self.name).inc(inputs)

    def drift(self, missing: int, orphaned: int, stale: int) -> None:
        for kind, count in (("missing", missing), ("orphaned", orphaned), ("stale", stale)):
            self._metrics.drift.labels(self.name, kind).set(count)

    # --- state -------------------------------------------------------------

    def retrying(self, error: BaseException, attempt: int, delay: float) -> None:
        message = redact_text(f"{type(error).__name__}: {error}")
        kind = classify(error).value
        self._metrics.retries.labels(self.name, kind).inc()
        with self._lock:
            if self._state != "retrying":
                self._before_retry = self._state if self._state in _READY_STATES else "streaming"
                self._state = "retrying"
            self._reason = message
            self._attempts += 1
            repeats = self._count_repeat(message)
        self._show_state()
        if repeats is None:
            return
        suffix = f" (repeated {repeats} times since last logged)" if repeats else ""
        log.warning(
            "retrying in %.1fs after %s error: %s%s",
            delay, kind, message, suffix,
            extra={"pipeline": self.name, "attempt": attempt, "delay_s": round(delay, 3)},
        )  # fmt: skip

    def recovered(self) -> None:
        with self._lock:
            if self._state != "retrying":
                return
            attempts, self._attempts = self._attempts, 0
            self._state, self._reason = self._before_retry, None
            self._repeats.clear()
        self._show_state()
        log.info(
            "recovered after %d attempt%s", attempts, "" if attempts == 1 else "s",
            extra={"pipeline": self.name, "attempts": attempts},
        )  # fmt: skip

    def set_state(self, state: str, error: BaseException | None = None) -> None:
        if state not in STATES:
            raise ValueError(f"unknown pipeline state {state!r}; expected one of {STATES}")
        with self._lock:
            previous = self._state
            if state == "retrying" and previous != "retrying":
                self._before_retry = previous if previous in _READY_STATES else "streaming"
            self._state = state
            self._reason = redact_text(f"{type(error).__name__}: {error}") if error else None
            if state != "retrying":
                self._attempts = 0
        self._show_state()
        if previous != state:
            log.info(
                "pipeline %s -> %s%s", previous, state, f": {self._reason}" if self._reason else "",
                extra={"pipeline": self.name, "state": state},
            )  # fmt: skip

    def heartbeat(self) -> None:
        self._last_beat = time.monotonic()

    def ready(self) -> bool:
        return self._state in _READY_STATES

    def healthy(self, timeout_s: float) -> bool:
        """Stale only while the loop should be running: halted or stopped loops stay quiet."""
        return self._state not in _LOOP_STATES or time.monotonic() - self._last_beat <= timeout_s

    def status(self) -> dict[str, Any]:
        with self._lock:
            status: dict[str, Any] = {
                "state": self._state,
                "ready": self._state in _READY_STATES,
                "heartbeat_age_s": round(time.monotonic() - self._last_beat, 3),
            }
            if self._reason:
                status["reason"] = self._reason
            if self._state == "retrying":
                status["attempts"] = self._attempts
        return status

    # --- internals ---------------------------------------------------------

    def _show_state(self) -> None:
        for state in STATES:
            self._metrics.state.labels(self.name, state).set(1 if state == self._state else 0)

    def _count_repeat(self, message: str) -> int | None:
        """None when this message was logged recently; else how often it was held back."""
        now = time.monotonic()
        logged_at, held_back = self._repeats.get(message, (None, 0))
        if logged_at is not None and now - logged_at < self._owner.settings.retry_log_interval_s:
            self._repeats[message] = (logged_at, held_back + 1)
            return None
        if len(self._repeats) > 100:  # many distinct messages: forget the old ones
            self._repeats.clear()
        self._repeats[message] = (now, 0)
        return held_back

    def _log_event(self, info: ChangeEventInfo, context: SpanContext, link: Link | None) -> None:
        if self._owner.span_log is None:
            return
        record: dict[str, Any] = {
            "time": _now_iso(),
            "pipeline": self.name,
            "document_id": info.document_id,
            "operation": info.operation,
            "cluster_time": _format_timestamp(info.cluster_time),
            "trace_id": trace.format_trace_id(context.trace_id) if context.is_valid else None,
            "span_id": trace.format_span_id(context.span_id) if context.is_valid else None,
        }
        if link is not None:
            record["linked_trace_id"] = trace.format_trace_id(link.context.trace_id)
            record["linked_span_id"] = trace.format_span_id(link.context.span_id)
        if self._pending is not None:
            self._pending.append(record)
        else:
            self._owner.write_span_log([{**record, "outcome": "seen"}])

    def _write_span_log(self, outcome: str) -> None:
        pending, self._pending = self._pending, None
        if pending:
            self._owner.write_span_log([{**record, "outcome": outcome} for record in pending])


class Telemetry:
    def __init__(self, settings: Settings, *, span_exporter: SpanExporter | None = None) -> None:
        """``span_exporter`` adds an exporter to the configured ones (tests use it)."""
        self.settings: TelemetrySettings = settings.telemetry
        self._namespaces = {p.name: p.namespace for p in settings.pipelines}
        self._enabled = True
        self._extra_exporter = span_exporter
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.tracer: trace.Tracer = trace.NoOpTracer()
        self.span_log: SpanLog | None = None
        self._provider: TracerProvider | None = None
        self._server: HealthServer | None = None
        self._pipelines: dict[str, PipelineTelemetry] = {}
        self._lock = threading.Lock()
        self._span_log_warned = -60.0
        self.oplog_start: int | None = None  # time (s) of the oldest oplog entry, when readable

    @classmethod
    def disabled(cls) -> Telemetry:
        """No spans, no listener, no span log; state and counters still work in memory."""
        off = TelemetrySettings(listen="", traces="none", span_log_path="")
        telemetry = cls(Settings.model_construct(telemetry=off, pipelines=[]))
        telemetry._enabled = False
        return telemetry

    def start(self) -> None:
        if not self._enabled or self._provider is not None or self._server is not None:
            return
        self._provider = tracer_provider(self.settings, self._extra_exporter)
        if self._provider is not None:
            self.tracer = self._provider.get_tracer("syncd", __version__)
        if self.settings.span_log_path and self.settings.span_log_max_bytes:
            self.span_log = SpanLog(self.settings.span_log_path, self.settings.span_log_max_bytes)
        if self.settings.listen:
            host, _, port = self.settings.listen.rpartition(":")
            self._server = HealthServer(self, host, int(port))
            self._server.start()
            log.info("serving /metrics, /healthz and /readyz on %s", self._server.url)

    def shutdown(self) -> None:
        provider, server, span_log = self._provider, self._server, self.span_log
        self._provider = self._server = self.span_log = None
        self.tracer = trace.NoOpTracer()
        if provider is not None:
            provider.force_flush(timeout_millis=10_000)
            provider.shutdown()
        if server is not None:
            server.stop()
        if span_log is not None:
            span_log.close()

    def force_flush(self, timeout_millis: int = 10_000) -> bool:
        return self._provider.force_flush(timeout_millis) if self._provider else True

    def pipeline(self, name: str) -> PipelineTelemetry:
        with self._lock:
            if name not in self._pipelines:
                namespace = self._namespaces.get(name, "")
                self._pipelines[name] = PipelineTelemetry(self, name, namespace)
            return self._pipelines[name]

    def process_ready(self) -> bool:
        pipelines = list(self._pipelines.values())
        return bool(pipelines) and all(p.ready() for p in pipelines)

    def oplog_window(self, oldest: bson.Timestamp | None) -> None:
        """Record where the oplog starts; every pipeline's headroom follows from it."""
        self.oplog_start = oldest.time if oldest is not None else None
        with self._lock:
            pipelines = list(self._pipelines.values())
        for pipeline in pipelines:
            pipeline.refresh_headroom()

    def write_span_log(self, records: list[dict[str, Any]]) -> None:
        """Append to the span log; a full disk must not fail a batch that was applied."""
        span_log = self.span_log
        if span_log is None:
            return
        try:
            span_log.extend(records)
        except OSError as exc:
            now = time.monotonic()
            if now - self._span_log_warned >= 60:
                self._span_log_warned = now
                log.warning("cannot write the span log %s: %s", span_log.path, exc)

    @property
    def http_address(self) -> tuple[str, int] | None:
        return self._server.address if self._server is not None else None

    def sampled(self, document_id: str) -> bool:
        """Per-document sampling: the same document is always traced, or never."""
        ratio = self.settings.event_sample_ratio
        if ratio >= 1 or ratio <= 0:
            return ratio >= 1
        return zlib.crc32(document_id.encode("utf-8", "surrogatepass")) < ratio * 2**32

    # --- what the HTTP listener serves ---------------------------------------

    def metrics_exposition(self, accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def health_report(self) -> tuple[bool, dict[str, Any]]:
        timeout = self.settings.heartbeat_timeout_s
        pipelines = {name: p.status() for name, p in self._pipelines.items()}
        stale = sorted(n for n, p in self._pipelines.items() if not p.healthy(timeout))
        report: dict[str, Any] = {"healthy": not stale, "pipelines": pipelines}
        if stale:
            report["stale"] = {n: f"no heartbeat for over {timeout:g}s" for n in stale}
        return not stale, report

    def readiness_report(self) -> tuple[bool, dict[str, Any]]:
        pipelines = {name: p.status() for name, p in self._pipelines.items()}
        not_ready = {
            name: status.get("reason") or status["state"]
            for name, status in pipelines.items()
            if not status["ready"]
        }
        ready = bool(pipelines) and not not_ready
        report: dict[str, Any] = {"ready": ready, "pipelines": pipelines}
        if not_ready:
            report["not_ready"] = not_ready
        elif not pipelines:
            report["not_ready"] = {"": "no pipeline has started"}
        return ready, report


# --- helpers -----------------------------------------------------------------


def _event_attributes(info: ChangeEventInfo, link: Link | None) -> dict[str, Any]:
    attributes = {
        "syncd.pipeline": info.pipeline,
        "db.namespace": info.namespace,
        "syncd.operation": info.operation,
        "syncd.document_id": redact_text(info.document_id),
        "syncd.cluster_time": _format_timestamp(info.cluster_time),
        "syncd.resume_token": info.resume_token,
        # Also as an attribute: not every backend keeps span links (Phoenix drops them).
        "syncd.traceparent": info.traceparent.strip() if link and info.traceparent else None,
    }
    return {key: value for key, value in attributes.items() if value is not None}


CONTENT_LIMIT = 4096  # characters of a document recorded with telemetry.record_content


def _content(document: Mapping[str, Any]) -> str:
    """The document as relaxed Extended JSON, credentials redacted, cut at CONTENT_LIMIT."""
    text = redact_text(json_util.dumps(document, json_options=json_util.RELAXED_JSON_OPTIONS))
    return text if len(text) <= CONTENT_LIMIT else text[:CONTENT_LIMIT] + "..."


def _now_iso() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def _format_timestamp(ts: bson.Timestamp | None) -> str | None:
    return f"{ts.time}.{ts.inc}" if ts is not None else None
