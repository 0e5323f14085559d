"""A halt record: bound to the checkpoint it holds, stored beside it, lifted on purpose."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncd import halts
from syncd.checkpoint import Checkpoint, FileCheckpointStore, SnapshotProgress
from syncd.config import CheckpointSettings, PipelineSettings
from syncd.errors import HaltedError, MappingError, SinkLostError


def settings(**overrides: object) -> PipelineSettings:
    return PipelineSettings.model_validate(
        {"name": "p", "database": "d", "collection": "c", "mapping": {"text": "body"}, **overrides}
    )


def stored(tmp_path: Path, cp: Checkpoint) -> FileCheckpointStore:
    store = FileCheckpointStore(CheckpointSettings(store="file", path=str(tmp_path)))
    store.save(cp)
    return store


def record(cp: Checkpoint, document_id: object = "bad") -> halts.Halt:
    return halts.Halt(
        reason="text field is not a string",
        error_class="MappingError",
        hint=halts.hint(settings()),
        position=halts.position_key(cp),
        token=cp.token,
        collection="c",
        namespace="d.c",
        key="s:bad",
        document_id=document_id,
    )


def test_a_halt_holds_its_checkpoint_across_saves_and_lapses_when_it_moves(tmp_path):
    cp = Checkpoint(pipeline="p", fingerprint="f", token={"_data": "8265A1B2C30000000104"})
    store = stored(tmp_path, cp)
    store.set_halt("p", record(cp).to_document())

    loaded = store.load("p")
    halt = halts.active(loaded)
    assert (
        halt is not None
        and halt.document_id == "bad"
        and halt.token == {"_data": "8265A1B2C30000000104"}
    )
    assert loaded is not None
    store.save(loaded)  # a checkpoint write keeps the record...
    assert halts.active(store.load("p")) is not None
    loaded.token = {"_data": "8265A1B2C30000000204"}  # ...and moving the position ends it
    store.save(loaded)
    assert halts.active(store.load("p")) is None


def test_a_nan_id_in_a_snapshot_position_still_equals_itself(tmp_path):
    nan = float("nan")
    cp = Checkpoint(pipeline="p", fingerprint="f", phase="snapshot")
    cp.snapshot = SnapshotProgress(collection="c", last_id=nan, has_last_id=True)
    store = stored(tmp_path, cp)
    store.set_halt("p", record(cp, document_id=nan).to_document())
    assert halts.active(store.load("p")) is not None


def test_a_started_pipeline_stops_on_the_stored_halt_unless_it_dead_letters_now(tmp_path):
    cp = Checkpoint(pipeline="p", fingerprint="f", token={"_data": "8265A1B2C30000000104"})
    store = stored(tmp_path, cp)
    store.set_halt("p", record(cp).to_document())
    loaded = store.load("p")
    assert loaded is not None
    with pytest.raises(HaltedError, match="not a string") as caught:
        halts.check_on_start(settings(), loaded, store)
    assert caught.value.document_id == "bad" and "`syncd resume p`" in (caught.value.hint or "")

    halts.check_on_start(settings(on_error="dead_letter"), loaded, store)
    assert halts.active(store.load("p")) is None


def test_resume_clears_only_a_halt_in_force(tmp_path):
    cp = Checkpoint(pipeline="p", fingerprint="f", token={"_data": "8265A1B2C30000000104"})
    store = stored(tmp_path, cp)
    assert halts.clear(store, "p") is None
    store.set_halt("p", record(cp).to_document())
    lifted = halts.clear(store, "p")
    assert lifted is not None and lifted.key == "s:bad"
    assert halts.active(store.load("p")) is None


def test_hints_name_only_commands_that_exist():
    assert "every 60 s" in halts.hint(settings()) and "`syncd resume p`" in halts.hint(settings())
    off = halts.hint(settings(halt_recheck_s=0))
    assert "re-checks" not in off and "then run `syncd resume p`" in off
    assert halts.hint(settings(), has_document=False).startswith("fix the cause")


def test_a_halted_rebuild_says_it_is_tried_again_and_names_no_resume() -> None:
    # A daemon tries its halted rebuild again every halt_recheck_s (60 s if 0): a fix is
    # picked up then; `syncd resume` lifts only a pipeline's own halt.
    every = halts.hint(settings(halt_recheck_s=5), rebuild=True)
    assert every.startswith(
        "fix or delete the document in MongoDB: syncd tries the rebuild again every 5 s"
    )
    assert "resume" not in every and "dead_letter" in every
    assert "every 60 s" in halts.hint(settings(halt_recheck_s=0), rebuild=True)
    assert "resume" not in halts.hint(settings(), has_document=False, rebuild=True)


def test_a_halted_syncd_rebuild_names_itself_to_run_again_and_no_resume() -> None:
    # `syncd rebuild` stops at the halt; the same command continues the build (the
    # operator's --config and all). `syncd resume` refuses the build's name.
    command = "syncd rebuild --config /etc/syncd.toml p"
    text = halts.hint(settings(halt_recheck_s=5), rebuild=True, command=command)
    assert text.startswith(
        f"fix or delete the document in MongoDB, then run `{command}` again: the rebuild "
        "continues where it stopped"
    )
    assert f'set on_error = "dead_letter" and run `{command}` again' in text
    assert "resume" not in text and "restart" not in text and "every" not in text
    bare = halts.hint(settings(), has_document=False, rebuild=True, command=command)
    assert bare.startswith(f"fix the cause, then run `{command}` again")
    halt = halts.new(
        settings(), MappingError("no text", document_id="bad"), None, rebuild=True,
        command=command,
    )  # fmt: skip
    assert halt.command == command and halt.hint.endswith("to set such changes aside")
    daemons = halts.new(settings(), MappingError("no text", document_id="bad"), None, rebuild=True)
    assert daemons.command is None and "tries the rebuild again" in daemons.hint


def test_a_halt_is_halted_and_a_fatal_error_is_failed() -> None:
    assert halts.stopped_state(HaltedError("at _id 7")) == "halted"
    assert halts.stopped_state(MappingError("no text")) == "halted"  # poison
    assert halts.stopped_state(SinkLostError("collection gone")) == "failed"
    assert halts.stopped_state(RuntimeError("a bug")) == "failed"
