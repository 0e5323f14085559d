"""Invariants 1-3 end to end: a randomized workload, `kill -9` of syncd at random
moments, and at every kill the checkpoint never passes an event missing from Chroma;
at the end Chroma equals MongoDB mapped (ids, documents, metadata, embeddings)."""

from __future__ import annotations

import functools
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from bson import Binary, ObjectId
from bson.timestamp import Timestamp
from pymongo import MongoClient

from . import oracle
from .helpers import caught_up, diff, load_checkpoint, settings_of, wait_until, write_config

KILLS = 10
METADATA = (*oracle.METADATA, "seq")


@dataclass
class OpLog:
    """What the workload did, per key: (operation time, seq, deleted?)."""

    ops: dict[tuple[str, str], list[tuple[Timestamp, int, bool]]] = field(default_factory=dict)
    last_time: Timestamp | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, coll: str, key: str, op_time: Timestamp, seq: int, deleted: bool) -> None:
        with self.lock:
            self.ops.setdefault((coll, key), []).append((op_time, seq, deleted))
            if self.last_time is None or op_time > self.last_time:
                self.last_time = op_time


def random_id(rng: random.Random) -> Any:
    kind = rng.randrange(4)
    if kind == 0:
        return ObjectId()
    if kind == 1:
        return f"s-{rng.randrange(10**9)}"
    if kind == 2:
        return rng.randrange(10**12)
    return Binary.from_uuid(uuid.UUID(int=rng.getrandbits(128)))


def make_doc(rng: random.Random, seq: int) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "body": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 12))),
        "seq": seq,
        "n": rng.randrange(1000),
        "vec": oracle.vector(seq),
    }
    if rng.random() < 0.6:
        doc["title"] = f"title {rng.randrange(100)}"
    if rng.random() < 0.5:
        doc["tags"] = rng.sample(WORDS, rng.randrange(1, 4))
    if rng.random() < 0.3:
        doc["nested"] = {"a": rng.randrange(5), "b": {"c": "deep"}}
    return doc


WORDS = [
    "alpha", "beta", "gamma", "delta", "river", "stone",
    "cloud", "vector", "index", "mirror", "change", "stream",
]  # fmt: skip


class Workload(threading.Thread):
    def __init__(self, uri: str, db: str, colls: list[str], log: OpLog, seed: int) -> None:
        super().__init__(daemon=True)
        self.client: MongoClient[dict[str, Any]] = MongoClient(uri)
        self.db = self.client[db]
        self.colls = colls
        self.log = log
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.live: dict[str, list[Any]] = {c: [] for c in colls}
        self.seq = 0
        self.error: BaseException | None = None

    def step(self) -> None:
        rng = self.rng
        coll_name = rng.choice(self.colls)
        coll = self.db[coll_name]
        live = self.live[coll_name]
        self.seq += 1
        with self.client.start_session(causal_consistency=True) as session:
            roll = rng.random()
            deleted = False
            if not live or roll < 0.35:
                _id = random_id(rng)
                coll.insert_one({"_id": _id, **make_doc(rng, self.seq)}, session=session)
                live.append(_id)
            elif roll < 0.6:
                _id = rng.choice(live)
                sets: dict[str, Any] = {"seq": self.seq, "n": rng.randrange(1000)}
                unset = {}
                if rng.random() < 0.5:
                    unset = {rng.choice(["title", "tags", "nested"]): ""}
                if rng.random() < 0.4:
                    sets["body"] = " ".join(rng.sample(WORDS, 4))
                update: dict[str, Any] = {"$set": sets}
                if unset:
                    update["$unset"] = unset
                coll.update_one({"_id": _id}, update, session=session)
            elif roll < 0.8:
                _id = rng.choice(live)
                coll.replace_one({"_id": _id}, make_doc(rng, self.seq), session=session)
            else:
                _id = live.pop(rng.randrange(len(live)))
                coll.delete_one({"_id": _id}, session=session)
                deleted = True
            op_time = session.operation_time
        assert op_time is not None
        self.log.record(coll_name, oracle.record_id(_id), op_time, self.seq, deleted)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.step()
                time.sleep(0.002)
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            self.client.close()


def assert_checkpoint_covered(settings: Any, name: str, log: OpLog, coll: Any, multi: bool) -> int:
    """Every event at or before the checkpoint is reflected in Chroma (or superseded)."""
    cp = load_checkpoint(settings, name)
    if cp is None or cp.phase != "streaming" or cp.cluster_time is None:
        return 0
    horizon = cp.cluster_time
    got = coll.get(include=["metadatas"])
    state = {m["syncd_id"]: m.get("seq") for m in got["metadatas"]}
    checked = 0
    with log.lock:
        items = list(log.ops.items())
    for (coll_name, key), ops in items:
        rid = f"{coll_name}/{key}" if multi else key
        covered = [op for op in ops if op[0] <= horizon]
        if not covered:
            continue
        checked += 1
        _, seq, deleted = covered[-1]
        later_seqs = {op[1] for op in ops if op[1] > seq}
        later_delete = any(op[2] for op in ops if op[1] > seq)
        if deleted:
            assert rid not in state or state[rid] in later_seqs, (
                f"{rid}: deleted at seq {seq} (before checkpoint {horizon}) but Chroma has "
                f"seq {state.get(rid)}"
            )
        else:
            present = state.get(rid)
            assert (present is not None and present >= seq) or (present is None and later_delete), (
                f"{rid}: seq {seq} is before checkpoint {horizon} but Chroma has {present}; "
                f"ops {ops}; checkpoint {cp}"
            )
    return checked


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill9_randomized_workload_converges(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db = f"crash_{uuid.uuid4().hex[:8]}"
    colls = ["docs", "notes"]
    chroma_coll = f"crash-{uuid.uuid4().hex[:8]}"
    cfg = write_config(
        tmp_path / "syncd.toml",
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port},
        checkpoint_db=f"{db}_syncd",
        # A killed holder's lease must expire before its successor may write.
        extra={"lease": {"ttl_s": 2.0, "renew_every_s": 0.5}},
        pipelines=[
            oracle.pipeline(
                "crash",
                db,
                metadata=METADATA,
                collection=None,
                collections=colls,
                chroma_collection=chroma_coll,
            )
        ],
    )
    settings = settings_of(cfg)
    # Documents with _ids of every kind exist before the first run, so the snapshot
    # (which must walk the _id index across BSON types) is part of the story.
    seed_rng = random.Random(7)
    for i in range(60):
        _id = random_id(seed_rng)
        mongo_client[db][colls[i % 2]].insert_one({"_id": _id, **make_doc(seed_rng, 0)})

    log = OpLog()
    workload = Workload(mongo_uri, db, colls, log, seed=42)
    workload.start()
    rng = random.Random(1234)
    checked_total = 0
    daemon = syncd_factory(["run"], cfg)
    client = chroma_server.client()
    collection = wait_until(lambda: _collection(client, chroma_coll), 120, "chroma collection")
    before: Timestamp | None = None  # the position the running daemon started from
    try:
        for kill in range(KILLS):
            daemon.wait_for_output("took the lease", timeout=60)
            if kill % 2:
                # On a busy machine a start (chromadb's import alone takes seconds) can
                # outlast every random pause, so the kill would only ever find the last
                # run's position: let this run checkpoint once, mid-stream, first.
                moved = functools.partial(_moved_past, settings, before)
                wait_until(moved, 120, "a streaming checkpoint written by this run")
            time.sleep(rng.uniform(0.5, 3.0))
            daemon.kill()
            checked_total += assert_checkpoint_covered(settings, "crash", log, collection, True)
            before = _position(settings)
            daemon.start()
    finally:
        workload.stop.set()
        workload.join(10)
    assert workload.error is None, workload.error
    assert workload.seq > 100, "the workload did too little to mean anything"
    assert checked_total > 0, "no kill happened after a checkpoint: the test proved nothing"

    last = log.last_time
    assert last is not None
    # Every pause above lets the workload run ahead of a daemon that spends most of each
    # run starting: on a busy machine the backlog takes minutes to drain.
    wait_until(lambda: caught_up(settings, "crash", last), 240, "syncd to catch up")
    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()

    expected: dict[str, Any] = {}
    for name in colls:
        found = mongo_client[db][name].find()
        expected.update(oracle.expected(found, collection=name, metadata_fields=METADATA))
    assert expected, "no documents survived the workload"
    problem = diff(expected, oracle.actual(collection))
    assert not problem, problem
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


def _position(settings: Any) -> Timestamp | None:
    """The streaming checkpoint's cluster time (None before the first event is covered)."""
    cp = load_checkpoint(settings, "crash")
    return cp.cluster_time if cp is not None and cp.phase == "streaming" else None


def _moved_past(settings: Any, before: Timestamp | None) -> bool:
    now = _position(settings)
    return now is not None and (before is None or now > before)


def _collection(client: Any, name: str) -> Any:
    try:
        return client.get_collection(name)
    except Exception:
        return None
