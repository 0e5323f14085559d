"""Structured logging: one line per event, as JSON or text, with credentials scrubbed.

JSON lines use the OpenTelemetry log data model's field names: ``timestamp``,
``severity_text``, ``severity_number``, ``body``, ``attributes`` (the extra fields, and
``exception.*`` for an exception), ``instrumentation_scope`` (the logger) and, when
logged inside a span, ``trace_id`` and ``span_id``, so a collector can ship them as
OTLP logs and a viewer can jump from a line to its trace.

Under systemd, when stderr is the journal (``$JOURNAL_STREAM`` names stderr's device and
inode), every line starts with its syslog priority, ``<3>`` to ``<7>``, which journald
stores as the entry's priority: ``journalctl -u syncd -p warning`` then works.

Every record that reaches syncd's handler, from syncd or from a library, passes
through :class:`RedactingFilter` first: the message, its arguments, every extra field
and the exception text go through :func:`~syncd.redact.redact_text`, so a MongoDB URI
with a password or an API key in an error message never reaches the output.

Extra fields are passed the usual way and become JSON keys (or ``key=value`` pairs)::

    log.warning("write failed", extra={"pipeline": "articles", "document_id": "42"})
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from opentelemetry import trace

from syncd.config import LogSettings
from syncd.errors import SyncdError
from syncd.redact import MASK, is_secret_key, redact_mapping, redact_text

# Attributes every LogRecord has; anything else on a record is an extra field.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# Libraries that are chatty at info level; they log at warning unless debug is asked for.
_NOISY = ("pymongo", "chromadb", "httpx", "httpcore", "urllib3", "opentelemetry")
_ERROR_CONTEXT = ("pipeline", "namespace", "document_id", "hint")
# Named like secrets but are positions in the change stream, which operators need to see.
_NOT_SECRET = frozenset({"resume_token", "start_token"})


class RedactingFilter(logging.Filter):
    """Scrub credentials from a record in place; never drops a record.

    ``brief_libraries``: a library's record (pymongo's background monitor, say) carries
    its exception as one line of the message, not a traceback: those are the libraries'
    own retries of what syncd reports and retries itself (tracebacks at debug level).
    """

    def __init__(self, *, brief_libraries: bool = False) -> None:
        super().__init__()
        self._brief = brief_libraries

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(_safe_message(record))
        record.args = None
        if self._brief and record.exc_info and record.name.split(".")[0] in _NOISY:
            error = record.exc_info[1]
            if error is not None:
                record.msg = f"{record.msg}: {type(error).__name__}: {redact_text(str(error))}"
            record.exc_info, record.exc_text = None, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        _add_error_context(record)
        for key, value in list(vars(record).items()):
            if key not in _STANDARD:
                setattr(record, key, _redact_value(key, value))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, in the OpenTelemetry log data model's field names."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": _timestamp(record),
            "severity_text": record.levelname,
            "severity_number": severity_number(record.levelno or 0),
            "body": record.getMessage(),
        }
        attributes = extra_fields(record)
        exc_text = _exception_text(record, self)
        if exc_text:
            error = record.exc_info[1] if record.exc_info else None
            if error is not None:
                attributes["exception.type"] = type(error).__qualname__
                attributes["exception.message"] = redact_text(str(error))
            attributes["exception.stacktrace"] = exc_text
        if attributes:
            line["attributes"] = attributes
        line["instrumentation_scope"] = {"name": record.name}
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            line["trace_id"] = trace.format_trace_id(context.trace_id)
            line["span_id"] = trace.format_span_id(context.span_id)
        return json.dumps(line, default=str, ensure_ascii=False)


# Python level floor -> (OpenTelemetry SeverityNumber, syslog(3) priority); below INFO
# is DEBUG: 5 and 7.
_LEVELS = (
    (logging.CRITICAL, 21, 2),
    (logging.ERROR, 17, 3),
    (logging.WARNING, 13, 4),
    (logging.INFO, 9, 6),
)


def _level(levelno: int) -> tuple[int, int]:
    return next(((sev, pri) for floor, sev, pri in _LEVELS if levelno >= floor), (5, 7))


def severity_number(levelno: int) -> int:
    """The data model's SeverityNumber: DEBUG 5, INFO 9, WARN 13, ERROR 17, FATAL 21."""
    return _level(levelno)[0]


class JournalPrefix(logging.Formatter):
    """Prefix every physical line with its syslog priority, as journald reads stderr."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno or 0)}>"
        return "\n".join(prefix + part for part in self.inner.format(record).split("\n"))


def syslog_priority(levelno: int) -> int:
    """crit 2, err 3, warning 4, info 6, debug 7 (syslog(3))."""
    return _level(levelno)[1]


def stream_is_journal(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal stream systemd connected (``$JOURNAL_STREAM``).

    systemd sets ``JOURNAL_STREAM=<device>:<inode>`` of the stream it connects stdout or
    stderr to; comparing it with the stream's own keeps a redirected stderr unprefixed.
    """
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        status = os.fstat(stream.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, io.UnsupportedOperation):
        return False


class TextFormatter(logging.Formatter):
    """``2024-05-01T12:00:00.123Z INFO syncd.pipeline: message key=value ...``"""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, f"{record.name}:", record.getMessage()]
        parts += [f"{key}={_text_value(value)}" for key, value in extra_fields(record).items()]
        line = " ".join(parts)
        exc_text = _exception_text(record, self)
        if exc_text:
            # The traceback stays part of this entry: continuation lines are indented.
            line += "\n" + "\n".join("  | " + part for part in exc_text.splitlines())
        return line


def setup_logging(settings: LogSettings, stream: TextIO | None = None) -> None:
    """Route all logging to one handler on ``stream`` (stderr) in the chosen format.

    Calling it again replaces the handler it installed before, so the CLI may call it
    once with defaults and again after the configuration is loaded.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_syncd", False):
            root.removeHandler(handler)
            handler.close()
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    handler._syncd = True  # type: ignore[attr-defined]
    level = getattr(logging, settings.level.upper())
    handler.addFilter(RedactingFilter(brief_libraries=level > logging.DEBUG))
    formatter: logging.Formatter = JsonFormatter() if settings.format == "json" else TextFormatter()
    handler.setFormatter(JournalPrefix(formatter) if stream_is_journal(out) else formatter)
    root.addHandler(handler)
    root.setLevel(level)
    for name in _NOISY:
        logging.getLogger(name).setLevel(level if level <= logging.DEBUG else logging.WARNING)
    from syncd import progress

    progress.configure(settings.progress_every_s)


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _safe_message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except (TypeError, ValueError):  # a bad format string must not lose the record
        return f"{record.msg!s} {record.args!r}"


def _add_error_context(record: logging.LogRecord) -> None:
    """Lift pipeline, namespace, document id and hint off a SyncdError being logged."""
    error = record.exc_info[1] if record.exc_info else None
    if not isinstance(error, SyncdError):
        return
    for key in _ERROR_CONTEXT:
        value = getattr(error, key, None)
        if value is not None and not hasattr(record, key):
            setattr(record, key, str(value))


def _redact_value(key: str, value: Any) -> Any:
    if is_secret_key(key) and key not in _NOT_SECRET and value is not None:
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return redact_mapping(value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    return redact_text(str(value))


def _exception_text(record: logging.LogRecord, formatter: logging.Formatter) -> str:
    if record.exc_info and not record.exc_text:
        record.exc_text = redact_text(formatter.formatException(record.exc_info))
    text = record.exc_text or ""
    if record.stack_info:
        text = f"{text}\n{record.stack_info}" if text else record.stack_info
    return text


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n')) else text
