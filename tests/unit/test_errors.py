"""The classifier, against real exception instances from every dependency.

Each row builds the exception the way its library does (chromadb's own HTTP error
mapping is fed a real ``httpx.Response``), so a library upgrade that changes what it
raises shows up here rather than as a retry loop that never ends, or one that never
starts.
"""

from __future__ import annotations

from collections.abc import Callable

import bson.errors
import httpx
import pytest
from chromadb.api.base_http_client import BaseHTTPClient
from chromadb.api.types import validate_metadata
from pymongo import errors as mongo

from syncd.errors import (
    ConsistencyError,
    ErrorKind,
    HistoryLostError,
    MappingError,
    OversizedError,
    SinkFatalError,
    SinkRejectedError,
    SourceFatalError,
    TransientError,
    classify,
    from_mongo,
    from_sink,
)

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
    translated = from_sink(exc, pipeline="p")
    assert isinstance(translated, SinkRejectedError)
    assert translated.kind is P
    assert translated.pipeline == "p"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: chroma_error(500, _json("InternalError")), TransientError),
        (lambda: httpx.ReadError("reset", request=_REQUEST), TransientError),
        (lambda: chroma_error(400, _json("InvalidArgumentError")), SinkRejectedError),
        (lambda: chroma_error(404, _json("NotFoundError")), SinkFatalError),
        (lambda: chroma_error(403, _json("AuthError")), SinkFatalError),
    ],
    ids=["500", "reset", "400", "404", "403"],
)
def test_from_sink_families(make: Callable[[], BaseException], expected: type) -> None:
    assert isinstance(from_sink(make()), expected)


def test_from_mongo_families_and_hints() -> None:
    lost = from_mongo(op_failure(286), pipeline="p")
    assert isinstance(lost, HistoryLostError)
    assert "syncd snapshot" in (lost.hint or "")
    auth = from_mongo(op_failure(18))
    assert isinstance(auth, SourceFatalError)
    assert "credentials" in auth.message
    assert isinstance(from_mongo(mongo.AutoReconnect("reset")), TransientError)
    assert isinstance(from_mongo(op_failure(260)), SourceFatalError)
