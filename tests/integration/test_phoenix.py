"""syncd's spans as a real OTLP receiver (Arize Phoenix) stores them, read back over its REST API.

Phoenix keeps names, parentage, status, attributes and events; it drops span kind and
links, which the unit tests check on the SDK's own spans instead.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import bson
import pytest

from syncd.config import Settings
from syncd.errors import TransientError
from syncd.telemetry import ChangeEventInfo, Telemetry
from tests.harness import phoenix as phoenix_harness
from tests.harness.phoenix import PhoenixServer

phoenix_server = phoenix_harness.phoenix_server  # the session fixture, for runs without plugins

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SECRET_URI = "mongodb://syncd:hunter2-secret@db.example:27017/app"


def send_batches(telemetry: Telemetry, pipeline_name: str) -> None:
    """One good batch (four stages, two events) and one that fails in the write stage."""
    pipeline = telemetry.pipeline(pipeline_name)
    events = [
        ChangeEventInfo(
            pipeline=pipeline_name,
            namespace="app.articles",
            operation=operation,
            document_id=document_id,
            cluster_time=bson.Timestamp(1_700_000_000, n),
            resume_token=f"82650000{n:02d}",
            traceparent=traceparent,
        )
        for n, (operation, document_id, traceparent) in enumerate(
            [("insert", "42", TRACEPARENT), ("delete", "7", None)], start=1
        )
    ]
    with pipeline.batch(len(events)):
        for stage in ("read", "map", "write", "checkpoint"):
            with pipeline.stage(stage):
                if stage == "map":
                    for event in events:
                        pipeline.event(event)
    with pytest.raises(TransientError), pipeline.batch(1), pipeline.stage("write"):
        raise TransientError(f"Chroma unavailable behind {SECRET_URI}")


def spans_of(phoenix: PhoenixServer, pipeline_name: str) -> list[dict[str, Any]]:
    """Wait for the 7 spans of :func:`send_batches` (Phoenix ingests asynchronously)."""

    def mine(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [s for s in spans if s["attributes"].get("syncd.pipeline") == pipeline_name]

    return mine(phoenix.wait_for_spans(lambda spans: len(mine(spans)) >= 7, timeout=60))


def assert_structure(spans: list[dict[str, Any]], pipeline_name: str) -> None:
    good_batch = ["syncd.batch", "syncd.read", "syncd.map", "syncd.write", "syncd.checkpoint"]
    failed_batch = ["syncd.batch", "syncd.write"]
    assert sorted(s["name"] for s in spans) == sorted([*good_batch, *failed_batch])
    by_id = {s["context"]["span_id"]: s for s in spans}
    good, bad = sorted(
        (s for s in spans if s["name"] == "syncd.batch"),
        key=lambda s: s["attributes"]["messaging.batch.message_count"],
        reverse=True,
    )
    for batch in (good, bad):
        assert batch["parent_id"] is None
        assert batch["attributes"]["messaging.system"] == "mongodb"
        assert batch["attributes"]["messaging.operation.type"] == "process"
        assert batch["attributes"]["messaging.destination.name"] == "app.articles"
    assert good["status_code"] != "ERROR"
    good_trace = good["context"]["trace_id"]
    children = [s for s in spans if s["context"]["trace_id"] == good_trace and s is not good]
    assert len(children) == 4
    for span in children:
        assert by_id[span["parent_id"]] is good, span["name"]
        assert not [e for e in span["events"] if e["name"] == "syncd.event"]

    # Each change is a span event on its batch's span.
    events = {e["attributes"]["syncd.document_id"]: e for e in good["events"]}
    assert events["42"]["attributes"] == {
        "syncd.pipeline": pipeline_name,
        "db.namespace": "app.articles",
        "syncd.operation": "insert",
        "syncd.document_id": "42",
        "syncd.cluster_time": "1700000000.1",
        "syncd.resume_token": "8265000001",
        "syncd.traceparent": TRACEPARENT,
    }
    assert "syncd.traceparent" not in events["7"]["attributes"]

    (failed_write,) = [s for s in spans if s["parent_id"] == bad["context"]["span_id"]]
    for span in (failed_write, bad):
        assert span["status_code"] == "ERROR"
        assert (
            "TransientError: Chroma unavailable behind mongodb://syncd:***@db"
            in (span["status_message"])
        )
        (exception,) = [e for e in span["events"] if e["name"] == "exception"]
        assert exception["attributes"]["exception.type"] == "syncd.errors.TransientError"
    assert "hunter2" not in json.dumps(spans)


def telemetry_for(tmp_path: Path, **telemetry: Any) -> Telemetry:
    options = {"listen": "", "span_log_path": str(tmp_path / "spans.jsonl"), **telemetry}
    return Telemetry(Settings.model_validate({"telemetry": options}))


def test_otlp_http_spans_arrive_with_structure_attributes_and_errors(phoenix_server, tmp_path):
    name = f"phoenix-http-{uuid.uuid4().hex[:8]}"
    telemetry = telemetry_for(
        tmp_path, traces="otlp_http", otlp_endpoint=phoenix_server.otlp_http_endpoint
    )
    telemetry.start()
    send_batches(telemetry, name)
    telemetry.shutdown()
    spans = spans_of(phoenix_server, name)
    assert_structure(spans, name)
    # The local span log names the same trace Phoenix stored.
    logged = telemetry_for(tmp_path)
    logged.start()
    assert logged.span_log is not None
    (record,) = logged.span_log.find(name, "42")
    logged.shutdown()
    (batch,) = [
        s
        for s in spans
        if any(e["attributes"].get("syncd.document_id") == "42" for e in s["events"])
    ]
    assert batch["name"] == "syncd.batch"
    assert record["trace_id"] == batch["context"]["trace_id"]
    assert record["span_id"] == batch["context"]["span_id"]
    assert record["outcome"] == "applied"


def test_standard_otel_variables_select_otlp_and_the_service_name(
    phoenix_server, tmp_path, monkeypatch
):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", phoenix_server.url)  # base URL
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "syncd-under-test")
    name = f"phoenix-env-{uuid.uuid4().hex[:8]}"
    telemetry = telemetry_for(tmp_path)
    telemetry.start()
    send_batches(telemetry, name)
    telemetry.shutdown()
    assert_structure(spans_of(phoenix_server, name), name)


def test_otlp_grpc_spans_arrive(phoenix_server, tmp_path):
    name = f"phoenix-grpc-{uuid.uuid4().hex[:8]}"
    telemetry = telemetry_for(
        tmp_path, traces="otlp_grpc", otlp_endpoint=phoenix_server.otlp_grpc_endpoint
    )
    telemetry.start()
    send_batches(telemetry, name)
    telemetry.shutdown()
    assert_structure(spans_of(phoenix_server, name), name)
