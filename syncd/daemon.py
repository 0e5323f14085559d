"""The long-running process: one thread per pipeline, signals, readiness, exit code.

SIGTERM and SIGINT stop reading; each pipeline finishes (or abandons) its in-flight
batch within ``shutdown_timeout_s`` and checkpoints only what was applied. SIGHUP
does not reload anything: it says so in the log. The first pipeline to fail fatally
stops the others, and its exit code becomes the process's.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType

from syncd.config import PipelineSettings, Settings
from syncd.errors import ExitCode, SyncdError
from syncd.notify import SystemdNotifier
from syncd.pipeline import Pipeline
from syncd.runtime import Runtime
from syncd.telemetry import Telemetry

log = logging.getLogger(__name__)


class Worker(threading.Thread):
    def __init__(self, pipeline: Pipeline, failed: threading.Event) -> None:
        super().__init__(name=f"pipeline-{pipeline.settings.name}", daemon=True)
        self.pipeline = pipeline
        self.failed = failed
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
        try:
            for ps in self.pipelines:
                pipeline = runtime.pipeline(ps, stop=self.stop, resync=self.resync)
                worker = Worker(pipeline, self.failed)
                pipeline._heartbeat = worker.beat
                workers.append(worker)
            for worker in workers:
                worker.start()
            log.info("syncd running %d pipeline(s)", len(workers))
            self.notifier.ready(f"running {len(workers)} pipeline(s)")
            self._supervise(workers)
            return self._finish(workers)
        finally:
            self.notifier.stopping()
            runtime.close()
            self.telemetry.shutdown()

    def _supervise(self, workers: list[Worker]) -> None:
        interval = self.notifier.watchdog_interval()
        ping_every = interval / 2 if interval else 1.0
        while not self.stop.is_set() and not self.failed.is_set():
            if all(not w.is_alive() for w in workers):
                return
            stale = [w for w in workers if w.is_alive() and time.monotonic() - w.last_beat > 60]
            if not stale:
                self.notifier.watchdog()
            self.stop.wait(min(ping_every, 1.0))

    def _finish(self, workers: list[Worker]) -> int:
        self.stop.set()
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
