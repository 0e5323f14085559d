"""When a daemon with on_mapping_change = "rebuild" rebuilds a pipeline, and when not."""

from __future__ import annotations

from pathlib import Path

from syncd.autorebuild import needs_rebuild
from syncd.checkpoint import Checkpoint, FileCheckpointStore
from syncd.config import CheckpointSettings
from syncd.switching import save_record


def _store(tmp_path: Path, fingerprint: str) -> FileCheckpointStore:
    store = FileCheckpointStore(CheckpointSettings(store="file", path=str(tmp_path)))
    store.save(Checkpoint(pipeline="p", fingerprint=fingerprint, phase="streaming"))
    return store


def test_a_changed_mapping_is_rebuilt_and_a_first_run_is_not(tmp_path: Path) -> None:
    store = _store(tmp_path, "old")
    assert needs_rebuild(store, "p", "new")
    assert not needs_rebuild(store, "p", "old")
    assert not needs_rebuild(store, "q", "new")  # no checkpoint: a first run copies


def test_a_switch_under_way_is_completed_only_by_its_own_mapping(tmp_path: Path) -> None:
    store = _store(tmp_path, "old")
    save_record(
        store,
        "p",
        {"state": "switching", "fingerprint": "new", "switch": {"after": {"fingerprint": "new"}}},
    )
    assert needs_rebuild(store, "p", "new")
    assert not needs_rebuild(store, "p", "old")


def test_the_mapping_a_rebuild_switched_away_from_is_not_built_back(tmp_path: Path) -> None:
    store = _store(tmp_path, "new")
    previous = {"name": "c--v1", "id": "x", "generation": 1, "position": {"fingerprint": "old"}}
    save_record(store, "p", {"state": "switched", "fingerprint": "new", "previous": previous})
    assert not needs_rebuild(store, "p", "old")
    save_record(store, "p", {"state": "switched", "fingerprint": "new", "previous": None})
    assert needs_rebuild(store, "p", "old")  # dropped: a deliberate change back
