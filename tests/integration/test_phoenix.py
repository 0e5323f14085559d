"""syncd's spans as a real OTLP receiver (Arize Phoenix) stores them, read back over its REST API.

Phoenix keeps names, parentage, status, attributes and events; it drops span kind and
links, which the unit tests check on the SDK's own spans instead. Its span API filters by
attribute, which is how an operator finds one document's sync.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import bson
import pytest

from syncd.config import Settings
from syncd.errors import MappingError, TransientError
from syncd.telemetry import ChangeEventInfo, Telemetry
from tests.harness.phoenix import PhoenixServer

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SECRET_URI = "mongodb://syncd:hunter2-secret@db.example:27017/app"


def send_batches(telemetry: Telemetry, pipeline_name: str) -> None:
    """A good batch (four stages, two changes), one that fails in the write stage, and one
    whose change is dead-lettered."""
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
            [("insert", "42", TRACEPARENT), ("delete", "7", None), ("update", "13", None)],
            start=1,
        )
    ]
    with pipeline.batch(2):
        for event in events[:2]:
            pipeline.event(event)
        for stage in ("read", "map", "write", "checkpoint"):
            with pipeline.stage(stage):
                pass
    with pytest.raises(TransientError), pipeline.batch(1), pipeline.stage("write"):
        raise TransientError(f"Chroma unavailable behind {SECRET_URI}")
    with pipeline.batch(1):
        pipeline.event(events[2])
        with pipeline.stage("map"):
            pass
        pipeline.dead_lettered([("13", MappingError(f"text is a list ({SECRET_URI})"))])


SPANS = 12  # a batch, 4 stages, 2 changes; a batch and its write; a batch, a map, a change


def spans_of(phoenix: PhoenixServer, pipeline_name: str) -> list[dict[str, Any]]:
    """Wait for the spans of :func:`send_batches` (Phoenix ingests asynchronously)."""

    def mine(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [s for s in spans if s["attributes"].get("syncd.pipeline") == pipeline_name]

    return mine(phoenix.wait_for_spans(lambda spans: len(mine(spans)) >= SPANS, timeout=60))


def find(phoenix: PhoenixServer, pipeline_name: str, document_id: str) -> list[dict[str, Any]]:
    """What an operator does in the viewer: filter spans by the document's id."""
    return phoenix.spans(
        attribute=[
            f"syncd.pipeline:{json.dumps(pipeline_name)}",
            f"syncd.document_id:{json.dumps(document_id)}",
        ]
    )


def assert_structure(phoenix: PhoenixServer, spans: list[dict[str, Any]], name: str) -> None:
    batch_name = "process app.articles"
    good_batch = [batch_name, "syncd.read", "syncd.map", "syncd.write", "syncd.checkpoint"]
    failed_batch = [batch_name, "syncd.write"]
    dead_letter_batch = [batch_name, "syncd.map"]
    changes = ["syncd.change"] * 3
    assert sorted(s["name"] for s in spans) == sorted(
        [*good_batch, *failed_batch, *dead_letter_batch, *changes]
    )
    by_id = {s["context"]["span_id"]: s for s in spans}
    batches = sorted(
        (s for s in spans if s["name"] == batch_name),
        key=lambda s: (s["attributes"]["messaging.batch.message_count"], s["status_message"]),
        reverse=True,
    )
    good = batches[0]
    for batch in batches:
        assert batch["parent_id"] is None
        assert batch["attributes"]["messaging.system"] == "mongodb"
        assert batch["attributes"]["messaging.operation.name"] == "process"
        assert batch["attributes"]["messaging.operation.type"] == "process"
        assert batch["attributes"]["messaging.consumer.group.name"] == name
        assert batch["attributes"]["messaging.destination.name"] == "app.articles"
    assert good["status_code"] != "ERROR"
    good_trace = good["context"]["trace_id"]
    children = [s for s in spans if s["context"]["trace_id"] == good_trace and s is not good]
    assert len(children) == 6
    for span in children:
        assert by_id[span["parent_id"]] is good, span["name"]

    # Each change is a span of its own, found through Phoenix's API by its document id.
    (change,) = find(phoenix, name, "42")
    assert change["context"]["trace_id"] == good_trace
    assert change["status_code"] == "UNSET"
    assert change["attributes"] == {
        "syncd.pipeline": name,
        "db.namespace": "app",
        "db.collection.name": "articles",
        "syncd.operation": "insert",
        "syncd.document_id": "42",
        "syncd.cluster_time": "1700000000.1",
        "messaging.message.id": "8265000001",
        "syncd.traceparent": TRACEPARENT,
    }
    (other,) = find(phoenix, name, "7")
    assert "syncd.traceparent" not in other["attributes"]

    (failed,) = [s for s in batches if s["attributes"]["messaging.batch.message_count"] == 1
                 and "TransientError" in s["status_message"]]  # fmt: skip
    (failed_write,) = [s for s in spans if s["parent_id"] == failed["context"]["span_id"]]
    for span in (failed_write, failed):
        assert span["status_code"] == "ERROR"
        assert span["attributes"]["error.type"] == "TransientError"
        assert (
            "TransientError: Chroma unavailable behind mongodb://syncd:***@db"
            in (span["status_message"])
        )
        (exception,) = [e for e in span["events"] if e["name"] == "exception"]
        assert exception["attributes"]["exception.type"] == "syncd.errors.TransientError"

    # A dead-lettered change: its span, its trace's root and the map stage are errors.
    (dead,) = find(phoenix, name, "13")
    assert dead["status_code"] == "ERROR"
    assert dead["attributes"]["error.type"] == "MappingError"
    in_trace = {
        s["name"]: s for s in spans if s["context"]["trace_id"] == dead["context"]["trace_id"]
    }
    for span_name in (batch_name, "syncd.map"):
        assert in_trace[span_name]["status_code"] == "ERROR"
        assert in_trace[span_name]["attributes"]["error.type"] == "MappingError"
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
    assert_structure(phoenix_server, spans, name)
    # The local span log names the same span Phoenix stored.
    logged = telemetry_for(tmp_path)
    logged.start()
    assert logged.span_log is not None
    (record,) = logged.span_log.find(name, "42")
    (dead,) = logged.span_log.find(name, "13")
    logged.shutdown()
    (change,) = find(phoenix_server, name, "42")
    assert record["trace_id"] == change["context"]["trace_id"]
    assert record["span_id"] == change["context"]["span_id"]
    assert record["outcome"] == "applied"
    assert dead["outcome"] == "dead-lettered: MappingError"


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
    assert_structure(phoenix_server, spans_of(phoenix_server, name), name)


def test_otlp_grpc_spans_arrive(phoenix_server, tmp_path):
    name = f"phoenix-grpc-{uuid.uuid4().hex[:8]}"
    telemetry = telemetry_for(
        tmp_path, traces="otlp_grpc", otlp_endpoint=phoenix_server.otlp_grpc_endpoint
    )
    telemetry.start()
    send_batches(telemetry, name)
    telemetry.shutdown()
    assert_structure(phoenix_server, spans_of(phoenix_server, name), name)


# --- `make viewer`: what an operator sees -------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "images"


def chromium(url: str, *, screenshot: Path | None = None) -> str:
    """Load ``url`` in headless Chromium until its scripts settle; return the rendered DOM."""
    assert CHROMIUM is not None
    flags = [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--no-first-run", "--disable-extensions", "--window-size=1600,1000",
        "--virtual-time-budget=30000", "--run-all-compositor-stages-before-draw",
    ]  # fmt: skip
    action = [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    result = subprocess.run(
        [CHROMIUM, *flags, *action, url], capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (Debian package chromium; `make test` installs it "
    "where apt-get can)",
)
def test_the_viewer_shows_a_batch_trace_and_finds_a_document(phoenix_server, tmp_path):
    """Screenshots for the README, taken from Phoenix's own UI in a real browser.

    ``SYNCD_UPDATE_SCREENSHOTS=1`` copies them to docs/images/.
    """
    name = f"viewer-{uuid.uuid4().hex[:8]}"
    telemetry = telemetry_for(
        tmp_path, traces="otlp_http", otlp_endpoint=phoenix_server.otlp_http_endpoint
    )
    telemetry.start()
    send_batches(telemetry, name)
    telemetry.shutdown()
    spans_of(phoenix_server, name)
    (change,) = find(phoenix_server, name, "42")
    (project,) = [
        p for p in phoenix_server.get_json("/v1/projects")["data"] if p["name"] == "default"
    ]

    trace_url = f"{phoenix_server.url}/redirects/traces/{change['context']['trace_id']}"
    condition = f'syncd.document_id == "42" and syncd.pipeline == "{name}"'
    search_url = f"{phoenix_server.url}/projects/{project['id']}/spans?" + urllib.parse.urlencode(
        {"spanFilterCondition": condition}
    )
    pages = {"phoenix-trace.png": trace_url, "phoenix-search.png": search_url}
    trace_dom = chromium(trace_url)
    for stage in ("process app.articles", "syncd.read", "syncd.map", "syncd.write", "syncd.change"):
        assert stage in trace_dom, stage
    search_dom = chromium(search_url)
    assert "syncd.change" in search_dom and "syncd.checkpoint" not in search_dom
    for file_name, url in pages.items():
        path = tmp_path / file_name
        chromium(url, screenshot=path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
        if os.environ.get("SYNCD_UPDATE_SCREENSHOTS"):
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, SCREENSHOTS / file_name)
