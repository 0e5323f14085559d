"""The file checkpoint store (`store = "file"`): one JSON file per pipeline.

What it promises (syncd/checkpoint.py): a save replaces the file atomically, so a
crash leaves the old checkpoint or the new one, never a mix; a file that cannot be
read is a loud CheckpointCorruptError (exit 4, a hint naming the reset), never a
first run; a write from an older epoch than the stored one is refused.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from bson.objectid import ObjectId
from bson.timestamp import Timestamp

from syncd.checkpoint import Checkpoint, FileCheckpointStore, SnapshotProgress
from syncd.config import CheckpointSettings
from syncd.errors import CheckpointCorruptError, ExitCode, LeaseLostError, SyncdError

TOKEN = {"_data": "8263515EAC000000022B0429296E1404"}


def store_in(directory: Path, *, history: int = 50) -> FileCheckpointStore:
    return FileCheckpointStore(
        CheckpointSettings(store="file", path=str(directory), history=history)
    )


def checkpoint(epoch: int = 1, time: int = 100, **fields: Any) -> Checkpoint:
    return Checkpoint(
        pipeline="p",
        fingerprint="f1",
        token=TOKEN,
        cluster_time=Timestamp(time, 1),
        wall_time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        counts={"upserts": time},
        chroma_collection_id="0a1b",
        epoch=epoch,
        updated_by="host:1",
        **fields,
    )


def stored(store: FileCheckpointStore) -> Checkpoint:
    cp = store.load("p")
    assert cp is not None
    return cp


def test_a_missing_file_is_a_first_run(tmp_path):
    store = store_in(tmp_path / "not-made-yet")
    assert store.load("p") is None
    assert store.list() == []


def test_a_checkpoint_reads_back_as_written_by_another_process(tmp_path):
    snapshot = SnapshotProgress(
        start_token=TOKEN,
        start_at=Timestamp(90, 3),
        collection="c",
        last_id=ObjectId("635019a078be67426d7cf4d2"),
        has_last_id=True,
        scanned=1234,
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        empty_ahead=True,
        writing_id=ObjectId("635019a078be67426d7cf4ff"),
        has_writing_id=True,
    )
    written = checkpoint(phase="snapshot", snapshot=snapshot, token_is_invalidate=True)
    store_in(tmp_path).save(written)

    loaded = store_in(tmp_path).load("p")  # a new store: nothing kept in memory

    assert loaded is not None
    assert loaded.snapshot == snapshot
    assert loaded.cluster_time == Timestamp(100, 1)
    assert loaded.wall_time == written.wall_time
    assert loaded.wall_time is not None and loaded.wall_time.tzinfo is not None
    for field in ("pipeline", "fingerprint", "phase", "token", "token_is_invalidate"):
        assert getattr(loaded, field) == getattr(written, field), field
    for field in ("counts", "chroma_collection_id", "epoch", "updated_by", "halt"):
        assert getattr(loaded, field) == getattr(written, field), field
    assert [cp.pipeline for cp in store_in(tmp_path).list()] == ["p"]


def test_a_save_replaces_the_position_and_keeps_status_halt_and_bounded_history(tmp_path):
    store = store_in(tmp_path, history=2)
    store.save(checkpoint(time=100), history_reason="first")
    store.set_status("p", {"state": "streaming"})
    store.set_halt("p", {"reason": "poison"})
    for time in (200, 300, 400):
        store.save(checkpoint(time=time), history_reason=f"at {time}")
    store.save(checkpoint(time=500))  # no reason: no history entry

    loaded = store_in(tmp_path).load("p")

    assert loaded is not None
    assert loaded.cluster_time == Timestamp(500, 1)
    assert loaded.status["state"] == "streaming"
    assert loaded.halt == {"reason": "poison"}
    assert [entry["reason"] for entry in loaded.history] == ["at 300", "at 400"]
    store.set_halt("p", None)
    assert stored(store).halt is None


def test_delete_leaves_a_first_run(tmp_path):
    store = store_in(tmp_path)
    store.save(checkpoint())
    store.delete("p")
    store.delete("p")  # already gone: nothing to do
    assert store.load("p") is None
    assert list(tmp_path.iterdir()) == []


# --- atomic write -------------------------------------------------------------------


def only_checkpoint_file(directory: Path) -> Path:
    """The pipeline's file, and no temp file left beside it."""
    assert sorted(p.name for p in directory.iterdir()) == ["p.json"]
    return directory / "p.json"


class Crash(BaseException):
    """Stands in for the process dying: not an Exception, nothing may swallow it."""


def test_a_failure_while_writing_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    store = store_in(tmp_path)
    store.save(checkpoint(time=100))
    before = only_checkpoint_file(tmp_path).read_bytes()
    real_fdopen = os.fdopen

    class HalfWriter:
        """Writes the first half of the new checkpoint, then dies."""

        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def __enter__(self) -> HalfWriter:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

        def write(self, data: bytes) -> None:
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise Crash

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(Crash):
        store.save(checkpoint(time=200))
    monkeypatch.undo()

    assert only_checkpoint_file(tmp_path).read_bytes() == before
    assert stored(store).cluster_time == Timestamp(100, 1)


def test_a_failure_before_the_rename_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    store = store_in(tmp_path)
    store.save(checkpoint(time=100))

    def fail_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail_fsync)
    with pytest.raises(SyncdError) as failed:
        store.save(checkpoint(time=200))
    monkeypatch.undo()

    assert failed.value.exit_code == ExitCode.SOURCE  # a one-shot command gives up with 4
    only_checkpoint_file(tmp_path)
    assert stored(store).cluster_time == Timestamp(100, 1)


def test_the_new_checkpoint_is_complete_and_synced_in_a_sibling_before_it_replaces_the_old(
    tmp_path, monkeypatch
):
    store = store_in(tmp_path)
    store.save(checkpoint(time=100))
    target = tmp_path / "p.json"
    before = target.read_bytes()
    synced: list[int] = []
    seen: dict[str, Any] = {}
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        seen["src"], seen["dst"] = Path(src), Path(dst)
        seen["fsyncs_before"] = len(synced)
        seen["old_at_rename"] = target.read_bytes()
        seen["new_at_rename"] = Path(src).read_bytes()
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store.save(checkpoint(time=200))
    monkeypatch.undo()

    assert seen["dst"] == target
    assert seen["src"].parent == tmp_path, "a rename is atomic only within one file system"
    assert seen["fsyncs_before"] == 1, "the data is on disk before the rename"
    assert len(synced) == 2, "and the directory entry after it"
    assert seen["old_at_rename"] == before
    assert seen["new_at_rename"] == target.read_bytes()
    only_checkpoint_file(tmp_path)
    assert stored(store).cluster_time == Timestamp(200, 1)


# --- corruption ---------------------------------------------------------------------


def truncated(text: bytes) -> bytes:
    return text[: len(text) // 2]


def garbled(text: bytes) -> bytes:
    return b"\xff\xfe" + text[2:]


def not_an_object(text: bytes) -> bytes:
    return b"[1, 2, 3]"


def epoch_edited(text: bytes) -> bytes:
    return text.replace(b'"epoch": {"$numberInt": "3"}', b'"epoch": "three"')


def empty(text: bytes) -> bytes:
    return b""


def an_empty_object(text: bytes) -> bytes:
    return b"{}"


def another_shape(text: bytes) -> bytes:
    return b'{"epoch": "x", "position": 5}'


@pytest.mark.parametrize(
    "damage",
    [truncated, garbled, not_an_object, epoch_edited, empty, an_empty_object, another_shape],
)
def test_an_unreadable_file_is_refused_loudly_and_left_alone(tmp_path, damage):
    store = store_in(tmp_path)
    store.save(checkpoint(epoch=3))
    path = tmp_path / "p.json"
    damaged = damage(path.read_bytes())
    assert damaged != path.read_bytes()
    path.write_bytes(damaged)

    for attempt in (
        lambda: store.load("p"),
        store.list,
        lambda: store.save(checkpoint(epoch=3, time=200)),
        lambda: store.next_epoch("p"),
        lambda: store.claim_epoch("p", 9),
    ):
        with pytest.raises(CheckpointCorruptError) as refused:
            attempt()
        error = refused.value
        assert error.exit_code == ExitCode.SOURCE
        assert error.pipeline == "p"
        assert error.hint is not None and "syncd tokens reset p --yes" in error.hint
        assert "syncd tokens reset p --yes" in error.describe()
        assert path.read_bytes() == damaged, "never reset or overwritten behind the user's back"


# --- epochs and fencing -------------------------------------------------------------


def test_an_older_epoch_cannot_overwrite_a_newer_one(tmp_path):
    store = store_in(tmp_path)
    store.save(checkpoint(epoch=2, time=100))
    before = (tmp_path / "p.json").read_bytes()

    with pytest.raises(LeaseLostError) as refused:
        store.save(checkpoint(epoch=1, time=200))
    assert refused.value.exit_code == ExitCode.LEASE
    with pytest.raises(LeaseLostError):
        store.claim_epoch("p", 1)

    assert (tmp_path / "p.json").read_bytes() == before
    store.save(checkpoint(epoch=2, time=300))  # the holder itself writes on
    store.save(checkpoint(epoch=5, time=400))  # and a newer one takes over
    assert stored(store).epoch == 5


def test_next_epoch_is_stored_so_a_new_process_continues_from_it(tmp_path):
    assert store_in(tmp_path).next_epoch("p") == 1
    assert store_in(tmp_path).next_epoch("p") == 2
    assert store_in(tmp_path).load("p") is None, "an epoch alone is no checkpoint"
    with pytest.raises(LeaseLostError):
        store_in(tmp_path).save(checkpoint(epoch=1))
    store_in(tmp_path).save(checkpoint(epoch=2))
    assert store_in(tmp_path).next_epoch("p") == 3


def test_claim_epoch_keeps_the_checkpoint_and_fences_off_older_writers(tmp_path):
    store = store_in(tmp_path)
    store.save(checkpoint(epoch=1, time=100))
    store.claim_epoch("p", 4)

    loaded = store.load("p")
    assert loaded is not None and loaded.epoch == 4 and loaded.cluster_time == Timestamp(100, 1)
    with pytest.raises(LeaseLostError):
        store.save(checkpoint(epoch=3, time=200))


def test_pipelines_are_fenced_apart(tmp_path):
    store = store_in(tmp_path)
    store.claim_epoch("other", 9)
    store.save(checkpoint(epoch=1))
    assert stored(store).epoch == 1
    assert [cp.pipeline for cp in store.list()] == ["p"]  # "other" holds only an epoch
