"""When a daemon with on_mapping_change = "rebuild" rebuilds a pipeline, and when not;
that however its rebuild ends, `syncd status` tells the truth about it; and that its
retries, as those of `syncd rebuild`, give up after retry_deadline_s of one outage."""

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
    HaltedError,
    LeaseLostError,
    MappingSwitchedError,
    SinkFatalError,
    SinkUnavailableError,
    SyncdError,
)
from syncd.switching import check_start, save_record
from tests.doubles import Clock, Waits


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

    def halted_until_a_part_moves(self, error: BaseException, then: str) -> None:
        self.states.append("halted")


def _rebuilder(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    run: Callable[..., int],
    stop: Any = None,
    **settings: Any,
) -> tuple[Any, FileCheckpointStore]:
    """A Rebuilder of pipeline p, whose stored mapping is another one, that runs ``run``
    as its rebuild, stopped by ``stop`` (an Event by default); and its checkpoint store."""
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
        stop=stop or threading.Event(),
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


# --- retry_deadline_s bounds one outage of a rebuild, not all of them -------------------
#
# The rebuild is a script of tries on a clock that moves only when told (a wait is 20 s):
# "fail" raises an outage of Chroma, "ok" ends the rebuild, and "build" is a try whose
# build moves (it checkpoints), runs for an hour, then meets an outage at the switch;
# "halt": the build halts at a document after an hour (a daemon tries again later).

DEADLINE = 60
_OUTAGE = "Chroma unavailable: connection refused"
TWO_SHORT_OUTAGES = ["fail", "fail", "build", "fail", "fail", "ok"]  # 40 s, an hour, 40 s
ONE_LONG_OUTAGE = ["fail"] * 6  # 0, 20, ... 100 s: past the deadline at 80 s
MOVED_THEN_ONE_LONG_OUTAGE = ["build"] + ["fail"] * 5


def _script(tries: list[str], clock: Clock) -> Callable[..., int]:
    """A rebuild that takes ``tries`` in turn: ``moved`` is how it reports its build moving."""
    left = list(tries)

    def run(*_: Any, moved: Callable[[], None], **__: Any) -> int:
        step = left.pop(0)
        if step == "ok":
            return int(ExitCode.OK)
        if step == "build":
            moved()
            clock.now += 3600
        if step == "halt":
            clock.now += 3600
            raise HaltedError("the text of _id 7 is missing", pipeline="p~rebuild")
        raise SinkUnavailableError(_OUTAGE, pipeline="p")

    return run


def _on_clock(monkeypatch: pytest.MonkeyPatch) -> tuple[Clock, Waits]:
    import syncd.outages as outages

    clock = Clock()
    monkeypatch.setattr(outages, "time", clock)
    return clock, Waits(clock, step=20)


def _standalone(tries: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """`syncd rebuild p`'s retries (syncd.rebuild._retrying) through ``tries``."""
    from syncd.rebuild import _retrying

    clock, waits = _on_clock(monkeypatch)
    run = _script(tries, clock)
    ps = PipelineSettings.model_validate(
        {"name": "p", "database": "d", "collection": "c", "mapping": {"text": "body"},
         "retry_deadline_s": DEADLINE}
    )  # fmt: skip
    runtime = SimpleNamespace(telemetry=SimpleNamespace(pipeline=lambda name: _Telemetry()))
    return _retrying(
        lambda moved: run(moved=moved),
        runtime,  # type: ignore[arg-type]
        ps,
        command="syncd rebuild p",
        stop=waits,  # type: ignore[arg-type]
    )


def _daemon(tries: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> bool:
    """A daemon's rebuild (syncd.autorebuild.Rebuilder) retried through ``tries``."""
    clock, waits = _on_clock(monkeypatch)
    rebuilder, _ = _rebuilder(
        tmp_path, monkeypatch, _script(tries, clock), stop=waits, retry_deadline_s=DEADLINE
    )
    return bool(rebuilder.run())


def _gave_up(error: SyncdError, command: str) -> None:
    assert isinstance(error, SinkFatalError)
    assert error.message == f"still failing after {DEADLINE} s of retries: {_OUTAGE}"
    assert error.hint == (
        f"fix the cause and start `{command}` again, or raise retry_deadline_s (0 retries forever)"
    )


def test_syncd_rebuild_times_each_outage_from_its_own_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _standalone(TWO_SHORT_OUTAGES, monkeypatch) == ExitCode.OK


@pytest.mark.parametrize("tries", [ONE_LONG_OUTAGE, MOVED_THEN_ONE_LONG_OUTAGE])
def test_syncd_rebuild_gives_up_after_one_outage_past_the_deadline(
    monkeypatch: pytest.MonkeyPatch, tries: list[str]
) -> None:
    with pytest.raises(SinkFatalError) as gave_up:
        _standalone(tries, monkeypatch)
    _gave_up(gave_up.value, "syncd rebuild p")


@pytest.mark.parametrize("between", ["build", "halt"])
def test_a_daemons_rebuild_times_each_outage_from_its_own_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, between: str
) -> None:
    tries = ["fail", "fail", between, "fail", "fail", "ok"]
    assert _daemon(tries, tmp_path, monkeypatch) is True


@pytest.mark.parametrize("tries", [ONE_LONG_OUTAGE, MOVED_THEN_ONE_LONG_OUTAGE])
def test_a_daemons_rebuild_gives_up_after_one_outage_past_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tries: list[str]
) -> None:
    with pytest.raises(SinkFatalError) as gave_up:
        _daemon(tries, tmp_path, monkeypatch)
    _gave_up(gave_up.value, "syncd run")


def test_the_build_reports_moving_when_it_checkpoints_or_catches_up_only() -> None:
    """What ends an outage of a retried rebuild: syncd.rebuild's telemetry of its build."""
    from bson.timestamp import Timestamp

    from syncd.rebuild import _UntilCaughtUp

    moves: list[str] = []
    inner = SimpleNamespace(
        set_state=lambda *_: None,
        retrying=lambda *_: None,
        snapshot_progress=lambda *_: None,
        checkpointed=lambda _: None,
        caught_up=lambda: None,
    )
    metrics = SimpleNamespace(
        phase="snapshot",
        set_phase=lambda _: None,
        behind_since=lambda _: None,
        snapshot_progress=lambda *_: None,
    )
    build = _UntilCaughtUp(
        inner,  # type: ignore[arg-type]
        threading.Event(),
        Timestamp(100, 1),
        metrics,  # type: ignore[arg-type]
        lambda: moves.append("moved"),
    )
    build.set_state("snapshotting")
    build.retrying(SinkUnavailableError("down", pipeline="p~rebuild"), 1, 1.0)
    build.set_state("streaming")
    assert moves == []  # starting or retrying is no move
    build.checkpointed(Timestamp(50, 1))
    assert moves == ["moved"]
    build.caught_up()
    assert moves == ["moved", "moved"]
