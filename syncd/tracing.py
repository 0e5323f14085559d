"""OpenTelemetry plumbing for :mod:`syncd.telemetry`: exporters, resource, errors, links.

The exporter comes from ``telemetry.traces`` or, when unset, from
``OTEL_TRACES_EXPORTER`` (default none). The OTLP exporters are an optional extra and
are imported only when asked for. Endpoints, headers, sampler and batch sizes follow
the standard ``OTEL_*`` variables through the SDK's own handling.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Link, Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from syncd import __version__
from syncd.config import TelemetrySettings, otlp_endpoints, otlp_kind, trace_exporters
from syncd.errors import ConfigError
from syncd.redact import redact_text

log = logging.getLogger("syncd.telemetry")

_OTLP_HINT = "install the OTLP exporters: pip install 'syncd[otlp]'"
_PROPAGATOR = TraceContextTextMapPropagator()


def tracer_provider(
    settings: TelemetrySettings, extra: SpanExporter | None = None
) -> TracerProvider | None:
    """A provider exporting through batch processors, or None when nothing exports."""
    made = exporting_provider(settings, extra)
    return made[0] if made is not None else None


def exporting_provider(
    settings: TelemetrySettings, extra: SpanExporter | None = None
) -> tuple[TracerProvider, list[SpanProcessor]] | None:
    """The provider and its processors, which also take the finished change spans."""
    exporters = span_exporters(settings)
    if extra is not None:
        exporters.append(extra)
    if not exporters:
        return None
    provider = TracerProvider(resource=_resource())  # OTEL_TRACES_SAMPLER applies here
    processors: list[SpanProcessor] = []
    for exporter in exporters:
        processor = BatchSpanProcessor(exporter, max_queue_size=_queue_size())
        provider.add_span_processor(processor)
        processors.append(processor)
    return provider, processors


def _queue_size() -> int | None:
    """A span per change fills the SDK's default queue (2,048) in one large batch or two."""
    return None if os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE") else 16_384


def record_error(span: Span, exc: BaseException) -> None:
    """Record ``exc`` on ``span`` with ERROR status, every text passed through redaction.

    The SDK's own ``record_exception`` would keep the raw message and traceback, which
    can hold a connection string.
    """
    message = redact_text(f"{type(exc).__name__}: {exc}")
    span.add_event(
        "exception",
        {
            "exception.type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "exception.message": redact_text(str(exc)),
            "exception.stacktrace": redact_text("".join(traceback.format_exception(exc))),
        },
    )
    span.set_attribute("error.type", type(exc).__qualname__)
    span.set_status(Status(StatusCode.ERROR, message))


def remote_link(traceparent: str | None) -> Link | None:
    """A link to the application span whose W3C context a document carries, if valid."""
    if not traceparent or not isinstance(traceparent, str):
        return None
    context = _PROPAGATOR.extract({"traceparent": traceparent.strip()})
    span_context = trace.get_current_span(context).get_span_context()
    if not span_context.is_valid:
        return None
    return Link(span_context, {"syncd.link": "document.traceparent"})


def _resource() -> Resource:
    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES; explicit attributes would win over
    # OTEL_SERVICE_NAME, so the default name is applied only when the variable is unset.
    name = os.environ.get("OTEL_SERVICE_NAME") or "syncd"
    return Resource.create({SERVICE_NAME: name, SERVICE_VERSION: __version__})


def span_exporters(settings: TelemetrySettings) -> list[SpanExporter]:
    exporters = [_span_exporter(kind, settings.otlp_endpoint) for kind in _kinds(settings)]
    return [exporter for exporter in exporters if exporter is not None]


def _kinds(settings: TelemetrySettings) -> list[str]:
    return trace_exporters(settings, os.environ)


def probe_exporters(
    settings: TelemetrySettings, timeout_s: float = 5.0
) -> Iterator[tuple[str, str | None]]:
    """Send each OTLP exporter the daemon would use an empty export, for `syncd check`.

    Yields ``(exporter, None)`` when the receiver accepted it, or ``(exporter, why)``.
    """
    for kind in _kinds(settings):
        if kind in ("none", "console"):
            continue
        exporter = _span_exporter(kind, settings.otlp_endpoint, timeout_s=timeout_s)
        if exporter is None:
            continue
        where = _target(otlp_kind(kind, os.environ), settings.otlp_endpoint)
        name = f"trace exporter {kind} to {where}"
        with _exporter_complaints() as complaints:
            result = exporter.export([])
        exporter.shutdown()
        if result is SpanExportResult.SUCCESS:
            yield name, None
        else:
            why = complaints[0] if complaints else "the receiver did not accept an export"
            why = redact_text(why)
            yield name, why if len(why) <= 500 else why[:500] + " [...]"


@contextmanager
def _exporter_complaints() -> Iterator[list[str]]:
    """What the SDK's exporters log while exporting: their only account of a failure."""
    complaints: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            complaints.append(record.getMessage())

    logger = logging.getLogger("opentelemetry.exporter")
    handler, propagate = Collect(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield complaints
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _span_exporter(
    kind: str, endpoint: str | None, *, timeout_s: float | None = None
) -> SpanExporter | None:
    if kind == "none":
        return None
    if kind == "console":
        return ConsoleSpanExporter(service_name="syncd")
    kind = otlp_kind(kind, os.environ)
    if kind == "otlp_http":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigError("OTLP/HTTP trace export needs a package", hint=_OTLP_HINT) from None
        url = http_traces_url(endpoint) if endpoint else _env_traces_url()
        log.info("exporting traces over OTLP/HTTP to %s", _target(kind, endpoint))
        return OTLPSpanExporter(endpoint=url, timeout=timeout_s)
    if kind == "otlp_grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError:
            raise ConfigError("OTLP/gRPC trace export needs a package", hint=_OTLP_HINT) from None
        log.info("exporting traces over OTLP/gRPC to %s", _target(kind, endpoint))
        return GrpcSpanExporter(endpoint=endpoint, timeout=timeout_s)
    raise ConfigError(
        f"unknown trace exporter {kind!r} (telemetry.traces or OTEL_TRACES_EXPORTER)",
        hint="use none, console, otlp, otlp_http or otlp_grpc",
    )


def _env_traces_url() -> str | None:
    """The OTLP/HTTP traces URL the OTEL_* variables give. The exporter appends /v1/traces
    to OTEL_EXPORTER_OTLP_ENDPOINT, as the specification says, also to a URL that already
    ends in it (a common way to write it), which then goes nowhere: such a URL is used as
    written."""
    specific = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if specific:
        return specific
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not base:
        return None
    if urlsplit(base).path.rstrip("/").endswith("/v1/traces"):
        return base
    return _with_path(base, urlsplit(base).path.rstrip("/") + "/v1/traces")


def http_traces_url(endpoint: str) -> str:
    """Accept a base URL (as OTEL_EXPORTER_OTLP_ENDPOINT) or the full /v1/traces URL."""
    if urlsplit(endpoint).path.strip("/"):
        return endpoint
    return _with_path(endpoint, "/v1/traces")


def _with_path(url: str, path: str) -> str:
    """``url`` with its path replaced, its query kept after it (``http://h:4318?k=v``)."""
    return urlunsplit(urlsplit(url)._replace(path=path))


def _target(kind: str, endpoint: str | None) -> str:
    """Where an OTLP exporter of ``kind`` sends spans, as it will be shown (redacted)."""
    if kind == "otlp_http":
        url = http_traces_url(endpoint) if endpoint else _env_traces_url()
        return redact_text(url or "http://localhost:4318/v1/traces (the default)")
    given = otlp_endpoints(endpoint, os.environ)
    return redact_text(given[0][1]) if given else "localhost:4317 (the default)"
