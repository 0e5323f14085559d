"""The metrics of a rebuild (:mod:`syncd.rebuild`): its phase, the documents its
snapshot copied against the estimate, and how far it is behind the live stream.

Labelled with the pipeline being rebuilt, in ``syncd rebuild`` and in a daemon that
rebuilds by itself (``on_mapping_change = "rebuild"``) alike.
"""

from __future__ import annotations

import threading
import time

from syncd.checkpoint import Checkpoint
from syncd.health import Metrics

PHASES = ("snapshot", "catching_up", "switching", "switched", "stopped")


class RebuildTelemetry:
    def __init__(self, metrics: Metrics, name: str) -> None:
        self.name = name
        self._metrics = metrics
        self._lock = threading.Lock()
        self.phase: str | None = None
        self._behind_since: float | None = None  # wall time the new collection stands at
        metrics.rebuild_lag.labels(name).set_function(self.lag_seconds)

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown rebuild phase {phase!r}; expected one of {PHASES}")
        with self._lock:
            self.phase = phase
            if phase in ("switched", "stopped"):
                self._behind_since = None
        for each in PHASES:
            self._metrics.rebuild_phase.labels(self.name, each).set(1 if each == phase else 0)

    def resume_from(self, cp: Checkpoint | None) -> None:
        """Phase, progress and lag from where the build's checkpoint stands."""
        if cp is None or cp.phase == "snapshot":
            started = cp.snapshot.started_at if cp is not None and cp.snapshot else None
            self.set_phase("snapshot")
            self.behind_since(started.timestamp() if started else time.time())
            if cp is not None and cp.snapshot is not None:
                self.snapshot_progress(cp.snapshot.scanned, None)
        else:
            self.set_phase("catching_up")
            if cp.cluster_time is not None:
                self.behind_since(cp.cluster_time.time)

    def snapshot_progress(self, scanned: int, estimated_total: int | None) -> None:
        self._metrics.rebuild_scanned.labels(self.name).set(scanned)
        if estimated_total is not None:
            self._metrics.rebuild_total.labels(self.name).set(estimated_total)

    def behind_since(self, when: float | None) -> None:
        """The new collection holds the changes up to ``when`` (seconds since the epoch);
        None: it has caught up."""
        with self._lock:
            self._behind_since = when

    def lag_seconds(self) -> float:
        since = self._behind_since
        return max(0.0, time.time() - since) if since is not None else 0.0
