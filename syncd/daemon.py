"""The long-running process: one thread per pipeline, signals, readiness, exit code.

SIGTERM and SIGINT stop reading; each pipeline finishes (or abandons) its in-flight
batch within ``shutdown_timeout_s`` and checkpoints only what was applied. SIGHUP
does not reload anything: it says so in the log. The first pipeline to fail fatally
stops the others, and its exit code becomes the process's.

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
from collections.abc import Sequence
from types import FrameType

from syncd.config import PipelineSettings, Settings
from syncd.errors import ExitCode, LeaseLostError, SyncdError
from syncd.lease import FencedSink, LeaseManager, uses_leases
from syncd.notify import SystemdNotifier
from syncd.pipeline import Pipeline
from syncd.runtime import Runtime
from syncd.scheduler import LeasedPipelines
from syncd.telemetry import Telemetry

log = logging.getLogger(__name__)


class Worker(threading.Thread):
    def __init__(
        self, pipeline: Pipeline, failed: threading.Event, *, leased: bool = False
    ) -> None:
        super().__init__(name=f"pipeline-{pipeline.settings.name}", daemon=True)
        self.pipeline = pipeline
        self.failed = failed
        self.leased = leased
        self.error: BaseException | None = None
        self.last_beat = time.monotonic()

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def run(self) -> None:
        telemetry = self.pipeline.telemetry
        try:
            telemetry.set_state("starting")
            self.pipeline.run()
            telemetry.set_state("stopped")
        except BaseException as exc:  # noqa: BLE001 - recorded and re-raised as the exit code
            self.error = exc
            if self.leased and isinstance(exc, LeaseLostError):
                telemetry.set_state("stopped", exc)  # the lease scheduler takes it from here
                return
            telemetry.set_state("halted", exc)
            self.failed.set()


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        pipelines: Sequence[PipelineSettings],
        resync: bool = False,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.pipelines = list(pipelines)
        self.resync = resync
        self.telemetry = telemetry or Telemetry(settings)
        self.stop = threading.Event()
        self.failed = threading.Event()
        self.notifier = SystemdNotifier()

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
        self.telemetry.start()
        runtime = Runtime(self.settings, self.telemetry)
        workers: list[Worker] = []
        leased: LeasedPipelines[Worker] | None = None
        try:
            if uses_leases(self.settings):
                leased = self._leased_pipelines(runtime)
                log.info("syncd running up to %d pipeline(s) under leases", len(self.pipelines))
            else:
                for ps in self.pipelines:
                    pipeline = runtime.pipeline(ps, stop=self.stop, resync=self.resync, epoch=None)
                    worker = Worker(pipeline, self.failed)
                    pipeline._heartbeat = worker.beat
                    workers.append(worker)
                    self._start_sampler(runtime, pipeline)
                for worker in workers:
                    worker.start()
                log.info("syncd running %d pipeline(s)", len(workers))
            threading.Thread(
                target=self._watch_oplog_window, args=(runtime,), name="oplog-window", daemon=True
            ).start()
            self.notifier.ready(f"running {len(self.pipelines)} pipeline(s)")
            self._supervise(workers, leased)
            return self._finish(leased.workers if leased else workers)
        finally:
            if leased is not None:
                leased.close()
            self.notifier.stopping()
            runtime.close()
            self.telemetry.shutdown()

    def _leased_pipelines(self, runtime: Runtime) -> LeasedPipelines[Worker]:
        leases = LeaseManager(
            runtime.mongo, self.settings.checkpoint.database, self.settings.lease, runtime.store
        )

        def start(ps: PipelineSettings, epoch: int) -> Worker:
            pipeline = runtime.pipeline(ps, stop=threading.Event(), epoch=epoch, resync=self.resync)
            pipeline.sink = FencedSink(pipeline.sink, lambda: leases.check(ps.name))
            worker = Worker(pipeline, self.failed, leased=True)
            pipeline._heartbeat = worker.beat
            worker.start()
            self._start_sampler(runtime, pipeline)
            return worker

        return LeasedPipelines(leases, self.pipelines, start)

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

    def _start_sampler(self, runtime: Runtime, pipeline: Pipeline) -> None:
        """Verify a random sample now and then, and export the drift it finds."""
        every = self.settings.telemetry.verify_sample_every_s
        if every <= 0:
            return
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
                workers = list(leased.running.values())
            elif all(not w.is_alive() for w in workers):
                return
            stale = [w for w in workers if w.is_alive() and time.monotonic() - w.last_beat > 60]
            if not stale:
                self.notifier.watchdog()
            self.notifier.keep_status(self.telemetry.status_line())
            self.stop.wait(min(ping_every, 1.0))

    def _finish(self, workers: list[Worker]) -> int:
        self.stop.set()
        for worker in workers:
            worker.pipeline.stop.set()  # leased pipelines each have their own stop event
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        abandoned = [w.pipeline.settings.name for w in workers if w.is_alive()]
        if abandoned:
            log.warning(
                "shutdown deadline passed; abandoning in-flight work of %s (not checkpointed)",
                ", ".join(abandoned),
            )
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
