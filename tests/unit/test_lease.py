"""Leases against a real MongoDB: take, renew, expire, steal, and epoch fencing of the
checkpoint. Expiry is the server's (``$$NOW``), so these tests wait real seconds."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import pytest
from pydantic import SecretStr
from pymongo.errors import AutoReconnect

from syncd import positions
from syncd.checkpoint import Checkpoint, FileCheckpointStore, MongoCheckpointStore
from syncd.config import (
    CheckpointSettings,
    LeaseSettings,
    MappingSettings,
    MongoSettings,
    PipelineSettings,
    Settings,
)
from syncd.errors import LeaseLostError
from syncd.lease import FencedSink, LeaseManager, lease_info, leases_collection
from syncd.runtime import Runtime
from syncd.scheduler import LeasedPipelines
from syncd.sink import WritePlan
from tests.doubles import MemorySink

TTL = LeaseSettings(ttl_s=1.0, renew_every_s=0.3)


def manager(db: Any, owner: str, settings: LeaseSettings = TTL) -> LeaseManager:
    store = MongoCheckpointStore(db.client, CheckpointSettings(database=db.name))
    return LeaseManager(db.client, db.name, settings, store, owner=owner)


def store_of(db: Any) -> MongoCheckpointStore:
    return MongoCheckpointStore(db.client, CheckpointSettings(database=db.name))


def checkpoint(epoch: int, seconds: int) -> Checkpoint:
    from bson.timestamp import Timestamp

    return Checkpoint(
        pipeline="p", fingerprint="f", epoch=epoch, cluster_time=Timestamp(seconds, 1)
    )


def test_acquire_is_exclusive_and_release_frees_it(mongo_db):
    a, b = manager(mongo_db, "a"), manager(mongo_db, "b")
    assert a.acquire("p") == 1
    assert b.acquire("p") is None
    assert a.holds("p") and not b.holds("p")
    info = lease_info(leases_collection(mongo_db.client, mongo_db.name), "p")
    assert info is not None and info.owner == "a" and info.epoch == 1 and info.live

    a.release("p")
    assert not a.holds("p")
    assert b.acquire("p") == 2
    stored = mongo_db["checkpoints"].find_one({"_id": "p"})
    assert stored is not None and stored["epoch"] == 2, "the new epoch was not claimed"


def test_renew_keeps_the_lease_past_its_ttl(mongo_db):
    a, b = manager(mongo_db, "a"), manager(mongo_db, "b")
    assert a.acquire("p") == 1
    for _ in range(6):  # 1.8 s, well past the 1 s TTL
        time.sleep(0.3)
        assert a.renew() == []
    assert b.acquire("p") is None
    assert a.holds("p")


def test_expired_lease_is_taken_and_the_old_holder_learns_it_lost(mongo_db):
    a, b = manager(mongo_db, "a"), manager(mongo_db, "b")
    assert a.acquire("p") == 1
    time.sleep(1.2)
    assert not a.holds("p"), "the local deadline should have passed with the TTL"
    assert b.acquire("p") == 2
    assert a.renew() == ["p"]
    assert a.take_lost() == [("p", "lost its lease to another process")]
    with pytest.raises(LeaseLostError):
        a.check("p")
    b.check("p")


def test_a_lease_that_cannot_be_renewed_past_its_deadline_says_why(mongo_db):
    a = manager(mongo_db, "a")
    assert a.acquire("p") == 1

    class Unreachable:
        def find_one_and_update(self, *args: object, **kwargs: object) -> None:
            raise AutoReconnect("connection refused")

    a._coll = Unreachable()  # type: ignore[assignment]
    assert a.renew() == []  # within the TTL: kept, our writes still allowed
    time.sleep(1.2)
    assert a.renew() == ["p"]
    ((name, why),) = a.take_lost()
    assert name == "p" and why.startswith("its lease expired: MongoDB could not be reached")


def test_a_lease_that_lapsed_in_an_outage_is_taken_back_unless_another_took_it(mongo_db):
    from syncd.errors import SourceUnavailableError

    a, b = manager(mongo_db, "a"), manager(mongo_db, "b")
    assert a.acquire("p") == 1
    reachable = a._coll

    class Unreachable:
        def find_one_and_update(self, *args: object, **kwargs: object) -> None:
            raise AutoReconnect("connection refused")

    a._coll = Unreachable()  # type: ignore[assignment]
    time.sleep(1.2)
    assert a.renew() == ["p"] and not a.holds("p")
    with pytest.raises(SourceUnavailableError):
        a.reclaim("p", 1)  # MongoDB still down: an outage, not a lost lease
    a._coll = reachable

    assert a.reclaim("p", 1), "nobody took the lease meanwhile: it is ours again"
    assert a.holds("p") and a.renew() == []
    assert b.acquire("p") is None, "a lease taken back is live again"

    a._coll = Unreachable()  # type: ignore[assignment]
    time.sleep(1.2)
    assert a.renew() == ["p"]
    assert b.acquire("p") == 2  # this time another process takes it during the lapse
    a._coll = reachable
    assert not a.reclaim("p", 1), "took back a lease another process holds"
    assert not a.holds("p") and b.holds("p")


def test_force_steals_a_live_lease(mongo_db):
    a, b = manager(mongo_db, "a"), manager(mongo_db, "b")
    assert a.acquire("p") == 1
    assert b.acquire("p", force=True) == 2
    assert a.renew() == ["p"]
    a.release("p")  # a no-op for a lease that is no longer ours
    info = lease_info(leases_collection(mongo_db.client, mongo_db.name), "p")
    assert info is not None and info.owner == "b" and info.live


def test_stale_epoch_cannot_move_the_checkpoint(mongo_db):
    a, b = manager(mongo_db, "a"), manager(mongo_db, "b")
    store = store_of(mongo_db)
    epoch_a = a.acquire("p")
    assert epoch_a == 1
    store.save(checkpoint(epoch_a, 100))
    time.sleep(1.2)
    epoch_b = b.acquire("p")
    assert epoch_b == 2
    with pytest.raises(LeaseLostError):
        store.save(checkpoint(epoch_a, 200))
    loaded = store.load("p")
    assert (
        loaded is not None and loaded.cluster_time is not None and loaded.cluster_time.time == 100
    )
    store.save(checkpoint(epoch_b, 300))
    loaded = store.load("p")
    assert (
        loaded is not None
        and loaded.cluster_time is not None
        and loaded.cluster_time.time == 300
        and loaded.epoch == 2
    )


def test_lease_epoch_jumps_past_a_newer_checkpoint_epoch(mongo_db):
    store = store_of(mongo_db)
    store.save(checkpoint(7, 100))  # written under leases that have since been dropped
    a = manager(mongo_db, "a")
    assert a.acquire("p") == 8
    store.save(checkpoint(8, 200))
    with pytest.raises(LeaseLostError):
        store.save(checkpoint(7, 300))


def test_a_status_recorded_before_the_first_checkpoint_does_not_fence_it_off(mongo_db):
    store = store_of(mongo_db)
    store.set_status("p", {"state": "retrying"})  # no epoch on the document yet
    store.save(checkpoint(0, 100))
    loaded = store.load("p")
    assert (
        loaded is not None and loaded.cluster_time is not None and loaded.cluster_time.time == 100
    )


@pytest.mark.parametrize("kind", ["mongodb", "file"])
def test_next_epoch_fences_off_every_older_writer(mongo_db, tmp_path, kind):
    if kind == "file":
        settings = CheckpointSettings(store="file", path=str(tmp_path / "cp"))
        store: Any = FileCheckpointStore(settings)
    else:
        store = store_of(mongo_db)
    assert store.next_epoch("p") == 1, "a pipeline never written starts at epoch 1"
    store.save(checkpoint(1, 100))
    assert store.next_epoch("p") == 2
    with pytest.raises(LeaseLostError):
        store.save(checkpoint(1, 200))
    store.delete("p")
    store.claim_epoch("p", 2)  # what `tokens reset` leaves: an epoch, no checkpoint
    assert store.load("p") is None
    assert store.next_epoch("p") == 3


def test_a_lease_jumps_past_an_epoch_left_without_a_checkpoint(mongo_db):
    store = store_of(mongo_db)
    store.claim_epoch("p", 7)  # claimed by a writer without a lease, then reset
    assert store.load("p") is None
    a = manager(mongo_db, "a")
    assert a.acquire("p") == 8
    store.save(checkpoint(8, 100))


def test_fenced_sink_refuses_writes_once_the_lease_is_gone(mongo_db):
    a = manager(mongo_db, "a")
    assert a.acquire("p") == 1
    inner = MemorySink()
    sink = FencedSink(inner, lambda: a.check("p"))
    sink.write(WritePlan())
    time.sleep(1.2)  # no renewal: a paused holder looks like this when it wakes up
    with pytest.raises(LeaseLostError):
        sink.write(WritePlan())
    assert inner.writes == 1


class FakeWorker:
    error: BaseException | None = None

    def __init__(self) -> None:
        self.stop = threading.Event()

    def is_alive(self) -> bool:
        return not self.stop.is_set()


def pipelines(*names: str) -> list[PipelineSettings]:
    return [
        PipelineSettings(name=n, database="d", collection=n, mapping={"text": "body"})  # type: ignore[arg-type]
        for n in names
    ]


def test_two_processes_spread_three_pipelines_and_one_takes_over_the_dead(mongo_db):
    settings = LeaseSettings(ttl_s=1.0, renew_every_s=0.2)
    configured = pipelines("p1", "p2", "p3")
    first = LeasedPipelines(manager(mongo_db, "a", settings), configured, lambda p, e: FakeWorker())
    first.tick()
    assert sorted(first.running) == ["p1", "p2", "p3"], "alone, a process runs everything"

    second = LeasedPipelines(
        manager(mongo_db, "b", settings), configured, lambda p, e: FakeWorker()
    )
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        first.tick()
        second.tick()
        if len(first.running) + len(second.running) == 3 and second.running:
            break
        time.sleep(0.05)
    assert len(second.running) == 1 and len(first.running) == 2, (first.running, second.running)
    assert not set(first.running) & set(second.running)

    # The first process dies: it stops renewing. The second takes everything within the TTL.
    first.leases.stop_renewing()
    died = time.monotonic()
    while time.monotonic() - died < 5 and len(second.running) < 3:
        second.tick()
        time.sleep(0.05)
    assert sorted(second.running) == ["p1", "p2", "p3"]
    assert time.monotonic() - died < settings.ttl_s + 2 * settings.renew_every_s + 0.5
    second.close()


class _FencedWriterBetweenSteps:
    """A checkpoint store through which a fenced-out daemon's checkpoint write lands
    after every step of the command that fenced it out: an idle daemon writes its
    position every fraction of a second, so under load one can land between any two."""

    def __init__(self, store: Any, stale: Checkpoint) -> None:
        self._store, self._stale = store, stale

    def __getattr__(self, name: str) -> Any:
        step = getattr(self._store, name)
        if not callable(step) or name in ("load", "list", "close"):
            return step

        def then_the_daemon_writes(*args: Any, **kwargs: Any) -> Any:
            done = step(*args, **kwargs)
            with contextlib.suppress(LeaseLostError):  # fenced: what must happen
                self._store.save(self._stale)
            return done

        return then_the_daemon_writes


@pytest.mark.parametrize("kind", ["mongodb", "file"])
def test_a_forced_reset_leaves_no_moment_for_the_fenced_daemon_to_bring_its_checkpoint_back(
    mongo_db, mongo_uri, tmp_path, kind
):
    """`tokens reset --force` beside a running daemon: whenever the daemon's next write
    lands, the checkpoint stays deleted, so the daemon starts over with a snapshot when
    it takes the pipeline back (it once came back at its old position, keeping drift)."""
    if kind == "file":  # without leases: the reset claims the next epoch
        cp_settings = CheckpointSettings(store="file", path=str(tmp_path / "cp"))
        store: Any = FileCheckpointStore(cp_settings)
        daemon_epoch = store.next_epoch("p")
    else:
        cp_settings = CheckpointSettings(database=mongo_db.name)
        store = store_of(mongo_db)
        daemon = manager(mongo_db, "daemon")
        daemon_epoch = daemon.acquire("p")
    assert daemon_epoch == 1
    store.save(checkpoint(daemon_epoch, 100))
    settings = Settings(
        mongodb=MongoSettings(uri=SecretStr(mongo_uri)),
        checkpoint=cp_settings,
        lease=TTL,
        pipelines=[
            PipelineSettings(
                name="p",
                database="d",
                collection="c",
                chroma_collection="c-p",
                mapping=MappingSettings(text="body"),
            )
        ],
    )
    stale = checkpoint(daemon_epoch, 200)

    class Beside(Runtime):
        @property
        def store(self) -> Any:
            return _FencedWriterBetweenSteps(store, stale)

    runtime = Beside(settings)
    try:
        done = positions.reset(runtime, "p", force=True)
    finally:
        runtime.close()
    assert done["deleted"] and done["epoch"] == 2
    assert store.load("p") is None, "the fenced daemon brought its checkpoint back"
    with pytest.raises(LeaseLostError):
        store.save(stale)
    assert store.next_epoch("p") == 3
