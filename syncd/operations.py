"""One-shot operations behind CLI verbs that change state on purpose."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from syncd import halts, hints
from syncd.config import PipelineSettings, Settings
from syncd.errors import (
    ExitCode,
    HaltedError,
    PoisonError,
    SinkFatalError,
    SourceFatalError,
    TransientError,
)
from syncd.exclusive import exclusive
from syncd.pipeline import backoff_waits
from syncd.runtime import Runtime

if TYPE_CHECKING:
    from syncd.checkpoint import Checkpoint
    from syncd.pipeline import Pipeline

log = logging.getLogger(__name__)


def snapshot(
    settings: Settings,
    pipeline_settings: PipelineSettings,
    *,
    force: bool = False,
    command: str | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Re-copy one pipeline; continue an interrupted snapshot instead of restarting it.

    The pipeline is held for the whole copy (:func:`syncd.exclusive.exclusive`): a fresh
    epoch fences older writers off, and a live daemon's lease makes it refuse unless
    ``force``. Setting ``stop`` ends the copy after the current batch, resumably.
    """
    name = pipeline_settings.name
    command = command or hints.command("snapshot", name)
    runtime = Runtime(settings)
    try:
        held = exclusive(runtime, name, force=force, command=command, who="syncd-snapshot")
        with held as hold:
            pipeline = runtime.pipeline(
                pipeline_settings, stop=stop, epoch=hold.epoch, resync=True, fence=hold.check
            )
            pipeline.sink.open()  # Chroma unreachable: say so before touching the checkpoint
            cp, continued = _begin(runtime, pipeline, name, hold.epoch)
            if continued:
                print(f"continuing the interrupted snapshot of {name}")
            pipeline.progress.publish("snapshotting")  # `syncd status` stops showing the old error
            try:
                _copy(runtime, pipeline, cp, ps=pipeline_settings, epoch=hold.epoch, stop=stop,
                      command=command)  # fmt: skip
            except (HaltedError, PoisonError) as exc:
                halted = _halted(pipeline_settings, exc, force=force)
                # `syncd status` says why the command stopped and what to run, not that
                # whatever recorded "snapshotting" vanished.
                pipeline.progress.publish("halted", halted)
                raise halted from exc
            except Exception as exc:
                pipeline.progress.publish("failed", exc)
                raise
            done = pipeline.checkpoint
            pipeline.progress.publish("stopped")
        if done is None or done.phase != "streaming":
            print(f"snapshot interrupted; run `{command}` again to continue")
            return ExitCode.DRIFT_OR_FAILURE
        print(
            f"snapshot of {name} complete; `{hints.command('run')}` streams from the "
            "position recorded before the scan"
        )
        return ExitCode.OK
    finally:
        runtime.close()


ONE_SHOT_OUTAGE_S = 60.0  # how long a one-shot copy rides out an outage when retry_deadline_s is 0


def _begin(runtime: Runtime, pipeline: Pipeline, name: str, epoch: int) -> tuple[Checkpoint, bool]:
    """The snapshot to run, and whether it is an interrupted one: made with this mapping,
    it continues after its last checkpointed page; else a new one starts."""
    cp = runtime.store.load(name)
    pipeline.checkpoint = cp
    if cp is not None and cp.phase == "snapshot" and cp.fingerprint == pipeline.mapper.fingerprint:
        cp.epoch = epoch
        return cp, True
    return pipeline.progress.start_snapshot(reason="syncd snapshot"), False


def _scanned(cp: Checkpoint | None) -> int:
    return cp.snapshot.scanned if cp is not None and cp.snapshot is not None else 0


def _copy(
    runtime: Runtime,
    pipeline: Pipeline,
    cp: Checkpoint,
    *,
    ps: PipelineSettings,
    epoch: int,
    stop: threading.Event | None,
    command: str,
) -> None:
    """Copy, riding out an outage of MongoDB, Chroma or the embedding API that begins
    once the copy has started (a restart, a failover, a connection reset): the copy is
    taken up again from its last checkpointed page, with backoff, for as long as
    ``retry_deadline_s`` allows (:data:`ONE_SHOT_OUTAGE_S` when that is 0, which only a
    daemon takes as forever). An outage is timed from its first failure; a page written
    since ends it. Past the deadline the error is raised, with the command to continue."""
    deadline = ps.retry_deadline_s or ONE_SHOT_OUTAGE_S
    waits = backoff_waits(ps.retry_max_backoff_s)
    since: float | None = None
    scanned = _scanned(cp)
    current: Checkpoint | None = cp
    while True:
        try:
            if current is None:
                pipeline.sink.open()
                stored = runtime.store.load(ps.name)
                if (
                    stored is not None
                    and stored.phase == "streaming"
                    and stored.fingerprint == pipeline.mapper.fingerprint
                ):  # its last save went in, though its answer did not come back
                    pipeline.checkpoint = stored
                    return
                current, _ = _begin(runtime, pipeline, ps.name, epoch)
                if _scanned(current) > scanned:  # a page went in before the failure
                    since, scanned = None, _scanned(current)
                    waits = backoff_waits(ps.retry_max_backoff_s)
            pipeline.snapshotter().run(current)
            return
        except TransientError as exc:
            now = time.monotonic()
            since = now if since is None else since
            if now - since > deadline:
                family = SinkFatalError if exc.exit_code == ExitCode.SINK else SourceFatalError
                raise family(
                    f"still failing after {deadline:.0f} s of retries: {exc.message}",
                    hint=f"once it answers again, run `{command}`: the copy continues after "
                    "its last checkpointed page",
                    pipeline=ps.name,
                ) from exc
            delay = min(exc.retry_after or next(waits), max(0.1, since + deadline - now))
            log.warning(
                "%s; retrying the snapshot in %.1f s (for up to %.0f s in all, then it stops "
                "and `%s` continues it)",
                exc.message, delay, deadline, command, extra={"pipeline": ps.name},
            )  # fmt: skip
            if stop is not None and stop.wait(delay):
                return  # interrupted: the caller says how to continue
            if stop is None:
                time.sleep(delay)
            current = None


def _halted(ps: PipelineSettings, exc: HaltedError | PoisonError, *, force: bool) -> HaltedError:
    """The scan stopped at a document it cannot apply (``on_error = "halt"``): its
    checkpoint stays before that page, so this command run again continues there."""
    again = hints.command("snapshot", ps.name, *(["--force"] if force else []))
    return HaltedError(
        exc.message,
        hint=halts.hint(ps, has_document=exc.document_id is not None, command=again),
        pipeline=ps.name,
        namespace=exc.namespace,
        document_id=exc.document_id,
    )
