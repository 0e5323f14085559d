"""A pipeline that looks its Chroma collection up by name just after a rebuild switched
that name to another collection (another mapping, maybe vectors of another size) waits
for the switch (MappingSwitchedError, transient): never a fatal error about the new
collection, never a snapshot into it, never a run on from the checkpoint it held."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from syncd.checkpoint import Checkpoint, FileCheckpointStore
from syncd.config import CheckpointSettings, PipelineSettings
from syncd.errors import MappingSwitchedError, SinkFatalError, SinkUnavailableError
from syncd.mapping import Mapper
from syncd.pipeline import Pipeline
from syncd.switching import save_record
from syncd.telemetry import Telemetry
from tests.doubles import MemorySink
from tests.unit.test_pipeline import FakeSource, token

NEW = "the rebuild's mapping"
PREVIOUS = {"name": "c--v1", "id": "coll-1", "generation": 1, "position": {}}


class SwitchedSink(MemorySink):
    """Chroma, where a rebuild switches the name to another collection the moment the
    pipeline next looks it up: the rebuild has recorded the switch by then (it does
    before it renames), and the lookup finds the new collection, whose vectors have
    another size (``other_size``: the lookup fails as that check does) or the same."""

    def __init__(self, store: FileCheckpointStore, *, other_size: bool) -> None:
        super().__init__()
        self.store = store
        self.other_size = other_size
        self.armed = False

    def collection_id(self, *, create: bool = False) -> str | None:
        if not self.armed:
            return super().collection_id(create=create)
        self.armed = False
        save_record(self.store, "p", {"state": "switched", "fingerprint": NEW,
                                      "generation": 2, "previous": PREVIOUS})  # fmt: skip
        self.store.save(Checkpoint(pipeline="p", fingerprint=NEW, phase="streaming",
                                   chroma_collection_id="coll-new", epoch=9))  # fmt: skip
        self.id = "coll-new"
        if self.other_size:
            raise SinkFatalError(
                "Chroma collection 'c' holds 32-dimensional vectors, but the pipeline's "
                "embedder makes 8"
            )
        return self.id


def _pipeline(
    tmp_path: Path, *, other_size: bool, **table: Any
) -> tuple[Pipeline, SwitchedSink, FileCheckpointStore]:
    settings = PipelineSettings.model_validate(
        {
            "name": "p",
            "database": "app",
            "collection": "docs",
            "mapping": {"text": "body", "metadata": ["tag", "n"]},
            "embedder": {"kind": "hashing", "dimensions": 8},
            "idle_checkpoint_interval_s": 0.1,
            **table,
        }
    )
    store = FileCheckpointStore(CheckpointSettings(store="file", path=str(tmp_path)))
    sink = SwitchedSink(store, other_size=other_size)
    pipeline = Pipeline(
        settings,
        source=FakeSource(),
        sink=sink,
        store=store,
        mapper=Mapper(settings),
        embedder=None,
        telemetry=Telemetry.disabled().pipeline("p"),
    )
    store.save(Checkpoint(pipeline="p", fingerprint=pipeline.mapper.fingerprint,
                          phase="streaming", chroma_collection_id="coll-1", token=token(1),
                          counts={"insert": 3}))  # fmt: skip
    return pipeline, sink, store


CASES = [
    pytest.param(other_size, table, id=f"{size}-{name}")
    for other_size, size in ((True, "other-size"), (False, "same-size"))
    for table, name in (
        ({}, "refuse"),
        ({"on_mapping_change": "rebuild"}, "rebuild"),
        ({"on_sink_lost": "resnapshot"}, "resnapshot"),
    )
]


@pytest.mark.parametrize(("other_size", "table"), CASES)
def test_a_switch_between_reading_the_record_and_looking_chroma_up_is_waited_for(
    tmp_path: Path, other_size: bool, table: dict[str, Any]
) -> None:
    """The load reads the record (none yet), then looks the collection up: switched."""
    pipeline, sink, store = _pipeline(tmp_path, other_size=other_size, **table)
    sink.armed = True
    with pytest.raises(MappingSwitchedError) as waits:
        pipeline.progress.load()
    assert "rebuilt with another mapping" in waits.value.message
    assert "syncd rebuild p --rollback" in (waits.value.hint or "")
    stored = store.load("p")
    assert stored is not None and stored.fingerprint == NEW, "no snapshot, nothing written"
    assert pipeline.checkpoint is None and not sink.records


@pytest.mark.parametrize(("other_size", "table"), CASES)
def test_a_quiet_pipeline_that_finds_its_name_switched_waits(
    tmp_path: Path, other_size: bool, table: dict[str, Any]
) -> None:
    """Streaming, quiet: its periodic look at the collection finds the switch."""
    pipeline, sink, store = _pipeline(tmp_path, other_size=other_size, **table)
    pipeline.progress.load()
    pipeline.progress._last_saved -= 60  # quiet for longer than the interval
    sink.armed = True
    with pytest.raises(MappingSwitchedError):
        pipeline.progress.idle(token(2))
    stored = store.load("p")
    assert stored is not None and stored.fingerprint == NEW and not sink.records


def test_a_wait_for_a_switch_loads_the_checkpoint_again_before_the_next_try(
    tmp_path: Path,
) -> None:
    """The next try checks the stored checkpoint and the record again, never runs on
    from the checkpoint held when the switch was found."""
    pipeline, _, _ = _pipeline(tmp_path, other_size=True, retry_max_backoff_s=0.01)
    held = pipeline.progress.load()
    tries: list[Checkpoint | None] = []

    def once() -> None:
        tries.append(pipeline.checkpoint)
        if len(tries) == 1:
            raise SinkUnavailableError("Chroma is down", pipeline="p")
        if len(tries) == 2:
            raise MappingSwitchedError("switched", pipeline="p")
        pipeline.stop.set()

    pipeline._run_once = once  # type: ignore[method-assign]
    pipeline.run()
    assert tries[0] is held and tries[1] is held  # an outage keeps what was loaded
    assert tries[2] is None  # a switch: loaded (and checked) again
