"""What each pipeline is doing, from what the daemon leaves behind.

The daemon records its state (streaming, snapshotting, retrying, halted, failed,
stopped) with the last error next to the checkpoint: ``failed`` when a fatal error
stopped the pipeline and its process. A halt in force (see :mod:`syncd.halts`) is
recorded there too and wins over the last state written. The position, lag and
dead-letter count come from the checkpoint store, MongoDB and the dead-letter store.
Nothing here needs the daemon to be running, so `syncd status` also explains why it
stopped.

A process that stops without recording why (killed, out of memory, or MongoDB
unreachable when it gave up, so its ``failed`` could not be written) leaves its last
running state behind. With leases, its lease then expires: a running state whose
pipeline has no live lease is shown as ``down``, with the state it recorded.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from bson.timestamp import Timestamp

from syncd import halts, hints, positions, switching
from syncd.checkpoint import Checkpoint
from syncd.config import PipelineSettings
from syncd.errors import CheckpointCorruptError, SyncdError
from syncd.lease import lease_info, leases_collection, uses_leases
from syncd.rebuild_halts import build_halt
from syncd.runtime import Runtime
from syncd.source import position_of

# States a process records while it runs the pipeline (and holds its lease).
RUNNING_STATES = frozenset({"starting", "snapshotting", "streaming", "retrying", "rebuilding"})


def collect(runtime: Runtime, pipelines: Sequence[PipelineSettings]) -> list[dict[str, Any]]:
    server_time = _server_time(runtime, pipelines)
    return [describe(runtime, ps, server_time) for ps in pipelines]


def describe(
    runtime: Runtime, ps: PipelineSettings, server_time: Timestamp | None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "pipeline": ps.name,
        "namespace": ps.namespace,
        "chroma_collection": ps.chroma_collection_name,
        "on_error": ps.on_error,
        "consistency": ps.consistency,
    }
    try:
        cp = runtime.store.load(ps.name)
    except CheckpointCorruptError as exc:
        # `syncd run` stops at it (exit 4) until the hint is followed: failed, not unknown.
        out["state"] = "failed"
        out["last_error"] = {
            "error_class": type(exc).__name__,
            "error": exc.message,
            **({"hint": exc.hint} if exc.hint else {}),
        }
        out["dead_letters"] = runtime.dead_letters(ps).count(ps.name)
        return out
    if cp is None:
        out["state"] = "never run"
        out["dead_letters"] = runtime.dead_letters(ps).count(ps.name)
        return out
    status = dict(cp.status or {})
    # A checkpoint with no state yet: its process is starting (opening Chroma, say).
    out["state"] = status.get("state", "starting")
    down = _down(runtime, ps, out["state"])
    if down is not None:
        out["state"] = "down"
        out["down"] = down
    if "updated_at" in status:
        out["state_since"] = _iso(status["updated_at"])
        out["state_age_s"] = _age(status["updated_at"])
    if status.get("by"):
        out["process"] = status["by"]
    out["phase"] = cp.phase
    if cp.phase == "snapshot" and cp.snapshot is not None:
        out["snapshot_scanned"] = cp.snapshot.scanned
    out.update(_position(cp))
    lag = _lag(runtime, ps, cp, server_time)
    if lag is not None:
        out["lag_s"] = lag
    if cp.wall_time is not None:
        out["checkpoint_age_s"] = _age(cp.wall_time)
    out["dead_letters"] = runtime.dead_letters(ps).count(ps.name)
    rebuild = _rebuild(runtime, ps, server_time)
    built = build_halt(runtime.store, ps.name)
    if rebuild is not None:
        out["rebuild"] = rebuild
        if built is not None and built.command is not None:
            # `syncd rebuild` halted: its build, not the pipeline, which streams on.
            rebuild["halt"] = built.describe()
    halt = _halt(cp, built)
    if halt is not None:
        out["state"] = "halted"
        out["halt"] = halt
    if status.get("error"):
        out["last_error"] = {
            key: status[key]
            for key in ("error_class", "error", "document_id", "namespace", "hint")
            if status.get(key) is not None
        }
    return out


def _down(runtime: Runtime, ps: PipelineSettings, state: str) -> dict[str, Any] | None:
    """What says that the process which recorded a running ``state`` is gone: no live
    lease holds the pipeline. None when one does, or nothing can tell (no leases:
    the file checkpoint store or ``lease.enabled = false``; the leases unreadable)."""
    if state not in RUNNING_STATES or not uses_leases(runtime.settings):
        return None
    try:
        coll = leases_collection(runtime.mongo, runtime.settings.checkpoint.database)
        lease = lease_info(coll, ps.name)
    except SyncdError:
        return None
    if lease is not None and lease.live:
        return None
    out: dict[str, Any] = {
        "recorded_state": state,
        "reason": "no process holds the pipeline's lease, so nothing runs it: the process "
        f"that recorded {state!r} stopped without recording why (killed, out of memory, "
        "or MongoDB unreachable when it gave up), or lost its lease while MongoDB was "
        "unreachable and has not taken it back yet",
        "hint": "if it is not running again within lease.renew_every_s, see that "
        "process's log for why it stopped (journalctl -u syncd, kubectl logs), then start "
        f"it again: `{hints.command('run')}`",
    }
    if lease is not None and lease.expires_at is not None:
        out["lease_expired_at"] = _iso(lease.expires_at)
        out["lease_expired_age_s"] = _age(lease.expires_at)
    return out


def _halt(cp: Checkpoint, built: halts.Halt | None) -> dict[str, Any] | None:
    """The halt in force: the pipeline's, or that of the rebuild a daemon runs for it
    (``built``: of a rebuild's build), which holds the pipeline meanwhile."""
    halt = halts.active(cp)
    if halt is not None:
        return halt.describe()
    if built is None or built.command is not None:
        return None
    return dict(built.describe(), rebuild=True)


def _position(cp: Checkpoint) -> dict[str, Any]:
    """Where the pipeline resumes, as ``syncd tokens show`` says it: the stored token's
    own cluster time (a high-water mark at T reads T.0), and ``applied_through``, the
    latest cluster time whose changes are in Chroma (for that mark, the last increment of
    the second before: T-1.4294967295, i.e. every change before T)."""
    out: dict[str, Any] = {}
    stored = positions.stored_position(cp)
    decoded = (stored or {}).get("decoded") or {}
    ts = (stored or {}).get("start_at") or decoded.get("clusterTime")
    if stored is not None and ts is not None:
        out["position"] = f"{ts['t']}.{ts['i']}"
        out["position_type"] = "start_at" if stored["kind"] == "start_at" else decoded["tokenType"]
        out["position_text"] = positions.position_text(stored)
        out["position_time"] = _iso(datetime.fromtimestamp(ts["t"], UTC))
    if cp.cluster_time is not None:
        out["applied_through"] = format_timestamp(cp.cluster_time)
        out.setdefault("position", out["applied_through"])
        out.setdefault("position_time", _iso(datetime.fromtimestamp(cp.cluster_time.time, UTC)))
    return out


def _rebuild(
    runtime: Runtime, ps: PipelineSettings, server_time: Timestamp | None
) -> dict[str, Any] | None:
    """A `syncd rebuild` under way or switched (see :mod:`syncd.switching`)."""
    record = switching.load_record(runtime.store, ps.name)
    if not record:
        return None
    out: dict[str, Any] = {"state": record.get("state", "unknown")}
    if record.get("state") in ("building", "switching"):
        out["collection"] = record.get("target")
        build = runtime.store.load(switching.build_name(ps.name))
        if build is None:
            out["phase"] = "starting"
        else:
            out["phase"] = build.phase
            if build.phase == "snapshot" and build.snapshot is not None:
                out["snapshot_scanned"] = build.snapshot.scanned
            if build.cluster_time is not None:
                out["position"] = format_timestamp(build.cluster_time)
            lag = _lag(runtime, ps, build, server_time) if build.phase == "streaming" else None
            if lag is not None:
                out["lag_s"] = lag
        if record.get("to_embed"):
            out["to_embed"] = record["to_embed"]
    previous = record.get("previous")
    if previous:
        out["previous_collection"] = previous.get("name")
    return out


def format_timestamp(ts: Timestamp) -> str:
    return f"{ts.time}.{ts.inc}"


def _lag(
    runtime: Runtime, ps: PipelineSettings, cp: Checkpoint, server_time: Timestamp | None
) -> int | None:
    """Seconds the oldest change not yet applied has waited, 0 when there is none (as
    ``syncd_lag_seconds``); None when MongoDB cannot say. A quiet pipeline's position
    moves only at its idle checkpoints, so its distance to the server's time is not a
    lag."""
    if server_time is None:
        return None
    try:
        pending = runtime.source(ps).first_pending(position_of(cp))
    except SyncdError:
        return None
    return 0 if pending is None else max(0, server_time.time - pending.time)


def _server_time(runtime: Runtime, pipelines: Sequence[PipelineSettings]) -> Timestamp | None:
    """MongoDB's latest operation time, to measure lag against; None if unreachable."""
    if not pipelines:
        return None
    try:
        value = runtime.source(pipelines[0]).server_time()
    except SyncdError:
        return None
    return value if isinstance(value, Timestamp) else None


def _age(moment: datetime) -> float:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(max(0.0, time.time() - moment.timestamp()), 1)


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
