"""One-shot operations behind CLI verbs that change state on purpose."""

from __future__ import annotations

import logging
import threading

from syncd import hints
from syncd.config import PipelineSettings, Settings
from syncd.errors import ExitCode
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
            pipeline.snapshotter().run(cp)
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
