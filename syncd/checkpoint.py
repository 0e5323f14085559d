"""Where each pipeline's resume position lives.

A checkpoint is written only after the sink acknowledged everything before it
(the pipeline guarantees the order; this module guarantees the write is atomic and
fenced). A missing checkpoint means "first run"; an unreadable one is a loud error.

Two stores share one protocol: a MongoDB collection (default; majority write
concern, compare-and-set on the fencing epoch) and a local JSON file per pipeline
(temp file, fsync, rename, fsync directory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from bson import SON, json_util
from bson.timestamp import Timestamp
from pymongo import MongoClient, ReturnDocument
from pymongo.errors import DuplicateKeyError
from pymongo.write_concern import WriteConcern

from syncd import hints
from syncd.config import CheckpointSettings
from syncd.errors import (
    CheckpointCorruptError,
    LeaseLostError,
    from_os_error,
    translate_mongo_errors,
)
from syncd.tokens import InvalidResumeToken, token_cluster_time

Phase = Literal["snapshot", "streaming"]
HISTORY_EVERY_S = 60.0


def whoami() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclasses.dataclass
class SnapshotProgress:
    """A resumable initial copy: where the stream starts and how far the scan got."""

    start_token: dict[str, Any] | None = None
    start_at: Timestamp | None = None
    collection: str | None = None  # the collection being scanned (multi-collection pipelines)
    last_id: Any = None
    has_last_id: bool = False
    scanned: int = 0
    started_at: datetime | None = None
    # Chroma held no record when the scan began (a new or empty collection), so it holds
    # nothing of the documents after ``last_id`` but what the write of the part ending at
    # ``writing_id`` may have put there: their stored records need no lookup.
    empty_ahead: bool = False
    writing_id: Any = None
    has_writing_id: bool = False


@dataclasses.dataclass
class Checkpoint:
    pipeline: str
    fingerprint: str
    phase: Phase = "streaming"
    token: dict[str, Any] | None = None
    token_is_invalidate: bool = False  # resume with startAfter: the token ends a stream
    start_at: Timestamp | None = None  # start position when no token exists yet
    cluster_time: Timestamp | None = None
    wall_time: datetime | None = None
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    snapshot: SnapshotProgress | None = None
    # The Chroma collection the records are in (its id, not its name: a collection
    # deleted and created again under the same name is another, empty one). None in
    # checkpoints written before syncd recorded it: the pipeline adopts the collection
    # it finds.
    chroma_collection_id: str | None = None
    epoch: int = 0
    updated_by: str = ""
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    status: dict[str, Any] = dataclasses.field(default_factory=dict)
    halt: dict[str, Any] | None = None  # see syncd.halts; kept apart from the position writes
    # Only in a rebuild's record (see syncd.switching): its state, a switch in progress,
    # the previous collection kept for rollback.
    rebuild: dict[str, Any] | None = None

    @property
    def position_summary(self) -> str:
        if self.cluster_time is not None:
            return f"cluster time {self.cluster_time.time}.{self.cluster_time.inc}"
        return "no position yet"

    def history_entry(self, reason: str) -> dict[str, Any]:
        return {
            "token": self.token,
            "start_at": self.start_at,
            "cluster_time": self.cluster_time,
            "wall_time": self.wall_time,
            "phase": self.phase,
            "set_by": self.updated_by,
            "reason": reason,
            "at": datetime.now(UTC),
        }


class CollectionIds(Protocol):
    def collection_id(self, *, create: bool = False) -> str | None: ...


def lost_collection(cp: Checkpoint, sink: CollectionIds, name: str) -> str | None:
    """None when ``sink``'s collection is the one ``cp`` describes; else what became of it.

    A checkpoint written before syncd recorded the id adopts the collection it finds
    (saved with its next write). A missing collection is created only for a checkpoint
    that never applied anything; otherwise, as a replaced one, it took the records.
    """
    found = sink.collection_id()
    if found is not None and cp.chroma_collection_id in (None, found):
        cp.chroma_collection_id = found
        return None
    if found is None and cp.chroma_collection_id is None and not cp.counts:
        cp.chroma_collection_id = sink.collection_id(create=True)
        return None
    if found is None:
        known = f" (id {cp.chroma_collection_id})" if cp.chroma_collection_id else ""
        # The name is the configured one, which may not be the name the described
        # collection had: `chroma_collection` may have been changed since.
        return (
            f"there is no Chroma collection named {name!r}, and the checkpoint describes "
            f"another{known}: it was deleted, or `chroma_collection` no longer names it"
        )
    return (
        f"the Chroma collection {name!r} was replaced: its id is {found}, the checkpoint "
        f"describes {cp.chroma_collection_id}"
    )


class CheckpointStore(Protocol):
    def load(self, pipeline: str) -> Checkpoint | None: ...

    def save(self, checkpoint: Checkpoint, *, history_reason: str | None = None) -> None:
        """Write atomically. Raises LeaseLostError when a newer epoch owns the pipeline."""
        ...

    def claim_epoch(self, pipeline: str, epoch: int) -> None:
        """Record that ``epoch`` now owns the pipeline so older writers are fenced off."""
        ...

    def next_epoch(self, pipeline: str) -> int:
        """Claim the stored epoch plus one, atomically; older writers are fenced off.

        For writers that hold no lease: a daemon without leases, a one-shot command.
        """
        ...

    def delete(self, pipeline: str) -> None: ...

    def clear(self, pipeline: str, epoch: int) -> None:
        """Delete the checkpoint (history, status and halt too) and leave ``epoch``
        claimed, in one write: an older writer cannot recreate it in between. Raises
        LeaseLostError when a newer epoch owns the pipeline."""
        ...

    def list(
        self, *, unreadable: dict[str, CheckpointCorruptError] | None = None
    ) -> list[Checkpoint]:
        """Every stored checkpoint. One that cannot be read raises CheckpointCorruptError,
        or, given ``unreadable``, is left out and put there under its pipeline's name."""
        ...

    def set_status(self, pipeline: str, status: Mapping[str, Any]) -> None: ...

    def set_halt(self, pipeline: str, halt: Mapping[str, Any] | None) -> None:
        """Record (or, with None, clear) the halt that holds the pipeline at its checkpoint."""
        ...

    def close(self) -> None: ...


# --- (de)serialisation ------------------------------------------------------------


def to_document(cp: Checkpoint) -> dict[str, Any]:
    doc = dataclasses.asdict(cp)
    doc["_id"] = doc.pop("pipeline")
    return doc


def from_document(doc: Mapping[str, Any]) -> Checkpoint:
    try:
        data = dict(doc)
        data["pipeline"] = data.pop("_id")
        data.pop("updated_at", None)
        _check_types(data, _FIELD_TYPES)
        snap = data.get("snapshot")
        if snap is not None:
            _check_types(snap, _SNAPSHOT_TYPES, "snapshot.")
            data["snapshot"] = SnapshotProgress(**snap)
        return Checkpoint(**data)
    except (TypeError, KeyError, ValueError) as exc:
        raise corrupt(str(doc.get("_id")), str(exc)) from exc


def corrupt(pipeline: str, why: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"the stored checkpoint cannot be read: {why}", hint=reset_hint(pipeline), pipeline=pipeline
    )


_NONE = type(None)
# The type of each stored field. A value of another type was written by someone else
# than syncd; reading on would fail later, far from the cause, as a TypeError.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "fingerprint": (str,),
    "phase": (str,),
    "token": (dict, _NONE),
    "token_is_invalidate": (bool,),
    "start_at": (Timestamp, _NONE),
    "cluster_time": (Timestamp, _NONE),
    "wall_time": (datetime, _NONE),
    "counts": (dict,),
    "snapshot": (dict, _NONE),
    "chroma_collection_id": (str, _NONE),
    "epoch": (int,),
    "updated_by": (str,),
    "history": (list,),
    "status": (dict,),
    "rebuild": (dict, _NONE),
}
_SNAPSHOT_TYPES: dict[str, tuple[type, ...]] = {
    "start_token": (dict, _NONE),
    "start_at": (Timestamp, _NONE),
    "collection": (str, _NONE),
    "has_last_id": (bool,),
    "scanned": (int,),
    "started_at": (datetime, _NONE),
    "empty_ahead": (bool,),
    "has_writing_id": (bool,),
}


def _check_types(
    data: Mapping[str, Any], types: Mapping[str, tuple[type, ...]], prefix: str = ""
) -> None:
    for field, allowed in types.items():
        if field not in data:
            continue
        value = data[field]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join("null" if t is _NONE else t.__name__ for t in allowed)
            raise ValueError(f"{prefix}{field} is {type(value).__name__}, not {names}")
    if data.get("phase", "streaming") not in ("snapshot", "streaming"):
        raise ValueError(f"phase is {data['phase']!r}, not 'snapshot' or 'streaming'")
    for field in ("token", "start_token"):
        token = data.get(field)
        if token is not None and not isinstance(token.get("_data"), str):
            raise ValueError(f"{prefix}{field} has no _data string")
        if token is not None:
            try:  # MongoDB refuses a damaged token only once the stream opens, as a fatal error
                token_cluster_time(token)
            except InvalidResumeToken as exc:
                raise ValueError(f"{prefix}{field} is {exc}") from exc


def reset_hint(pipeline: str) -> str:
    """What to run when a checkpoint cannot be read."""
    return (
        f"start over with `{hints.command('tokens', 'reset', pipeline, '--yes')}`: the next "
        f"`{hints.command('run')}` copies "
        "every document again"
    )


# --- MongoDB store --------------------------------------------------------------


def _not_newer(pipeline: str, epoch: int) -> dict[str, Any]:
    """The checkpoint, unless a newer epoch holds it; no epoch yet counts as 0.

    A document without an epoch exists when a status was recorded before the first
    checkpoint: it must not make the first write look fenced off.
    """
    return {"_id": pipeline, "$or": [{"epoch": {"$lte": epoch}}, {"epoch": {"$exists": False}}]}


class MongoCheckpointStore:
    def __init__(self, client: MongoClient[dict[str, Any]], settings: CheckpointSettings) -> None:
        self._history = settings.history
        self._coll = client[settings.database].get_collection(
            settings.collection, write_concern=WriteConcern(w="majority", j=True)
        )

    def load(self, pipeline: str) -> Checkpoint | None:
        with translate_mongo_errors(pipeline=pipeline):
            doc = self._coll.find_one({"_id": pipeline})
        if doc is None or "fingerprint" not in doc:
            return None
        return from_document(doc)

    def save(self, checkpoint: Checkpoint, *, history_reason: str | None = None) -> None:
        doc = to_document(checkpoint)
        doc.pop("history")
        doc.pop("status")
        doc.pop("halt")
        doc["updated_at"] = datetime.now(UTC)
        update: dict[str, Any] = {"$set": doc}
        if history_reason:
            entry = checkpoint.history_entry(history_reason)
            update["$push"] = {"history": {"$each": [entry], "$slice": -self._history}}
        fence = _not_newer(checkpoint.pipeline, checkpoint.epoch)
        with translate_mongo_errors(pipeline=checkpoint.pipeline):
            try:
                self._coll.update_one(fence, update, upsert=True)
            except DuplicateKeyError:
                # The upsert found no document with our epoch or older, but one exists:
                # a newer epoch holds the pipeline.
                raise LeaseLostError(
                    "checkpoint write refused: another process holds this pipeline "
                    f"(our epoch {checkpoint.epoch})",
                    pipeline=checkpoint.pipeline,
                ) from None

    def claim_epoch(self, pipeline: str, epoch: int) -> None:
        with translate_mongo_errors(pipeline=pipeline):
            try:
                self._coll.update_one(
                    _not_newer(pipeline, epoch), {"$set": {"epoch": epoch}}, upsert=True
                )
            except DuplicateKeyError:
                raise LeaseLostError(
                    f"cannot claim epoch {epoch}: a newer holder exists", pipeline=pipeline
                ) from None

    def next_epoch(self, pipeline: str) -> int:
        with translate_mongo_errors(pipeline=pipeline):
            stored = self._coll.find_one({"_id": pipeline}, {"epoch": True})
            if stored is not None and "epoch" in stored:
                _epoch_of(stored, pipeline)  # $inc would fail on an epoch edited by hand
            doc = self._coll.find_one_and_update(
                {"_id": pipeline},
                {"$inc": {"epoch": 1}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        return _epoch_of(doc, pipeline)

    def delete(self, pipeline: str) -> None:
        with translate_mongo_errors(pipeline=pipeline):
            self._coll.delete_one({"_id": pipeline})

    def clear(self, pipeline: str, epoch: int) -> None:
        with translate_mongo_errors(pipeline=pipeline):
            try:
                self._coll.replace_one(
                    _not_newer(pipeline, epoch), {"_id": pipeline, "epoch": epoch}, upsert=True
                )
            except DuplicateKeyError:
                raise LeaseLostError(
                    f"cannot clear the checkpoint with epoch {epoch}: a newer holder exists",
                    pipeline=pipeline,
                ) from None

    def list(
        self, *, unreadable: dict[str, CheckpointCorruptError] | None = None
    ) -> list[Checkpoint]:
        with translate_mongo_errors():
            docs = list(self._coll.find({"fingerprint": {"$exists": True}}).sort("_id", 1))
        out = []
        for doc in docs:
            try:
                out.append(from_document(doc))
            except CheckpointCorruptError as exc:
                if unreadable is None:
                    raise
                unreadable[str(doc["_id"])] = exc
        return out

    def set_status(self, pipeline: str, status: Mapping[str, Any]) -> None:
        with translate_mongo_errors(pipeline=pipeline):
            self._coll.update_one(
                {"_id": pipeline},
                {"$set": {"status": dict(status) | {"updated_at": datetime.now(UTC)}}},
                upsert=True,
            )

    def set_halt(self, pipeline: str, halt: Mapping[str, Any] | None) -> None:
        update = {"$set": {"halt": dict(halt)}} if halt is not None else {"$unset": {"halt": ""}}
        with translate_mongo_errors(pipeline=pipeline):
            self._coll.update_one({"_id": pipeline}, update)

    def close(self) -> None:
        """The client belongs to the caller."""


# --- file store ---------------------------------------------------------------------

# Times come back aware, in UTC, as from the MongoDB store (its client is tz_aware).
_READ_OPTIONS = json_util.CANONICAL_JSON_OPTIONS.with_options(tz_aware=True, tzinfo=UTC)


class FileCheckpointStore:
    """One JSON file per pipeline, replaced atomically.

    Fencing here is per host only (the epoch is compared on write); use the MongoDB
    store when several hosts may run the same pipeline.
    """

    def __init__(self, settings: CheckpointSettings) -> None:
        self._dir = Path(settings.path)
        self._history = settings.history

    def _path(self, pipeline: str) -> Path:
        return self._dir / f"{pipeline}.json"

    def _read(self, pipeline: str) -> dict[str, Any] | None:
        path = self._path(pipeline)
        try:
            with _file_errors(pipeline, missing_ok=True):
                text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError as exc:
            raise corrupt(pipeline, f"{path} is not UTF-8 text") from exc
        try:
            doc = json_util.loads(text, json_options=_READ_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise CheckpointCorruptError(
                f"checkpoint file {path} is corrupt: {exc}",
                hint=f"restore it from a backup, or {reset_hint(pipeline)}",
                pipeline=pipeline,
            ) from exc
        if not isinstance(doc, dict) or doc.get("_id") != pipeline:
            # Every file syncd writes is an object naming its pipeline: anything else
            # (`{}`, another shape) is not a "never run", whose snapshot would start over.
            raise CheckpointCorruptError(
                f"checkpoint file {path} is corrupt",
                hint=f"restore it from a backup, or {reset_hint(pipeline)}",
                pipeline=pipeline,
            )
        _epoch_of(doc, pipeline, missing=0)
        return doc

    def load(self, pipeline: str) -> Checkpoint | None:
        doc = self._read(pipeline)
        if doc is None or "fingerprint" not in doc:
            return None
        return from_document(doc)

    def save(self, checkpoint: Checkpoint, *, history_reason: str | None = None) -> None:
        current = self._read(checkpoint.pipeline) or {}
        if _epoch_of(current, checkpoint.pipeline, missing=0) > checkpoint.epoch:
            raise LeaseLostError(
                "checkpoint write refused: a newer holder exists", pipeline=checkpoint.pipeline
            )
        doc = to_document(checkpoint)
        history = list(current.get("history", []))
        if history_reason:
            history = [*history, checkpoint.history_entry(history_reason)][-self._history :]
        doc["history"] = history
        doc["status"] = current.get("status", {})
        doc["halt"] = current.get("halt")
        doc["updated_at"] = datetime.now(UTC)
        self._write(checkpoint.pipeline, doc)

    def claim_epoch(self, pipeline: str, epoch: int) -> None:
        current = self._read(pipeline) or {"_id": pipeline}
        if _epoch_of(current, pipeline, missing=0) > epoch:
            raise LeaseLostError(f"cannot claim epoch {epoch}", pipeline=pipeline)
        current["epoch"] = epoch
        self._write(pipeline, current)

    def next_epoch(self, pipeline: str) -> int:
        current = self._read(pipeline) or {"_id": pipeline}
        epoch = _epoch_of(current, pipeline, missing=0) + 1
        current["epoch"] = epoch
        self._write(pipeline, current)
        return epoch

    def delete(self, pipeline: str) -> None:
        with contextlib.suppress(FileNotFoundError), _file_errors(pipeline, missing_ok=True):
            self._path(pipeline).unlink()

    def clear(self, pipeline: str, epoch: int) -> None:
        current = self._read(pipeline) or {}
        if _epoch_of(current, pipeline, missing=0) > epoch:
            raise LeaseLostError(
                f"cannot clear the checkpoint with epoch {epoch}", pipeline=pipeline
            )
        self._write(pipeline, {"_id": pipeline, "epoch": epoch})

    def list(
        self, *, unreadable: dict[str, CheckpointCorruptError] | None = None
    ) -> list[Checkpoint]:
        if not self._dir.is_dir():
            return []
        out = []
        with _file_errors():
            paths = sorted(self._dir.glob("*.json"))
        for path in paths:
            try:
                cp = self.load(path.stem)
            except CheckpointCorruptError as exc:
                if unreadable is None:
                    raise
                unreadable[path.stem] = exc
                continue
            if cp is not None:
                out.append(cp)
        return out

    def set_status(self, pipeline: str, status: Mapping[str, Any]) -> None:
        current = self._read(pipeline) or {"_id": pipeline}
        current["status"] = dict(status) | {"updated_at": datetime.now(UTC)}
        self._write(pipeline, current)

    def set_halt(self, pipeline: str, halt: Mapping[str, Any] | None) -> None:
        current = self._read(pipeline)
        if current is None:
            return
        current["halt"] = dict(halt) if halt is not None else None
        self._write(pipeline, current)

    def close(self) -> None:
        """Nothing to release."""

    def _write(self, pipeline: str, doc: Mapping[str, Any]) -> None:
        text = json_util.dumps(SON(doc), json_options=json_util.CANONICAL_JSON_OPTIONS)
        with _file_errors(pipeline):
            self._dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self._path(pipeline), text.encode("utf-8"))

    def check_writable(self) -> None:
        """Create the directory and replace a probe file in it, as a checkpoint write does."""
        probe = self._dir / ".syncd-check"
        with _file_errors():
            self._dir.mkdir(parents=True, exist_ok=True)
            atomic_write(probe, b"")
            probe.unlink()


@contextlib.contextmanager
def _file_errors(pipeline: str | None = None, *, missing_ok: bool = False) -> Iterator[None]:
    """An unusable ``checkpoint.path`` is a configuration error, not a crash.

    With ``missing_ok`` a missing file passes through as FileNotFoundError: no checkpoint.
    """
    try:
        yield
    except OSError as exc:
        if missing_ok and isinstance(exc, FileNotFoundError):
            raise
        raise from_os_error(exc, setting="checkpoint.path", pipeline=pipeline) from exc


def _epoch_of(doc: Mapping[str, Any] | None, pipeline: str, *, missing: int | None = None) -> int:
    epoch = (doc or {}).get("epoch", missing)
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise corrupt(pipeline, f"epoch is {type(epoch).__name__}, not int")
    return epoch


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def open_store(
    settings: CheckpointSettings, client: MongoClient[dict[str, Any]]
) -> CheckpointStore:
    if settings.store == "file":
        return FileCheckpointStore(settings)
    return MongoCheckpointStore(client, settings)


def describe(cp: Checkpoint) -> dict[str, Any]:
    """A JSON-friendly summary for status output."""
    return json.loads(json_util.dumps(to_document(cp), json_options=json_util.RELAXED_JSON_OPTIONS))  # type: ignore[no-any-return]
