"""An outage during a snapshot ends when the snapshot writes again: the pipeline shows
``snapshotting`` (not ``retrying``) for the rest of the copy, and ``streaming`` once it
streams, whatever state it was in when the outage began."""

from __future__ import annotations

import threading
from typing import Any

from syncd.config import PipelineSettings
from syncd.embedder import HashingEmbedder
from syncd.mapping import Mapper
from syncd.pipeline import Pipeline
from syncd.telemetry import Telemetry
from tests.doubles import MemorySink, MemoryStore
from tests.unit.test_pipeline import FakeSource


class Watched(MemorySink):
    """Fails its first write; records the pipeline's state as each write begins."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_writes = 1
        self.states: list[str] = []
        self.telemetry: Any = None

    def write(self, plan: Any) -> None:
        self.states.append(self.telemetry.status_text().split()[1].rstrip(","))
        super().write(plan)


def test_a_snapshot_that_writes_again_after_an_outage_is_snapshotting_then_streaming() -> None:
    source = FakeSource({i: {"_id": i, "body": f"text {i}"} for i in range(1, 7)})
    sink = Watched()
    settings = PipelineSettings.model_validate(
        {
            "name": "p",
            "database": "app",
            "collection": "docs",
            "snapshot_batch_size": 2,
            "mapping": {"text": "body"},
            "embedder": {"kind": "hashing", "dimensions": 8},
            "retry_max_backoff_s": 0.05,
        }
    )
    telemetry = Telemetry.disabled().pipeline("p")
    sink.telemetry = telemetry
    p = Pipeline(
        settings,
        source=source,
        sink=sink,
        store=MemoryStore(),
        mapper=Mapper(settings),
        embedder=HashingEmbedder(8),
        telemetry=telemetry,
    )
    runner = threading.Thread(target=p.run, daemon=True)
    runner.start()
    try:
        for _ in range(500):
            if len(sink.records) == 6 and telemetry.status_text().startswith("p streaming"):
                break
            threading.Event().wait(0.01)
    finally:
        p.stop.set()
        runner.join(10)
    # Page 1 fails (retrying), is written again (still retrying as it begins), then the
    # copy moves on: pages 2 and 3 are written while snapshotting.
    assert sink.states == ["snapshotting", "retrying", "snapshotting", "snapshotting"]
    assert telemetry.status_text().startswith("p streaming"), telemetry.status_text()
    assert len(sink.records) == 6
