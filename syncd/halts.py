"""A halted pipeline: stopped before one change it cannot apply, alone, until resolved.

Under ``on_error = "halt"`` a change that cannot be applied (poison, see
:mod:`syncd.errors`) stops its pipeline just before that change; the process and its
other pipelines carry on. The halt is recorded next to the pipeline's checkpoint
(``halt`` in the checkpoint store): the document's ``_id``, the reason, the error
class and the resume position. Whichever process runs the pipeline next, after a
restart or on another replica, finds the record and waits instead of retrying the
change, so no process retries a poison change in a loop.

A halt holds the pipeline *at its checkpoint*: the record names the position it was
taken at and lapses when the checkpoint moves (``syncd snapshot``, ``syncd tokens
set`` or ``reset``). Otherwise it is lifted

* by itself: every ``halt_recheck_s`` the process holding the pipeline reads the
  document again; once it is deleted, no longer matches the filter, or maps and
  embeds cleanly (a document Chroma itself refused must also have changed), the
  pipeline runs again and applies it;
* by ``syncd resume PIPELINE``: the record is cleared, and the next run (the daemon
  notices within seconds) retries the change, halting again if it still fails;
* by ``on_error = "dead_letter"``: the change is dead-lettered on the next start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import bson
from bson import json_util

from syncd import hints
from syncd import plan as planning
from syncd.checkpoint import Checkpoint, CheckpointStore, whoami
from syncd.config import PipelineSettings
from syncd.errors import (
    CollectionGoneHalt,
    HaltedError,
    PoisonError,
    SinkRejectedError,
    SyncdError,
    TransientError,
)
from syncd.identity import prefixed, record_key
from syncd.source import id_key

if TYPE_CHECKING:
    from syncd.pipeline import Pipeline

log = logging.getLogger(__name__)

POLL_S = 2.0  # how soon a held pipeline notices `syncd resume` or a moved checkpoint
REBUILD_RETRY_S = 60.0  # a daemon's halted rebuild tries again this often under halt_recheck_s = 0
_NO_ID = object()


def stopped_state(exc: BaseException) -> str:
    """The state of a pipeline that ``exc`` stopped: ``halted`` for a change it cannot
    apply (a halt, held alone until resolved), ``failed`` for a fatal error, which stops
    the process with its exit code until an operator acts on the error's hint."""
    return "halted" if isinstance(exc, HaltedError | PoisonError) else "failed"


def hint(
    settings: PipelineSettings,
    *,
    has_document: bool = True,
    rebuild: bool = False,
    command: str | None = None,
) -> str:
    """What an operator can do about a halt; every command named here works as written.

    ``rebuild``: a halt of a rebuild's build. Without ``command``, of the rebuild a
    daemon runs by itself (see :mod:`syncd.autorebuild`), which tries the rebuild again
    every ``halt_recheck_s`` (:data:`REBUILD_RETRY_S` when 0): a fix is picked up then,
    without a restart. With it, of ``syncd rebuild`` run as ``command``, which stopped:
    running it again continues the build from where it halted (``syncd resume`` lifts
    a pipeline's own halt, not a build's). ``command`` without ``rebuild``: the
    ``syncd snapshot`` that stopped, whose scan the same command continues."""
    if command is not None:
        # A one-shot command that stopped (`syncd rebuild`, `syncd snapshot`): nothing
        # runs on to restart; the same command run again continues.
        again = f"run `{command}` again"
        what = "the rebuild" if rebuild else "the scan"
        if not has_document:
            return f"fix the cause, then {again}: {what} continues where it stopped"
        return (
            f"fix or delete the document in MongoDB, then {again}: {what} continues "
            f'where it stopped; or set on_error = "dead_letter" and {again} to set such '
            "changes aside"
        )
    if rebuild:
        every = settings.halt_recheck_s or REBUILD_RETRY_S
        retry = f"syncd tries the rebuild again every {every:g} s and continues by itself"
        if not has_document:
            return f"fix the cause: {retry}"
        return (
            f"fix or delete the document in MongoDB: {retry}; or set "
            'on_error = "dead_letter" and restart to set such changes aside'
        )
    resume = f"`{hints.command('resume', settings.name)}`"
    if not has_document:
        return f"fix the cause, then run {resume} to retry the change"
    every = settings.halt_recheck_s
    fix = "fix or delete the document in MongoDB"
    if every > 0:
        first = (
            f"{fix}: syncd re-checks it every {every:g} s and continues by itself, "
            f"or run {resume} to retry it at once"
        )
    else:
        first = f"{fix}, then run {resume} to retry it"
    return f'{first}; or set on_error = "dead_letter" and restart to set such changes aside'


@dataclasses.dataclass
class Halt:
    """The stored record of a halt (``halt`` on the pipeline's checkpoint document)."""

    reason: str
    error_class: str
    hint: str
    position: str  # position_key() of the checkpoint the halt holds
    token: dict[str, Any] | None = None  # the resume token the pipeline continues from
    collection: str | None = None
    namespace: str | None = None
    key: str | None = None  # the document's record id, e.g. "s:42"
    document_id: Any = _NO_ID
    document_hash: str | None = None  # the document as it was refused, when Chroma refused it
    policy: str | None = None  # "on_drop", ...: the setting a drop, rename or dropDatabase met
    command: str | None = None  # a rebuild's halt: the `syncd rebuild` that halted (not a daemon)
    since: datetime = dataclasses.field(default_factory=lambda: datetime.now(UTC))
    by: str = dataclasses.field(default_factory=whoami)

    @property
    def has_document(self) -> bool:
        return self.document_id is not _NO_ID and self.collection is not None

    def to_document(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        if not self.has_document:
            doc.pop("document_id")
        return {key: value for key, value in doc.items() if value is not None}

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> Halt:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in doc.items() if key in fields}
        values.setdefault("reason", "halted")
        values.setdefault("error_class", "HaltedError")
        values.setdefault("hint", "")
        values.setdefault("position", "")
        since = values.get("since")
        if isinstance(since, datetime) and since.tzinfo is None:
            values["since"] = since.replace(tzinfo=UTC)
        return cls(**values)

    def error(self, pipeline: str) -> HaltedError:
        return HaltedError(
            self.reason,
            hint=self.hint,
            pipeline=pipeline,
            namespace=self.namespace,
            document_id=self.document_id if self.has_document else None,
        )

    def describe(self) -> dict[str, Any]:
        """JSON-friendly, for `syncd status` and logs."""
        out: dict[str, Any] = {
            "reason": self.reason,
            "error_class": self.error_class,
            "hint": self.hint,
            "since": _iso(self.since),
            "by": self.by,
        }
        if self.has_document:
            out["document_id"] = repr(self.document_id)
            out["key"] = self.key
        if self.namespace:
            out["namespace"] = self.namespace
        if self.token is not None:
            out["resume_token"] = self.token.get("_data", self.token)
        return out


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def position_key(cp: Checkpoint) -> str:
    """The checkpoint's position as one comparable string (canonical Extended JSON).

    Canonical JSON, not Python equality: an ``_id`` of NaN in a snapshot position
    must equal itself.
    """
    snap = cp.snapshot
    data = {
        "phase": cp.phase,
        "token": cp.token,
        "invalidate": cp.token_is_invalidate,
        "start_at": cp.start_at,
        "snapshot": None
        if snap is None
        else {
            "collection": snap.collection,
            "after": [snap.last_id] if snap.has_last_id else [],
            "start_token": snap.start_token,
            "start_at": snap.start_at,
        },
    }
    return json_util.dumps(data, json_options=json_util.CANONICAL_JSON_OPTIONS, sort_keys=True)


def active(cp: Checkpoint | None) -> Halt | None:
    """The halt holding this checkpoint, if any; a halt taken elsewhere has lapsed."""
    return holding(cp.halt if cp is not None else None, cp)


def holding(record: Any, cp: Checkpoint | None) -> Halt | None:
    """The halt ``record`` (stored), if it holds checkpoint ``cp``: taken at its position."""
    if cp is None or not isinstance(record, Mapping):
        return None
    halt = Halt.from_document(record)
    return halt if halt.position == position_key(cp) else None


def check_on_start(settings: PipelineSettings, cp: Checkpoint, store: CheckpointStore) -> None:
    """Raise the stored halt's HaltedError, so a (re)started pipeline waits instead of
    retrying the change; under ``on_error = "dead_letter"`` (a halt at a document), or
    with its ``on_drop``/``on_rename``/``on_drop_database`` no longer "halt" (a halt at
    a collection event), lift it instead."""
    halt = active(cp)
    if halt is None:
        return
    if settings.on_error == "dead_letter" and halt.has_document:
        log.warning(
            "lifting the halt at _id %r: on_error is \"dead_letter\" now", halt.document_id,
            extra={"pipeline": settings.name},
        )  # fmt: skip
        store.set_halt(settings.name, None)
        cp.halt = None
        return
    if halt.policy is not None and getattr(settings, halt.policy, "halt") != "halt":
        log.warning(
            "lifting the halt at %s: %s is %r now", halt.namespace, halt.policy,
            getattr(settings, halt.policy), extra={"pipeline": settings.name},
        )  # fmt: skip
        store.set_halt(settings.name, None)
        cp.halt = None
        return
    raise halt.error(settings.name)


def clear(store: CheckpointStore, pipeline: str) -> Halt | None:
    """Lift the pipeline's halt (`syncd resume`); return what was lifted, if anything."""
    halt = active(store.load(pipeline))
    if halt is not None:
        store.set_halt(pipeline, None)
    return halt


def document_hash(doc: Mapping[str, Any]) -> str:
    return hashlib.sha256(bson.encode(doc)).hexdigest()


def _cause(error: SyncdError) -> BaseException:
    return error.__cause__ if isinstance(error, HaltedError) and error.__cause__ else error


def new(
    settings: PipelineSettings,
    error: SyncdError,
    cp: Checkpoint | None,
    *,
    rebuild: bool = False,
    command: str | None = None,
) -> Halt:
    """The record of a halt ``error`` causes at checkpoint ``cp`` (``rebuild``: of a
    rebuild's build, which the daemon tries again by itself, or, with ``command``, which
    that `syncd rebuild` run again continues; its hint says which)."""
    cause = _cause(error)
    collection = _collection(settings, error, cp)
    has_id = error.document_id is not None and collection is not None
    if has_id or rebuild:
        text = hint(settings, has_document=has_id, rebuild=rebuild, command=command)
    else:  # a halt at no document (a dropped or renamed collection) says its own way out
        text = error.hint or hint(settings, has_document=False)
    halt = Halt(
        policy=error.policy if isinstance(error, CollectionGoneHalt) else None,
        command=command if rebuild else None,
        reason=error.message,
        error_class=type(cause if isinstance(cause, SyncdError) else error).__name__,
        hint=text,
        position=position_key(cp) if cp is not None else "",
        token=dict(cp.token) if cp is not None and cp.token else None,
        namespace=error.namespace or (f"{settings.database}.{collection}" if collection else None),
    )
    if has_id and collection is not None:
        halt.collection, halt.document_id = collection, error.document_id
        halt.key = record_key(collection, error.document_id, prefixed=prefixed(settings))
    return halt


def _collection(settings: PipelineSettings, error: SyncdError, cp: Checkpoint | None) -> str | None:
    prefix = f"{settings.database}."
    if error.namespace and error.namespace.startswith(prefix):
        return error.namespace[len(prefix) :]
    if settings.collection:
        return settings.collection
    if cp is not None and cp.snapshot is not None:
        return cp.snapshot.collection
    return None


def publish(store: CheckpointStore, pipeline: str, halt: Halt) -> None:
    """Record the halt as the pipeline's state, for `syncd status`."""
    status = {
        "state": "halted",
        "by": whoami(),
        "error_class": "HaltedError",
        "error": halt.reason,
        "hint": halt.hint,
        "namespace": halt.namespace,
    }
    if halt.has_document:
        status["document_id"] = repr(halt.document_id)
    store.set_status(pipeline, status)


class HeldPipeline:
    """Keeps a halted pipeline halted, and says when it may run again.

    :meth:`hold` records the halt (unless the pipeline stopped on a stored one), then
    waits: it returns True once the halt is lifted (by `syncd resume`, a moved
    checkpoint or a re-check of the document) and False when ``stop`` is set.
    """

    def __init__(self, pipeline: Pipeline, stop: threading.Event, beat: Callable[[], None]) -> None:
        self.p = pipeline
        self.settings = pipeline.settings
        self.stop = stop
        self.beat = beat
        self._warned_at = -float("inf")

    def hold(self, error: SyncdError) -> bool:
        halt: Halt | None = None
        every = self.settings.halt_recheck_s
        next_check = time.monotonic() + every
        while True:
            self.beat()
            try:
                if halt is None:
                    halt = self._record(error)
                    self._announce(halt)
                else:
                    lifted = self._lifted()
                    if lifted is None and every > 0 and time.monotonic() >= next_check:
                        next_check = time.monotonic() + every
                        lifted = self._recheck(halt)
                    if lifted is not None:
                        log.info(
                            "pipeline %s continues: %s", self.settings.name, lifted,
                            extra={"pipeline": self.settings.name},
                        )  # fmt: skip
                        return True
            except TransientError as exc:
                self._warn(exc)
            if self.stop.wait(min(POLL_S, every) if every > 0 else POLL_S):
                return False

    # --- steps ---------------------------------------------------------------

    def _record(self, error: SyncdError) -> Halt:
        """The halt in force: the stored one, or a new record of ``error``."""
        store, name = self.p.store, self.settings.name
        cp = store.load(name)
        stored = active(cp)
        if stored is not None:
            return stored
        halt = self._new(error, cp)
        if cp is not None:
            store.set_halt(name, halt.to_document())
        self._publish(halt)
        return halt

    def _new(self, error: SyncdError, cp: Checkpoint | None) -> Halt:
        halt = new(self.settings, error, cp)
        if halt.has_document and isinstance(_cause(error), SinkRejectedError):
            # Mapping and embedding pass for what Chroma refuses: only a change
            # to the document can lift this halt by itself.
            doc = self._fetch(halt)
            halt.document_hash = document_hash(doc) if doc is not None else None
        return halt

    def _publish(self, halt: Halt) -> None:
        publish(self.p.store, self.settings.name, halt)

    def _announce(self, halt: Halt) -> None:
        error = halt.error(self.settings.name)
        self.p.telemetry.set_state("halted", error)
        log.error(
            "pipeline %s halted (since %s): %s", self.settings.name,
            halt.since.isoformat(timespec="seconds"), error.describe(),
            extra={"pipeline": self.settings.name, "error_class": halt.error_class},
        )  # fmt: skip

    def _lifted(self) -> str | None:
        """Why the stored halt no longer holds, or None while it does."""
        cp = self.p.store.load(self.settings.name)
        if cp is None:
            return "its checkpoint was deleted (`syncd tokens reset`)"
        if active(cp) is not None:
            return None
        if isinstance(cp.halt, Mapping):
            return "its checkpoint moved since it halted"
        return "the halt was lifted (`syncd resume`)"

    def _recheck(self, halt: Halt) -> str | None:
        """Look at the halted document again; why it can go on now, or None."""
        if not halt.has_document or halt.collection is None:
            return None
        doc = self._fetch(halt)
        why = self._verdict(halt, doc)
        if why is not None:
            self.p.store.set_halt(self.settings.name, None)
        return why

    def _verdict(self, halt: Halt, doc: Mapping[str, Any] | None) -> str | None:
        if doc is None:
            return f"the document {halt.key} it halted on was deleted"
        if not self.p.mapper.matches(doc):
            return f"the document {halt.key} it halted on no longer matches the filter"
        if halt.document_hash is not None and document_hash(doc) == halt.document_hash:
            return None
        change = planning.Change(
            key=halt.key or "",
            collection=halt.collection or "",
            source_id=halt.document_id,
            document=doc,
            operation="update",
            cluster_time=None,
            event=None,
        )
        result = planning.build(
            [change],
            mapper=self.p.mapper,
            embedder=self.p.embedder,
            sink=planning.NOTHING_STORED,  # so that a re-check maps *and* embeds it
            prefixed=prefixed(self.settings),
        )
        if result.poisoned:
            log.debug(
                "the halted document still cannot be applied: %s", result.poisoned[0].error.message,
                extra={"pipeline": self.settings.name},
            )  # fmt: skip
            return None
        return f"the document {halt.key} it halted on can be applied now"

    def _fetch(self, halt: Halt) -> Mapping[str, Any] | None:
        """The document as it is now; by its ``_id`` in MongoDB, never by Python equality."""
        found = self.p.source.fetch(halt.collection or "", [halt.document_id])
        return found.get(id_key(halt.document_id))  # not a numerically equal other _id

    def _warn(self, exc: TransientError) -> None:
        now = time.monotonic()
        if now - self._warned_at >= 60:
            self._warned_at = now
            log.warning(
                "cannot check the halt of pipeline %s: %s", self.settings.name, exc.message,
                extra={"pipeline": self.settings.name},
            )  # fmt: skip
