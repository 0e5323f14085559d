"""One writer per pipeline: leases in MongoDB, fenced by an epoch on the checkpoint.

A lease is one document per pipeline in ``<checkpoint.database>.leases``::

    {_id: PIPELINE, owner: "host:pid:uuid", epoch: int, expires_at: datetime}

Taking a lease increments its epoch, and the new epoch is then claimed on the
checkpoint (:meth:`CheckpointStore.claim_epoch`), whose ``save()`` refuses any write
with an older epoch. So a holder that was paused past its lease (GC, SIGSTOP, a
partition) can never move the checkpoint after someone else took over: its write
raises :class:`~syncd.errors.LeaseLostError`.

Time: every expiry is computed and compared on the server (``$$NOW`` inside update
pipelines and ``$expr``), so hosts with skewed clocks agree on who holds what. The
holder additionally keeps a local deadline on the monotonic clock (renewal start +
TTL - margin); past it, :meth:`LeaseManager.check` refuses further sink writes even
before the server has said anything. ``$expr`` is never combined with an upsert,
which MongoDB rejects; the take-over decision lives in a ``$cond`` instead.

Which process runs which pipeline is decided in :mod:`syncd.scheduler`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pymongo
from pymongo import MongoClient, ReturnDocument
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError, PyMongoError
from pymongo.write_concern import WriteConcern

from syncd.checkpoint import CheckpointStore, whoami
from syncd.config import LeaseSettings, Settings
from syncd.errors import (
    LeaseLostError,
    SyncdError,
    TransientError,
    from_mongo,
    translate_mongo_errors,
)
from syncd.sink import Sink, StoredRecord, WritePlan
from syncd.source import BOOKKEEPING_S, bookkeeping

log = logging.getLogger(__name__)

LEASES_COLLECTION = "leases"
PROCESS_PREFIX = "process:"
_EPOCH_ZERO = datetime(1970, 1, 1, tzinfo=UTC)


def new_owner(prefix: str = "") -> str:
    """``host:pid:uuid``: unique per process incarnation, readable by operators."""
    return f"{prefix}{whoami()}:{uuid.uuid4().hex[:8]}"


def leases_collection(
    client: MongoClient[dict[str, Any]], database: str
) -> Collection[dict[str, Any]]:
    return client[database].get_collection(
        LEASES_COLLECTION, write_concern=WriteConcern(w="majority", j=True)
    )


@dataclasses.dataclass
class Held:
    pipeline: str
    epoch: int
    deadline: float  # monotonic; past it we no longer trust that we hold the lease


@dataclasses.dataclass(frozen=True)
class LeaseInfo:
    """A lease as stored, with liveness decided by the server's clock."""

    pipeline: str
    owner: str
    epoch: int
    expires_at: datetime | None
    live: bool


@dataclasses.dataclass(frozen=True)
class View:
    """Who is alive and what they hold, as seen in one read of the leases collection."""

    processes: dict[str, frozenset[str]]  # owner -> pipelines it is configured to run
    holders: dict[str, str]  # pipeline -> owner of its live lease

    def held_by(self, owner: str) -> int:
        return sum(1 for holder in self.holders.values() if holder == owner)


class LeaseManager:
    """Takes, renews and releases this process's leases; see the module docstring."""

    def __init__(
        self,
        client: MongoClient[dict[str, Any]],
        database: str,
        settings: LeaseSettings,
        store: CheckpointStore,
        *,
        owner: str | None = None,
    ) -> None:
        self._coll = leases_collection(client, database)
        self.settings = settings
        self.store = store
        self.owner = owner or new_owner()
        self._ttl_ms = int(settings.ttl_s * 1000)
        # Stop trusting a lease a little before the server would expire it.
        self._margin = min(1.0, settings.ttl_s / 10)
        self._held: dict[str, Held] = {}
        self._lost: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._pipelines: list[str] | None = None  # announced once LeasedPipelines runs
        self._closing = threading.Event()
        self._renewer: threading.Thread | None = None

    # --- one lease ----------------------------------------------------------------

    def acquire(self, pipeline: str, *, force: bool = False) -> int | None:
        """Take the lease if it is free (or, with ``force``, in any case): the new epoch.

        Returns None when another owner holds a live lease. The epoch is claimed on
        the checkpoint before returning, so older holders are fenced off from then on.
        """
        started = time.monotonic()
        free = {"$lte": [{"$ifNull": ["$expires_at", _EPOCH_ZERO]}, "$$NOW"]}
        take = {"$or": [free, force]}
        update = [
            {
                "$set": {
                    "owner": {"$cond": [take, self.owner, "$owner"]},
                    # An epoch that is not a number (edited by hand) counts as 0: the lease
                    # is only a lock, and _fence lifts it past the checkpoint's epoch.
                    "epoch": {"$cond": [take, {"$add": [_NUMBER_OR_0, 1]}, "$epoch"]},
                    "expires_at": {
                        "$cond": [take, {"$add": ["$$NOW", self._ttl_ms]}, "$expires_at"]
                    },
                }
            }
        ]
        with translate_mongo_errors(pipeline=pipeline):
            try:
                doc = self._coll.find_one_and_update(
                    {"_id": pipeline}, update, upsert=True, return_document=ReturnDocument.AFTER
                )
            except DuplicateKeyError:  # another process created it at the same moment
                return None
        if doc is None or doc.get("owner") != self.owner:
            return None
        try:
            epoch = self._fence(pipeline, int(doc["epoch"]))
        except LeaseLostError as exc:
            log.error("took the lease of %s but cannot fence its checkpoint: %s", pipeline, exc)
            return None
        except SyncdError:
            # Not held, so close() would not release it: free it now, or the command the
            # error's hint names would find the pipeline busy until the lease expires.
            self._expire(pipeline, int(doc["epoch"]))
            raise
        with self._lock:
            self._held[pipeline] = Held(
                pipeline, epoch, started + self.settings.ttl_s - self._margin
            )
        log.info(
            "took the lease of pipeline %s (epoch %d)", pipeline, epoch,
            extra={"pipeline": pipeline, "epoch": epoch, "owner": self.owner},
        )  # fmt: skip
        return epoch

    def _fence(self, pipeline: str, epoch: int) -> int:
        """Claim ``epoch`` on the checkpoint; lift it past a newer checkpoint epoch if needed.

        A checkpoint epoch above the lease's means the leases collection was dropped or
        edited, or a writer without a lease (leases turned off, a one-shot command)
        claimed one: the lease then jumps past the checkpoint so fencing keeps working.
        """
        try:
            self.store.claim_epoch(pipeline, epoch)
            return epoch
        except LeaseLostError:
            pass
        try:
            lifted = self.store.next_epoch(pipeline)
        except SyncdError:
            self._expire(pipeline, epoch)  # others may take it at once
            raise
        with translate_mongo_errors(pipeline=pipeline):
            moved = self._coll.update_one(
                {"_id": pipeline, "owner": self.owner, "epoch": epoch}, {"$set": {"epoch": lifted}}
            )
        if moved.matched_count == 0:
            raise LeaseLostError(
                f"lost the lease while lifting its epoch past {lifted - 1}", pipeline=pipeline
            )
        return lifted

    def renew(self) -> list[str]:
        """Extend every held lease; return the pipelines whose lease is lost.

        A lease is lost when its document no longer names us with our epoch, or when
        MongoDB cannot be reached until the local deadline has passed.
        """
        self.announce_safely()
        lost = []
        with self._lock:
            current = list(self._held.values())
        for held in current:
            why = self._renew_one(held)
            if why is None:
                continue
            with self._lock:
                if self._held.get(held.pipeline) is held:
                    del self._held[held.pipeline]
                    lost.append(held.pipeline)
                    self._lost.append((held.pipeline, why))
        return lost

    def take_lost(self) -> list[tuple[str, str]]:
        """Pipelines whose lease was found lost since the last call, each with why."""
        with self._lock:
            lost, self._lost = self._lost, []
        return lost

    def start_renewing(self) -> None:
        """Renew from a thread of its own, so a slow pipeline start cannot starve it."""
        if self._renewer is None:
            self._renewer = threading.Thread(target=self._renew_loop, name="lease-renewer")
            self._renewer.daemon = True
            self._renewer.start()

    def stop_renewing(self, wait_s: float | None = None) -> None:
        """Stop the renewer; ``wait_s``: how long to wait for a renewal in flight (a
        MongoDB that does not answer holds it up to its local deadline)."""
        self._closing.set()
        if self._renewer is not None:
            self._renewer.join(wait_s)
            self._renewer = None

    def _renew_loop(self) -> None:
        while not self._closing.wait(self.settings.renew_every_s):
            try:
                self.renew()
            except SyncdError as exc:  # the local deadlines stop our writes meanwhile
                log.error("cannot renew leases: %s", exc)

    def _renew_one(self, held: Held) -> str | None:
        """Extend one lease; None when done, else why it is lost."""
        started = time.monotonic()
        try:
            # A server that takes the request and never answers (hung, frozen) must not
            # hold the renewal past the local deadline: then the lease is lost, and said so.
            with pymongo.timeout(max(1.0, held.deadline - started)):
                doc = self._coll.find_one_and_update(
                    {"_id": held.pipeline, "owner": self.owner, "epoch": held.epoch},
                    [{"$set": {"expires_at": {"$add": ["$$NOW", self._ttl_ms]}}}],
                    return_document=ReturnDocument.AFTER,
                )
        except PyMongoError as exc:
            error = from_mongo(exc, pipeline=held.pipeline)
            if not isinstance(error, TransientError):
                raise error from exc
            log.warning(
                "cannot renew the lease of pipeline %s: %s", held.pipeline, error.message,
                extra={"pipeline": held.pipeline},
            )  # fmt: skip
            if time.monotonic() < held.deadline:
                return None
            return f"its lease expired: MongoDB could not be reached to renew it ({error.message})"
        if doc is None:
            return "lost its lease to another process"
        held.deadline = started + self.settings.ttl_s - self._margin
        return None

    def reclaim(self, pipeline: str, epoch: int) -> bool:
        """Take back a lease that lapsed (MongoDB unreachable past its deadline) if it
        still names us with ``epoch``: no other process took it meanwhile, so nothing
        was written under another epoch. False when it is another's now."""
        started = time.monotonic()
        with translate_mongo_errors(pipeline=pipeline):
            doc = self._coll.find_one_and_update(
                {"_id": pipeline, "owner": self.owner, "epoch": epoch},
                [{"$set": {"expires_at": {"$add": ["$$NOW", self._ttl_ms]}}}],
                return_document=ReturnDocument.AFTER,
            )
        if doc is None:
            return False
        with self._lock:
            self._held[pipeline] = Held(
                pipeline, epoch, started + self.settings.ttl_s - self._margin
            )
        log.info(
            "took back the lease of pipeline %s (epoch %d): it lapsed while MongoDB was "
            "unreachable, and no other process took it", pipeline, epoch,
            extra={"pipeline": pipeline, "epoch": epoch},
        )  # fmt: skip
        return True

    def release(self, pipeline: str) -> None:
        """Expire our lease at once so another process can take it without waiting."""
        with self._lock:
            held = self._held.pop(pipeline, None)
        if held is not None:
            self._expire(pipeline, held.epoch)

    def _expire(self, pipeline: str, epoch: int) -> None:
        with translate_mongo_errors(pipeline=pipeline):
            self._coll.update_one(
                {"_id": pipeline, "owner": self.owner, "epoch": epoch},
                [{"$set": {"expires_at": "$$NOW"}}],
            )

    def forget(self, pipeline: str) -> None:
        """Drop a lease we know is gone, without touching the stored document."""
        with self._lock:
            self._held.pop(pipeline, None)

    def holds(self, pipeline: str) -> bool:
        held = self._held.get(pipeline)
        return held is not None and time.monotonic() < held.deadline

    def epoch(self, pipeline: str) -> int | None:
        held = self._held.get(pipeline)
        return held.epoch if held else None

    def check(self, pipeline: str) -> None:
        """Raise LeaseLostError unless we still hold the pipeline's lease."""
        if not self.holds(pipeline):
            raise LeaseLostError(
                "this process no longer holds the pipeline's lease; not writing",
                hint="another process runs it now; this one will try to take it back later",
                pipeline=pipeline,
            )

    @property
    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    # --- processes and the shared view --------------------------------------------

    def announce(self, pipelines: Sequence[str]) -> None:
        self._pipelines = list(pipelines)
        self.announce_safely()

    def announce_safely(self) -> None:
        pipelines = self._pipelines
        if pipelines is None:
            return
        try:
            with pymongo.timeout(self.settings.renew_every_s):  # a hung server: renew anyway
                self._coll.update_one(
                    {"_id": PROCESS_PREFIX + self.owner},
                    [
                        {
                            "$set": {
                                "kind": "process",
                                "owner": self.owner,
                                "pipelines": pipelines,
                                "expires_at": {"$add": ["$$NOW", self._ttl_ms]},
                            }
                        }
                    ],
                    upsert=True,
                )
        except PyMongoError as exc:
            log.warning("cannot announce this process: %s", from_mongo(exc).message)

    def view(self) -> View:
        # Bounded: the scheduler reads the view between stopping pipelines whose lease
        # is lost, which a hung server must not hold up.
        with translate_mongo_errors(), pymongo.timeout(max(1.0, self.settings.renew_every_s)):
            docs = list(self._coll.find({"$expr": {"$gt": ["$expires_at", "$$NOW"]}}))
        processes: dict[str, frozenset[str]] = {}
        holders: dict[str, str] = {}
        for doc in docs:
            if doc.get("kind") == "process":
                processes[str(doc["owner"])] = frozenset(doc.get("pipelines") or [])
            elif "owner" in doc:
                holders[str(doc["_id"])] = str(doc["owner"])
        return View(processes, holders)

    def info(self, pipeline: str) -> LeaseInfo | None:
        return lease_info(self._coll, pipeline)

    def close(self) -> None:
        """Release every lease and withdraw this process's announcement: best effort, in
        :data:`syncd.source.BOOKKEEPING_S` or so when MongoDB does not answer (a lease
        left behind expires after its ttl)."""
        self.stop_renewing(BOOKKEEPING_S)
        with bookkeeping():
            for pipeline in self.held:
                try:
                    self.release(pipeline)
                except TransientError as exc:
                    log.warning("could not release the lease of %s: %s", pipeline, exc.message)
            try:
                self._coll.delete_one({"_id": PROCESS_PREFIX + self.owner})
            except PyMongoError as exc:
                log.warning("could not withdraw this process: %s", from_mongo(exc).message)


_NUMBER_OR_0 = {"$cond": [{"$isNumber": "$epoch"}, "$epoch", 0]}


def lease_info(coll: Collection[dict[str, Any]], pipeline: str) -> LeaseInfo | None:
    """The pipeline's lease, with ``live`` decided by the server's clock."""
    with translate_mongo_errors(pipeline=pipeline):
        docs = list(
            coll.aggregate(
                [
                    {"$match": {"_id": pipeline}},
                    {"$addFields": {"live": {"$gt": ["$expires_at", "$$NOW"]}}},
                ]
            )
        )
    if not docs:
        return None
    doc = docs[0]
    expires = doc.get("expires_at")
    if not isinstance(expires, datetime):
        expires = None  # edited by hand: no time to show (and not live: see acquire)
    elif expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    return LeaseInfo(
        pipeline=pipeline,
        owner=str(doc.get("owner", "")),
        epoch=epoch if isinstance(epoch := doc.get("epoch"), int) else 0,
        expires_at=expires,
        live=bool(doc.get("live")),
    )


def uses_leases(settings: Settings) -> bool:
    """Leases need the MongoDB checkpoint store; the file store runs without them."""
    return settings.lease.enabled and settings.checkpoint.store == "mongodb"


# --- fencing the sink -------------------------------------------------------------


class FencedSink:
    """A sink that refuses writes once the pipeline's lease is no longer ours.

    The checkpoint is fenced on the server; this narrows the other window, where a
    holder paused past its lease would still write stale records into Chroma. A
    write already in flight when the pause began can still land: Chroma has no
    conditional write to fence it with.
    """

    def __init__(self, inner: Sink, check: Callable[[], None]) -> None:
        self._inner = inner
        self._check = check

    @property
    def max_batch(self) -> int:
        return self._inner.max_batch  # read when needed: the inner sink opens lazily

    def open(self) -> None:
        self._inner.open()

    def collection_id(self, *, create: bool = False) -> str | None:
        if create:
            self._check()
        return self._inner.collection_id(create=create)

    def existing(self, keys: Sequence[str]) -> dict[str, dict[str, Mapping[str, Any]]]:
        return self._inner.existing(keys)

    def write(self, plan: WritePlan) -> None:
        self._check()
        self._inner.write(plan)

    def get(self, ids: Sequence[str], *, include_embeddings: bool = False) -> list[StoredRecord]:
        return self._inner.get(ids, include_embeddings=include_embeddings)

    def scan(self, page: int = 1000) -> Iterator[list[StoredRecord]]:
        return self._inner.scan(page)

    def delete_all(self) -> int:
        self._check()
        return self._inner.delete_all()

    def delete_where(self, where: Mapping[str, Any]) -> None:
        self._check()
        self._inner.delete_where(where)

    def count(self) -> int:
        return self._inner.count()

    def close(self) -> None:
        self._inner.close()
