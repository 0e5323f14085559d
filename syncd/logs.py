"""Structured logging: one line per event, as JSON or text, with credentials scrubbed.

Every record that reaches syncd's handler, from syncd or from a library, passes
through :class:`RedactingFilter` first: the message, its arguments, every extra field
and the exception text go through :func:`~syncd.redact.redact_text`, so a MongoDB URI
with a password or an API key in an error message never reaches the output.

Extra fields are passed the usual way and become JSON keys (or ``key=value`` pairs)::

    log.warning("write failed", extra={"pipeline": "articles", "document_id": "42"})
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

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
    """Scrub credentials from a record in place; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(_safe_message(record))
        record.args = None
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
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(extra_fields(record))
        exc_text = _exception_text(record, self)
        if exc_text:
            line["exc"] = exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


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
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._syncd = True  # type: ignore[attr-defined]
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    root.addHandler(handler)
    level = getattr(logging, settings.level.upper())
    root.setLevel(level)
    for name in _NOISY:
        logging.getLogger(name).setLevel(level if level <= logging.DEBUG else logging.WARNING)


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
