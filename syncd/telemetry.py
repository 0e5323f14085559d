"""Traces, metrics, health and the local span log, behind one object the pipeline calls.

Everything here is optional: :meth:`Telemetry.disabled` returns an instance whose
spans go nowhere and that opens no port and no file, and the pipeline behaves the
same with it.

Traces (:mod:`syncd.spans`): a ``process <namespace>`` span per batch, a child per
stage and a ``syncd.change`` span per sampled change, findable by its document id.
No span attribute carries credentials or document content unless
``telemetry.record_content`` is on. Exporters: :mod:`syncd.tracing`.

Metrics (:class:`syncd.health.Metrics`) live on a registry owned by the instance and
are served with ``/healthz`` and ``/readyz`` by :class:`syncd.health.HealthServer`.
The lag gauge is computed when scraped: now minus the cluster time of the oldest
change read but not yet applied (counted from when the reader hands its batch on, so
batches read ahead of the writer count too), and 0 once a read finds nothing new.
Every event's identifiers and trace ids also go to the local span log
(:mod:`syncd.spanlog`) with the outcome of its batch.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import bson
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from syncd import __version__
from syncd.config import Settings, TelemetrySettings
from syncd.errors import classify
from syncd.health import HealthServer, Metrics, readiness
from syncd.rebuild_metrics import RebuildTelemetry
from syncd.redact import redact_text
from syncd.spanlog import SpanLog
from syncd.spans import (
    ChangeEventInfo,
    ChangeIds,
    PipelineSpans,
    document_content,
    outcome_of,
    poison_stage,
    span_log_record,
)
from syncd.tracing import exporting_provider, remote_link

__all__ = ["ChangeEventInfo", "PipelineTelemetry", "Telemetry"]

log = logging.getLogger("syncd.telemetry")

# "rebuilding": a changed mapping is being built beside the live collection, which
# keeps serving (see syncd.rebuild): ready.
STATES = (
    "starting", "snapshotting", "streaming", "retrying", "halted", "failed", "stopped",
    "rebuilding",
)  # fmt: skip
_READY_STATES = frozenset({"snapshotting", "streaming", "rebuilding"})
_LOOP_STATES = frozenset({"starting", "snapshotting", "streaming", "retrying", "rebuilding"})


class PipelineTelemetry:
    """Telemetry for one pipeline; safe to call from its loop and from the HTTP thread."""

    def __init__(
        self,
        owner: Telemetry,
        name: str,
        namespace: str,
        *,
        part_of: PipelineTelemetry | None = None,
    ) -> None:
        """``part_of``: this loop is a part of that pipeline (a rebuild's build, see
        :meth:`Telemetry.part`): its metrics carry that pipeline's name, and its state is
        that pipeline's to report (it has no state, readiness or lag series of its own)."""
        self.name = name
        self._owner = owner
        self._metrics = owner.metrics
        self._part_of = part_of
        self._label = part_of.name if part_of is not None else name
        self.spans = PipelineSpans(owner, name, namespace)
        self._lock = threading.Lock()
        self._state = "starting"
        self._reason: str | None = None
        self._before_retry = "streaming"
        self._after_halt: str | None = None  # see halted_until_a_part_moves
        self._part_scanned: int | None = None  # a part's snapshot: documents scanned
        self._attempts = 0
        self._repeats: dict[str, tuple[float, int]] = {}  # error message -> (logged at, since)
        self._last_beat = time.monotonic()
        self._last_checkpoint: float | None = None
        self._checkpoint_time: int | None = None  # cluster time (s) of the stored checkpoint
        self._oldest_pending: int | None = None  # cluster time (s) of the open batch's oldest
        # Reads handed on but not applied: (ticket, cluster time (s) of the first change).
        self._read_ahead: deque[tuple[int, int]] = deque()
        self._tickets = itertools.count(1)
        # The open batch's span log records, each with its change's document id (unredacted).
        self._pending: list[tuple[str, dict[str, Any]]] | None = None
        self._redacted: dict[str, str] = {}  # pipeline name and operations, redacted
        self._failed: dict[str, BaseException] = {}  # document id -> error, in the open batch
        self._read_seconds: float | None = None
        if part_of is not None:
            return
        self._show_state()
        self._metrics.ready.labels(name).set_function(lambda: float(self.ready()))
        self._metrics.heartbeat_age.labels(name).set_function(
            lambda: time.monotonic() - self._last_beat
        )
        self._metrics.lag.labels(name).set_function(self.lag_seconds)
        # Counters that alerts take increase() of are exported at 0 from the start: a series
        # that first appears at 1 shows no increase, so the first dead letter would not alert.
        for counter in (self._metrics.dead_letters, self._metrics.reapplied_late):
            counter.labels(name)
        for operation in ("insert", "update", "replace", "delete"):
            self._metrics.applied.labels(name, operation)

    # --- traces ------------------------------------------------------------

    @contextmanager
    def batch(self, size: int) -> Iterator[None]:
        if self._read_seconds is not None:
            self._observe_stage("read", self._read_seconds)
            self._read_seconds = None
        self._pending, self._failed = [], {}
        self._redacted.clear()  # a secret registered since is masked from this batch on
        try:
            with self.spans.batch(size):
                yield
        except BaseException as exc:
            self._write_span_log(f"failed: {type(exc).__name__}")
            raise
        self._write_span_log("applied")
        self._oldest_pending = None

    @contextmanager
    def read(self) -> Iterator[None]:
        """Time a read of the change stream; the next :meth:`batch` gets it as a child span.

        The batch size is known only after the read, so its span is recorded afterwards.
        An empty read leaves no span (an idle stream would otherwise make a trace every
        ``batch_max_wait_ms``); a failed read is a root span of its own.
        """
        self._read_seconds = None
        started, clock = time.time_ns(), time.perf_counter()
        try:
            yield
        except BaseException as exc:
            self.spans.read_failed(started, exc)
            raise
        self._read_seconds = time.perf_counter() - clock
        self.spans.read_done(started, time.time_ns())

    def read_at(self, started_ns: int, ended_ns: int) -> None:
        """A read timed elsewhere (by the planner thread); the next :meth:`batch` gets it."""
        self._read_seconds = (ended_ns - started_ns) / 1e9
        self.spans.read_done(started_ns, ended_ns)

    def stage_at(
        self, name: str, started_ns: int, ended_ns: int, seconds: float, error: BaseException | None
    ) -> None:
        """A stage of the open batch that ran earlier, in the planner thread."""
        self.spans.stage_at(name, started_ns, ended_ns, error)
        self._observe_stage(name, seconds)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        clock = time.perf_counter()
        try:
            with self.spans.stage(name):
                yield
        finally:
            self._observe_stage(name, time.perf_counter() - clock)

    @contextmanager
    def idle_checkpoint(self) -> Iterator[None]:
        """A checkpoint that only moves an idle position: timed, logged at debug, no trace."""
        clock = time.perf_counter()
        try:
            with self.spans.idle_checkpoint():
                yield
        finally:
            self._observe_stage("checkpoint", time.perf_counter() - clock)
        log.debug("idle checkpoint stored", extra={"pipeline": self.name})

    def event(self, info: ChangeEventInfo, document: Any = None) -> None:
        """Record one change of the open batch: a ``syncd.change`` span if sampled.

        ``document`` (the change's full document) is recorded only when
        ``telemetry.record_content`` is on.
        """
        if self._oldest_pending is None and info.cluster_time is not None:
            self._oldest_pending = info.cluster_time.time
        link = remote_link(info.traceparent) if info.traceparent else None
        content = None
        if self._owner.settings.record_content and isinstance(document, Mapping):
            content = document_content(document)
        ids = ChangeIds.of(info)
        span = self.spans.change(info, ids, link, content)
        self._log_event(info, ids, span, link)

    def read_ahead(self, events: Sequence[Mapping[str, Any]]) -> int:
        """A read handed on to be applied; return its ticket for :meth:`applied_through`.

        Its changes count in the lag from now on, while they wait to be planned, in the
        queue, or behind a write that fails, until the read is applied.
        """
        first = next((e["clusterTime"] for e in events if e.get("clusterTime")), None)
        with self._lock:
            ticket = next(self._tickets)
            if first is not None:
                self._read_ahead.append((ticket, first.time))
        return ticket

    def applied_through(self, ticket: int) -> None:
        """Every read up to ``ticket`` is applied, or was read again under a later ticket
        (a retry reads again what it had read ahead)."""
        with self._lock:
            while self._read_ahead and self._read_ahead[0][0] <= ticket:
                self._read_ahead.popleft()

    def caught_up(self) -> None:
        """A read found nothing new: every change read before it is applied."""
        self._oldest_pending = None

    def lag_seconds(self) -> float:
        oldest = self._oldest_pending
        with self._lock:
            if self._read_ahead:
                first = min(seconds for _, seconds in self._read_ahead)
                oldest = first if oldest is None else min(oldest, first)
        return max(0.0, time.time() - oldest) if oldest is not None else 0.0

    # --- metrics -----------------------------------------------------------

    def applied(self, operation: str, count: int) -> None:
        self._metrics.applied.labels(self._label, operation).inc(count)

    def batch_done(self, size: int, seconds: float) -> None:
        self._metrics.batch_size.labels(self._label).observe(size)
        self._metrics.batch_seconds.labels(self._label).observe(seconds)

    def snapshot_progress(self, scanned: int, estimated_total: int | None) -> None:
        if self._part_of is not None:
            # A page written: whatever failed works again. (The report a snapshot makes
            # as it starts, or continues, writes nothing: not past a halt yet.)
            started, self._part_scanned = self._part_scanned, scanned
            if started is not None and scanned > started:
                self._part_of.part_moved()
            else:
                self._part_of.recovered()
            return  # the rebuild's own progress series say it (syncd.rebuild_metrics)
        self._metrics.snapshot_scanned.labels(self.name).set(scanned)
        if estimated_total is not None:
            self._metrics.snapshot_total.labels(self.name).set(estimated_total)

    def checkpointed(self, cluster_time: bson.Timestamp | None) -> None:
        if self._part_of is not None:
            # Not the pipeline's checkpoint: that one stays where the live collection is.
            self._part_of.part_moved()
            return
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

    def dead_lettered(self, failures: Sequence[tuple[str, BaseException]]) -> None:
        """Changes parked in the dead-letter store: a metric, a log line and a span each."""
        self._metrics.dead_letters.labels(self._label).inc(len(failures))
        for document_id, error in failures:
            self._failed[document_id] = error
            self.spans.poisoned(document_id, error)
            message = redact_text(f"{type(error).__name__}: {error}")
            log.warning(
                "dead-lettered %s: %s", document_id, message,
                extra={
                    "pipeline": self.name, "document_id": document_id,
                    "error_class": type(error).__name__, "stage": poison_stage(error),
                },
            )  # fmt: skip

    def halted_at(self, document_id: str, error: BaseException) -> None:
        """The change the pipeline halts at; the halt itself is raised through the batch."""
        self._failed[document_id] = error
        self.spans.poisoned(document_id, error)

    def embedded(self, inputs: int) -> None:
        self._metrics.embedding_inputs.labels(self._label).inc(inputs)

    def reapplied_late(self, documents: int) -> None:
        """Documents re-applied after a write that went unanswered (syncd.unanswered)."""
        if documents:
            self._metrics.reapplied_late.labels(self._label).inc(documents)

    def drift(self, missing: int, orphaned: int, stale: int) -> None:
        for kind, count in (("missing", missing), ("orphaned", orphaned), ("stale", stale)):
            self._metrics.drift.labels(self._label, kind).set(count)

    # --- state -------------------------------------------------------------

    def retrying(self, error: BaseException, attempt: int, delay: float) -> None:
        if self._part_of is not None:
            # An outage of a part is the pipeline's outage: it reports retrying.
            self._part_of.retrying(error, attempt, delay)
            return
        message = redact_text(f"{type(error).__name__}: {error}")
        kind = classify(error).value
        self._metrics.retries.labels(self._label, kind).inc()
        with self._lock:
            previous = self._state
            if previous != "retrying":
                before = self._after_halt if previous == "halted" else previous
                self._before_retry = before if before in _READY_STATES else "streaming"
                self._state = "retrying"
            self._reason = message
            self._attempts += 1
            repeats = self._count_repeat(message)
        self._show_state()
        if previous != "retrying":  # as set_state logs every other change of state
            log.info(
                "pipeline %s -> retrying: %s", previous, message,
                extra={"pipeline": self.name, "state": "retrying"},
            )  # fmt: skip
        if repeats is None:
            return
        suffix = f" (repeated {repeats} times since last logged)" if repeats else ""
        log.warning(
            "retrying in %.1fs after %s error: %s%s",
            delay, kind, message, suffix,
            extra={"pipeline": self.name, "attempt": attempt, "delay_s": round(delay, 3)},
        )  # fmt: skip

    def halted_until_a_part_moves(self, error: BaseException, then: str) -> None:
        """Halted, while a part of this pipeline (a rebuild's build) tries again from
        where it halted: the pipeline stays ``halted`` through each try, and reports
        ``then`` once the part writes again (it moved past what halted it)."""
        self.set_state("halted", error)
        with self._lock:
            self._after_halt = then

    def part_moved(self) -> None:
        """A part of this pipeline wrote (a page, a checkpoint): whatever failed works
        again, and a halt it was tried again from is behind it."""
        with self._lock:
            then = self._after_halt if self._state == "halted" else None
        if then is not None:
            self.set_state(then)
        self.recovered()

    def recovered(self) -> None:
        if self._part_of is not None:
            self._part_of.recovered()
            return
        with self._lock:
            if self._state != "retrying":
                return
            attempts, self._attempts = self._attempts, 0
            self._state, self._reason = self._before_retry, None
            self._after_halt = None
            self._repeats.clear()
            state = self._state
        self._show_state()
        log.info("pipeline retrying -> %s", state, extra={"pipeline": self.name, "state": state})
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
            self._after_halt = None
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
        if self._part_of is not None:
            self._part_of.heartbeat()

    def ready(self) -> bool:
        return self._state in _READY_STATES

    def status_text(self) -> str:
        """``articles streaming, lag 0s`` or ``articles retrying, lag 42s: <error>``."""
        with self._lock:
            state, reason = self._state, self._reason
        text = f"{self.name} {state}"
        if state in _LOOP_STATES:
            text += f", lag {self.lag_seconds():.0f}s"
        return f"{text}: {reason[:120]}" if reason else text

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
        if self._part_of is not None:
            return  # the pipeline it is a part of shows its state
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

    def _log_event(
        self,
        info: ChangeEventInfo,
        ids: ChangeIds,
        span: tuple[str, str] | None,
        link: Link | None,
    ) -> None:
        if self._owner.span_log is None:
            return
        record = span_log_record(info, ids, span, link, self._redact)
        if self._pending is not None:
            self._pending.append((info.document_id, record))
        else:
            record["outcome"] = "seen"
            self._owner.write_span_log([record])

    def _redact(self, text: str) -> str:
        """redact_text, remembered for the few words every record of a batch repeats."""
        safe = self._redacted.get(text)
        if safe is None:
            if len(self._redacted) > 64:
                self._redacted.clear()
            safe = self._redacted[text] = redact_text(text)
        return safe

    def _write_span_log(self, outcome: str) -> None:
        pending, self._pending = self._pending, None
        failed, self._failed = self._failed, {}
        if not pending:
            return
        for document_id, record in pending:
            record["outcome"] = outcome_of(document_id, failed, outcome) if failed else outcome
        self._owner.write_span_log([record for _, record in pending])

    def _observe_stage(self, stage: str, seconds: float) -> None:
        self._metrics.stage_seconds.labels(self._label, stage).observe(seconds)


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
        self.span_processors: list[SpanProcessor] = []  # also take finished change spans
        self.resource = Resource.get_empty()
        self.scope = InstrumentationScope("syncd", __version__)
        self.span_log: SpanLog | None = None
        self._provider: TracerProvider | None = None
        self._server: HealthServer | None = None
        self._pipelines: dict[str, PipelineTelemetry] = {}
        self._rebuilds: dict[str, RebuildTelemetry] = {}
        self._lock = threading.Lock()
        self._span_log_warned = -60.0
        self.oplog_start: int | None = None  # time (s) of the oldest oplog entry, when readable
        # Holding no pipeline is ready for a leased replica's standby once it has read the
        # leases; _standby_blind says why it could not.
        self._standby_ok = False
        self._standby_blind: str | None = None
        self._draining = False

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
        made = exporting_provider(self.settings, self._extra_exporter)
        if made is not None:
            self._provider, self.span_processors = made
            self.resource = self._provider.resource
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
        self.tracer, self.span_processors = trace.NoOpTracer(), []
        if provider is not None:
            provider.force_flush(timeout_millis=10_000)
            provider.shutdown()
        if server is not None:
            server.stop()
        if span_log is not None:
            span_log.close()

    def force_flush(self, timeout_millis: int = 10_000) -> bool:
        return self._provider.force_flush(timeout_millis) if self._provider else True

    def rebuild(self, name: str) -> RebuildTelemetry:
        """The metrics of a rebuild of pipeline ``name``'s collection."""
        with self._lock:
            if name not in self._rebuilds:
                self._rebuilds[name] = RebuildTelemetry(self.metrics, name)
            return self._rebuilds[name]

    def part(self, of: PipelineTelemetry, name: str) -> PipelineTelemetry:
        """Telemetry for a loop that is a part of pipeline ``of`` (a rebuild's build,
        ``PIPELINE~rebuild``): not a pipeline of its own in ``/readyz``, ``/healthz`` or
        the state series; its outages make ``of`` report retrying, and its counters and
        histograms are ``of``'s. Its traces and logs keep its own name."""
        return PipelineTelemetry(self, name, self._namespaces.get(of.name, ""), part_of=of)

    def pipeline(self, name: str) -> PipelineTelemetry:
        with self._lock:
            if name not in self._pipelines:
                namespace = self._namespaces.get(name, "")
                self._pipelines[name] = PipelineTelemetry(self, name, namespace)
            return self._pipelines[name]

    def status_line(self) -> str:
        """One line for ``systemctl status``: each pipeline's state, lag and reason."""
        with self._lock:
            pipelines = list(self._pipelines.values())
        if not pipelines:
            return "no pipeline running"
        return "; ".join(p.status_text() for p in pipelines)[:400]

    def process_ready(self) -> bool:
        pipelines = list(self._pipelines.values())
        return bool(pipelines) and all(p.ready() for p in pipelines)

    def standby_ready(self, blind: str | None = None) -> None:
        """This process shares pipelines under leases: while it holds none and could read
        the leases (``blind`` is None) it is a healthy standby, and ready; ``blind`` says
        why it cannot tell (MongoDB unreachable), which is not ready."""
        self._standby_ok = blind is None
        self._standby_blind = blind

    def draining(self) -> None:
        """A stop signal came: not ready from now on."""
        self._draining = True

    def oplog_window(self, oldest: bson.Timestamp | None) -> None:
        """Record where the oplog starts; every pipeline's headroom follows from it."""
        self.oplog_start = oldest.time if oldest is not None else None
        with self._lock:
            pipelines = list(self._pipelines.values())
        for pipeline in pipelines:
            pipeline.refresh_headroom()

    def write_span_log(self, records: list[dict[str, Any]]) -> None:
        """Append to the span log; a full disk must not fail a batch that was applied.

        The records' values are redacted already (:func:`syncd.spans.span_log_record`).
        """
        span_log = self.span_log
        if span_log is None:
            return
        try:
            span_log.extend(records, redacted=True)
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
        return readiness(
            pipelines,
            standby_ok=self._standby_ok,
            draining=self._draining,
            blind=self._standby_blind,
        )


# --- helpers -----------------------------------------------------------------
