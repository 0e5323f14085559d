"""The classifier, against real exception instances from every dependency.

Each row builds the exception the way its library does (chromadb's own HTTP error
mapping is fed a real ``httpx.Response``), so a library upgrade that changes what it
raises shows up here rather than as a retry loop that never ends, or one that never
starts.
"""

from __future__ import annotations

from collections.abc import Callable

import bson.errors
import httpcore
import httpx
import pytest
from chromadb.api.base_http_client import BaseHTTPClient
from chromadb.api.types import validate_metadata
from pymongo import errors as mongo

from syncd.errors import (
    ConsistencyError,
    ErrorKind,
    ExitCode,
    HistoryLostError,
    MappingError,
    OversizedError,
    SinkFatalError,
    SinkRejectedError,
    SinkUnavailableError,
    SourceFatalError,
    TransientError,
    body_excerpt,
    classify,
    from_mongo,
    from_sink,
    http_status_kind,
    parse_retry_after,
    retries_exhausted,
)
from tests.harness.ports import free_port

T, P, F = ErrorKind.TRANSIENT, ErrorKind.POISON, ErrorKind.FATAL
_REQUEST = httpx.Request("POST", "http://127.0.0.1:8000/api/v2/collections/x/upsert")


def op_failure(code: int, *labels: str) -> mongo.OperationFailure:
    details = {"ok": 0, "code": code, "errmsg": "from the server"}
    if labels:
        details["errorLabels"] = list(labels)
    return mongo.OperationFailure("from the server", code=code, details=details)


def chroma_error(status: int, body: str) -> BaseException:
    """What chromadb's HTTP client raises for this response (its own mapping)."""
    try:
        BaseHTTPClient._raise_chroma_error(httpx.Response(status, text=body, request=_REQUEST))
    except BaseException as exc:  # the exception is the data under test
        return exc
    raise AssertionError(f"chromadb raised nothing for HTTP {status}")


def http_status_error(status: int) -> httpx.HTTPStatusError:
    response = httpx.Response(status, request=_REQUEST)
    return httpx.HTTPStatusError(f"HTTP {status}", request=_REQUEST, response=response)


def chroma_validation_error() -> ValueError:
    try:
        validate_metadata({"nested": {"a": 1}})  # type: ignore[dict-item]
    except ValueError as exc:
        return exc
    raise AssertionError("chromadb accepted a nested metadata value")


def chroma_unreachable() -> BaseException:
    """What chromadb's HttpClient raises when nothing listens: a ValueError over ConnectError."""
    import chromadb
    from chromadb.config import Settings

    try:
        chromadb.HttpClient(
            host="127.0.0.1", port=free_port(), settings=Settings(anonymized_telemetry=False)
        )
    except BaseException as exc:  # the exception is the data under test
        return exc
    raise AssertionError("chromadb connected to a port nobody listens on")


def chroma_tenant_lookup_failed(status: int, body: str) -> BaseException:
    """chromadb's client start-up: any error looking up the tenant becomes a ValueError."""
    try:
        try:
            BaseHTTPClient._raise_chroma_error(httpx.Response(status, text=body, request=_REQUEST))
        except Exception:
            raise ValueError("Could not connect to tenant t. Are you sure it exists?")  # noqa: B904
    except ValueError as exc:
        return exc
    raise AssertionError("unreachable")


WEB_PAGE_404 = (
    "<!DOCTYPE html><html><head><title>404 Not Found</title><style>body{color:red}</style>"
    "</head><body><h1>Not Found</h1><p>The requested URL was not found on this server.</p>"
    + "<p>padding</p>" * 200
    + "</body></html>"
)


def _json(name: str, message: str = "details") -> str:
    return f'{{"error": "{name}", "message": "{message}"}}'


CASES: list[tuple[str, Callable[[], BaseException], ErrorKind]] = [
    # --- MongoDB: network and elections -----------------------------------------
    ("AutoReconnect", lambda: mongo.AutoReconnect("connection reset"), T),
    ("NetworkTimeout", lambda: mongo.NetworkTimeout("timed out"), T),
    ("NotPrimaryError", lambda: mongo.NotPrimaryError("not primary", {}), T),
    ("ServerSelectionTimeout", lambda: mongo.ServerSelectionTimeoutError("no servers"), T),
    ("WaitQueueTimeout", lambda: mongo.WaitQueueTimeoutError("pool full"), T),
    ("189 PrimarySteppedDown", lambda: op_failure(189), T),
    ("10107 NotWritablePrimary", lambda: op_failure(10107), T),
    ("11602 InterruptedDueToReplStateChange", lambda: op_failure(11602), T),
    ("91 ShutdownInProgress", lambda: op_failure(91), T),
    ("43 CursorNotFound", lambda: mongo.CursorNotFound("cursor gone", 43, {}), T),
    ("50 MaxTimeMSExpired", lambda: mongo.ExecutionTimeout("slow", 50, {}), T),
    ("label ResumableChangeStreamError", lambda: op_failure(280, "ResumableChangeStreamError"), T),
    ("label RetryableWriteError", lambda: op_failure(64, "RetryableWriteError"), T),
    # --- MongoDB: nothing improves by waiting -------------------------------------
    ("286 ChangeStreamHistoryLost", lambda: op_failure(286), F),
    ("286 even with a resumable label", lambda: op_failure(286, "ResumableChangeStreamError"), F),
    ("260 InvalidResumeToken", lambda: op_failure(260), F),
    ("13 Unauthorized", lambda: op_failure(13), F),
    ("18 AuthenticationFailed", lambda: op_failure(18), F),
    ("label NonResumable", lambda: op_failure(189, "NonResumableChangeStreamError"), F),
    ("11000 DuplicateKey", lambda: mongo.DuplicateKeyError("dup", 11000, {}), F),
    ("ConfigurationError", lambda: mongo.ConfigurationError("bad option"), F),
    ("InvalidDocument", lambda: bson.errors.InvalidDocument("key '$x' must not start with '$'"), P),
    # --- Chroma over HTTP (chromadb's own error mapping) ---------------------------
    ("chroma 500 InternalError", lambda: chroma_error(500, _json("InternalError")), T),
    ("chroma 502 HTML from a proxy", lambda: chroma_error(502, "<html>Bad Gateway</html>"), T),
    ("chroma 503 unknown error name", lambda: chroma_error(503, _json("Unavailable")), T),
    ("chroma 429 RateLimitError", lambda: chroma_error(429, _json("RateLimitError")), T),
    ("chroma 400 InvalidArgument", lambda: chroma_error(400, _json("InvalidArgumentError")), P),
    ("chroma 400 InvalidDimension", lambda: chroma_error(400, _json("InvalidDimension")), P),
    ("chroma 413 BatchSizeExceeded", lambda: chroma_error(413, _json("BatchSizeExceededError")), P),
    ("chroma 401 AuthorizationError", lambda: chroma_error(401, _json("AuthorizationError")), F),
    ("chroma 403 AuthError", lambda: chroma_error(403, _json("AuthError")), F),
    ("chroma 404 NotFoundError", lambda: chroma_error(404, _json("NotFoundError")), F),
    ("chroma down: ValueError over ConnectError", chroma_unreachable, T),
    ("web server 404 page instead of Chroma", lambda: chroma_error(404, WEB_PAGE_404), F),
    ("tenant lookup got a web page", lambda: chroma_tenant_lookup_failed(404, WEB_PAGE_404), F),
    ("tenant lookup got a 503", lambda: chroma_tenant_lookup_failed(503, "busy"), T),
    ("501 Not Implemented page", lambda: chroma_error(501, "<html>Unsupported</html>"), F),
    ("chroma local validation ValueError", chroma_validation_error, F),
    # --- httpx transport (Chroma or the embedding API unreachable) -----------------
    ("httpx ConnectError", lambda: httpx.ConnectError("refused", request=_REQUEST), T),
    ("httpx ReadError (reset mid-response)", lambda: httpx.ReadError("reset", request=_REQUEST), T),
    ("httpx WriteError", lambda: httpx.WriteError("broken pipe", request=_REQUEST), T),
    ("httpx ReadTimeout", lambda: httpx.ReadTimeout("slow", request=_REQUEST), T),
    ("httpx ConnectTimeout", lambda: httpx.ConnectTimeout("slow", request=_REQUEST), T),
    ("httpx PoolTimeout", lambda: httpx.PoolTimeout("pool", request=_REQUEST), T),
    ("httpx RemoteProtocol", lambda: httpx.RemoteProtocolError("hung up", request=_REQUEST), T),
    ("httpx LocalProtocolError", lambda: httpx.LocalProtocolError("our bug"), F),
    ("httpx UnsupportedProtocol", lambda: httpx.UnsupportedProtocol("ftp://"), F),
    ("HTTPStatusError 503", lambda: http_status_error(503), T),
    ("HTTPStatusError 429", lambda: http_status_error(429), T),
    ("HTTPStatusError 422", lambda: http_status_error(422), P),
    ("HTTPStatusError 401", lambda: http_status_error(401), F),
    # --- the standard library --------------------------------------------------------
    ("ConnectionRefusedError", lambda: ConnectionRefusedError(111, "refused"), T),
    ("TimeoutError (socket.timeout)", lambda: TimeoutError("timed out"), T),
    ("ConnectionResetError", lambda: ConnectionResetError(104, "reset by peer"), T),
    ("KeyError (a bug)", lambda: KeyError("x"), F),
    # --- our own classes carry their kind -------------------------------------------------
    ("MappingError", lambda: MappingError("text field missing"), P),
    ("OversizedError", lambda: OversizedError("too big"), P),
    ("ConsistencyError", lambda: ConsistencyError("read-back differs"), T),
    ("TransientError", lambda: TransientError("later"), T),
    ("HistoryLostError", lambda: HistoryLostError("gone"), F),
]


@pytest.mark.parametrize(("make", "kind"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_classify(make: Callable[[], BaseException], kind: ErrorKind) -> None:
    assert classify(make()) is kind


def test_chroma_validation_value_error_becomes_poison_at_the_sink_boundary() -> None:
    exc = chroma_validation_error()
    assert type(exc) is ValueError
    translated = from_sink(exc, records=True, pipeline="p")
    assert isinstance(translated, SinkRejectedError)
    assert translated.kind is P
    assert translated.pipeline == "p"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: chroma_error(500, _json("InternalError")), TransientError),
        (lambda: httpx.ReadError("reset", request=_REQUEST), TransientError),
        (lambda: chroma_error(400, _json("InvalidArgumentError")), SinkFatalError),
        (lambda: chroma_error(404, _json("NotFoundError")), SinkFatalError),
        (lambda: chroma_error(403, _json("AuthError")), SinkFatalError),
        (chroma_unreachable, SinkUnavailableError),
        (chroma_validation_error, SinkFatalError),
    ],
    ids=["500", "reset", "400", "404", "403", "unreachable", "ValueError"],
)
def test_from_sink_families(make: Callable[[], BaseException], expected: type) -> None:
    """Outside a write of records, no refusal is about a document: none is poison."""
    assert isinstance(from_sink(make()), expected)


def test_a_write_of_records_can_be_refused_for_its_content() -> None:
    refused = from_sink(chroma_error(400, _json("InvalidArgumentError")), records=True)
    assert isinstance(refused, SinkRejectedError)
    down = from_sink(chroma_unreachable(), records=True)
    assert isinstance(down, SinkUnavailableError)


def test_chroma_down_is_transient_with_a_sink_exit_code_and_no_misleading_words() -> None:
    error = from_sink(chroma_unreachable(), pipeline="p")
    assert error.kind is T and error.exit_code == ExitCode.SINK
    assert error.message.startswith("Chroma unavailable: ConnectError")
    assert "rejected" not in error.describe()
    assert "start Chroma (or correct chroma.host and chroma.port)" in (error.hint or "")


@pytest.mark.parametrize(
    "make",
    [
        lambda: httpx.ReadTimeout("timed out", request=_REQUEST),
        lambda: httpx.WriteTimeout("timed out", request=_REQUEST),
        lambda: httpcore.ReadTimeout("timed out"),
    ],
    ids=["httpx read", "httpx write", "httpcore read"],
)
def test_chroma_too_slow_gets_its_own_hint(make: Callable[[], BaseException]) -> None:
    """A server that answers past chroma.timeout_s is up: starting it is no advice."""
    error = from_sink(make(), pipeline="p")
    assert isinstance(error, SinkUnavailableError) and error.kind is T
    assert error.message.startswith("Chroma unavailable: ") and "Timeout" in error.message
    hint = error.hint or ""
    assert "start Chroma" not in hint and "chroma.host" not in hint, hint
    assert "chroma.timeout_s" in hint and "load" in hint, hint


def test_a_connect_timeout_is_an_unreachable_chroma() -> None:
    error = from_sink(httpx.ConnectTimeout("timed out", request=_REQUEST), pipeline="p")
    assert "start Chroma (or correct chroma.host and chroma.port)" in (error.hint or "")


@pytest.mark.parametrize(
    "make",
    [
        lambda: chroma_error(404, WEB_PAGE_404),
        lambda: chroma_tenant_lookup_failed(404, WEB_PAGE_404),
    ],
    ids=["collection call", "client start"],
)
def test_a_web_page_instead_of_chroma_is_one_short_line_with_a_hint(
    make: Callable[[], BaseException],
) -> None:
    error = from_sink(make())
    assert isinstance(error, SinkFatalError)
    line = error.describe()
    assert "<" not in line and "color:red" not in line and "\n" not in line, line
    assert "HTTP 404 (404 Not Found Not Found The requested URL" in line
    assert len(error.message) < 220, error.message
    assert "check chroma.host, chroma.port and chroma.ssl" in (error.hint or "")


def test_body_excerpt_caps_and_strips() -> None:
    assert body_excerpt('{"error": "bad input"}') == '{"error": "bad input"}'
    assert body_excerpt("a  b\n\nc") == "a b c"
    assert len(body_excerpt("x" * 1000)) == 160


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, P), (401, F), (403, F), (404, F), (405, F), (408, T), (413, P), (422, P), (429, T),
     (500, T), (501, F), (502, T), (503, T), (504, T), (505, F), (302, F)],
)  # fmt: skip
def test_http_status_table(status: int, kind: ErrorKind) -> None:
    assert http_status_kind(status) is kind


def test_retry_after_in_seconds_or_as_a_date() -> None:
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("inf") is None and parse_retry_after("nan") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    wait = parse_retry_after(later)
    assert wait is not None and 100 < wait <= 120
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=120), usegmt=True)
    assert parse_retry_after(past) == 0.0


def test_giving_up_keeps_the_exit_code_of_the_server_that_failed() -> None:
    chroma_down, mongo_down = from_sink(chroma_unreachable()), from_mongo(mongo.AutoReconnect("x"))
    assert isinstance(chroma_down, TransientError) and isinstance(mongo_down, TransientError)
    sink_side = retries_exhausted(chroma_down, 30, pipeline="p")
    assert isinstance(sink_side, SinkFatalError) and sink_side.exit_code == ExitCode.SINK
    assert sink_side.message.startswith("still failing after 30 s of retries: Chroma unavailable")
    source_side = retries_exhausted(mongo_down, 30)
    assert isinstance(source_side, SourceFatalError) and source_side.exit_code == ExitCode.SOURCE


def test_a_change_event_past_16_mib_is_named_with_what_keeps_events_under_it() -> None:
    failure = mongo.OperationFailure(
        "BSONObj size: 18874881 (0x1200101) is invalid. Size must be between 0 and 16793600(16MB)",
        code=10334,
    )
    error = from_mongo(failure, pipeline="p")
    assert isinstance(error, SourceFatalError)
    assert "a change event is larger than MongoDB allows (16 MiB)" in error.message
    assert "BSONObj size: 18874881" in error.message
    assert error.hint is not None and "MongoDB 6.0.7 and newer" in error.hint
