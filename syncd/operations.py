"""One-shot operations behind CLI verbs that change state on purpose."""

from __future__ import annotations

import logging
import threading

from syncd import halts, hints
from syncd.config import PipelineSettings, Settings
from syncd.errors import ExitCode, HaltedError, PoisonError
from syncd.exclusive import exclusive
from syncd.runtime import Runtime

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
            cp = runtime.store.load(name)
            pipeline.checkpoint = cp
            if (
                cp is not None
                and cp.phase == "snapshot"
                and cp.fingerprint == pipeline.mapper.fingerprint
            ):
                cp.epoch = hold.epoch
                print(f"continuing the interrupted snapshot of {name}")
            else:
                cp = pipeline.progress.start_snapshot(reason="syncd snapshot")
            pipeline.progress.publish("snapshotting")  # `syncd status` stops showing the old error
            try:
                pipeline.snapshotter().run(cp)
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
