"""The rebuild's metrics: one phase at a time, progress, and lag behind the live stream."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from bson import Timestamp

from syncd.checkpoint import Checkpoint, SnapshotProgress
from syncd.rebuild_metrics import PHASES
from syncd.telemetry import Telemetry


def test_one_phase_at_a_time_and_lag_until_caught_up() -> None:
    tel = Telemetry.disabled()
    rebuild = tel.rebuild("articles")
    value = tel.registry.get_sample_value

    def phases() -> list[str]:
        return [
            p for p in PHASES
            if value("syncd_rebuild_phase", {"pipeline": "articles", "phase": p}) == 1
        ]  # fmt: skip

    assert value("syncd_rebuild_lag_seconds", {"pipeline": "articles"}) == 0
    started = datetime.now(UTC) - timedelta(seconds=100)
    cp = Checkpoint(pipeline="articles~rebuild", fingerprint="f", phase="snapshot")
    cp.snapshot = SnapshotProgress(started_at=started, scanned=40)
    rebuild.resume_from(cp)
    assert phases() == ["snapshot"]
    assert value("syncd_rebuild_documents_scanned", {"pipeline": "articles"}) == 40
    assert 99 <= (value("syncd_rebuild_lag_seconds", {"pipeline": "articles"}) or 0) <= 200
    rebuild.snapshot_progress(120, 300)
    assert value("syncd_rebuild_documents_estimated", {"pipeline": "articles"}) == 300

    streaming = Checkpoint(pipeline="articles~rebuild", fingerprint="f", phase="streaming")
    streaming.cluster_time = Timestamp(int(time.time()) - 30, 1)
    rebuild.resume_from(streaming)
    assert phases() == ["catching_up"]
    assert 29 <= (value("syncd_rebuild_lag_seconds", {"pipeline": "articles"}) or 0) <= 100
    rebuild.behind_since(None)
    assert value("syncd_rebuild_lag_seconds", {"pipeline": "articles"}) == 0
    rebuild.set_phase("switching")
    rebuild.set_phase("switched")
    assert phases() == ["switched"]
    assert tel.rebuild("articles") is rebuild
    with pytest.raises(ValueError, match="unknown rebuild phase"):
        rebuild.set_phase("sideways")
