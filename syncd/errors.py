"""syncd's exception families and the one function that classifies foreign errors.

Every error that reaches the pipeline is one of three kinds:

* transient: the world is briefly unavailable (network, timeouts, Chroma 5xx,
  embedding API 429/5xx, MongoDB step-down). Retry with backoff; report not ready.
* poison: this one event cannot be applied (mapping failure, oversized document,
  an input the embedding API or Chroma rejects). Halt or dead-letter, by policy.
* fatal: nothing will get better by waiting (bad configuration, authentication,
  history lost, collection dropped under ``halt``). Stop with a distinct exit code.

Only :func:`classify` looks inside foreign exceptions; everything else raises or
handles the classes below.
"""

from __future__ import annotations

import enum
import errno
import re
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import bson.errors
from pymongo import errors as mongo_errors

from syncd.redact import redact_text


class ExitCode(enum.IntEnum):
    """Process exit codes, documented in the README."""

    OK = 0
    DRIFT_OR_FAILURE = 1  # verify found drift; a one-shot command failed
    CONFIG = 2  # bad configuration or usage: do not restart
    HISTORY_LOST = 3  # resume position fell out of the oplog: run `syncd snapshot`
    SOURCE = 4  # fatal MongoDB error (auth, dropped collection under halt, ...)
    SINK = 5  # fatal Chroma error
    HALTED = 6  # a poison event stopped the pipeline under on_error = "halt"
    LEASE = 7  # lost the pipeline's lease to another process
    INTERNAL = 70  # a bug: EX_SOFTWARE


class ErrorKind(enum.Enum):
    TRANSIENT = "transient"
    POISON = "poison"
    FATAL = "fatal"


class SyncdError(Exception):
    """Base of every error syncd raises on purpose.

    Carries the context an operator needs (pipeline, namespace, document id,
    resume token) and a hint saying what to do next.
    """

    kind: ErrorKind = ErrorKind.FATAL
    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        pipeline: str | None = None,
        namespace: str | None = None,
        document_id: Any = None,
        token: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(redact_text(message))
        self.message = redact_text(message)
        self.hint = hint
        self.pipeline = pipeline
        self.namespace = namespace
        self.document_id = document_id
        self.token = token

    def with_context(self, **context: Any) -> SyncdError:
        for key, value in context.items():
            if getattr(self, key, None) is None:
                setattr(self, key, value)
        return self

    def describe(self) -> str:
        """One line for humans: what happened, to what, and what to do."""
        parts = []
        if self.pipeline:
            parts.append(f"pipeline {self.pipeline!r}")
        if self.namespace:
            parts.append(f"namespace {self.namespace}")
        if self.document_id is not None:
            parts.append(f"_id {self.document_id!r}")
        where = f" ({', '.join(parts)})" if parts else ""
        hint = f"; {self.hint}" if self.hint else ""
        return f"{self.message}{where}{hint}"

    def __str__(self) -> str:
        return self.describe()


# --- fatal -----------------------------------------------------------------


class ConfigError(SyncdError):
    """Invalid settings. Raised before any work starts."""

    exit_code = ExitCode.CONFIG


class HistoryLostError(SyncdError):
    """The stored resume position is no longer in the oplog (server code 286)."""

    exit_code = ExitCode.HISTORY_LOST


class SourceFatalError(SyncdError):
    """MongoDB said something waiting will not fix: auth, dropped collection..."""

    exit_code = ExitCode.SOURCE


class SinkFatalError(SyncdError):
    """Chroma said something waiting will not fix: auth, a missing tenant..."""

    exit_code = ExitCode.SINK


class CheckpointCorruptError(SyncdError):
    """A stored checkpoint exists but cannot be read. Never treated as 'first run'."""

    exit_code = ExitCode.SOURCE


class FingerprintMismatchError(ConfigError):
    """The mapping changed since the checkpoint was written."""


class LeaseLostError(SyncdError):
    """Another process holds the pipeline; our checkpoint write was fenced off."""

    exit_code = ExitCode.LEASE


class HaltedError(SyncdError):
    """The pipeline stopped at a poison event under on_error = "halt"."""

    exit_code = ExitCode.HALTED


# --- transient and poison ----------------------------------------------------


class TransientError(SyncdError):
    kind = ErrorKind.TRANSIENT

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class PoisonError(SyncdError):
    """This event cannot be applied; other events can."""

    kind = ErrorKind.POISON
    exit_code = ExitCode.HALTED


class MappingError(PoisonError):
    pass


class OversizedError(PoisonError):
    pass


class EmbeddingRejectedError(PoisonError):
    pass


class SinkRejectedError(PoisonError):
    """Chroma refused a record's content (e.g. a metadata value)."""


class ConsistencyError(TransientError):
    """Read-back after a write disagreed with what was written (strong consistency)."""


# --- classification ------------------------------------------------------------

# MongoDB server error codes that a retry can outlive. This is the driver's own
# resumable set (change stream spec) plus the ones a long-running tailer meets
# while a replica set elects or restarts.
_MONGO_TRANSIENT_CODES = frozenset(
    {
        6,  # HostUnreachable
        7,  # HostNotFound
        89,  # NetworkTimeout
        91,  # ShutdownInProgress
        189,  # PrimarySteppedDown
        262,  # ExceededTimeLimit
        9001,  # SocketException
        10107,  # NotWritablePrimary
        11600,  # InterruptedAtShutdown
        11602,  # InterruptedDueToReplStateChange
        13435,  # NotPrimaryNoSecondaryOk
        13436,  # NotPrimaryOrSecondary
        63,  # StaleShardVersion
        150,  # StaleEpoch
        13388,  # StaleConfig
        234,  # RetryChangeStream
        133,  # FailedToSatisfyReadPreference
        43,  # CursorNotFound: the cursor timed out; resuming fixes it
        50,  # MaxTimeMSExpired
    }
)
_MONGO_AUTH_CODES = frozenset({13, 18, 8000})  # Unauthorized, AuthenticationFailed, Atlas
HISTORY_LOST_CODE = 286
INVALID_RESUME_TOKEN_CODE = 260


def classify(exc: BaseException) -> ErrorKind:
    """Decide whether ``exc`` is worth retrying, skipping or stopping for."""
    if isinstance(exc, SyncdError):
        return exc.kind
    if isinstance(exc, mongo_errors.PyMongoError):
        return _classify_mongo(exc)
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return ErrorKind.TRANSIENT
    if isinstance(exc, bson.errors.InvalidDocument):
        return ErrorKind.POISON
    status = _http_status(exc)
    if status is not None:
        return _classify_http_status(status)
    if _is_transport_error(exc):
        return ErrorKind.TRANSIENT
    return ErrorKind.FATAL


# httpx/httpcore base classes of failures a retry can outlive: refused or reset
# connections (NetworkError covers connect, read, write and close), timeouts, a
# server that hung up mid-response. LocalProtocolError and UnsupportedProtocol are ours.
_TRANSPORT_ERRORS = frozenset({"NetworkError", "TimeoutException", "RemoteProtocolError"})


def _is_transport_error(exc: BaseException) -> bool:
    return any(
        cls.__module__.split(".")[0] in ("httpx", "httpcore") and cls.__name__ in _TRANSPORT_ERRORS
        for cls in type(exc).__mro__
    )


def _classify_mongo(exc: mongo_errors.PyMongoError) -> ErrorKind:
    if isinstance(exc, (mongo_errors.ConnectionFailure, mongo_errors.ServerSelectionTimeoutError)):
        return ErrorKind.TRANSIENT
    if isinstance(exc, mongo_errors.OperationFailure):
        code = exc.code or 0
        if code == HISTORY_LOST_CODE or code in _MONGO_AUTH_CODES:
            return ErrorKind.FATAL
        if exc.has_error_label("NonResumableChangeStreamError"):
            return ErrorKind.FATAL
        if code in _MONGO_TRANSIENT_CODES or exc.has_error_label("ResumableChangeStreamError"):
            return ErrorKind.TRANSIENT
        if exc.has_error_label("RetryableWriteError"):
            return ErrorKind.TRANSIENT
        return ErrorKind.FATAL
    if isinstance(exc, bson.errors.InvalidDocument):
        return ErrorKind.POISON
    if exc.has_error_label("RetryableWriteError") or exc.timeout:
        return ErrorKind.TRANSIENT
    return ErrorKind.FATAL


def _http_status(exc: BaseException) -> int | None:
    """Best-effort HTTP status of an error raised by chromadb or httpx.

    chromadb's HTTP client raises a ``ChromaError`` whose ``code()`` is the status
    when the body names a known error, and a bare ``Exception(body)`` raised while
    handling httpx's ``HTTPStatusError`` otherwise (a proxy's HTML 502, a 503).
    """
    code = getattr(exc, "code", None)
    if type(exc).__module__.startswith("chromadb.") and callable(code):
        status = code()
        return status if isinstance(status, int) else None
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None) or getattr(exc, "status_code", None)
    if status is None and type(exc) is Exception and exc.__context__ is not None:
        return _http_status(exc.__context__)
    return status if isinstance(status, int) else None


def _classify_http_status(status: int) -> ErrorKind:
    if status == 429 or status >= 500:
        return ErrorKind.TRANSIENT
    if status in (401, 403, 404):  # credentials, or the collection/model is not there
        return ErrorKind.FATAL
    if 400 <= status < 500:
        return ErrorKind.POISON
    return ErrorKind.FATAL


def retry_after_seconds(exc: BaseException) -> float | None:
    """Honour a ``Retry-After`` header (seconds form) when the error carries one."""
    if isinstance(exc, TransientError):
        return exc.retry_after
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    value = headers.get("retry-after") if hasattr(headers, "get") else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


@contextmanager
def translate_mongo_errors(**context: Any) -> Iterator[None]:
    """Turn MongoDB driver errors into syncd errors at the source boundary."""
    try:
        yield
    except mongo_errors.PyMongoError as exc:
        raise from_mongo(exc, **context) from exc


def _mongo_detail(exc: mongo_errors.PyMongoError) -> str:
    """The driver's message without its topology dump and timeout settings."""
    text = str(exc).split(", full error:")[0].split(", Timeout: ")[0]
    text = re.sub(r" \(configured timeouts: [^)]*\)", "", text)
    return redact_text(text)


def from_mongo(exc: mongo_errors.PyMongoError, **context: Any) -> SyncdError:
    kind = _classify_mongo(exc)
    detail = _mongo_detail(exc)
    if isinstance(exc, mongo_errors.OperationFailure) and exc.code == HISTORY_LOST_CODE:
        return HistoryLostError(
            f"the stored resume position is no longer in the MongoDB oplog ({detail})",
            hint="changes were lost from the oplog; run "
            f"`syncd snapshot {context.get('pipeline') or 'PIPELINE'}` to re-copy, "
            'or set on_history_lost = "resnapshot"',
            **context,
        )
    if kind is ErrorKind.TRANSIENT:
        error = TransientError(
            f"MongoDB unavailable: {detail}",
            hint="is MongoDB running and reachable at mongodb.uri? syncd run retries by itself",
            **context,
        )
        error.exit_code = ExitCode.SOURCE  # when a one-shot command gives up on it
        return error
    if kind is ErrorKind.POISON:
        return PoisonError(f"MongoDB rejected the document: {detail}", **context)
    code = getattr(exc, "code", None)
    if code in _MONGO_AUTH_CODES:
        return SourceFatalError(
            f"MongoDB refused the credentials: {detail}",
            hint="check the user, password and authSource in the MongoDB URI",
            **context,
        )
    return SourceFatalError(f"MongoDB error: {detail}", **context)


def from_sink(exc: BaseException, **context: Any) -> SyncdError:
    """Translate an error from the Chroma client into ours."""
    if isinstance(exc, SyncdError):
        return exc.with_context(**context)
    kind = classify(exc)
    detail = redact_text(f"{type(exc).__name__}: {exc}")
    if kind is ErrorKind.TRANSIENT:
        error = TransientError(f"Chroma unavailable: {detail}", **context)
        error.exit_code = ExitCode.SINK  # when a one-shot command gives up on it
        return error
    if kind is ErrorKind.POISON:
        return SinkRejectedError(f"Chroma rejected the write: {detail}", **context)
    if isinstance(exc, ValueError):
        # chromadb validates locally and raises ValueError for bad records.
        return SinkRejectedError(f"Chroma rejected the write: {detail}", **context)
    return SinkFatalError(f"Chroma error: {detail}", **context)


# errno values of a local path that waiting will not fix: it names the wrong thing, or
# syncd may not use it. Others (a full disk, an I/O error) may pass.
_PATH_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ENOENT,
        errno.ELOOP,
        errno.ENAMETOOLONG,
        errno.EEXIST,
    }
)


def from_os_error(exc: OSError, *, setting: str, **context: Any) -> SyncdError:
    """Translate a failure to use a local file that a setting names (``checkpoint.path``)."""
    where = f" {exc.filename}" if exc.filename else ""
    detail = f"cannot use {setting}{where}: {exc.strerror or exc}"
    if exc.errno in _PATH_ERRNOS:
        return ConfigError(detail, hint=f"make {setting} a path this user can write", **context)
    error = TransientError(detail, **context)
    error.exit_code = ExitCode.SOURCE  # when a one-shot command gives up on it
    return error
