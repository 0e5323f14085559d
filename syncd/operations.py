"""One-shot operations behind CLI verbs that change state on purpose."""

from __future__ import annotations

import logging

from syncd.config import PipelineSettings, Settings
from syncd.errors import ExitCode
from syncd.runtime import Runtime
from syncd.snapshot import Snapshotter

log = logging.getLogger(__name__)


def snapshot(settings: Settings, pipeline_settings: PipelineSettings) -> int:
    """Re-copy one pipeline; continue an interrupted snapshot instead of restarting it."""
    runtime = Runtime(settings)
    try:
        pipeline = runtime.pipeline(pipeline_settings, resync=True)
        cp = runtime.store.load(pipeline_settings.name)
        resumable = (
            cp is not None
            and cp.phase == "snapshot"
            and cp.fingerprint == pipeline.mapper.fingerprint
        )
        if cp is not None and resumable:
            pipeline.checkpoint = cp
            print(f"continuing the interrupted snapshot of {pipeline_settings.name}")
        else:
            pipeline.checkpoint = cp
            cp = pipeline._start_snapshot(reason="syncd snapshot")
        Snapshotter(pipeline).run(cp)
        done = pipeline.checkpoint
        if done is None or done.phase != "streaming":
            print("snapshot interrupted; run the same command again to continue")
            return ExitCode.DRIFT_OR_FAILURE
        print(
            f"snapshot of {pipeline_settings.name} complete; `syncd run` streams from the "
            "position recorded before the scan"
        )
        return ExitCode.OK
    finally:
        runtime.close()
