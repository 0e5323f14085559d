"""The halt of a rebuild's build: at a document the new mapping cannot apply.

A build (``PIPELINE~rebuild``, see :mod:`syncd.rebuild`) that halts under ``on_error =
"halt"`` keeps its checkpoint where it halted. Its halt is recorded beside the
rebuild's record (``PIPELINE~switch``; no pipeline runs under that name, so no start
trips over it, see :func:`syncd.halts.check_on_start`) for `syncd status`: the
``_id``, reason, resume token and what to do. It holds while the build's checkpoint
stays where it halted; the build moving on, or starting over, ends it.

Who continues the build says what to do: a daemon that rebuilds by itself (see
:mod:`syncd.autorebuild`) tries again every ``halt_recheck_s``; ``syncd rebuild``
stops, and the same command run again continues (``command`` on the record).
"""

from __future__ import annotations

import logging

from syncd import halts, switching
from syncd.checkpoint import CheckpointStore
from syncd.config import PipelineSettings
from syncd.errors import SyncdError

log = logging.getLogger(__name__)


def build_halt(store: CheckpointStore, name: str) -> halts.Halt | None:
    """The halt of pipeline ``name``'s rebuild, while it holds: taken at the build's
    checkpoint as it is now, while the rebuild is building."""
    record = store.load(switching.record_name(name))
    if record is None or (record.rebuild or {}).get("state") != "building":
        return None
    return halts.holding(record.halt, store.load(switching.build_name(name)))


def record(
    store: CheckpointStore, ps: PipelineSettings, exc: SyncdError, *, command: str | None = None
) -> halts.Halt:
    """Record the build's halt ``exc`` of pipeline ``ps``'s rebuild (``command``: the
    `syncd rebuild` that halted; None: a daemon's rebuild). Found again at the same
    document by the next try, it is the same halt, since the same moment. Best effort,
    like any state recorded for `syncd status`: the halt is returned all the same."""
    name = ps.name
    halt = halts.new(ps, exc, None, rebuild=True, command=command)
    try:
        build = store.load(switching.build_name(name))
        halt = halts.new(ps, exc, build, rebuild=True, command=command)
        last = build_halt(store, name)
        if last is not None and last.key == halt.key:
            halt.since, halt.by = last.since, last.by
        if build is not None and store.load(switching.record_name(name)) is not None:
            store.set_halt(switching.record_name(name), halt.to_document())
    except SyncdError as err:
        log.warning("could not record the rebuild's halt: %s", err, extra={"pipeline": name})
    return halt
