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
import json
import math
import re
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from syncd import hints
from syncd.redact import redact_text

if TYPE_CHECKING:
    from pymongo import errors as mongo_errors


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


class SinkLostError(SinkFatalError):
    """The Chroma collection a checkpoint describes was deleted or replaced."""


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


class CollectionGoneHalt(HaltedError):
    """The pipeline stopped at a drop, rename or dropDatabase under its ``policy``
    (``on_drop``, ``on_rename`` or ``on_drop_database``) = "halt"."""

    def __init__(self, message: str, *, policy: str, **context: Any) -> None:
        super().__init__(message, **context)
        self.policy = policy


# --- transient and poison ----------------------------------------------------


class TransientError(SyncdError):
    kind = ErrorKind.TRANSIENT

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class MappingSwitchedError(TransientError):
    """A rebuild is switching the pipeline's collection, or switched it to another mapping
    than this process has: the pipeline waits (writes nothing) instead of applying the
    wrong mapping; the process and its other pipelines keep running."""

    exit_code = ExitCode.CONFIG


class SourceUnavailableError(TransientError):
    """MongoDB cannot be reached now. `syncd run` retries; a one-shot command exits 4."""

    exit_code = ExitCode.SOURCE


class SinkUnavailableError(TransientError):
    """Chroma (or the embedding API) cannot be reached now, or refuses for a while.

    `syncd run` retries; a one-shot command exits 5.
    """

    exit_code = ExitCode.SINK


class EmbeddingAPIRefusingError(SinkUnavailableError):
    """The embedding API refuses every input, a known-good probe included.

    Not poison: the documents are not at fault, so nothing is dead-lettered; the
    pipeline retries (not ready) until the API accepts the probe again.
    """


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
    """Chroma refused a record's content (e.g. a metadata value), or a write too large.
    ``record_id``: the record, when Chroma refused a request holding only that one."""

    record_id: str | None = None


class ConsistencyError(TransientError):
    """Read-back after a write disagreed with what was written (strong consistency)."""

    exit_code = ExitCode.SINK


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
    mongo = _imported("pymongo.errors")
    if mongo is not None and isinstance(exc, mongo.PyMongoError):
        return _classify_mongo(exc)
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return ErrorKind.TRANSIENT
    if _is_invalid_document(exc):
        return ErrorKind.POISON
    status = _http_status(exc)
    if status is not None:
        return http_status_kind(status)
    if _is_transport_error(exc):
        return ErrorKind.TRANSIENT
    inner = _wrapped(exc)
    if inner is not None:
        return classify(inner)
    return ErrorKind.FATAL


# httpx/httpcore base classes of failures a retry can outlive: refused or reset
# connections (NetworkError covers connect, read, write and close), timeouts, a
# server that hung up mid-response. LocalProtocolError and UnsupportedProtocol are ours.
_TRANSPORT_ERRORS = frozenset({"NetworkError", "TimeoutException", "RemoteProtocolError"})


# httpx/httpcore timeouts of a server that took the connection but answered (or read the
# request) too slowly; a connect timeout is an unreachable server instead.
_SLOW_ANSWERS = frozenset({"ReadTimeout", "WriteTimeout", "PoolTimeout"})


def _is_slow_answer(exc: BaseException) -> bool:
    return any(
        cls.__module__.split(".")[0] in ("httpx", "httpcore") and cls.__name__ in _SLOW_ANSWERS
        for cls in type(exc).__mro__
    )


def _is_transport_error(exc: BaseException) -> bool:
    return any(
        cls.__module__.split(".")[0] in ("httpx", "httpcore") and cls.__name__ in _TRANSPORT_ERRORS
        for cls in type(exc).__mro__
    )


# chromadb re-raises some failures from inside its ``except`` blocks as a bare
# ValueError or Exception: ``ValueError("Could not connect to a Chroma server…")``
# while handling httpx.ConnectError, ``ValueError("Could not connect to tenant…")``
# while handling whatever the tenant lookup raised, ``Exception(response body)``
# while handling httpx.HTTPStatusError. The error handled then (the implicit
# context) is what happened; the wrapper's type and text say nothing about it.
_WRAPPERS = (Exception, ValueError)


def _wrapped(exc: BaseException) -> BaseException | None:
    if type(exc) in _WRAPPERS:
        return exc.__cause__ or exc.__context__
    return None


def _root(exc: BaseException) -> BaseException:
    """The error a chain of such re-raises started from (``exc`` if none)."""
    seen = {id(exc)}
    while (inner := _wrapped(exc)) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    return exc


def _imported(module: str) -> Any:
    """``module`` if something imported it already, else None.

    An exception can be an instance of a driver's class only once the driver was
    imported, so classifying needs no import of pymongo or bson: commands that never
    reach MongoDB (``--help``, a usage mistake) start without loading them.
    """
    return sys.modules.get(module)


def _is_invalid_document(exc: BaseException) -> bool:
    """A document BSON cannot encode (bson.errors.InvalidDocument)."""
    bson_errors = _imported("bson.errors")
    return bson_errors is not None and isinstance(exc, bson_errors.InvalidDocument)


def _is_dns_failure(exc: BaseException) -> bool:
    """A mongodb+srv:// lookup that failed: pymongo raises it as a ConfigurationError,
    but a name server that does not answer, or a record not yet published, is an
    outage like a host that does not answer."""
    cause = exc.__cause__
    return cause is not None and type(cause).__module__.split(".")[0] == "dns"


def _classify_mongo(exc: mongo_errors.PyMongoError) -> ErrorKind:
    from pymongo import errors as mongo_errors

    if isinstance(exc, (mongo_errors.ConnectionFailure, mongo_errors.ServerSelectionTimeoutError)):
        return ErrorKind.TRANSIENT
    if _is_dns_failure(exc):
        return ErrorKind.TRANSIENT
    if isinstance(exc, mongo_errors.OperationFailure):
        code = exc.code or 0
        if code == HISTORY_LOST_CODE or code in _MONGO_AUTH_CODES:
            return ErrorKind.FATAL
        if exc.has_error_label("NonResumableChangeStreamError"):
            return ErrorKind.FATAL
        if code in _MONGO_TRANSIENT_CODES or exc.has_error_label("ResumableChangeStreamError"):
            return ErrorKind.TRANSIENT
        if exc.timeout:  # MaxTimeMSExpired of an operation syncd gave a time limit
            return ErrorKind.TRANSIENT
        if exc.has_error_label("RetryableWriteError"):
            return ErrorKind.TRANSIENT
        return ErrorKind.FATAL
    if _is_invalid_document(exc):
        return ErrorKind.POISON
    if exc.has_error_label("RetryableWriteError") or exc.timeout:
        return ErrorKind.TRANSIENT
    return ErrorKind.FATAL


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of an error raised by chromadb or httpx, when it carries one.

    chromadb's HTTP client raises a ``ChromaError`` whose ``code()`` is the status
    when the body names a known error; anything else (a proxy's HTML 502, a web
    server's 404 page) arrives as a wrapper around httpx's ``HTTPStatusError``.
    """
    code = getattr(exc, "code", None)
    if type(exc).__module__.startswith("chromadb.") and callable(code):
        status = code()
        return status if isinstance(status, int) else None
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None) or getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


# What an HTTP status says about waiting, for Chroma and the embedding API alike:
# 5xx and 429 are the server's passing trouble; a few 4xx (and two 5xx) say the
# request cannot work at this address whatever it carries; any other 4xx is about
# what this request carried.
_HTTP_TRANSIENT = frozenset({408, 425, 429})  # Request Timeout, Too Early, Too Many Requests
_HTTP_FATAL = frozenset(
    {
        401,  # Unauthorized: credentials
        403,  # Forbidden: credentials or permissions
        404,  # Not Found: no such endpoint, tenant, database, collection or model
        405,  # Method Not Allowed: the URL points at something else
        407,  # Proxy Authentication Required
        501,  # Not Implemented: this server does not offer the API at all
        505,  # HTTP Version Not Supported
    }
)


def too_large(exc: BaseException) -> bool:
    """Chroma, or a proxy in front of it, refused a request as too large (HTTP 413)."""
    cause = exc.__cause__ if isinstance(exc, SyncdError) and exc.__cause__ else exc
    root = _root(cause)
    if _http_status(root) == 413 or _http_status(cause) == 413:
        return True
    return any("payload too large" in str(e).lower() for e in (cause, root))


def slow_answer(exc: BaseException) -> bool:
    """Chroma took the request but did not answer (or read it) within the client's
    timeout: the request may be too much work for that time, or the server too busy."""
    cause = exc.__cause__ if isinstance(exc, SyncdError) and exc.__cause__ else exc
    return any(
        type(e).__name__ in ("ReadTimeout", "WriteTimeout") and _is_slow_answer(e)
        for e in (cause, _root(cause))
    )


def http_status_kind(status: int) -> ErrorKind:
    """Transient, poison or fatal, for an HTTP status (see the tables above)."""
    if status in _HTTP_FATAL:
        return ErrorKind.FATAL
    if status in _HTTP_TRANSIENT or status >= 500:
        return ErrorKind.TRANSIENT
    if 400 <= status < 500:
        return ErrorKind.POISON
    return ErrorKind.FATAL


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        import email.utils

        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None  # unparsable: fall back to our own backoff
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


_TAG = re.compile(r"(?s)<(script|style)\b.*?</\1>|<[^>]*>")
_HTML = re.compile(r"(?i)<(!doctype|html|head|body|title|h1|p)\b")


def body_excerpt(text: str, limit: int = 160) -> str:
    """A response body fit for one line: tags stripped, whitespace collapsed, capped."""
    if _HTML.search(text):
        text = _TAG.sub(" ", text)
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return redact_text(text)


EVENT_TOO_LARGE_CODE = 10334  # BSONObjectTooLarge: an event past 16 MiB fails the stream


@contextmanager
def translate_mongo_errors(**context: Any) -> Iterator[None]:
    """Turn MongoDB driver errors into syncd errors at the source boundary."""
    from pymongo import errors as mongo_errors

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
    from pymongo import errors as mongo_errors

    kind = _classify_mongo(exc)
    detail = _mongo_detail(exc)
    if isinstance(exc, mongo_errors.OperationFailure) and exc.code == HISTORY_LOST_CODE:
        return HistoryLostError(
            f"the stored resume position is no longer in the MongoDB oplog ({detail})",
            hint="changes were lost from the oplog; run "
            f"`{hints.command('snapshot', str(context.get('pipeline') or 'PIPELINE'))}` "
            "to re-copy, "
            'or set on_history_lost = "resnapshot"',
            **context,
        )
    if kind is ErrorKind.TRANSIENT:
        not_mongodb = "Got response id" in str(exc)  # the wire protocol of something else
        return SourceUnavailableError(
            f"MongoDB unavailable: {detail}",
            hint="the server at mongodb.uri does not answer like MongoDB: check the host "
            "and port in the URI, then run the command again; a running syncd retries by "
            "itself"
            if not_mongodb
            else "the mongodb+srv:// host was not found in DNS: check the host name in "
            "mongodb.uri and the name server, then run the command again; a running syncd "
            "retries by itself"
            if _is_dns_failure(exc)
            else "start MongoDB (or correct mongodb.uri) and run the command again; "
            "a running syncd retries by itself",
            **context,
        )
    if kind is ErrorKind.POISON:
        return PoisonError(f"MongoDB rejected the document: {detail}", **context)
    code = getattr(exc, "code", None)
    if code in _MONGO_AUTH_CODES:
        return SourceFatalError(
            f"MongoDB refused the credentials: {detail}",
            hint="check the user, password and authSource in the MongoDB URI",
            **context,
        )
    if code == INVALID_RESUME_TOKEN_CODE and context.get("pipeline"):
        pipeline = str(context["pipeline"])
        return CheckpointCorruptError(
            f"MongoDB refused the stored resume token: {detail}",
            hint=f"start over with `{hints.command('tokens', 'reset', pipeline, '--yes')}`: "
            f"the next `{hints.command('run')}` copies every document again (or replay "
            "from a time before the damage with syncd tokens set PIPELINE --at TIME)",
            **context,
        )
    if code == EVENT_TOO_LARGE_CODE:
        return SourceFatalError(
            f"a change event is larger than MongoDB allows (16 MiB): {detail}",
            hint="syncd leaves updateDescription out of its stream, which keeps an "
            "update's event under the limit on MongoDB 6.0.7 and newer: upgrade an older "
            "server, or make the document smaller (an update's event carries the document "
            "as it is now), then run the command again",
            **context,
        )
    return SourceFatalError(f"MongoDB error: {detail}", **context)


def from_sink(exc: BaseException, *, records: bool = False, **context: Any) -> SyncdError:
    """Translate an error from the Chroma client into ours.

    ``records`` says the call carried records (upsert, update): only then can a
    refusal be about their content (poison). A refusal of anything else (making the
    client, opening the collection, reads, deletes) is about the configuration.
    """
    if isinstance(exc, SyncdError):
        return exc.with_context(**context)
    root = _root(exc)
    kind = classify(root)
    detail = _sink_detail(root)
    if kind is ErrorKind.TRANSIENT and _is_slow_answer(root):
        return SinkUnavailableError(
            f"Chroma unavailable: {detail}",
            hint="Chroma answered more slowly than chroma.timeout_s allows: look at the "
            "server's load, or raise chroma.timeout_s, then run the command again; a "
            "running syncd retries by itself",
            **context,
        )
    if kind is ErrorKind.TRANSIENT:
        return SinkUnavailableError(
            f"Chroma unavailable: {detail}",
            hint=_tls_hint(exc)
            or "start Chroma (or correct chroma.host and chroma.port) and run the command "
            "again; a running syncd retries by itself",
            **context,
        )
    if records and (kind is ErrorKind.POISON or (type(exc) is ValueError and root is exc)):
        # chromadb checks records before sending them and raises a plain ValueError.
        return SinkRejectedError(f"Chroma rejected the write: {detail}", **context)
    return SinkFatalError(f"Chroma error: {detail}", hint=_sink_hint(root), **context)


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


def _sink_detail(root: BaseException) -> str:
    response = getattr(root, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int) and not type(root).__module__.startswith("chromadb."):
        body = body_excerpt(str(getattr(response, "text", "") or ""))
        return f"HTTP {status}" + (f" ({body})" if body else "")
    return f"{type(root).__name__}: {body_excerpt(str(root))}"


def _tls_hint(exc: BaseException) -> str | None:
    """What to check when the connection failed in its TLS handshake."""
    text = " ".join(str(e) for e in _chain(exc))
    if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
        return (
            "Chroma at chroma.host:chroma.port does not speak TLS: set chroma.ssl = false, "
            "or point chroma.port at the TLS endpoint; then run the command again"
        )
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            "the TLS certificate of the server at chroma.host is not trusted here: install "
            "its CA in the system's trust store (or set SSL_CERT_FILE), then run the "
            "command again"
        )
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors it was raised from, or during."""
    out, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def _not_chroma(root: BaseException) -> bool:
    """The server answered, but not as Chroma does: a body chromadb cannot read."""
    if isinstance(root, json.JSONDecodeError):
        return True
    if isinstance(root, (TypeError, KeyError, AttributeError)) and _raised_in_chromadb(root):
        return True  # the client read a JSON answer of another shape ({} or [1, 2])
    return getattr(root, "response", None) is not None and not type(root).__module__.startswith(
        "chromadb."
    )


def _raised_in_chromadb(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` is the Chroma client's own code."""
    tb = exc.__traceback__
    module = ""
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next
    return module.startswith("chromadb")


def _sink_hint(root: BaseException) -> str | None:
    if too_large(root):
        return (
            "Chroma, or a proxy in front of it, refused the request as too large: raise "
            "the proxy's request body limit (e.g. nginx's client_max_body_size)"
        )
    if _not_chroma(root):
        return (
            "the server at chroma.host:chroma.port does not answer like a Chroma server; "
            "check chroma.host, chroma.port and chroma.ssl"
        )
    status = _http_status(root)
    if status in (401, 403):
        return "check chroma.token (or SYNCD_CHROMA_TOKEN) and chroma.headers"
    return None


def retries_exhausted(
    exc: TransientError, deadline_s: float, *, command: str | None = None, **context: Any
) -> SyncdError:
    """The fatal error that ends ``retry_deadline_s`` of retrying ``exc``; ``command``:
    the one that retried, to start again (default ``syncd run``)."""
    family = SinkFatalError if exc.exit_code == ExitCode.SINK else SourceFatalError
    again = command or hints.command("run")
    return family(
        f"still failing after {deadline_s:.0f} s of retries: {exc.message}",
        hint=f"fix the cause and start `{again}` again, or raise retry_deadline_s "
        "(0 retries forever)",
        **context,
    )
