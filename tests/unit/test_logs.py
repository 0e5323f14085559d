"""Structured log lines without credentials, and the local span log's rotation and lookup."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.config import LogSettings
from syncd.errors import SourceFatalError
from syncd.logs import setup_logging
from syncd.redact import redact_every_pattern, redact_text
from syncd.spanlog import SpanLog

URI = "mongodb://syncd:hunter2-secret@db.example:27017/app?authSource=admin"
BEARER = "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig"
API_KEY = "api_key=sk-live-0123456789abcdef"
SECRETS = ("hunter2-secret", "eyJhbGciOiJIUzI1NiJ9", "sk-live-0123456789abcdef")


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """Install syncd's handler on a buffer; restore the root logger afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    yield stream
    for handler in list(root.handlers):
        if getattr(handler, "_syncd", False):
            root.removeHandler(handler)
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def test_json_lines_carry_fields_and_extras_with_credentials_redacted(output):
    setup_logging(LogSettings(format="json", level="info"), stream=output)
    log = logging.getLogger("syncd.pipeline")
    log.info(
        "connected to %s",
        URI,
        extra={"pipeline": "articles", "document_id": "42", "header": BEARER, "url": URI},
    )
    log.warning("embedding API said no: %s", API_KEY, extra={"api_key": "sk-live-0123456789abcdef"})
    (first, second) = [json.loads(line) for line in lines(output)]
    assert (first["severity_text"], first["severity_number"]) == ("INFO", 9)
    assert first["instrumentation_scope"] == {"name": "syncd.pipeline"}
    assert first["timestamp"].endswith("Z") and "T" in first["timestamp"]
    assert first["body"] == "connected to mongodb://syncd:***@db.example:27017/app?authSource=admin"
    attributes = first["attributes"]
    assert attributes["pipeline"] == "articles" and attributes["document_id"] == "42"
    assert attributes["header"] == "Authorization: ***"
    assert "trace_id" not in first and "span_id" not in first, "not inside a span"
    assert (second["severity_text"], second["severity_number"]) == ("WARNING", 13)
    assert second["attributes"]["api_key"] == "***"
    assert "api_key=***" in second["body"]
    assert_no_secret(output.getvalue())


def test_exception_text_is_redacted_and_error_context_lifted(output):
    setup_logging(LogSettings(format="json"), stream=output)
    try:
        try:
            raise ConnectionError(f"refused by {URI} with {BEARER}")
        except ConnectionError as cause:
            raise SourceFatalError(
                f"MongoDB refused {URI}", pipeline="articles", namespace="app.articles",
                hint="check the password",
            ) from cause  # fmt: skip
    except SourceFatalError:
        logging.getLogger("syncd").exception("pipeline stopped")
    (line,) = lines(output)
    record = json.loads(line)
    assert (record["severity_text"], record["severity_number"]) == ("ERROR", 17)
    attributes = record["attributes"]
    assert "ConnectionError: refused by mongodb://syncd:***@" in attributes["exception.stacktrace"]
    assert attributes["exception.type"] == "SourceFatalError"
    assert "mongodb://syncd:***@" in attributes["exception.message"]
    assert attributes["pipeline"] == "articles" and attributes["namespace"] == "app.articles"
    assert attributes["hint"] == "check the password"
    assert_no_secret(line)


def test_text_format_is_one_readable_line_with_key_values(output):
    setup_logging(LogSettings(format="text", level="debug"), stream=output)
    logging.getLogger("syncd.sink").debug(
        "upsert to %s failed", "http://admin:pw12345@chroma:8000", extra={"pipeline": "a b", "n": 3}
    )
    (line,) = lines(output)
    assert " DEBUG syncd.sink: upsert to http://admin:***@chroma:8000 failed" in line
    assert 'pipeline="a b"' in line and "n=3" in line
    assert "pw12345" not in line


def test_library_records_are_redacted_too_and_setup_replaces_its_handler(output):
    setup_logging(LogSettings(format="json"), stream=output)
    setup_logging(LogSettings(format="json", level="warning"), stream=output)
    assert sum(getattr(h, "_syncd", False) for h in logging.getLogger().handlers) == 1
    logging.getLogger("pymongo.topology").warning("heartbeat to %s failed", URI)
    logging.getLogger("pymongo.topology").info("not shown at warning level")
    (line,) = lines(output)
    assert json.loads(line)["instrumentation_scope"] == {"name": "pymongo.topology"}
    assert_no_secret(line)


def _library_error(logger: str) -> None:
    try:
        raise ConnectionRefusedError(f"connecting to {URI} refused")
    except ConnectionRefusedError:
        logging.getLogger(logger).error("MongoClient background task failed", exc_info=True)


def test_a_library_error_is_one_line_unless_debug_asks_for_its_traceback(output):
    setup_logging(LogSettings(format="text"), stream=output)
    _library_error("pymongo.client")
    try:
        raise ValueError("kept")
    except ValueError:
        logging.getLogger("syncd.daemon").exception("ours")
    text = output.getvalue()
    assert "Traceback" in text and "ValueError" in text, "syncd's own tracebacks are kept"
    library = [line for line in lines(output) if "background task" in line]
    assert len(library) == 1 and "ConnectionRefusedError: connecting to" in library[0]
    assert text.count("Traceback") == 1
    assert_no_secret(text)

    output.truncate(0), output.seek(0)
    setup_logging(LogSettings(format="text", level="debug"), stream=output)
    _library_error("pymongo.client")
    assert "Traceback" in output.getvalue()
    assert_no_secret(output.getvalue())


def test_json_lines_inside_a_span_carry_its_trace_and_span_ids(output):
    from opentelemetry.sdk.trace import TracerProvider

    setup_logging(LogSettings(format="json"), stream=output)
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("syncd.write") as span:
        logging.getLogger("syncd.sink").warning("slow write")
    logging.getLogger("syncd.sink").warning("outside")
    inside, outside = [json.loads(line) for line in lines(output)]
    context = span.get_span_context()
    assert inside["trace_id"] == f"{context.trace_id:032x}"
    assert inside["span_id"] == f"{context.span_id:016x}"
    assert "trace_id" not in outside


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_lines_to_the_journal_start_with_their_syslog_priority(tmp_path, monkeypatch, log_format):
    path = tmp_path / "stderr"
    with path.open("w") as stream:
        status = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
        try:
            setup_logging(LogSettings(format=log_format, level="debug"), stream=stream)
            log = logging.getLogger("syncd.pipeline")
            log.debug("d")
            log.info("i")
            log.warning("w")
            log.error("e")
            log.critical("c")
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("failed")
        finally:
            _remove_syncd_handlers()
    got = path.read_text().splitlines()
    assert [line[:3] for line in got[:5]] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert all(line.startswith("<3>") for line in got[5:]), "a traceback stays at its priority"
    if log_format == "json":
        assert json.loads(got[2][3:])["body"] == "w"


def test_a_stream_that_is_not_the_journal_gets_no_prefix(tmp_path, monkeypatch, output):
    monkeypatch.setenv("JOURNAL_STREAM", "8:123456")  # the journal, but not our stream
    path = tmp_path / "stderr"
    with path.open("w") as stream:
        setup_logging(LogSettings(format="text"), stream=stream)
        logging.getLogger("syncd").warning("plain")
        _remove_syncd_handlers()
    assert " WARNING syncd: plain" in path.read_text()
    assert not path.read_text().startswith("<")


def _remove_syncd_handlers() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_syncd", False):
            root.removeHandler(handler)


def test_a_bad_format_string_does_not_lose_the_record(output):
    setup_logging(LogSettings(format="json"), stream=output)
    (handler,) = [h for h in logging.getLogger().handlers if getattr(h, "_syncd", False)]
    bad = logging.makeLogRecord({"name": "syncd", "msg": "%d items from %s"})
    bad.args = ("not a number", URI)
    handler.handle(bad)  # directly: pytest's own capture handler would trip first
    (line,) = lines(output)
    assert "not a number" in json.loads(line)["body"]
    assert_no_secret(line)


def record(pipeline: str, document_id: str, n: int) -> dict[str, object]:
    return {
        "pipeline": pipeline,
        "document_id": document_id,
        "operation": "update",
        "cluster_time": f"1700000000.{n}",
        "trace_id": f"{n:032x}",
        "span_id": f"{n:016x}",
        "outcome": "applied",
    }


def test_span_log_rotates_to_one_backup_and_find_reads_both(tmp_path):
    path = tmp_path / "spans" / "spans.jsonl"
    span_log = SpanLog(path, max_bytes=2_000)
    for n in range(40):
        span_log.append(record("articles", "42" if n % 2 else "7", n))
    span_log.close()
    backup = path.with_name("spans.jsonl.1")
    assert backup.exists()
    assert path.stat().st_size <= 2_000 and backup.stat().st_size <= 2_000
    assert not path.with_name("spans.jsonl.2").exists()
    kept = [json.loads(line) for p in (backup, path) for line in p.read_text().splitlines()]
    assert kept[-1]["cluster_time"] == "1700000000.39", "the newest records survive"
    assert len(kept) < 40, "older ones were dropped"

    reopened = SpanLog(path, max_bytes=2_000)
    found = reopened.find("articles", "42", limit=3)
    assert [r["cluster_time"] for r in found] == [
        "1700000000.35",
        "1700000000.37",
        "1700000000.39",
    ]
    all_found = reopened.find("articles", "42", limit=100)
    assert all(r["document_id"] == "42" for r in all_found)
    assert len(all_found) == len([r for r in kept if r["document_id"] == "42"])
    assert reopened.find("other", "42") == []


def test_span_log_appends_across_restarts_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "spans.jsonl"
    first = SpanLog(path, max_bytes=1_000_000)
    first.append(record("articles", "1", 1))
    first.close()
    with path.open("a") as handle:
        handle.write('{"pipeline": "articles", "document_id": "1", "cut sh')  # a crash mid-write
    second = SpanLog(path, max_bytes=1_000_000)
    second.append({**record("articles", "1", 2), "note": f"from {URI}"})
    found = second.find("articles", "1")
    assert [r["cluster_time"] for r in found] == ["1700000000.1", "1700000000.2"]
    assert found[1]["note"] == "from mongodb://syncd:***@db.example:27017/app?authSource=admin"
    second.close()
    assert "hunter2-secret" not in path.read_text()


def test_span_log_needs_a_positive_size(tmp_path):
    with pytest.raises(ValueError, match="max_bytes"):
        SpanLog(tmp_path / "x.jsonl", max_bytes=0)


_SECRET_SHAPES = [
    "mongodb://u:p@h/db",
    "https://tok@h",
    "PASSWORD=x1",
    "Api-Key: abc",
    "X-Chroma-Token: t0k",
    "authorization=Bearer abc.def",
    "CREDENTIALS='c'",
    "passwd: z",
    "bEaReR qwerty",
    "InvalidResumeToken: bad",
    "i:42",
    "2026-11-26T00:21:30.123Z",
]


@given(st.lists(st.sampled_from(_SECRET_SHAPES) | st.text(max_size=20), max_size=6))
def test_redact_text_shortcuts_change_nothing(parts: list[str]) -> None:
    text = " ".join(parts)
    assert redact_text(text) == redact_every_pattern(text)
