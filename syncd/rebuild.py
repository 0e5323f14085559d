"""`syncd rebuild`: build a pipeline's collection again beside the live one, then switch.

1. Record the rebuild (:mod:`syncd.switching`): the new collection's versioned name,
   ``NAME--vN+1``, and the mapping it is built with.
2. Build it as a pipeline of its own, ``PIPELINE~rebuild`` (own checkpoint, own lease):
   a snapshot with the configured mapping from a stream position recorded before the
   scan, then streaming from that position until caught up. The live pipeline keeps
   streaming into the live collection meanwhile; searches see only that one.
3. Take the live pipeline's lease (fencing its writer out), catch up once more, and
   switch (:func:`syncd.switching.complete`): the live collection is renamed to
   ``NAME--vN``, the new one to ``NAME``, and the live checkpoint then describes the new
   collection at the build's position, with the new mapping's fingerprint.

``--rollback`` switches back to the previous collection (at the position it stopped
at; the daemon replays from there); ``--drop-previous`` deletes it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bson.timestamp import Timestamp

from syncd import hints, rebuild_halts, reuse, switching
from syncd.checkpoint import Checkpoint
from syncd.config import PipelineSettings, Settings
from syncd.errors import (
    ConfigError,
    ExitCode,
    HaltedError,
    PoisonError,
    SinkLostError,
    TransientError,
    from_sink,
)
from syncd.estimate import estimate
from syncd.exclusive import Hold, exclusive
from syncd.mapping import Mapper
from syncd.outages import Outage
from syncd.rebuild_metrics import RebuildTelemetry
from syncd.runtime import Runtime
from syncd.switching import build_name, load_record, position_of, save_record, versioned
from syncd.telemetry import PipelineTelemetry, Telemetry

log = logging.getLogger(__name__)


def _say(line: str) -> None:
    """What ``syncd rebuild`` tells its operator, on stdout, at once."""
    print(line, flush=True)


def rebuild(
    settings: Settings,
    ps: PipelineSettings,
    *,
    action: str = "build",
    force: bool = False,
    command: str | None = None,
    stop: threading.Event | None = None,
    listen: str | None = None,
) -> int:
    """``action``: "build" (build and switch), "rollback" or "drop_previous"; ``listen``:
    serve the metrics there while it runs."""
    telemetry = None
    if listen:
        served = settings.telemetry.model_copy(
            update={"listen": listen, "traces": "none", "span_log_path": ""}
        )
        telemetry = Telemetry(settings.model_copy(update={"telemetry": served}))
        telemetry.start()
    runtime = Runtime(settings, telemetry)
    command = command or hints.command("rebuild", ps.name)
    stop = stop or threading.Event()
    try:
        return _retrying(
            lambda moved: run_rebuild(
                runtime, ps, action=action, force=force, command=command, stop=stop, moved=moved
            ),
            runtime,
            ps,
            command=command,
            stop=stop,
        )
    except (HaltedError, PoisonError) as exc:
        # A document the new mapping cannot apply (on_error = "halt"): the build keeps
        # its checkpoint there, and this command run again continues from it.
        halt = rebuild_halts.record(runtime.store, ps, exc, command=command)
        raise HaltedError(
            f"the rebuild of {ps.name} halted: {halt.reason}",
            hint=halt.hint,
            pipeline=ps.name,
            namespace=halt.namespace,
            document_id=halt.document_id if halt.has_document else None,
        ) from exc
    finally:
        runtime.close()
        if telemetry is not None:
            telemetry.shutdown()


def _retrying(
    attempt: Callable[[Callable[[], None]], int],
    runtime: Runtime,
    ps: PipelineSettings,
    *,
    command: str,
    stop: threading.Event,
) -> int:
    """``attempt(moved)`` (the rebuild) until it ends, tried again after an outage of
    MongoDB, Chroma or the embedding API outside the build's own retry loop (before its
    snapshot starts, during the switch), with the same backoff and ``retry_deadline_s``
    as the build and as a daemon's rebuild (see :mod:`syncd.autorebuild`): each run
    continues where the last one stopped. The rebuild calls ``moved()`` as its build
    moves: an outage after that is a new one (see :mod:`syncd.outages`)."""
    outage = Outage(ps, command=command)
    while True:
        try:
            return attempt(outage.recovered)
        except TransientError as exc:
            delay = outage.failed(exc)
            runtime.telemetry.pipeline(ps.name).retrying(exc, outage.attempt, delay)
            if stop.wait(delay):
                _say(f"rebuild interrupted; run `{command}` again to continue")
                return ExitCode.DRIFT_OR_FAILURE


def run_rebuild(
    runtime: Runtime,
    ps: PipelineSettings,
    *,
    action: str = "build",
    force: bool = False,
    command: str,
    stop: threading.Event,
    who: str = "syncd-rebuild",
    live: Callable[[], Hold] | None = None,
    heartbeat: Callable[[], None] | None = None,
    say: Callable[[str], None] = _say,
    telemetry: PipelineTelemetry | None = None,
    retrying_halt: bool = False,
    moved: Callable[[], None] | None = None,
) -> int:
    """:func:`rebuild` with the parts of a running process: a daemon rebuilding by itself
    (see :mod:`syncd.autorebuild`) passes ``live``, which gives its hold on the live
    pipeline when the switch needs it (the lease it holds, or takes then), a
    ``heartbeat``, ``say`` (its log) and ``telemetry``, the pipeline's, which reports
    ``rebuilding`` (``syncd rebuild`` makes its own); ``retrying_halt``: this is the
    daemon trying again at the document its build halted at, which continues the
    build it already said it continues (so it does not say so again); ``moved()`` is
    called each time the build writes a checkpoint or catches up, which ends an outage
    the caller retries the rebuild through (see :mod:`syncd.outages`)."""
    name = ps.name
    if telemetry is None:
        telemetry = runtime.telemetry.pipeline(name)
        telemetry.set_state("rebuilding")
    with exclusive(
        runtime, build_name(name), force=force, command=command, who=who, configured=False
    ) as hold:
        job = _Rebuild(
            runtime, ps, hold, command, stop,
            live=live, heartbeat=heartbeat, say=say, telemetry=telemetry, moved=moved,
        )  # fmt: skip
        job.retrying_halt = retrying_halt
        if job.record.get("state") == "switching":
            job.switch()
            say(f"completed the interrupted switch of {name}")
            if action == "build" and job.fingerprint == job.record.get("fingerprint"):
                return ExitCode.OK
        if action == "rollback":
            return job.rollback()
        if action == "drop_previous":
            return job.drop_previous()
        return job.build()


class _Rebuild:
    def __init__(
        self,
        runtime: Runtime,
        ps: PipelineSettings,
        hold: Hold,
        command: str,
        stop: threading.Event,
        *,
        live: Callable[[], Hold] | None = None,
        heartbeat: Callable[[], None] | None = None,
        say: Callable[[str], None] = _say,
        telemetry: PipelineTelemetry | None = None,
        moved: Callable[[], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.store = runtime.store
        self.ps = ps
        self.name = ps.name
        self.base = ps.chroma_collection_name
        self.hold = hold
        self.command = command
        self.stop = stop
        self.fingerprint = Mapper(ps).fingerprint
        self.record = load_record(self.store, self.name)
        self.reusing: reuse.ReusingEmbedder | None = None
        self.letters = runtime.dead_letters(ps)
        self.live = live
        self.heartbeat = heartbeat
        self.say = say
        self.metrics = runtime.telemetry.rebuild(ps.name)
        self.telemetry = telemetry or runtime.telemetry.pipeline(ps.name)
        self.retrying_halt = False  # see run_rebuild
        self.moved = moved or (lambda: None)

    # --- build --------------------------------------------------------------------

    def build(self) -> int:
        live = self._live()
        record = self.record
        continued = False  # from where an earlier run stopped: its work is not counted here
        if record.get("state") != "building":
            if live.fingerprint == self.fingerprint:
                self.say(f"nothing to rebuild: {self.name}'s collection has this mapping already")
                return ExitCode.OK
            refusal = switching.kept_previous(record, self.name)
            if refusal is not None:
                raise refusal
            generation = int(record.get("generation", 1))
            record = {
                "state": "building",
                "generation": generation,
                "target": versioned(self.base, generation + 1),
                "fingerprint": self.fingerprint,
                "previous": None,
            }
            self._start_over(record, live)
        elif record.get("fingerprint") != self.fingerprint:
            log.warning(
                "the mapping changed again since this rebuild began: building it over",
                extra={"pipeline": self.name},
            )
            record = dict(record, fingerprint=self.fingerprint)
            self._start_over(record, live)
        else:
            built = self.store.load(build_name(self.name))
            if built is None or built.fingerprint != self.fingerprint:
                self._start_over(record, live)
            else:
                if not self.retrying_halt:
                    self.say(f"continuing the rebuild of {self.name} into {record['target']}")
                continued = True
        self.record = record
        self.metrics.resume_from(self.store.load(build_name(self.name)))
        self._choose_embedder()
        if self._run_build() is None:
            return self._interrupted()
        with self._taking_live() as live_hold:
            built_cp = self._run_build()  # the live writer is fenced out: catch up once more
            if built_cp is None:
                return self._interrupted()
            self.metrics.set_phase("switching")
            live = self._live()
            generation = int(record["generation"])
            parked = versioned(self.base, generation)
            kept = self._switch_to(
                live,
                into={
                    "id": built_cp.chroma_collection_id,
                    "name": record["target"],
                    "position": position_of(built_cp),
                    "letters": build_name(self.name),
                },
                after={
                    "generation": generation + 1,
                    "fingerprint": self.fingerprint,
                    "target": None,
                    "previous": {
                        "name": parked,
                        "id": live.chroma_collection_id,
                        "generation": generation,
                        "position": position_of(live),
                    },
                },
                parked=parked,
                epoch=live_hold.epoch,
            )
        self.metrics.set_phase("switched")
        if self.reusing is not None:
            earlier = " (not counting what was done before it continued)" if continued else ""
            self.say(
                f"{self.reusing.reused} vectors reused from the live collection and "
                f"{self.reusing.embedded} texts embedded by this run of the rebuild{earlier}"
            )
        self.say(
            f"rebuild of {self.name} switched: {self.base!r} now holds the new records; the "
            + (
                f"previous collection is kept as {parked!r} "
                f"(`{hints.command('rebuild', self.name, '--rollback')}` goes back to it, "
                "`--drop-previous` deletes it)"
                if kept
                else "previous collection was deleted during the rebuild: none is kept for a "
                "rollback"
            )
        )
        return ExitCode.OK

    @contextmanager
    def _taking_live(self) -> Iterator[Hold]:
        """The live pipeline, held for the switch: taken from (fencing out) whoever
        streams it, or, in a daemon that rebuilds by itself, the hold it has already."""
        if self.live is not None:
            hold = self.live()
            hold.check()
            yield hold
            return
        with exclusive(
            self.runtime, self.name, force=True, command=self.command, who="syncd-rebuild"
        ) as hold:
            yield hold

    def _start_over(self, record: dict[str, Any], live: Checkpoint) -> None:
        """An empty new collection and no build checkpoint, then the record says "building"."""
        self.hold.check()
        client = self.runtime.chroma
        names = switching.collections(client, f"chroma:{record['target']}")
        kept = {live.chroma_collection_id, (record.get("previous") or {}).get("id")}
        for cid, cname in names.items():
            if cname == record["target"] and cid not in kept:
                switching.delete(client, cname)  # an abandoned build's: its vectors may be stale
        self.store.delete(build_name(self.name))
        self.letters.purge(build_name(self.name))  # of documents an abandoned build saw
        save_record(self.store, self.name, record)

    def _build_settings(self) -> PipelineSettings:
        return self.ps.model_copy(
            update={
                "name": build_name(self.name),
                "chroma_collection": self.record["target"],
                "snapshot": "initial",
                "on_sink_lost": "resnapshot",
                "on_history_lost": "resnapshot",
            }
        )

    def _choose_embedder(self) -> None:
        """Reuse the live collection's vectors if its embedder is this one (see
        :mod:`syncd.reuse`); otherwise say how much there is to embed."""
        settings = self._build_settings()
        inner = self.runtime.embedder(settings)
        if inner is None:
            return  # vectors come from the documents
        try:
            live = self.runtime.chroma.get_collection(self.base, embedding_function=None)
        except Exception as exc:
            raise from_sink(exc, namespace=f"chroma:{self.base}") from exc
        if reuse.same_embedder(inner, live):
            self.reusing = reuse.ReusingEmbedder(inner, live)
            self.runtime.use_embedder(settings.name, self.reusing)
            log.info(
                "the live collection has this embedder's vectors: texts it holds are not "
                "embedded again",
                extra={"pipeline": self.name},
            )
            self._note_to_embed(None)
            return
        guess = estimate(self.runtime.source(settings), settings)
        self._note_to_embed(guess.to_json())
        self.say(f"the embedder differs from the live collection's: {guess.describe()}")
        log.info(
            "the embedder differs from the live collection's: every text is embedded again, %s",
            guess.describe(),
            extra={"pipeline": self.name, "texts": guess.texts},
        )

    def _note_to_embed(self, guess: dict[str, Any] | None) -> None:
        """Kept in the record for `syncd status` while the rebuild runs."""
        if self.record.get("to_embed") == guess:
            return
        self.record = dict(self.record, to_embed=guess)
        self.hold.check()
        save_record(self.store, self.name, self.record)

    def _run_build(self) -> Checkpoint | None:
        """Snapshot (or continue) into the new collection, then stream until caught up.

        The build's checkpoint when caught up; None when stopped first.
        """
        settings = self._build_settings()
        until = threading.Event()
        threading.Thread(target=_relay, args=(self.stop, until), daemon=True).start()
        # Under a steady write load no read comes back empty: caught up is also having
        # checkpointed past the latest operation in MongoDB when this began.
        target = self.runtime.source(settings).server_time()
        # The build is a part of the pipeline: its outages are the pipeline's (retrying),
        # and it is no pipeline of its own in /readyz or the state metrics.
        part = self.runtime.telemetry.part(self.telemetry, settings.name)
        telemetry = _UntilCaughtUp(part, until, target, self.metrics, self.moved)
        self.metrics.resume_from(self.store.load(settings.name))
        pipeline = self.runtime.pipeline(
            settings,
            stop=until,
            epoch=self.hold.epoch,
            resync=True,
            telemetry=telemetry,  # type: ignore[arg-type]
            heartbeat=self.heartbeat,
            fence=self.hold.check,
        )
        pipeline.progress.publish("rebuilding")
        pipeline.run()
        cp = pipeline.checkpoint
        if self.stop.is_set() or not telemetry.caught or cp is None or cp.phase != "streaming":
            return None
        return cp

    def _interrupted(self) -> int:
        self.metrics.set_phase("stopped")
        self.say(f"rebuild interrupted; run `{self.command}` again to continue")
        return ExitCode.DRIFT_OR_FAILURE

    # --- switch, rollback, drop -------------------------------------------------------

    def _switch_to(
        self,
        live: Checkpoint,
        *,
        into: dict[str, Any],
        after: dict[str, Any],
        parked: str,
        epoch: int,
    ) -> bool:
        """Record the intent, then complete it (see :func:`syncd.switching.complete`).

        Whether the collection switched away from is kept (it may have been deleted
        meanwhile: then nothing is kept for a rollback)."""
        names = switching.collections(self.runtime.chroma, f"chroma:{self.base}")
        kept = live.chroma_collection_id in names
        if not kept:
            after = dict(after, previous=None)
        intent = {
            "live_name": self.base,
            "out": {"id": live.chroma_collection_id, "name": parked},
            "in": into,
            "after": after,
            "was": self.record.get("state"),
        }
        record = dict(self.record, state="switching", switch=intent)
        self.hold.check()
        save_record(self.store, self.name, record)
        self.hold.check()
        self.record = switching.complete(
            self.store, self.runtime.chroma, self.name, record, epoch=epoch, letters=self.letters
        )
        return kept

    def switch(self) -> None:
        """Complete a switch a crash interrupted."""
        self.metrics.set_phase("switching")
        with self._taking_live() as live_hold:
            self.hold.check()
            self.record = switching.complete(
                self.store,
                self.runtime.chroma,
                self.name,
                self.record,
                epoch=live_hold.epoch,
                letters=self.letters,
            )
        self.metrics.set_phase("switched")

    def rollback(self) -> int:
        previous = self.record.get("previous")
        if not previous:
            raise ConfigError(
                f"{self.name} has no previous collection to roll back to",
                hint="a rollback follows a `syncd rebuild` that switched, until `--drop-previous`",
                pipeline=self.name,
            )
        names = switching.collections(self.runtime.chroma, f"chroma:{previous['name']}")
        if previous["id"] not in names:
            save_record(self.store, self.name, dict(self.record, previous=None))
            raise SinkLostError(
                f"the previous collection {previous['name']!r} (id {previous['id']}) of "
                f"{self.name} is gone: there is nothing to roll back to",
                hint=f"{self.base!r} serves on unchanged, with this configuration's mapping: "
                "run syncd with it",
                pipeline=self.name,
            )
        with self._taking_live() as live_hold:
            live = self._live()
            generation = int(self.record["generation"])
            parked = versioned(self.base, generation)
            kept = self._switch_to(
                live,
                into={k: previous[k] for k in ("id", "name", "position")},
                after={
                    "generation": int(previous["generation"]),
                    "fingerprint": previous["position"]["fingerprint"],
                    "target": None,
                    "previous": {
                        "name": parked,
                        "id": live.chroma_collection_id,
                        "generation": generation,
                        "position": position_of(live),
                    },
                },
                parked=parked,
                epoch=live_hold.epoch,
            )
        self.say(
            f"rolled {self.name} back: {self.base!r} holds the previous collection again and "
            "streams from where it stopped; "
            + (f"the one it replaced is kept as {parked!r}" if kept else "nothing else is kept")
            + ". Run syncd with the configuration of that mapping"
        )
        return ExitCode.OK

    def drop_previous(self) -> int:
        previous = self.record.get("previous")
        if not previous:
            self.say(f"{self.name} keeps no previous collection")
            return ExitCode.OK
        client = self.runtime.chroma
        names = switching.collections(client, f"chroma:{previous['name']}")
        current = names.get(previous["id"])
        self.hold.check()
        if current is not None and current != self.base:
            switching.delete(client, current)
        self.letters.purge(switching.parked_letters(self.name, previous["id"]))
        save_record(self.store, self.name, dict(self.record, previous=None))
        self.say(f"deleted {self.name}'s previous collection {previous['name']!r}")
        return ExitCode.OK

    def _live(self) -> Checkpoint:
        live = self.store.load(self.name)
        if live is None or live.chroma_collection_id is None:
            raise ConfigError(
                f"pipeline {self.name!r} has no live collection to rebuild beside yet",
                hint=f"`{hints.command('run')}` makes its first copy; rebuild a pipeline "
                "that has one",
                pipeline=self.name,
            )
        return live


def _relay(source: threading.Event, target: threading.Event) -> None:
    while not target.is_set():
        if source.wait(0.5):
            target.set()


class _UntilCaughtUp:
    """The build's telemetry, which also stops it the first time it finds no change waiting.

    Also keeps the rebuild's metrics (:mod:`syncd.rebuild_metrics`): phase, documents
    copied, and how far the build is behind the live stream; and tells ``moved()`` each
    time the build checkpoints or catches up: each needs its dependencies to answer, and
    the build reaches the switch only through one of them (see :meth:`_done`).
    """

    def __init__(
        self,
        inner: PipelineTelemetry,
        until: threading.Event,
        target: Timestamp | None,
        metrics: RebuildTelemetry,
        moved: Callable[[], None],
    ) -> None:
        self._inner = inner
        self._until = until
        self._target = target
        self._metrics = metrics
        self._moved = moved
        self.caught = False

    def set_state(self, state: str, error: BaseException | None = None) -> None:
        self._inner.set_state(state, error)
        if state == "snapshotting":
            self._metrics.set_phase("snapshot")
        elif state == "streaming" and self._metrics.phase != "switching":
            self._metrics.set_phase("catching_up")

    def snapshot_progress(self, scanned: int, estimated_total: int | None) -> None:
        self._inner.snapshot_progress(scanned, estimated_total)
        self._metrics.snapshot_progress(scanned, estimated_total)

    def caught_up(self) -> None:
        self._inner.caught_up()
        self._moved()
        self._metrics.behind_since(None)
        self._done()

    def checkpointed(self, cluster_time: Timestamp | None) -> None:
        self._inner.checkpointed(cluster_time)
        self._moved()
        if cluster_time is not None and self._metrics.phase != "snapshot":
            self._metrics.behind_since(cluster_time.time)
        if self._target is not None and cluster_time is not None and cluster_time >= self._target:
            self._metrics.behind_since(None)
            self._done()

    def _done(self) -> None:
        self.caught = True
        self._until.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
