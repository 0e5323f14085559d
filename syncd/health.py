"""What probes and scrapers see: the metric families, and ``/metrics``, ``/healthz``, ``/readyz``.

A small threaded :mod:`http.server`; what it serves comes from a :class:`Probe`
(:class:`syncd.telemetry.Telemetry`), so the server knows nothing about pipelines.

* ``/metrics``: Prometheus (or OpenMetrics, if asked) exposition of a registry.
* ``/healthz``: 200 while every running pipeline loop heartbeats, else 503 (liveness).
* ``/readyz``: 200 while every pipeline this process runs is connected, not halted and
  not backing off, else 503 with a JSON body naming the pipelines that are not ready
  and why. A process sharing pipelines under leases that holds none is a healthy
  standby: 200, with ``"standby": true`` in the body. Draining after a stop signal: 503.
"""

from __future__ import annotations

import json
import logging
import platform
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
)

from syncd import __version__
from syncd.errors import ConfigError

log = logging.getLogger(__name__)


class Metrics:
    """The Prometheus families, on a registry owned by one ``Telemetry``: a registry per
    instance, so tests and several instances never collide on the global one.."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(name, doc, ["pipeline", *labels], registry=registry)

        self.applied = Counter(
            "syncd_events_applied", "Change events applied to Chroma, by operation.",
            ["pipeline", "operation"], registry=registry,
        )  # fmt: skip
        self.retries = Counter(
            "syncd_retries", "Retries after an error, by error kind.",
            ["pipeline", "kind"], registry=registry,
        )  # fmt: skip
        self.dead_letters = Counter(
            "syncd_dead_letters", "Events written to the dead-letter store.",
            ["pipeline"], registry=registry,
        )  # fmt: skip
        self.reapplied_late = Counter(
            "syncd_late_writes_reapplied", "Documents re-applied because a write Chroma did "
            "not answer in time may have been applied late.", ["pipeline"], registry=registry,
        )  # fmt: skip
        self.embedding_inputs = Counter(
            "syncd_embedding_inputs", "Texts sent to the embedder.", ["pipeline"], registry=registry
        )
        self.batch_size = Histogram(
            "syncd_batch_size", "Change events per batch.", ["pipeline"], registry=registry,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000),
        )  # fmt: skip
        self.batch_seconds = Histogram(
            "syncd_batch_seconds", "Time to read, map, embed, write and checkpoint a batch.",
            ["pipeline"], registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "syncd_stage_seconds", "Time spent in one stage of a batch: read, map, lookup, "
            "embed, write, readback, checkpoint (idle ones included), snapshot.",
            ["pipeline", "stage"], registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )  # fmt: skip
        self.lag = gauge(
            "syncd_lag_seconds",
            "Now minus the cluster time of the oldest change read but not yet applied; "
            "0 when caught up.",
        )
        self.snapshot_scanned = gauge(
            "syncd_snapshot_documents_scanned",
            "Documents the current or last snapshot has written and checkpointed.",
        )
        self.snapshot_total = gauge(
            "syncd_snapshot_documents_estimated",
            "Documents the snapshot is expected to copy (the collections' estimated counts).",
        )
        self.checkpoint_ts = gauge(
            "syncd_checkpoint_timestamp_seconds", "Cluster time of the stored checkpoint."
        )
        self.checkpoint_age = gauge(
            "syncd_checkpoint_age_seconds", "Seconds since a checkpoint was last stored."
        )
        self.headroom = gauge(
            "syncd_oplog_headroom_seconds", "How far the checkpoint is from leaving the oplog."
        )
        self.state = gauge("syncd_pipeline_state", "1 for the pipeline's current state.", "state")
        self.ready = gauge("syncd_pipeline_ready", "1 while the pipeline is ready.")
        self.heartbeat_age = gauge(
            "syncd_heartbeat_age_seconds", "Seconds since the pipeline loop last reported."
        )
        self.drift = gauge("syncd_drift_records", "Records found out of sync, by kind.", "kind")
        # A rebuild of the pipeline's collection (syncd.rebuild), labelled with the
        # pipeline it rebuilds.
        self.rebuild_phase = gauge(
            "syncd_rebuild_phase",
            "1 for the phase of the pipeline's rebuild (snapshot, catching_up, switching, "
            "switched, stopped), 0 for the others.",
            "phase",
        )
        self.rebuild_scanned = gauge(
            "syncd_rebuild_documents_scanned",
            "Documents the rebuild's snapshot has written into the new collection and "
            "checkpointed.",
        )
        self.rebuild_total = gauge(
            "syncd_rebuild_documents_estimated",
            "Documents the rebuild's snapshot is expected to copy (estimated counts).",
        )
        self.rebuild_lag = gauge(
            "syncd_rebuild_lag_seconds",
            "How far the new collection is behind the live stream: now minus the cluster "
            "time it has applied through (in the snapshot: since the snapshot began); 0 "
            "once caught up.",
        )
        Info("syncd_build", "The running syncd's version.", registry=registry).info(
            {"version": __version__, "python_version": platform.python_version()}
        )
        # The process_* and python_* families every Prometheus client exports by default.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)


NOT_HERE = "stopped"  # a pipeline this process does not run (now): not its readiness to judge
STANDBY = (
    "standby: this process holds no pipeline; it takes pipelines over when their leases are free"
)


def readiness(
    pipelines: dict[str, dict[str, Any]],
    *,
    standby_ok: bool,
    draining: bool,
    blind: str | None = None,
) -> tuple[bool, dict[str, Any]]:
    """The ``/readyz`` verdict from each pipeline's :meth:`PipelineTelemetry.status`.

    ``not_ready`` maps the pipelines that are not ready to why; a reason of the whole
    process (draining, no pipeline started, the leases unreadable) is ``reason``."""
    report: dict[str, Any] = {"pipelines": pipelines}
    if draining:
        report |= {"ready": False, "reason": "draining after a stop signal"}
        return False, report
    running = {name: s for name, s in pipelines.items() if s["state"] != NOT_HERE}
    not_ready = {
        name: status.get("reason") or status["state"]
        for name, status in running.items()
        if not status["ready"]
    }
    if not running:
        if standby_ok:
            report |= {"ready": True, "standby": True, "message": STANDBY}
            return True, report
        report |= {"ready": False, "reason": blind or "no pipeline has started"}
        return False, report
    report["ready"] = not not_ready
    if not_ready:
        report["not_ready"] = not_ready
    return not not_ready, report


class Probe(Protocol):
    def metrics_exposition(self, accept: str | None) -> tuple[bytes, str]: ...

    def health_report(self) -> tuple[bool, dict[str, Any]]: ...

    def readiness_report(self) -> tuple[bool, dict[str, Any]]: ...


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], probe: Probe) -> None:
        self.probe = probe
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._respond(include_body=True)

    def do_HEAD(self) -> None:
        self._respond(include_body=False)

    def _respond(self, *, include_body: bool) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        probe = self.server.probe
        if path == "/metrics":
            body, content_type = probe.metrics_exposition(self.headers.get("Accept"))
            self._send(200, body, content_type, include_body)
        elif path in ("/healthz", "/readyz"):
            ok, report = probe.health_report() if path == "/healthz" else probe.readiness_report()
            body = json.dumps(report, indent=2, default=str).encode() + b"\n"
            self._send(200 if ok else 503, body, "application/json", include_body)
        else:
            body = b"not found: try /metrics, /healthz or /readyz\n"
            self._send(404, body, "text/plain; charset=utf-8", include_body)

    def _send(self, status: int, body: bytes, content_type: str, include_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if include_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class HealthServer:
    """Serve a :class:`Probe` on ``host:port`` from a daemon thread until :meth:`stop`."""

    def __init__(self, probe: Probe, host: str, port: int) -> None:
        self._probe = probe
        self._requested = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._server is not None:
            return
        host, port = self._requested
        try:
            self._server = _Server((host, port), self._probe)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} for /metrics, /healthz and /readyz: "
                f"{exc.strerror or exc}",
                hint='choose a free address with telemetry.listen, or "" to turn the listener off',
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="syncd-health-http",
            daemon=True,
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """The bound address; the port is the real one when 0 was asked for."""
        if self._server is None:
            return self._requested
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
