"""When a daemon with on_mapping_change = "rebuild" rebuilds a pipeline, and when not;
and that however its rebuild ends, `syncd status` tells the truth about it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from syncd.autorebuild import needs_rebuild
from syncd.checkpoint import Checkpoint, FileCheckpointStore
from syncd.config import CheckpointSettings, PipelineSettings
from syncd.errors import (
    ConfigError,
    ExitCode,
    LeaseLostError,
    MappingSwitchedError,
    SinkFatalError,
    SinkUnavailableError,
)
from syncd.switching import check_start, save_record


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


def test_a_process_switched_away_waits_for_another_build_and_offers_no_lost_rollback(
    tmp_path: Path,
) -> None:
    """Under on_mapping_change = "rebuild", a pipeline whose checkpoint has another
    mapping waits (transient) while another build is under way, never the refusal; its
    hint offers --rollback only while a previous collection is kept."""
    store = _store(tmp_path, "b")
    live = store.load("p")
    assert live is not None
    previous = {"name": "c--v1", "id": "x", "generation": 1, "position": {"fingerprint": "a"}}
    save_record(store, "p", {"state": "switched", "fingerprint": "b", "previous": previous})
    with pytest.raises(MappingSwitchedError) as kept:
        check_start(store, "p", "a", live, rebuilds=True)
    assert "--rollback" in (kept.value.hint or "")
    save_record(store, "p", {"state": "switched", "fingerprint": "b", "previous": None})
    with pytest.raises(MappingSwitchedError) as dropped:
        check_start(store, "p", "a", live, rebuilds=True)
    assert "--rollback" not in (dropped.value.hint or "")
    building = {"state": "building", "fingerprint": "d", "target": "c--v3", "previous": None}
    save_record(store, "p", building)
    with pytest.raises(MappingSwitchedError) as waits:
        check_start(store, "p", "a", live, rebuilds=True)
    assert "p~rebuild" in waits.value.message and "snapshot" not in (waits.value.hint or "")
    check_start(store, "p", "a", live)  # under "refuse": the caller refuses (exit 2)


# --- however the rebuild of a daemon ends, `syncd status` says so -------------------


class _Telemetry:
    def __init__(self) -> None:
        self.states: list[str] = []

    def set_state(self, state: str, error: BaseException | None = None) -> None:
        self.states.append(state)

    def retrying(self, exc: BaseException, attempt: int, delay: float) -> None:
        self.states.append("retrying")


def _rebuilder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Callable[..., int], **settings: Any
) -> tuple[Any, FileCheckpointStore]:
    """A Rebuilder of pipeline p, whose stored mapping is another one, that runs ``run``
    as its rebuild; and its checkpoint store."""
    import syncd.autorebuild as autorebuild

    monkeypatch.setattr(autorebuild, "run_rebuild", run)
    ps = PipelineSettings.model_validate(
        {"name": "p", "database": "d", "collection": "c", "mapping": {"text": "body"}, **settings}
    )
    store = _store(tmp_path, "old")
    telemetry = _Telemetry()
    runtime = SimpleNamespace(
        store=store,
        telemetry=SimpleNamespace(pipeline=lambda name: _Telemetry()),
        settings=SimpleNamespace(lease=SimpleNamespace(renew_every_s=0.01)),
    )
    rebuilder = autorebuild.Rebuilder(
        runtime,  # type: ignore[arg-type]
        ps,
        stop=threading.Event(),
        telemetry=telemetry,  # type: ignore[arg-type]
        heartbeat=lambda: None,
        live=None,
    )
    return rebuilder, store


@pytest.mark.parametrize(
    "error",
    [
        ConfigError(
            "the previous collection 'c--v1' of p is still kept from the last rebuild",
            hint="run `syncd rebuild p --drop-previous` first",
            pipeline="p",
        ),
        SinkFatalError("the Chroma collection 'c' was replaced", hint="run it", pipeline="p"),
        RuntimeError("a bug"),
    ],
)
def test_a_rebuild_ended_by_an_error_is_failed_with_that_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def run(*_: Any, **__: Any) -> int:
        raise error

    rebuilder, store = _rebuilder(tmp_path, monkeypatch, run)
    with pytest.raises(type(error)):
        rebuilder.run()
    status = _status(store)
    assert status["state"] == "failed", status
    assert status["error_class"] == type(error).__name__
    assert status["error"] == getattr(error, "message", str(error))
    assert status.get("hint") == getattr(error, "hint", None)


def test_a_rebuild_retried_past_its_deadline_is_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(*_: Any, **__: Any) -> int:
        raise SinkUnavailableError("Chroma is down", pipeline="p")

    rebuilder, store = _rebuilder(tmp_path, monkeypatch, run, retry_deadline_s=0.05)
    with pytest.raises(SinkFatalError):
        rebuilder.run()
    status = _status(store)
    assert status["state"] == "failed" and "still failing after" in status["error"], status
    assert "retry_deadline_s" in status["hint"]


def test_a_rebuild_whose_lease_was_taken_leaves_the_state_to_the_process_that_took_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(*_: Any, **__: Any) -> int:
        raise LeaseLostError("another process took the pipeline over", pipeline="p")

    rebuilder, store = _rebuilder(tmp_path, monkeypatch, run)
    with pytest.raises(LeaseLostError):
        rebuilder.run()
    assert _status(store)["state"] == "rebuilding"


def test_a_rebuild_stopped_first_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(*_: Any, stop: threading.Event, **__: Any) -> int:
        stop.set()  # SIGTERM during the build: it stops after its batch
        return int(ExitCode.DRIFT_OR_FAILURE)

    rebuilder, store = _rebuilder(tmp_path, monkeypatch, run)
    assert rebuilder.run() is False
    status = _status(store)
    assert status["state"] == "stopped" and "error" not in status, status


def _status(store: FileCheckpointStore) -> dict[str, Any]:
    cp = store.load("p")
    assert cp is not None
    return cp.status
