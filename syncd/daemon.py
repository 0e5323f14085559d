"""The long-running process: one thread per pipeline, signals, readiness, exit code.

SIGTERM and SIGINT stop reading; each pipeline finishes (or abandons) its in-flight
batch within ``shutdown_timeout_s`` and checkpoints only what was applied. A process
that is draining takes no lease and starts no pipeline. SIGHUP does not reload
anything: it says so in the log.

A halt (a change that cannot be applied, under ``on_error = "halt"``) stops only its
pipeline: the worker keeps it halted and re-checks it (see :mod:`syncd.halts`) while
the other pipelines stream on. A fatal error (history lost, a dropped or renamed
collection under ``halt``, a changed mapping, rejected credentials, a fenced
checkpoint without leases) stops the process: the others drain, and its exit code
becomes the process's. Shared clients are closed only once every worker has stopped.

With leases (the default with the MongoDB checkpoint store), a pipeline runs only
while this process holds its lease (see :mod:`syncd.lease`). A pipeline whose lease
is lost stops alone, logs it, and is taken again later when its lease is free; the
process keeps running. Without leases each pipeline claims the stored epoch plus one
when it starts, and a fenced checkpoint write (a newer process or command took the
pipeline) stops the process with ExitCode.LEASE.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import FrameType

from syncd.autorebuild import Rebuilder, needs_rebuild
from syncd.checkpointing import refused_mapping
from syncd.config import PipelineSettings, Settings
from syncd.errors import ExitCode, HaltedError, LeaseLostError, PoisonError, SyncdError
from syncd.exclusive import Hold, lease_of
from syncd.halts import HeldPipeline, stopped_state
from syncd.lease import LeaseManager, uses_leases
from syncd.mapping import Mapper
from syncd.notify import SystemdNotifier
from syncd.pipeline import Pipeline
from syncd.runtime import Runtime
from syncd.scheduler import LeasedPipelines
from syncd.telemetry import PipelineTelemetry, Telemetry

log = logging.getLogger(__name__)

STALE_AFTER_S = 60.0  # a live worker silent this long stops the systemd watchdog pings


class Worker(threading.Thread):
    """Runs one pipeline until stopped; holds it while halted and runs it again after.

    ``build(worker)`` makes a fresh :class:`Pipeline` for each run, stopped by
    ``worker.stop``: a halted pipeline's parts are not reused once the halt is lifted.
    """

    def __init__(
        self,
        settings: PipelineSettings,
        build: Callable[[Worker], Pipeline],
        telemetry: PipelineTelemetry,
        failed: threading.Event,
        *,
        leased: bool = False,
        prepare: Callable[[Worker], bool] | None = None,
    ) -> None:
        """``prepare(worker)`` runs once before the pipeline (a rebuild it needs, see
        :mod:`syncd.autorebuild`); False: stopped before the pipeline could start."""
        super().__init__(name=f"pipeline-{settings.name}", daemon=True)
        self.settings = settings
        self.build = build
        self.prepare = prepare
        self.telemetry = telemetry
        self.failed = failed
        self.leased = leased
        self.stop = threading.Event()
        self.pipeline: Pipeline | None = None
        self.sampling = False  # the drift sampler runs for this worker
        self.error: BaseException | None = None
        self.last_beat = time.monotonic()

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def run(self) -> None:
        try:
            self.telemetry.set_state("starting")
            self._run()
            self.telemetry.set_state("stopped")
        except BaseException as exc:  # noqa: BLE001 - recorded and re-raised as the exit code
            self.error = exc
            if self.leased and isinstance(exc, LeaseLostError):
                self.telemetry.set_state("stopped", exc)  # the lease scheduler takes it from here
                return
            self.telemetry.set_state(stopped_state(exc), exc)
            self.failed.set()

    def _run(self) -> None:
        if self.prepare is not None and not self.prepare(self):
            return
        while not self.stop.is_set():
            self.beat()
            pipeline = self.build(self)
            self.pipeline = pipeline
            if self.stop.is_set():
                return  # asked to stop while it was being built: never start it
            try:
                pipeline.run()
                return
            except (HaltedError, PoisonError) as exc:
                self.telemetry.set_state("halted", exc)
                _close_stream(pipeline)
                if not HeldPipeline(pipeline, self.stop, self.beat).hold(exc):
                    return


def _close_stream(pipeline: Pipeline) -> None:
    """A halted pipeline reads nothing: let its cursor go (MongoDB may be what failed)."""
    try:
        pipeline.source.close()
    except SyncdError as exc:
        log.debug("could not close the change stream: %s", exc)


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        pipelines: Sequence[PipelineSettings],
        resync: bool = False,
        telemetry: Telemetry | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """``stop`` may already be set: a signal that arrived before the daemon existed."""
        self.settings = settings
        self.pipelines = list(pipelines)
        self.resync = resync
        self.telemetry = telemetry or Telemetry(settings)
        self.stop = stop or threading.Event()
        self.failed = threading.Event()
        self.notifier = SystemdNotifier()
        self._leases: LeaseManager | None = None
        # Pipelines this process has started with its mapping (past any rebuild): it
        # never rebuilds them again while it runs. One switched away from its mapping
        # meanwhile (another process's rebuild, a rollback) is waited for, not rebuilt
        # back, whoever holds its lease next (see switching.check_start).
        self._started: set[str] = set()
        self._made: list[Worker] = []  # every worker made, for the stop relay
        self._made_lock = threading.Lock()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            log.warning("SIGHUP received: syncd does not reload its configuration; restart it")
            return
        if not self.stop.is_set():
            log.info("%s received: draining", signal.Signals(signum).name)
        self.stop.set()

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        if self.stop.is_set():
            log.info("stop signal received while starting: exiting without starting pipelines")
            return ExitCode.OK
        threading.Thread(target=self._relay_stop, name="stop-relay", daemon=True).start()
        self.telemetry.start()
        runtime = Runtime(self.settings, self.telemetry)
        workers: list[Worker] = []
        leased: LeasedPipelines[Worker] | None = None

        def everyone() -> list[Worker]:
            return leased.workers if leased is not None else workers

        try:
            if uses_leases(self.settings):
                self._refuse_changed_mappings(runtime)
                leased = self._leased_pipelines(runtime)
                log.info("syncd running up to %d pipeline(s) under leases", len(self.pipelines))
            else:
                for ps in self.pipelines:
                    if self.stop.is_set():
                        break
                    worker = self._worker(runtime, ps)
                    worker.start()
                    workers.append(worker)
                log.info("syncd running %d pipeline(s)", len(workers))
            threading.Thread(
                target=self._watch_oplog_window, args=(runtime,), name="oplog-window", daemon=True
            ).start()
            self.notifier.ready(f"running {len(self.pipelines)} pipeline(s)")
            self._supervise(workers, leased)
        finally:
            self.stop.set()
            self.telemetry.draining()
            abandoned = self._drain(everyone())
            if leased is not None:
                leased.close()
            self.notifier.stopping()
            if abandoned:
                # Closing the MongoDB client under them would turn their abandoned work
                # into errors ("Cannot use MongoClient after close"); the process exits.
                log.info("leaving shared clients open for %d abandoned pipeline(s)", abandoned)
            else:
                runtime.close()
            self.telemetry.shutdown()
        return self._exit_code(everyone())

    def _worker(
        self,
        runtime: Runtime,
        ps: PipelineSettings,
        *,
        epoch: int | None = None,
        beside: bool = False,
    ) -> Worker:
        """``epoch``: of the lease this process took for the pipeline. ``beside``: the
        pipeline's lease is another process's; the worker rebuilds it beside that
        process and takes the lease when it switches (see :mod:`syncd.autorebuild`)."""
        leases = self._leases if epoch is not None or beside else None
        held: dict[str, int] = {} if epoch is None else {"epoch": epoch}

        def live() -> Hold:
            if "epoch" not in held:  # beside: fence out the process streaming the old mapping
                assert leases is not None
                taken = leases.acquire(ps.name, force=True)
                if taken is None:
                    raise LeaseLostError(
                        "could not take the pipeline's lease to switch", pipeline=ps.name
                    )
                held["epoch"] = taken
            assert leases is not None
            return Hold(ps.name, held["epoch"], lambda: leases.check(ps.name))

        def build(worker: Worker) -> Pipeline:
            pipeline = runtime.pipeline(
                ps,
                stop=worker.stop,
                epoch=held["epoch"] if leases is not None else None,
                resync=self.resync,
                heartbeat=worker.beat,
                fence=(lambda: leases.check(ps.name)) if leases is not None else None,
            )
            if not worker.sampling:
                worker.sampling = self._start_sampler(runtime, pipeline)
            return pipeline

        telemetry = self.telemetry.pipeline(ps.name)
        prepare = None
        if ps.on_mapping_change == "rebuild" and not self.resync:  # --resync: in place

            def prepare(worker: Worker) -> bool:
                if ps.name in self._started:
                    return True  # taken again after a fence: no rebuild (see _started)

                def beat() -> None:
                    worker.beat()
                    telemetry.heartbeat()

                rebuilder = Rebuilder(
                    runtime,
                    ps,
                    stop=worker.stop,
                    telemetry=telemetry,
                    heartbeat=beat,
                    live=live if leases is not None else None,
                    beside=beside,
                )
                # Beside another process, stream only once the switch took its lease.
                ready = rebuilder.run() and "epoch" in held if beside else rebuilder.run()
                if ready:
                    self._started.add(ps.name)
                return ready

        worker = Worker(
            ps, build, telemetry, self.failed, leased=leases is not None, prepare=prepare
        )
        with self._made_lock:
            self._made.append(worker)
        if self.stop.is_set():
            worker.stop.set()
        return worker

    def _relay_stop(self) -> None:
        """Pass a stop on to every worker at once: the main thread may be busy (reading
        the leases of a MongoDB that does not answer) when the signal comes, and a
        worker waiting out a backoff should not wait for it."""
        self.stop.wait()
        with self._made_lock:
            workers = list(self._made)
        for worker in workers:
            worker.stop.set()

    def _beside(self, runtime: Runtime, ps: PipelineSettings) -> Worker | None:
        """For a pipeline another process streams: a worker that rebuilds it beside that
        process, if its mapping changed and ``on_mapping_change = "rebuild"``."""
        if self.stop.is_set() or ps.on_mapping_change != "rebuild" or self.resync:
            return None
        if ps.name in self._started:
            return None  # streamed here with this mapping already: never rebuilt back
        try:
            if not needs_rebuild(runtime.store, ps.name, Mapper(ps).fingerprint):
                return None
        except SyncdError as exc:
            log.warning("cannot tell whether %s needs a rebuild: %s", ps.name, exc)
            return None
        log.info(
            "pipeline %s has another mapping than its lease's holder, %s: rebuilding it "
            "beside that process",
            ps.name,
            _holder(runtime, ps.name),
            extra={"pipeline": ps.name},
        )
        worker = self._worker(runtime, ps, beside=True)
        worker.start()
        return worker

    def _leased_pipelines(self, runtime: Runtime) -> LeasedPipelines[Worker]:
        self._leases = LeaseManager(
            runtime.mongo, self.settings.checkpoint.database, self.settings.lease, runtime.store
        )

        def start(ps: PipelineSettings, epoch: int) -> Worker | None:
            if self.stop.is_set():
                return None  # draining: the scheduler gives the lease back
            worker = self._worker(runtime, ps, epoch=epoch)
            worker.start()
            return worker

        return LeasedPipelines(
            self._leases,
            self.pipelines,
            start,
            stopping=self.stop.is_set,
            beside=lambda ps: self._beside(runtime, ps),
            on_lost=self._lease_lost,
        )

    def _refuse_changed_mappings(self, runtime: Runtime) -> None:
        """Stop before announcing this process for leases if it would refuse to run a
        pipeline (its mapping changed under ``on_mapping_change = "refuse"``): a replica
        started with a changed config must not be handed a pipeline a healthy process
        runs, only to stop it. What cannot be read now is left to the pipeline's start."""
        if self.resync:
            return
        for ps in self.pipelines:
            refusal = refused_mapping(runtime.store, ps, Mapper(ps).fingerprint)
            if refusal is not None:
                raise refusal

    def _lease_lost(self, name: str, why: str) -> None:
        """Not ready from now on, whenever its worker ends: this process may not write."""
        lost = LeaseLostError(f"stopping: {why}", pipeline=name)
        self.telemetry.pipeline(name).set_state("stopped", lost)

    def _watch_oplog_window(self, runtime: Runtime, every_s: float = 60.0) -> None:
        """Read where the oplog starts now and then, for the headroom metric."""
        from syncd.source import oplog_start

        readable = True
        while not self.stop.is_set():
            oldest = oplog_start(runtime.mongo)
            if oldest is None and readable:
                log.info("the oplog cannot be read here: oplog headroom is not reported")
            readable = oldest is not None
            self.telemetry.oplog_window(oldest)
            self.stop.wait(every_s)

    def _start_sampler(self, runtime: Runtime, pipeline: Pipeline) -> bool:
        """Verify a random sample now and then, and export the drift it finds."""
        every = self.settings.telemetry.verify_sample_every_s
        if every <= 0:
            return False
        from syncd.consistency import sample_forever

        threading.Thread(
            target=sample_forever,
            args=(pipeline, runtime.mongo[pipeline.settings.database]),
            kwargs={
                "every_s": every,
                "size": self.settings.telemetry.verify_sample_size,
                "stop": pipeline.stop,
            },
            name=f"verify-{pipeline.settings.name}",
            daemon=True,
        ).start()
        return True

    def _supervise(
        self, workers: list[Worker], leased: LeasedPipelines[Worker] | None = None
    ) -> None:
        interval = self.notifier.watchdog_interval()
        ping_every = interval / 2 if interval else 1.0
        if leased is not None:
            ping_every = min(ping_every, self.settings.lease.renew_every_s / 2)
        while not self.stop.is_set() and not self.failed.is_set():
            if leased is not None:
                leased.tick()
                # holding nothing after a round that read the leases is a standby
                self.telemetry.standby_ready(leased.blind)
                workers = list(leased.running.values())
            elif all(not w.is_alive() for w in workers):
                return
            now = time.monotonic()
            stale = [w for w in workers if w.is_alive() and now - w.last_beat > STALE_AFTER_S]
            if not stale:
                self.notifier.watchdog()
            self.notifier.keep_status(self.telemetry.status_line())
            self.stop.wait(min(ping_every, 1.0))

    def _drain(self, workers: list[Worker]) -> int:
        """Stop every worker and wait for them up to the deadline; how many are left."""
        for worker in workers:
            worker.stop.set()
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        abandoned = [w.settings.name for w in workers if w.is_alive()]
        if abandoned:
            log.warning(
                "shutdown deadline passed; abandoning in-flight work of %s (not checkpointed)",
                ", ".join(abandoned),
            )
        return len(abandoned)

    def _exit_code(self, workers: list[Worker]) -> int:
        errors = [w.error for w in workers if w.error is not None]
        if not errors:
            log.info("syncd stopped cleanly")
            return ExitCode.OK
        first = errors[0]
        for error in errors:
            log.error("pipeline stopped: %s", error)
        if isinstance(first, SyncdError):
            return int(first.exit_code)
        log.error("internal error", exc_info=first)
        return ExitCode.INTERNAL


def _holder(runtime: Runtime, name: str) -> str:
    """Who holds pipeline ``name``'s lease, for a log line: a live process, or one that
    stopped without giving it back (kill -9), whose lease expires on its own."""
    try:
        lease = lease_of(runtime, name)
    except SyncdError as exc:
        return f"another process, or one that stopped and left it (unread: {exc.message})"
    if lease is None or lease.expires_at is None:
        return "another process, or one that stopped and left it"
    left = max(0, round((lease.expires_at - datetime.now(UTC)).total_seconds()))
    return (
        f"{lease.owner}: another process, or one that stopped and left it (it expires in "
        f"{left} s unless renewed)"
    )
