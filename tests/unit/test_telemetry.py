"""Span structure, metrics and state of syncd.telemetry, read from the in-memory exporter."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from syncd import __version__
from syncd.config import Settings
from syncd.errors import ConfigError, HaltedError, TransientError
from syncd.telemetry import ChangeEventInfo, PipelineTelemetry, Telemetry
from syncd.tracing import http_traces_url, span_exporters, tracer_provider

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SECRET_URI = "mongodb://syncd:hunter2-secret@db.example:27017/app"


def make_telemetry(tmp_path: Path, **telemetry: Any) -> tuple[Telemetry, InMemorySpanExporter]:
    options = {"listen": "", "traces": "none", "span_log_path": str(tmp_path / "spans.jsonl")}
    settings = Settings.model_validate({"telemetry": {**options, **telemetry}})
    exporter = InMemorySpanExporter()
    return Telemetry(settings, span_exporter=exporter), exporter


@pytest.fixture
def telemetry(tmp_path: Path) -> Iterator[tuple[Telemetry, InMemorySpanExporter]]:
    telemetry, exporter = make_telemetry(tmp_path)
    telemetry.start()
    yield telemetry, exporter
    telemetry.shutdown()


def info(document_id: str = "42", **overrides: Any) -> ChangeEventInfo:
    fields: dict[str, Any] = {
        "pipeline": "articles",
        "namespace": "app.articles",
        "operation": "update",
        "document_id": document_id,
        "cluster_time": bson.Timestamp(1_700_000_000, 7),
        "resume_token": "8265A1B2C3000000072B",
    }
    return ChangeEventInfo(**{**fields, **overrides})


BATCH = "process app.articles"


def finished(telemetry: Telemetry, exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    assert telemetry.force_flush()
    return {span.name: span for span in exporter.get_finished_spans()}


def change_spans(telemetry: Telemetry, exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    assert telemetry.force_flush()
    return [span for span in exporter.get_finished_spans() if span.name == "syncd.change"]


def only_change(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> tuple[ReadableSpan, ReadableSpan]:
    """The batch span and its one change span."""
    batch = finished(telemetry, exporter)[BATCH]
    (change,) = change_spans(telemetry, exporter)
    return batch, change


def run_batch(pipeline: PipelineTelemetry, *events: ChangeEventInfo) -> None:
    with pipeline.batch(len(events)):
        with pipeline.stage("read"):
            pass
        with pipeline.stage("map"):
            for event in events:
                pipeline.event(event)
        with pipeline.stage("write"):
            pass


def test_batch_is_a_root_consumer_span_with_stages_and_changes_as_children(telemetry):
    tel, exporter = telemetry
    pipeline = tel.pipeline("articles")
    outer = TracerProvider().get_tracer("caller")
    with outer.start_as_current_span("unrelated caller span"):
        run_batch(pipeline, info("42"))
    spans = finished(tel, exporter)

    batch = spans[BATCH]
    assert batch.parent is None, "a batch starts its own trace"
    assert batch.kind is SpanKind.CONSUMER
    assert dict(batch.attributes or {}) == {
        "syncd.pipeline": "articles",
        "messaging.system": "mongodb",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.consumer.group.name": "articles",
        "messaging.batch.message_count": 1,
        "messaging.destination.name": "app.articles",
    }
    for name in ("syncd.read", "syncd.map", "syncd.write", "syncd.change"):
        parent = spans[name].parent
        assert parent is not None
        assert parent.span_id == batch.context.span_id
        assert spans[name].context.trace_id == batch.context.trace_id
    change = spans["syncd.change"]
    assert dict(change.attributes or {}) == {
        "syncd.pipeline": "articles",
        "db.namespace": "app",
        "db.collection.name": "articles",
        "syncd.operation": "update",
        "syncd.document_id": "42",
        "syncd.cluster_time": "1700000000.7",
        "messaging.message.id": "8265A1B2C3000000072B",
    }
    assert change.status.status_code is StatusCode.UNSET
    assert change.resource.attributes["service.name"] == batch.resource.attributes["service.name"]
    assert change.instrumentation_scope is not None
    assert change.instrumentation_scope.name == "syncd"
    assert not batch.links and not batch.events


def test_event_links_to_the_trace_in_the_document_traceparent(telemetry):
    tel, exporter = telemetry
    run_batch(tel.pipeline("articles"), info(traceparent=TRACEPARENT))
    batch, change = only_change(tel, exporter)
    assert [link.context for link in change.links] == [batch.links[0].context]
    assert len(batch.links) == 1
    link = batch.links[0].context
    assert trace.format_trace_id(link.trace_id) == "0af7651916cd43dd8448eb211c80319c"
    assert trace.format_span_id(link.span_id) == "b7ad6b7169203331"
    assert link.is_remote
    assert dict(batch.links[0].attributes or {}) == {"syncd.link": "document.traceparent"}
    assert link.trace_id != batch.context.trace_id, "a link, not a parent"
    assert (change.attributes or {})["syncd.traceparent"] == TRACEPARENT


def test_a_batch_links_to_every_traced_document_once_each(telemetry):
    tel, exporter = telemetry
    other = "00-1af7651916cd43dd8448eb211c80319c-c7ad6b7169203331-01"
    run_batch(
        tel.pipeline("articles"),
        info("1", traceparent=TRACEPARENT),
        info("2"),
        info("3", traceparent=other),
    )
    batch = finished(tel, exporter)[BATCH]
    linked = [trace.format_trace_id(link.context.trace_id) for link in batch.links]
    assert linked == ["0af7651916cd43dd8448eb211c80319c", "1af7651916cd43dd8448eb211c80319c"]
    assert [
        dict(c.attributes or {}).get("syncd.traceparent") for c in change_spans(tel, exporter)
    ] == [TRACEPARENT, None, other]


@pytest.mark.parametrize(
    "bad",
    [
        "not a traceparent",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # all-zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # all-zero span id
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # forbidden version
        "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",  # short trace id
    ],
)
def test_invalid_traceparent_adds_no_link(telemetry, bad):
    tel, exporter = telemetry
    run_batch(tel.pipeline("articles"), info(traceparent=bad))
    batch, change = only_change(tel, exporter)
    assert not batch.links and not change.links
    assert "syncd.traceparent" not in (change.attributes or {})


def test_failure_marks_stage_and_batch_as_errors_without_leaking_credentials(telemetry):
    tel, exporter = telemetry
    pipeline = tel.pipeline("articles")
    with pytest.raises(TransientError), pipeline.batch(3), pipeline.stage("write"):
        raise TransientError(f"cannot reach {SECRET_URI}")
    spans = finished(tel, exporter)
    for name in ("syncd.write", "process"):
        span = spans[name]
        assert span.status.status_code is StatusCode.ERROR
        assert "TransientError" in (span.status.description or "")
        (exception,) = [e for e in span.events if e.name == "exception"]
        assert exception.attributes is not None
        assert exception.attributes["exception.type"] == "syncd.errors.TransientError"
        assert "syncd:***@db.example" in str(exception.attributes["exception.message"])
        everything = json.loads(span.to_json())
        assert "hunter2" not in json.dumps(everything)


def test_document_ids_that_look_like_credentials_are_redacted(telemetry):
    tel, exporter = telemetry
    run_batch(tel.pipeline("articles"), info(document_id=SECRET_URI))
    batch, change = only_change(tel, exporter)
    assert (
        dict(change.attributes or {})["syncd.document_id"]
        == "mongodb://syncd:***@db.example:27017/app"
    )
    assert "hunter2" not in batch.to_json() + change.to_json()


def test_document_content_is_recorded_only_when_enabled(tmp_path):
    document = {"_id": 42, "body": "private words", "uri": SECRET_URI, "pad": "x" * 5000}
    for enabled in (False, True):
        tel, exporter = make_telemetry(tmp_path / str(enabled), record_content=enabled)
        tel.start()
        try:
            pipeline = tel.pipeline("articles")
            with pipeline.batch(1):
                pipeline.event(info("42"), document)
            batch, change = only_change(tel, exporter)
        finally:
            tel.shutdown()
        content = dict(change.attributes or {}).get("syncd.document")
        if not enabled:
            assert content is None and "private words" not in batch.to_json() + change.to_json()
            continue
        assert isinstance(content, str) and content.startswith(
            '{"_id": 42, "body": "private words"'
        )
        assert len(content) == 4096 + 3 and content.endswith("...")
        assert "hunter2" not in change.to_json() and "syncd:***@db.example" in content


def test_sample_ratio_zero_records_no_change_spans_but_keeps_the_span_log(tmp_path):
    tel, exporter = make_telemetry(tmp_path, event_sample_ratio=0.0)
    tel.start()
    try:
        run_batch(tel.pipeline("articles"), info("1"), info("2"))
        spans = finished(tel, exporter)
        assert not change_spans(tel, exporter)
        assert tel.span_log is not None
        records = tel.span_log.find("articles", "2")
        assert len(records) == 1
        assert records[0]["span_id"] == trace.format_span_id(spans[BATCH].context.span_id)
    finally:
        tel.shutdown()


def test_sampling_is_per_document_and_follows_the_ratio(tmp_path):
    tel, _ = make_telemetry(tmp_path, event_sample_ratio=0.25)
    ids = [str(n) for n in range(4000)]
    picked = [i for i in ids if tel.sampled(i)]
    assert 800 < len(picked) < 1200
    assert picked == [i for i in ids if tel.sampled(i)], "the same documents every time"


def test_span_log_records_each_event_with_its_ids_and_the_batch_outcome(telemetry):
    tel, exporter = telemetry
    pipeline = tel.pipeline("articles")
    run_batch(pipeline, info("42", operation="insert", traceparent=TRACEPARENT))
    with pytest.raises(RuntimeError), pipeline.batch(1):
        pipeline.event(info("42", operation="delete"))
        raise RuntimeError("sink down")
    pipeline.event(info("7"))  # outside a batch: written at once
    changes = change_spans(tel, exporter)
    assert len(changes) == 2
    assert tel.span_log is not None
    first, second = tel.span_log.find("articles", "42")
    assert first["operation"] == "insert" and first["outcome"] == "applied"
    assert first["cluster_time"] == "1700000000.7"
    assert first["span_id"] == trace.format_span_id(changes[0].context.span_id)
    assert second["span_id"] == trace.format_span_id(changes[1].context.span_id)
    assert changes[1].status.status_code is StatusCode.ERROR
    assert dict(changes[1].attributes or {})["error.type"] == "RuntimeError"
    assert first["linked_trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert second["operation"] == "delete" and second["outcome"] == "failed: RuntimeError"
    assert second["trace_id"] != first["trace_id"]
    assert [r["outcome"] for r in tel.span_log.find("articles", "7")] == ["seen"]


def test_counters_that_alerts_watch_are_exported_at_zero_before_their_first_increment(
    telemetry,
):
    # increase() over a series that first appears at 1 is 0: the first dead letter of a
    # process would not alert if the series only appeared with it.
    tel, _ = telemetry
    tel.pipeline("articles")
    value = tel.registry.get_sample_value
    assert value("syncd_dead_letters_total", {"pipeline": "articles"}) == 0
    assert value("syncd_late_writes_reapplied_total", {"pipeline": "articles"}) == 0
    for operation in ("insert", "update", "replace", "delete"):
        labels = {"pipeline": "articles", "operation": operation}
        assert value("syncd_events_applied_total", labels) == 0


def test_metrics_are_recorded_on_the_instance_registry(telemetry):
    tel, _ = telemetry
    p = tel.pipeline("articles")
    p.applied("insert", 3)
    p.applied("insert", 2)
    p.applied("delete", 1)
    p.batch_done(5, 0.2)
    p.dead_lettered([("1", ValueError("bad")), ("2", ValueError("bad"))])
    p.embedded(10)
    p.drift(missing=1, orphaned=2, stale=3)
    p.snapshot_progress(40, 100)
    with p.stage("embed"):
        pass
    p.checkpointed(bson.Timestamp(1_700_000_000, 1))
    value = tel.registry.get_sample_value
    assert value("syncd_events_applied_total", {"pipeline": "articles", "operation": "insert"}) == 5
    assert value("syncd_events_applied_total", {"pipeline": "articles", "operation": "delete"}) == 1
    assert value("syncd_batch_size_sum", {"pipeline": "articles"}) == 5
    assert value("syncd_batch_seconds_count", {"pipeline": "articles"}) == 1
    assert value("syncd_dead_letters_total", {"pipeline": "articles"}) == 2
    assert value("syncd_embedding_inputs_total", {"pipeline": "articles"}) == 10
    assert value("syncd_drift_records", {"pipeline": "articles", "kind": "orphaned"}) == 2
    assert value("syncd_snapshot_documents_scanned", {"pipeline": "articles"}) == 40
    assert value("syncd_snapshot_documents_estimated", {"pipeline": "articles"}) == 100
    assert value("syncd_stage_seconds_count", {"pipeline": "articles", "stage": "embed"}) == 1
    build = [s for m in tel.registry.collect() for s in m.samples if s.name == "syncd_build_info"]
    assert [(s.labels["version"], s.value) for s in build] == [(__version__, 1.0)]
    assert value("process_cpu_seconds_total") is not None
    assert value("python_gc_collections_total", {"generation": "0"}) is not None
    ts = value("syncd_checkpoint_timestamp_seconds", {"pipeline": "articles"})
    assert ts == 1_700_000_000
    age = value("syncd_checkpoint_age_seconds", {"pipeline": "articles"})
    time.sleep(0.05)
    assert value("syncd_checkpoint_age_seconds", {"pipeline": "articles"}) > age >= 0
    # Unknown until the oplog's start is known; then it follows each checkpoint.
    assert value("syncd_oplog_headroom_seconds", {"pipeline": "articles"}) is None
    tel.oplog_window(bson.Timestamp(1_700_000_000 - 3600, 9))
    assert value("syncd_oplog_headroom_seconds", {"pipeline": "articles"}) == 3600
    p.checkpointed(bson.Timestamp(1_700_000_060, 1))
    assert value("syncd_oplog_headroom_seconds", {"pipeline": "articles"}) == 3660
    other = Telemetry.disabled()
    other.pipeline("articles").applied("insert", 1)
    assert value("syncd_events_applied_total", {"pipeline": "articles", "operation": "insert"}) == 5


def test_state_gauge_and_readiness_follow_the_pipeline(telemetry):
    tel, _ = telemetry
    p = tel.pipeline("articles")
    value = tel.registry.get_sample_value

    def state() -> str:
        return next(
            s for s in ("starting", "snapshotting", "streaming", "retrying", "halted", "failed",
                        "stopped")
            if value("syncd_pipeline_state", {"pipeline": "articles", "state": s}) == 1
        )  # fmt: skip

    assert state() == "starting" and not p.ready() and not tel.process_ready()
    p.set_state("snapshotting")
    assert state() == "snapshotting" and p.ready() and tel.process_ready()
    p.retrying(TransientError("timeout"), attempt=1, delay=0.5)
    assert state() == "retrying" and not p.ready()
    assert value("syncd_retries_total", {"pipeline": "articles", "kind": "transient"}) == 1
    p.recovered()
    assert state() == "snapshotting", "back to the state before the retries"
    p.set_state("halted", error=ValueError(f"bad document from {SECRET_URI}"))
    assert state() == "halted" and not p.ready()
    assert "hunter2" not in json.dumps(p.status())
    assert value("syncd_pipeline_ready", {"pipeline": "articles"}) == 0
    p.set_state("failed", error=ValueError("collection gone"))
    assert state() == "failed" and not p.ready()
    assert value("syncd_pipeline_state", {"pipeline": "articles", "state": "halted"}) == 0
    tel.pipeline("other").set_state("streaming")
    assert not tel.process_ready(), "every pipeline must be ready"
    with pytest.raises(ValueError, match="unknown pipeline state"):
        p.set_state("sleeping")


def test_a_rebuilds_build_is_a_part_of_its_pipeline_not_a_pipeline_of_its_own(telemetry):
    tel, _ = telemetry
    live = tel.pipeline("articles")
    live.set_state("rebuilding")
    build = tel.part(live, "articles~rebuild")
    value = tel.registry.get_sample_value
    build.set_state("snapshotting")
    build.applied("snapshot", 3)
    assert value("syncd_events_applied_total", {"pipeline": "articles", "operation": "snapshot"})
    ready, report = tel.readiness_report()
    assert ready and set(report["pipelines"]) == {"articles"}, report
    assert value("syncd_pipeline_state", {"pipeline": "articles", "state": "rebuilding"}) == 1

    build.retrying(TransientError("Chroma unavailable"), attempt=1, delay=0.5)
    ready, report = tel.readiness_report()
    assert not ready and report["pipelines"]["articles"]["state"] == "retrying", report
    assert "Chroma unavailable" in report["not_ready"]["articles"]
    build.snapshot_progress(10, 100)  # a page written: it works again
    assert tel.readiness_report()[0]
    assert value("syncd_pipeline_state", {"pipeline": "articles", "state": "rebuilding"}) == 1
    exposition = tel.metrics_exposition(None)[0].decode()
    assert "articles~rebuild" not in exposition


def test_a_halted_rebuild_stays_halted_through_a_try_until_its_build_moves_on(telemetry):
    tel, _ = telemetry
    live = tel.pipeline("articles")
    value = tel.registry.get_sample_value
    live.set_state("rebuilding")
    live.halted_until_a_part_moves(HaltedError("over max_text_chars"), "rebuilding")
    # A try again: the build starts at the page it halted in, and writes nothing yet.
    build = tel.part(live, "articles~rebuild")
    build.set_state("snapshotting")
    build.snapshot_progress(100, 300)
    ready, report = tel.readiness_report()
    assert not ready and report["pipelines"]["articles"]["state"] == "halted", report
    assert value("syncd_pipeline_state", {"pipeline": "articles", "state": "halted"}) == 1
    # An outage meanwhile, then a page written: past the halt, rebuilding again.
    build.retrying(TransientError("Chroma unavailable"), attempt=1, delay=0.5)
    assert report_state(tel) == "retrying"
    build.snapshot_progress(110, 300)
    assert report_state(tel) == "rebuilding" and tel.readiness_report()[0]
    # Halted again, and a checkpoint of the build (a streamed change applied) moves it on.
    live.halted_until_a_part_moves(HaltedError("over max_text_chars"), "rebuilding")
    build.checkpointed(bson.Timestamp(1, 1))
    assert report_state(tel) == "rebuilding"
    # A pipeline's own halt is not lifted by a part.
    live.set_state("halted", HaltedError("its own"))
    build.snapshot_progress(120, 300)
    assert report_state(tel) == "halted"


def report_state(tel: Telemetry) -> str:
    return str(tel.readiness_report()[1]["pipelines"]["articles"]["state"])


def test_repeated_retry_errors_are_logged_once_per_interval_with_a_count(tmp_path, caplog):
    tel, _ = make_telemetry(tmp_path, retry_log_interval_s=0.3)
    p = tel.pipeline("articles")
    p.set_state("streaming")
    caplog.set_level(logging.INFO, logger="syncd.telemetry")
    caplog.clear()
    for attempt in range(1, 4):
        p.retrying(TransientError(f"cannot reach {SECRET_URI}"), attempt=attempt, delay=0.1)
    p.retrying(TransientError("another error"), attempt=4, delay=0.1)
    retry_lines = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retry_lines) == 2, retry_lines
    assert "hunter2" not in caplog.text
    time.sleep(0.35)
    p.retrying(TransientError(f"cannot reach {SECRET_URI}"), attempt=5, delay=0.1)
    assert "(repeated 2 times since last logged)" in caplog.records[-1].getMessage()
    assert caplog.records[-1].pipeline == "articles"
    p.recovered()
    assert caplog.records[-1].getMessage() == "recovered after 5 attempts"
    assert p.ready()
    count = len(caplog.records)
    p.recovered()
    assert len(caplog.records) == count, "nothing to recover from: no second line"
    # Every change of state has its line, the outage's too, once each way.
    changes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pipeline ")]
    assert changes == [
        "pipeline streaming -> retrying: TransientError: cannot reach "
        "mongodb://syncd:***@db.example:27017/app",
        "pipeline retrying -> streaming",
    ], changes
    p.set_state("snapshotting")
    p.retrying(TransientError("Chroma unavailable"), attempt=1, delay=0.1)
    p.recovered()
    changes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pipeline ")]
    assert changes[-3:] == [
        "pipeline streaming -> snapshotting",
        "pipeline snapshotting -> retrying: TransientError: Chroma unavailable",
        "pipeline retrying -> snapshotting",
    ], changes


def test_disabled_telemetry_does_nothing_observable_but_keeps_state(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    tel = Telemetry.disabled()
    tel.start()
    p = tel.pipeline("articles")
    run_batch(p, info())
    assert not trace.get_current_span().get_span_context().is_valid
    assert tel.http_address is None and tel.span_log is None
    p.set_state("streaming")
    assert tel.process_ready()
    tel.shutdown()
    tel.shutdown()
    assert list(tmp_path.iterdir()) == []


def test_shutdown_flushes_spans_and_is_idempotent(tmp_path):
    tel, exporter = make_telemetry(tmp_path)
    tel.start()
    run_batch(tel.pipeline("articles"), info())
    tel.shutdown()
    assert [s.name for s in exporter.get_finished_spans()].count("syncd.change") == 1
    tel.shutdown()
    run_batch(tel.pipeline("articles"), info())  # after shutdown: no error, nothing exported
    assert [s.name for s in exporter.get_finished_spans()].count("syncd.change") == 1


def test_exporter_comes_from_settings_then_otel_env(monkeypatch):
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(name, raising=False)
    telemetry = Settings().telemetry
    assert span_exporters(telemetry) == []
    assert tracer_provider(telemetry) is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert [type(e) for e in span_exporters(telemetry)] == [ConsoleSpanExporter]
    explicit = telemetry.model_copy(update={"traces": "none"})
    assert span_exporters(explicit) == []
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigError, match="unknown trace exporter 'zipkin'"):
        span_exporters(telemetry)


def test_otlp_exporters_honour_endpoint_and_protocol(monkeypatch):
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    telemetry = Settings().telemetry.model_copy(
        update={"traces": "otlp", "otlp_endpoint": "http://127.0.0.1:4318"}
    )
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
    (exporter,) = span_exporters(telemetry)
    assert isinstance(exporter, Http)
    assert exporter._endpoint == "http://127.0.0.1:4318/v1/traces"
    exporter.shutdown()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    (exporter,) = span_exporters(telemetry)
    assert isinstance(exporter, Grpc)
    exporter.shutdown()
    assert http_traces_url("http://h:4318/") == "http://h:4318/v1/traces"
    assert http_traces_url("http://h:4318?k=v") == "http://h:4318/v1/traces?k=v"
    assert http_traces_url("http://h:4318/custom/traces") == "http://h:4318/custom/traces"


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318"}, "http://h:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318/base/"}, "http://h:4318/base/v1/traces"),
        # the full URL in the base variable: used as written, not .../v1/traces/v1/traces
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318/v1/traces"}, "http://h:4318/v1/traces"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://base:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h:1/t",
            },
            "http://h:1/t",
        ),
        # the path goes before the query, not after it (...?x=1/v1/traces)
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318?x=1"}, "http://h:4318/v1/traces?x=1"),
    ],
    ids=["base", "base with a path", "full URL as base", "traces variable wins", "query"],
)
def test_the_otlp_http_url_from_the_otel_variables(monkeypatch, variables, expected):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    telemetry = Settings().telemetry.model_copy(update={"traces": "otlp_http"})
    (exporter,) = span_exporters(telemetry)
    assert isinstance(exporter, Http)
    assert exporter._endpoint == expected
    exporter.shutdown()


def test_service_name_defaults_to_syncd_and_follows_otel_service_name(tmp_path, monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    tel, exporter = make_telemetry(tmp_path)
    tel.start()
    run_batch(tel.pipeline("articles"))
    tel.shutdown()
    assert exporter.get_finished_spans()[0].resource.attributes["service.name"] == "syncd"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "syncd-eu")
    tel, exporter = make_telemetry(tmp_path)
    tel.start()
    run_batch(tel.pipeline("articles"))
    tel.shutdown()
    assert exporter.get_finished_spans()[0].resource.attributes["service.name"] == "syncd-eu"


def test_otel_traces_sampler_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    tel, exporter = make_telemetry(tmp_path)
    tel.start()
    run_batch(tel.pipeline("articles"), info())
    tel.shutdown()
    assert exporter.get_finished_spans() == ()


def test_an_unwritable_span_log_does_not_fail_the_batch(tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    tel, exporter = make_telemetry(tmp_path, span_log_path=str(blocker / "spans.jsonl"))
    tel.start()
    try:
        run_batch(tel.pipeline("articles"), info())
        run_batch(tel.pipeline("articles"), info())
        assert BATCH in finished(tel, exporter)
        warnings = [r for r in caplog.records if "cannot write the span log" in r.getMessage()]
        assert len(warnings) == 1, "warned once, not per batch"
    finally:
        tel.shutdown()


# --- what the operator looks for -----------------------------------------------------


def test_an_idle_checkpoint_makes_no_trace_unless_it_fails(telemetry, caplog):
    tel, exporter = telemetry
    p = tel.pipeline("articles")
    caplog.set_level(logging.DEBUG, logger="syncd.telemetry")
    with p.idle_checkpoint():
        pass
    assert finished(tel, exporter) == {}
    assert "idle checkpoint stored" in caplog.text
    value = tel.registry.get_sample_value
    labels = {"pipeline": "articles", "stage": "checkpoint"}
    assert value("syncd_stage_seconds_count", labels) == 1
    with pytest.raises(TransientError), p.idle_checkpoint():
        raise TransientError(f"checkpoint store unreachable at {SECRET_URI}")
    (span,) = finished(tel, exporter).values()
    assert span.name == "syncd.checkpoint" and span.parent is None
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "TransientError"
    assert value("syncd_stage_seconds_count", labels) == 2


def test_a_dead_lettered_change_marks_its_span_its_stage_and_its_batch(telemetry, caplog):
    from syncd.errors import EmbeddingRejectedError, MappingError

    tel, exporter = telemetry
    p = tel.pipeline("articles")
    caplog.set_level(logging.INFO, logger="syncd.telemetry")
    with p.batch(3):
        for n in ("1", "2", "3"):
            p.event(info(n))
        with p.stage("map"):
            pass
        with p.stage("embed"):
            pass
        p.dead_lettered([("2", MappingError(f"text is a list, see {SECRET_URI}"))])
        p.dead_lettered([("3", EmbeddingRejectedError("input too long"))])
    spans = finished(tel, exporter)
    changes = {
        dict(c.attributes or {})["syncd.document_id"]: c for c in change_spans(tel, exporter)
    }
    assert changes["1"].status.status_code is StatusCode.UNSET
    for document_id, error_class, stage in (
        ("2", "MappingError", "syncd.map"),
        ("3", "EmbeddingRejectedError", "syncd.embed"),
    ):
        change = changes[document_id]
        assert change.status.status_code is StatusCode.ERROR
        assert dict(change.attributes or {})["error.type"] == error_class
        assert spans[stage].status.status_code is StatusCode.ERROR
        assert dict(spans[stage].attributes or {})["error.type"] == error_class
    batch = spans[BATCH]
    assert batch.status.status_code is StatusCode.ERROR
    assert "2 changes not applied" in (batch.status.description or "")
    assert "hunter2" not in "".join(s.to_json() for s in exporter.get_finished_spans())
    lines = [r for r in caplog.records if r.getMessage().startswith("dead-lettered")]
    assert [(r.document_id, r.error_class, r.stage) for r in lines] == [
        ("2", "MappingError", "map"),
        ("3", "EmbeddingRejectedError", "embed"),
    ]
    assert tel.span_log is not None
    assert [r["outcome"] for r in tel.span_log.find("articles", "2")] == [
        "dead-lettered: MappingError"
    ]
    assert [r["outcome"] for r in tel.span_log.find("articles", "1")] == ["applied"]


def test_a_halt_marks_the_change_and_the_stage_it_failed_in(telemetry):
    from syncd.errors import HaltedError, MappingError

    tel, exporter = telemetry
    p = tel.pipeline("articles")
    with pytest.raises(HaltedError), p.batch(1):
        p.event(info("9"))
        with p.stage("map"):
            pass
        error = MappingError("no text")
        p.halted_at("9", error)
        raise HaltedError("halted at a change that cannot be applied: no text")
    spans = finished(tel, exporter)
    (change,) = change_spans(tel, exporter)
    assert dict(change.attributes or {})["error.type"] == "MappingError"
    assert dict(spans["syncd.map"].attributes or {})["error.type"] == "MappingError"
    assert dict(spans[BATCH].attributes or {})["error.type"] == "HaltedError"


def test_lag_is_the_age_of_the_oldest_unapplied_change_and_zero_when_caught_up(telemetry):
    tel, _ = telemetry
    p = tel.pipeline("articles")

    def lag() -> float:
        value = tel.registry.get_sample_value("syncd_lag_seconds", {"pipeline": "articles"})
        assert value is not None
        return value

    assert lag() == 0
    old = bson.Timestamp(int(time.time()) - 30, 1)
    with pytest.raises(TransientError), p.batch(2):
        p.event(info("1", cluster_time=old))
        p.event(info("2", cluster_time=bson.Timestamp(int(time.time()), 1)))
        raise TransientError("Chroma is down")
    assert 30 <= lag() < 40, "the failed batch's oldest change is still waiting"
    with p.batch(1):  # the retry reads the same change again, and applies it
        p.event(info("1", cluster_time=old))
        assert 30 <= lag() < 40
    assert lag() == 0
    with pytest.raises(TransientError), p.batch(1):
        p.event(info("3", cluster_time=old))
        raise TransientError("Chroma is down")
    p.caught_up()
    assert lag() == 0


def test_status_line_names_each_pipelines_state_lag_and_reason(telemetry):
    tel, _ = telemetry
    assert tel.status_line() == "no pipeline running"
    tel.pipeline("articles").set_state("streaming")
    other = tel.pipeline("other")
    other.set_state("streaming")
    with pytest.raises(TransientError), other.batch(1):
        other.event(info("1", cluster_time=bson.Timestamp(int(time.time()) - 30, 1)))
        raise TransientError("x")
    other.retrying(TransientError(f"Chroma unreachable at {SECRET_URI}"), attempt=1, delay=1)
    line = tel.status_line()
    articles, retrying = line.split("; ")
    assert articles == "articles streaming, lag 0s"
    assert retrying.startswith("other retrying, lag 3")
    assert retrying.endswith(
        "TransientError: Chroma unreachable at mongodb://syncd:***@db.example:27017/app"
    )


SECRET_DOCUMENT = {
    "_id": 42,
    "body": "plain words",
    "password": "doc-pw-0123",
    "profile": {"api_key": "doc-ak-0123", "Secret": "doc-sc-0123", "x": ["token: doc-tk-0123"]},
    "headers": "Authorization: Basic ZG9jLWJhc2ljLTAxMjM=",
    "aws": "aws_secret_access_key=doc-aws-0123 region=eu-west-1",
    "tls": "privateKey=doc-pk-0123",
    "conn": "mongodb://u:doc-uri-0123@db/?tlsCertificateKeyFilePassword=doc-tls-0123",
}
DOCUMENT_SECRETS = [
    "doc-pw-0123",
    "doc-ak-0123",
    "doc-sc-0123",
    "doc-tk-0123",
    "ZG9jLWJhc2ljLTAxMjM=",
    "doc-aws-0123",
    "doc-pk-0123",
    "doc-uri-0123",
    "doc-tls-0123",
]


def test_recorded_content_has_every_secret_masked(tmp_path: Path) -> None:
    tel, exporter = make_telemetry(tmp_path, record_content=True)
    tel.start()
    try:
        pipeline = tel.pipeline("articles")
        with pipeline.batch(1):
            pipeline.event(info("42"), SECRET_DOCUMENT)
        batch, change = only_change(tel, exporter)
    finally:
        tel.shutdown()
    content = str(dict(change.attributes or {})["syncd.document"])
    assert "plain words" in content and "region=eu-west-1" in content
    exported = batch.to_json() + change.to_json()
    for secret in DOCUMENT_SECRETS:
        assert secret not in exported, secret
