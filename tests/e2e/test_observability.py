"""What operators see of a running `syncd run`: traces in a real OTLP receiver (Phoenix)
and on the console, `/metrics`, `/readyz`, and that no credential shows up in any of it."""

from __future__ import annotations

import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd
from tests.harness.embedding_api import EmbeddingAPI
from tests.harness.ports import free_port

from .helpers import (
    caught_up,
    http_get,
    load_checkpoint,
    metric_sample,
    pipeline_table,
    settings_of,
    wait_caught_up,
    wait_until,
    write_config,
)

# An application's span, as it would store it in the document it writes (W3C trace context).
APP_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{APP_TRACE_ID}-{APP_SPAN_ID}-01"
STAGES = {"syncd.read", "syncd.map", "syncd.lookup", "syncd.write", "syncd.checkpoint"}


def _config(
    tmp_path: Path,
    mongo_uri: str,
    chroma: Any,
    db: str,
    name: str,
    telemetry: dict[str, Any],
    **pipeline: Any,
) -> Path:
    return write_config(
        tmp_path / "syncd.toml",
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": chroma.host, "port": chroma.port},
        checkpoint_db=f"{db}_syncd",
        extra={
            "lease": {"enabled": False},
            "telemetry": {"span_log_path": str(tmp_path / "spans.jsonl"), **telemetry},
        },
        pipelines=[
            pipeline_table(
                name, db, chroma_collection=f"{name}-c", **{"snapshot": "never", **pipeline}
            )
        ],
    )


class Writer:
    """Writes to `db.docs` and waits until syncd has checkpointed past each write."""

    def __init__(self, client: Any, db: str, settings: Any, name: str) -> None:
        self.client, self.settings, self.name = client, settings, name
        self.coll = client[db]["docs"]

    def __call__(self, operation: str, *args: Any) -> None:
        with self.client.start_session() as session:
            getattr(self.coll, operation)(*args, session=session)
            op_time = session.operation_time
        wait_until(lambda: caught_up(self.settings, self.name, op_time), 30, f"{operation} applied")


def _streaming(settings: Any, name: str) -> bool:
    cp = load_checkpoint(settings, name)
    return cp is not None and cp.phase == "streaming"


def _console_spans(output: str) -> list[dict[str, Any]]:
    """The ConsoleSpanExporter's JSON objects, picked out of the daemon's mixed output."""
    decoder = json.JSONDecoder()
    spans = []
    for match in re.finditer(r'^\{\n\s+"name": ', output, re.MULTILINE):
        span, _ = decoder.raw_decode(output, match.start())
        spans.append(span)
    return spans


def _changes(spans: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each change span (Phoenix's JSON or the console's), with its batch span."""

    def span_id(span: dict[str, Any]) -> str:
        return str(span["context"]["span_id"])

    by_id = {span_id(s): s for s in spans}
    return [
        (by_id[span["parent_id"]], span)
        for span in spans
        if span["name"] == "syncd.change" and span["parent_id"] in by_id
    ]


def _find(pipeline: str, document_id: str) -> list[str]:
    """Phoenix's span filter for one document of one pipeline (values JSON-quoted)."""
    return [
        f"syncd.pipeline:{json.dumps(pipeline)}",
        f"syncd.document_id:{json.dumps(document_id)}",
    ]


def _span_log(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "spans.jsonl").read_text().splitlines()]


# --- traces -----------------------------------------------------------------------------


def test_each_change_is_a_trace_in_phoenix_found_by_its_document_id(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory, phoenix_server
):
    db, name = f"obs_{uuid.uuid4().hex[:8]}", f"obs-{uuid.uuid4().hex[:8]}"
    telemetry = {
        "traces": "otlp_http",
        "otlp_endpoint": phoenix_server.otlp_http_endpoint,
        "event_sample_ratio": 1.0,
    }
    cfg = _config(tmp_path, mongo_uri, chroma_server, db, name, telemetry, on_error="dead_letter")
    settings = settings_of(cfg)
    daemon = syncd_factory(["run"], cfg)
    wait_until(lambda: _streaming(settings, name), 30, "the pipeline to start streaming")
    write = Writer(mongo_client, db, settings, name)
    write("insert_one", {"_id": 1, "body": "the first body", "title": "one"})
    write("update_one", {"_id": 1}, {"$set": {"title": "uno"}})
    write("delete_one", {"_id": 1})
    write("insert_one", {"_id": 2, "body": "traced body", "traceparent": TRACEPARENT})
    write("insert_one", {"_id": 3, "body": {"not": "text"}})  # poison: dead-lettered
    daemon.terminate()  # a clean stop flushes the spans still queued for export
    assert daemon.wait(30) == ExitCode.OK, daemon.output()

    def mine(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [s for s in spans if s["attributes"].get("syncd.pipeline") == name]

    def complete(spans: list[dict[str, Any]]) -> bool:
        return len(_changes(mine(spans))) >= 5

    spans = mine(phoenix_server.wait_for_spans(complete, timeout=30))
    by_id = {s["context"]["span_id"]: s for s in spans}
    changes = _changes(spans)
    assert sorted(c["attributes"]["syncd.operation"] for _, c in changes) == [
        "delete", "insert", "insert", "insert", "update",
    ]  # fmt: skip
    assert len({b["context"]["trace_id"] for b, _ in changes}) == 5, "one trace per change"
    # Nothing else: reads that found no change and idle checkpoints leave no trace. The
    # two good inserts embed their text; the update (metadata only), the delete and the
    # poison insert do not.
    assert {s["context"]["trace_id"] for s in spans} == {
        b["context"]["trace_id"] for b, _ in changes
    }
    embedded = {s["context"]["trace_id"] for s in spans if s["name"] == "syncd.embed"}
    assert sorted(
        (c["attributes"]["syncd.operation"], c["attributes"]["syncd.document_id"])
        for b, c in changes
        if b["context"]["trace_id"] in embedded
    ) == [("insert", "i:1"), ("insert", "i:2")]

    for batch, change in changes:
        trace_id = batch["context"]["trace_id"]
        in_trace = [s for s in spans if s["context"]["trace_id"] == trace_id]
        (root,) = [s for s in in_trace if s["parent_id"] is None]
        assert root is batch and batch["name"] == f"process {db}.docs"
        assert batch["attributes"] == {
            "syncd.pipeline": name,
            "messaging.system": "mongodb",
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            "messaging.consumer.group.name": name,
            "messaging.batch.message_count": 1,
            "messaging.destination.name": f"{db}.docs",
            **({"error.type": "MappingError"} if batch["status_code"] == "ERROR" else {}),
        }
        children = [s for s in in_trace if s is not batch]
        assert all(by_id[s["parent_id"]] is batch for s in children), [
            (s["name"], by_id[s["parent_id"]]["name"]) for s in children
        ]
        operation = change["attributes"]["syncd.operation"]
        poison = change["attributes"]["syncd.document_id"] == "i:3"
        embed = ["syncd.embed"] if operation == "insert" and not poison else []
        # A poison change is mapped again from the document's current state before it is
        # dead-lettered: a second map and lookup.
        again = ["syncd.map", "syncd.lookup"] if poison else []
        assert sorted(s["name"] for s in children) == sorted(
            [*STAGES, *embed, *again, "syncd.change"]
        )

        attributes = change["attributes"]
        assert attributes["syncd.pipeline"] == name
        assert attributes["db.namespace"] == db
        assert attributes["db.collection.name"] == "docs"
        assert re.fullmatch(r"\d+\.\d+", attributes["syncd.cluster_time"])
        assert re.fullmatch(r"[0-9A-F]+", attributes["messaging.message.id"], re.IGNORECASE)
    documents = {
        (c["attributes"]["syncd.operation"], c["attributes"]["syncd.document_id"])
        for _, c in changes
    }
    assert documents == {
        ("insert", "i:1"), ("update", "i:1"), ("delete", "i:1"), ("insert", "i:2"),
        ("insert", "i:3"),
    }  # fmt: skip

    # An operator who starts in the viewer: Phoenix's own API finds the document's sync.
    (found,) = phoenix_server.spans(attribute=_find(name, "i:2"))
    assert found["name"] == "syncd.change" and found["attributes"]["syncd.pipeline"] == name
    traced_batch = by_id[found["parent_id"]]
    assert found["attributes"]["syncd.traceparent"] == TRACEPARENT
    assert traced_batch["context"]["trace_id"] != APP_TRACE_ID, "a link, not a parent"
    assert sum("syncd.traceparent" in c["attributes"] for _, c in changes) == 1
    assert {
        s["status_code"] for s in phoenix_server.spans(trace_id=[found["context"]["trace_id"]])
    } == {"UNSET"}

    # The dead-lettered change: its span, the stage it failed in and its batch are errors.
    (poisoned,) = phoenix_server.spans(attribute=_find(name, "i:3"))
    assert poisoned["status_code"] == "ERROR"
    assert poisoned["attributes"]["error.type"] == "MappingError"
    in_trace = phoenix_server.spans(trace_id=[poisoned["context"]["trace_id"]])
    status = {(s["name"], s["status_code"], s["attributes"].get("error.type")) for s in in_trace}
    assert (f"process {db}.docs", "ERROR", "MappingError") in status
    assert ("syncd.map", "ERROR", "MappingError") in status
    assert ("syncd.write", "UNSET", None) in status
    # No document content in any span.
    stored = json.dumps(spans)
    assert "the first body" not in stored and "traced body" not in stored and "uno" not in stored

    # The span log names the same spans Phoenix stored, and the linked application span.
    logged = {(r["operation"], r["document_id"]): r for r in _span_log(tmp_path)}
    assert set(logged) == documents
    record = logged[("insert", "i:2")]
    assert record["trace_id"] == found["context"]["trace_id"]
    assert record["span_id"] == found["context"]["span_id"]
    assert (record["linked_trace_id"], record["linked_span_id"]) == (APP_TRACE_ID, APP_SPAN_ID)
    assert record["outcome"] == "applied"
    assert logged[("insert", "i:3")]["outcome"] == "dead-lettered: MappingError"
    # One log line names the dead-lettered document.
    (line,) = [text for text in daemon.output().splitlines() if "dead-lettered" in text]
    assert "i:3" in line and "MappingError" in line


def test_console_spans_link_to_the_documents_trace(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db, name = f"con_{uuid.uuid4().hex[:8]}", f"con-{uuid.uuid4().hex[:8]}"
    cfg = _config(tmp_path, mongo_uri, chroma_server, db, name, {"traces": "console"})
    settings = settings_of(cfg)
    daemon = syncd_factory(["run"], cfg)
    wait_until(lambda: _streaming(settings, name), 30, "the pipeline to start streaming")
    write = Writer(mongo_client, db, settings, name)
    write("insert_one", {"_id": "a", "body": "linked", "traceparent": f"  {TRACEPARENT} "})
    write("insert_one", {"_id": "b", "body": "unlinked", "traceparent": "00-not-a-context"})
    # Writes elsewhere in the database move the quiet stream's position: idle checkpoints.
    before = load_checkpoint(settings, name)
    assert before is not None and before.cluster_time is not None
    for n in range(3):
        mongo_client[db]["elsewhere"].insert_one({"n": n})
        wait_caught_up(mongo_client, db, settings, name, 30, "an idle checkpoint")
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()

    spans = _console_spans(daemon.output())
    roots = [s["name"] for s in spans if s["parent_id"] is None]
    assert roots == [f"process {db}.docs"] * 2, "idle checkpoints make no trace"
    batches = {e["attributes"]["syncd.document_id"]: (b, e) for b, e in _changes(spans)}
    assert set(batches) == {"s:a", "s:b"}
    linked, event = batches["s:a"]
    (link,) = linked["links"]
    assert event["links"] == linked["links"], "the change span links to the document's trace"
    assert link["context"]["trace_id"] == f"0x{APP_TRACE_ID}"
    assert link["context"]["span_id"] == f"0x{APP_SPAN_ID}"
    assert link["attributes"] == {"syncd.link": "document.traceparent"}
    assert linked["context"]["trace_id"] != f"0x{APP_TRACE_ID}"
    assert event["attributes"]["syncd.traceparent"] == TRACEPARENT
    # A malformed traceparent is ignored: no link, no attribute, and the change still applies.
    unlinked, bad = batches["s:b"]
    assert unlinked["links"] == [] and "syncd.traceparent" not in bad["attributes"]

    batch = linked  # span kind, which Phoenix does not keep
    assert batch["name"] == f"process {db}.docs" and batch["kind"] == "SpanKind.CONSUMER"
    assert batch["parent_id"] is None
    assert batch["resource"]["attributes"]["service.name"] == "syncd"

    records = {r["document_id"]: r for r in _span_log(tmp_path)}
    assert records["s:a"]["linked_trace_id"] == APP_TRACE_ID
    assert f"0x{records['s:a']['trace_id']}" == linked["context"]["trace_id"]
    assert "linked_trace_id" not in records["s:b"]


# --- metrics and probes ------------------------------------------------------------------


def test_metrics_count_changes_and_readyz_follows_chroma(
    tmp_path, mongo_uri, mongo_client, chroma_server_factory, syncd_factory
):
    db, name = f"met_{uuid.uuid4().hex[:8]}", f"met-{uuid.uuid4().hex[:8]}"
    chroma = chroma_server_factory()
    listen = f"127.0.0.1:{free_port()}"
    cfg = _config(tmp_path, mongo_uri, chroma, db, name, {"listen": listen})
    settings = settings_of(cfg)
    base = f"http://{listen}"
    daemon = syncd_factory(["run"], cfg)
    wait_until(lambda: http_get(f"{base}/readyz")[0] == 200, 30, "/readyz to answer 200")
    write = Writer(mongo_client, db, settings, name)

    def metric(sample: str, **labels: str) -> float | None:
        status, text = http_get(f"{base}/metrics")
        assert status == 200
        return metric_sample(text, sample, pipeline=name, **labels)

    inserted = metric("syncd_events_applied_total", operation="insert") or 0.0
    write("insert_many", [{"_id": i, "body": f"body {i}"} for i in range(3)])
    write("update_one", {"_id": 0}, {"$set": {"body": "changed"}})
    assert metric("syncd_events_applied_total", operation="insert") == inserted + 3
    assert metric("syncd_events_applied_total", operation="update") == 1
    wait_until(lambda: metric("syncd_lag_seconds") == 0, 30, "no lag once caught up and idle")
    for stage in ("read", "map", "lookup", "embed", "write", "checkpoint"):
        assert (metric("syncd_stage_seconds_count", stage=stage) or 0) >= 1, stage
    assert metric("syncd_pipeline_ready") == 1
    assert metric("syncd_pipeline_state", state="streaming") == 1

    # Chroma down and a write pending: not ready, with the reason; still alive.
    chroma.kill()
    mongo_client[db]["docs"].insert_one({"_id": 3, "body": "written during the outage"})
    wait_until(lambda: http_get(f"{base}/readyz")[0] == 503, 30, "/readyz to answer 503")
    report = json.loads(http_get(f"{base}/readyz")[1])
    assert report["ready"] is False
    assert report["pipelines"][name]["state"] == "retrying"
    assert name in report["not_ready"] and report["not_ready"][name]
    assert http_get(f"{base}/healthz")[0] == 200, "a dependency outage is not a reason to restart"
    assert metric("syncd_pipeline_ready") == 0
    assert metric("syncd_events_applied_total", operation="insert") == inserted + 3
    # The lag is the pending change's age, growing for as long as Chroma is down.
    first = wait_until(lambda: metric("syncd_lag_seconds") or None, 30, "the lag to show")
    wait_until(lambda: (metric("syncd_lag_seconds") or 0) > first, 30, "the lag to grow")

    # Chroma back on the same port: ready again, and the pending write is applied.
    chroma.start()
    wait_until(lambda: http_get(f"{base}/readyz")[0] == 200, 30, "/readyz to answer 200 again")
    wait_until(
        lambda: metric("syncd_events_applied_total", operation="insert") == inserted + 4,
        30,
        "the pending insert to be applied",
    )
    assert (metric("syncd_retries_total", kind="transient") or 0) >= 1
    assert chroma.client().get_collection(f"{name}-c").count() == 4
    wait_until(lambda: metric("syncd_lag_seconds") == 0, 30, "no lag once idle again")
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()


# --- secrets -----------------------------------------------------------------------------


def test_no_credential_reaches_logs_spans_or_metrics(
    tmp_path, mongo_uri, mongo_client, chroma_server_factory, syncd_factory, phoenix_server
):
    chroma_token = f"chroma-token-{uuid.uuid4().hex}"
    api_key = f"sk-live-{uuid.uuid4().hex}"
    mongo_password = f"mongo-pw-{uuid.uuid4().hex}"
    secrets = (chroma_token, api_key, mongo_password)
    db, name = f"sec_{uuid.uuid4().hex[:8]}", f"sec-{uuid.uuid4().hex[:8]}"
    chroma = chroma_server_factory()  # no auth: it accepts the token and ignores it
    listen = f"127.0.0.1:{free_port()}"
    base = f"http://{listen}"
    api = EmbeddingAPI(dimensions=32, api_key=api_key).start()  # refuses any other key
    try:
        telemetry = {
            "listen": listen,
            "traces": "otlp_http",
            "otlp_endpoint": phoenix_server.otlp_http_endpoint,
        }
        embedder = {
            "kind": "openai",
            "base_url": api.base_url,
            "model": "test-embed",
            "dimensions": 32,
            "api_key_env": "SYNCD_TEST_EMBED_KEY",
        }
        cfg = _config(tmp_path, mongo_uri, chroma, db, name, telemetry, embedder=embedder)
        env = {
            "SYNCD_CHROMA_TOKEN": chroma_token,
            "SYNCD_TEST_EMBED_KEY": api_key,
            "SYNCD_LOG_LEVEL": "debug",  # libraries' chatter too
        }
        settings = settings_of(cfg, env)
        daemon = syncd_factory(["run"], cfg, env)
        wait_until(lambda: http_get(f"{base}/readyz")[0] == 200, 30, "/readyz to answer 200")
        write = Writer(mongo_client, db, settings, name)
        write("insert_one", {"_id": 1, "body": "one", "traceparent": TRACEPARENT})
        assert api.inputs == ["one"], "the key was sent and accepted"
        # An outage: errors and retries are where credentials tend to slip into messages.
        chroma.kill()
        mongo_client[db]["docs"].insert_one({"_id": 2, "body": "two"})
        wait_until(lambda: http_get(f"{base}/readyz")[0] == 503, 30, "/readyz to answer 503")
        probes = [http_get(f"{base}/readyz")[1], http_get(f"{base}/healthz")[1]]
        chroma.start()
        write("update_one", {"_id": 2}, {"$set": {"body": "deux"}})
        probes += [http_get(f"{base}/metrics")[1], http_get(f"{base}/readyz")[1]]
        daemon.terminate()
        assert daemon.wait(30) == ExitCode.OK, daemon.output()
    finally:
        api.close()

    # `syncd check` with a password in the MongoDB URI, from the file and from the
    # environment; nothing listens on the port, so the failure messages are printed too.
    secret_uri = f"mongodb://syncd:{mongo_password}@127.0.0.1:{free_port()}/?directConnection=true"
    check_cfg = write_config(
        tmp_path / "check.toml",
        mongo_uri=secret_uri,
        chroma={"mode": "http", "host": chroma.host, "port": chroma.port},
        checkpoint_db=f"{db}_syncd",
        extra={"mongodb": {"server_selection_timeout_ms": 300}},
        pipelines=[pipeline_table(name, db, embedder=embedder)],
    )
    from_env = {
        **env,
        "SYNCD_MONGODB_URI": secret_uri,
        "SYNCD_MONGODB__SERVER_SELECTION_TIMEOUT_MS": "300",
    }
    with ThreadPoolExecutor(2) as pool:
        checks = list(
            pool.map(lambda a: run_syncd(["check"], *a), [(check_cfg, env), (cfg, from_env)])
        )
    for check in checks:
        assert check.returncode == ExitCode.SOURCE, check.stdout + check.stderr
        assert "FAIL  MongoDB mongodb://syncd:***@127.0.0.1:" in check.stdout, check.stdout

    def exported(spans: list[dict[str, Any]]) -> bool:
        ours = [s for s in spans if s["attributes"].get("syncd.pipeline") == name]
        return (
            any(s["status_code"] == "ERROR" for s in ours)
            and sum(s["name"].startswith("process ") and s["status_code"] != "ERROR" for s in ours)
            >= 2
        )  # the first insert, and the outage's write once Chroma was back

    spans = phoenix_server.wait_for_spans(exported, timeout=30)
    outputs = {
        "daemon output": daemon.output(),
        "span log": "".join(p.read_text() for p in tmp_path.glob("spans.jsonl*")),
        "Phoenix spans": json.dumps(spans),
        "/metrics, /readyz, /healthz": "\n".join(probes),
        **{f"check {n}": c.stdout + c.stderr for n, c in enumerate(checks)},
    }
    assert "Chroma" in outputs["daemon output"] and "retrying" in outputs["daemon output"]
    for where, text in outputs.items():
        for secret in secrets:
            assert secret not in text, f"{where} contains a credential"


# --- shipped monitoring ------------------------------------------------------------------

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
# Exported as families from the start, with samples only after a retry, or where the
# oplog is readable (the stand-in has none): declared is what can be checked here.
# Declared by every daemon, sampled only once something happens: a retry, a readable
# oplog, a rebuild (tests/e2e/test_rebuild_on_start.py sees the rebuild's samples).
DECLARED_ONLY = {
    "syncd_retries_total",
    "syncd_oplog_headroom_seconds",
    "syncd_rebuild_phase",
    "syncd_rebuild_documents_scanned",
    "syncd_rebuild_documents_estimated",
    "syncd_rebuild_lag_seconds",
}


def _monitoring_metrics() -> set[str]:
    """Every metric name the shipped dashboard and alert rules query."""
    import yaml

    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return {m for e in exprs for m in re.findall(r"\b(?:syncd|process|python)_[a-z0-9_]+", e)}


def test_every_metric_the_dashboard_and_alerts_use_is_exported(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    used = _monitoring_metrics()
    assert {"syncd_lag_seconds", "syncd_stage_seconds_bucket", "syncd_build_info"} <= used
    db, name = f"mon_{uuid.uuid4().hex[:8]}", f"mon-{uuid.uuid4().hex[:8]}"
    mongo_client[db]["docs"].insert_many([{"_id": i, "body": f"existing {i}"} for i in range(5)])
    listen = f"127.0.0.1:{free_port()}"
    telemetry = {"listen": listen, "verify_sample_every_s": 0.5, "verify_sample_size": 10}
    cfg = _config(
        tmp_path, mongo_uri, chroma_server, db, name, telemetry,
        snapshot="initial", on_error="dead_letter",
    )  # fmt: skip
    settings = settings_of(cfg)
    daemon = syncd_factory(["run"], cfg)
    wait_until(lambda: _streaming(settings, name), 60, "the snapshot to finish")
    write = Writer(mongo_client, db, settings, name)
    write("insert_one", {"_id": 10, "body": "new"})
    write("insert_one", {"_id": 11, "body": {"not": "text"}})  # dead-lettered

    def missing() -> set[str]:
        text = http_get(f"http://{listen}/metrics")[1]
        families = list(text_string_to_metric_families(text))
        sampled = {s.name for f in families for s in f.samples}
        declared = {f"{f.name}{suffix}" for f in families for suffix in ("", "_total")}
        return {m for m in used if m not in sampled and not (m in DECLARED_ONLY and m in declared)}

    wait_until(lambda: not missing() or None, 30, "every metric to be exported")
    assert not missing()
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()


def test_systemd_status_follows_state_and_lag(
    tmp_path, mongo_uri, mongo_client, chroma_server_factory, syncd_factory
):
    import socket

    db, name = f"sd_{uuid.uuid4().hex[:8]}", f"sd-{uuid.uuid4().hex[:8]}"
    chroma = chroma_server_factory()
    cfg = _config(tmp_path, mongo_uri, chroma, db, name, {})
    address = f"/tmp/syncd-status-{uuid.uuid4().hex[:8]}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(1)
        statuses: list[str] = []

        def status_shows(text: str) -> bool:
            try:
                message = sock.recv(4096).decode()
            except TimeoutError:
                return False
            statuses.extend(line[7:] for line in message.splitlines() if line.startswith("STATUS="))
            return any(text in s for s in statuses)

        try:
            daemon = syncd_factory(["run"], cfg, {"NOTIFY_SOCKET": address})
            wait_until(lambda: status_shows(f"{name} streaming, lag 0s"), 30, "streaming status")
            chroma.kill()
            mongo_client[db]["docs"].insert_one({"_id": 1, "body": "during the outage"})
            wait_until(lambda: status_shows(f"{name} retrying, lag "), 30, "retrying status")
            chroma.start()
            statuses.clear()
            wait_until(lambda: status_shows(f"{name} streaming, lag 0s"), 60, "recovered status")
            daemon.terminate()
            assert daemon.wait(30) == ExitCode.OK, daemon.output()
        finally:
            Path(address).unlink(missing_ok=True)


def test_status_lag_is_the_wait_of_the_oldest_unapplied_change(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db, name = f"lag_{uuid.uuid4().hex[:8]}", f"lag-{uuid.uuid4().hex[:8]}"
    # Idle checkpoints far apart: the checkpoint's position stays behind the server's
    # clock on a quiet pipeline, which is not lag.
    cfg = _config(
        tmp_path,
        mongo_uri,
        chroma_server,
        db,
        name,
        {},
        snapshot="initial",
        idle_checkpoint_interval_s=3600,
    )
    settings = settings_of(cfg)

    def lag() -> Any:
        result = run_syncd(["status", name, "--json"], cfg)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)[0].get("lag_s")

    mongo_client[db]["docs"].insert_one({"_id": 1, "body": "one"})
    daemon = syncd_factory(["run"], cfg)
    wait_until(lambda: _streaming(settings, name), 60, "the snapshot to finish")
    # Time passes on the server (writes elsewhere), the pipeline has nothing to do.
    for i in range(3):
        time.sleep(1.1)
        mongo_client[db]["elsewhere"].insert_one({"_id": i})
    assert lag() == 0
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()

    # Stopped with a change waiting: its wait is the lag, and it grows.
    mongo_client[db]["docs"].insert_one({"_id": 2, "body": "two"})
    time.sleep(2.1)
    mongo_client[db]["elsewhere"].insert_one({"_id": "tick"})
    assert lag() >= 2
