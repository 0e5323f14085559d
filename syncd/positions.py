"""Where each pipeline stands, and moving it: the logic behind ``syncd tokens``.

Reading (:func:`decode`, :func:`show`, :func:`history`) never writes. Moving
(:func:`set_position`, :func:`reset`) holds the pipeline like a daemon would, with a
fresh epoch (:func:`syncd.exclusive.exclusive`): a live daemon holding the lease
makes it refuse, unless ``force``; forcing fences that daemon out (it stops the
pipeline and takes it again later, from the new position).

Every function returns plain JSON-ready data; the shapes are documented in
:mod:`syncd.cli.tokens`.
"""

from __future__ import annotations

import getpass
import socket
from datetime import UTC, datetime
from typing import Any

from bson.timestamp import Timestamp

from syncd import hints, switching
from syncd.checkpoint import Checkpoint
from syncd.errors import CheckpointCorruptError, ConfigError, HistoryLostError
from syncd.exclusive import exclusive, lease_of
from syncd.lease import LeaseInfo
from syncd.runtime import Runtime
from syncd.source import Position
from syncd.tokens import InvalidResumeToken, decode_resume_token, token_cluster_time


def operator() -> str:
    """``user@host`` of whoever runs the command, for the checkpoint history."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


# --- reading --------------------------------------------------------------------------


def decode(token: str) -> dict[str, Any]:
    """The decoded fields of a hex resume token; a ConfigError (exit 2) if it is not one."""
    try:
        decoded = decode_resume_token(token)
    except InvalidResumeToken as exc:
        # "token: X" reads like a credential to the redactor, which would mask the reason.
        raise ConfigError(str(exc).replace("resume token:", "resume token -")) from None
    return {"token": token.strip().upper(), **decoded.to_json()}


def show(runtime: Runtime, name: str | None = None) -> list[dict[str, Any]]:
    """Every configured or stored pipeline's position (or just ``name``'s)."""
    now = datetime.now(UTC)
    if name:
        if name.endswith(switching.RECORD_SUFFIX):
            refuse_internal(name, "shown")
        try:
            return [_describe(runtime, name, _load_known(runtime, name), now)]
        except CheckpointCorruptError as exc:
            return [_describe(runtime, name, None, now, unreadable=exc)]
    # A rebuild's record holds no position (`syncd status` shows it); its build's does.
    # A checkpoint that cannot be read is shown as such, between the others.
    unreadable: dict[str, CheckpointCorruptError] = {}
    stored = {cp.pipeline: cp for cp in runtime.store.list(unreadable=unreadable)}
    names = sorted(
        n
        for n in {p.name for p in runtime.settings.pipelines} | set(stored) | set(unreadable)
        if not n.endswith(switching.RECORD_SUFFIX)
    )
    return [_describe(runtime, n, stored.get(n), now, unreadable=unreadable.get(n)) for n in names]


def refuse_internal(name: str, doing: str) -> None:
    """A ConfigError for a name `syncd rebuild` keeps (``P~rebuild``, ``P~switch``):
    moving it by hand would desynchronise the rebuild from its record."""
    owner = switching.internal_owner(name)
    if owner is None:
        return
    pipeline, _ = owner
    what = (
        "the position of the collection `syncd rebuild` builds"
        if name == switching.build_name(pipeline)
        else "the record of `syncd rebuild`"
    )
    raise ConfigError(
        f"{name!r} is {what} for pipeline {pipeline!r}, not a pipeline; it is not {doing} by hand",
        hint=f"`{hints.command('rebuild', pipeline)}` continues the rebuild and "
        f"`{hints.command('status')}` shows it; "
        f"name {pipeline!r} to move the pipeline itself",
    )


def history(runtime: Runtime, name: str, limit: int = 20) -> dict[str, Any]:
    cp = _load_known(runtime, name)
    entries = cp.history[-limit:] if cp and limit > 0 else []
    return {"pipeline": name, "entries": [_history_entry(e) for e in entries]}


def _describe(
    runtime: Runtime,
    name: str,
    cp: Checkpoint | None,
    now: datetime,
    *,
    unreadable: CheckpointCorruptError | None = None,
) -> dict[str, Any]:
    lease = lease_of(runtime, name)
    owner = switching.internal_owner(name)
    out: dict[str, Any] = {
        "pipeline": name,
        "rebuild_of": owner[0] if owner else None,
        "configured": any(p.name == name for p in runtime.settings.pipelines),
        "stored": cp is not None,
        "phase": None,
        "position": None,
        "cluster_time": None,
        "wall_time": None,
        "age_s": None,
        "lag_s": None,
        "epoch": None,
        "updated_by": None,
        "snapshot": None,
        "lease": _lease_json(lease),
        "chroma_collection_id": None,
        "error": None,
    }
    if unreadable is not None:
        out["stored"] = True
        out["error"] = {"message": unreadable.message, "hint": unreadable.hint}
    if cp is None:
        return out
    wall = _aware(cp.wall_time)
    out.update(
        phase=cp.phase,
        position=_position(cp.token, cp.start_at, cp.token_is_invalidate),
        cluster_time=_ts(cp.cluster_time),
        wall_time=_iso(wall),
        age_s=round((now - wall).total_seconds(), 3) if wall else None,
        lag_s=round(now.timestamp() - cp.cluster_time.time, 3) if cp.cluster_time else None,
        epoch=cp.epoch,
        updated_by=cp.updated_by,
        chroma_collection_id=cp.chroma_collection_id,
    )
    if cp.snapshot is not None:
        out["snapshot"] = {
            "collection": cp.snapshot.collection,
            "scanned": cp.snapshot.scanned,
            "started_at": _iso(_aware(cp.snapshot.started_at)),
        }
    return out


def stored_position(cp: Checkpoint) -> dict[str, Any] | None:
    """Where a checkpoint resumes, as ``tokens show`` reports it (POSITION)."""
    return _position(cp.token, cp.start_at, cp.token_is_invalidate)


def position_text(position: dict[str, Any] | None) -> str:
    """``resume after highWaterMark at 1796131584.0 (2026-...Z)``: the token's own
    cluster time, which MongoDB resumes from."""
    if position is None:
        return "no position"
    if position["kind"] == "start_at":
        ts = position["start_at"]
        return f"start at {ts['t']}.{ts['i']} ({ts['iso']})"
    decoded = position["decoded"] or {}
    ts = decoded.get("clusterTime")
    when = f" at {ts['t']}.{ts['i']} ({ts['iso']})" if ts else ""
    after = "start after" if position["start_after"] else "resume after"
    return f"{after} {decoded.get('tokenType') or 'token'}{when}"


def _position(
    token: Any, start_at: Timestamp | None, start_after: bool = False
) -> dict[str, Any] | None:
    if token:
        data = token.get("_data") if isinstance(token, dict) else token
        try:
            decoded: dict[str, Any] | None = decode_resume_token(token).to_json()
        except InvalidResumeToken as exc:
            decoded = {"error": str(exc)}
        return {
            "kind": "token",
            "token": data if isinstance(data, str) else None,
            "start_after": start_after,
            "decoded": decoded,
            "start_at": None,
        }
    if start_at is not None:
        return {
            "kind": "start_at",
            "token": None,
            "start_after": False,
            "decoded": None,
            "start_at": _ts(start_at),
        }
    return None


def _history_entry(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "at": _iso(_aware(entry.get("at"))),
        "set_by": entry.get("set_by"),
        "reason": entry.get("reason"),
        "phase": entry.get("phase"),
        "cluster_time": _ts(entry.get("cluster_time")),
        "wall_time": _iso(_aware(entry.get("wall_time"))),
        "position": _position(entry.get("token"), entry.get("start_at")),
    }


# --- moving -------------------------------------------------------------------------------


def parse_at(text: str) -> Timestamp:
    """ISO-8601 (no offset means UTC) to the first cluster time of that second."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"--at {text!r} is not an ISO-8601 time", hint="e.g. 2024-05-01T12:00:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = int(moment.timestamp())  # floor: events earlier in that second replay too
    if not 0 < seconds < 2**32:
        raise ConfigError(f"--at {text!r}: cluster times run from 1970 to 2106")
    return Timestamp(seconds, 0)


def set_position(
    runtime: Runtime,
    name: str,
    *,
    token: str | None = None,
    at: Timestamp | None = None,
    force: bool = False,
    by: str | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Point the pipeline at ``token`` or at cluster time ``at``; recorded in history.

    ``at`` is stored as ``start_at`` (``startAtOperationTime``), which every MongoDB
    version honours and which replays every event at or after that time. A token is
    resumed after (``resumeAfter``; ``startAfter`` for an invalidate's token).
    """
    refuse_internal(name, "moved")
    if (token is None) == (at is None):
        raise ConfigError("give exactly one of --token and --at")
    decoded = decode(token) if token is not None else None
    by = by or operator()
    store = runtime.store
    command = command or hints.command("tokens", "set", name)
    _check_reachable(runtime, name, decoded, at)
    with exclusive(runtime, name, force=force, command=command, who="syncd-tokens") as hold:
        cp = store.load(name)
        previous = _position(cp.token, cp.start_at, cp.token_is_invalidate) if cp else None
        if cp is None:
            cp = _fresh(runtime, name)
        cp.phase, cp.snapshot = "streaming", None
        if token is not None and decoded is not None:
            cp.token = {"_data": decoded["token"]}
            cp.token_is_invalidate = bool(decoded["fromInvalidate"])
            cp.start_at = None
            cp.cluster_time = token_cluster_time(decoded["token"])
        else:
            cp.token, cp.token_is_invalidate = None, False
            cp.start_at = cp.cluster_time = at
        cp.epoch = hold.epoch
        cp.updated_by = by
        cp.wall_time = datetime.now(UTC)
        store.save(cp, history_reason=f"tokens set by {by}")
    return {
        "pipeline": name,
        "previous": previous,
        "position": _position(cp.token, cp.start_at, cp.token_is_invalidate),
        "cluster_time": _ts(cp.cluster_time),
        "epoch": cp.epoch,
        "set_by": by,
    }


def _check_reachable(
    runtime: Runtime, name: str, decoded: dict[str, Any] | None, at: Timestamp | None
) -> None:
    """Refuse a position MongoDB can no longer resume from (its oplog has moved past
    it): the pipeline would stop there with exit 3 at its next start."""
    if decoded is not None:
        data = {"_data": decoded["token"]}
        where = (
            Position(start_after=data) if decoded["fromInvalidate"] else Position(resume_after=data)
        )
    else:
        where = Position(start_at=at)
    try:
        runtime.source(runtime.settings.pipeline(name)).check_reachable(where)
    except HistoryLostError as exc:
        raise ConfigError(
            f"MongoDB can no longer resume pipeline {name!r} there: its oplog does not "
            "reach back that far",
            hint="pick a later --at time or token, or run "
            f"`{hints.command('snapshot', name)}` to copy every document again",
            pipeline=name,
        ) from exc


def reset(
    runtime: Runtime, name: str, *, force: bool = False, command: str | None = None
) -> dict[str, Any]:
    """Delete the checkpoint: the next run starts as a first run (a new snapshot).

    The fencing epoch survives the reset, so a daemon forced out cannot recreate the
    deleted checkpoint with its older epoch. An unreadable checkpoint is deleted too:
    starting over is what its error message suggests.
    """
    refuse_internal(name, "reset")
    store = runtime.store
    command = command or hints.command("tokens", "reset", name)
    hold = exclusive(
        runtime, name, force=force, command=command, who="syncd-tokens", unreadable_ok=True
    )
    with hold as held:
        try:
            existed = store.load(name) is not None
        except CheckpointCorruptError:
            existed = True
        if held.epoch:
            # One write: a daemon fenced out by this command, whose next write came
            # between a delete and the claim, would bring its old position back.
            store.clear(name, held.epoch)
        else:
            store.delete(name)
    return {"pipeline": name, "deleted": existed, "epoch": held.epoch}


def _fresh(runtime: Runtime, name: str) -> Checkpoint:
    from syncd.mapping import Mapper

    ps = runtime.settings.pipeline(name)
    return Checkpoint(pipeline=name, fingerprint=Mapper(ps).fingerprint)


def _load_known(runtime: Runtime, name: str) -> Checkpoint | None:
    cp = runtime.store.load(name)
    if cp is None:
        runtime.settings.pipeline(name)  # an unknown name is a ConfigError
    return cp


def _lease_json(lease: LeaseInfo | None) -> dict[str, Any] | None:
    if lease is None:
        return None
    return {
        "owner": lease.owner,
        "epoch": lease.epoch,
        "expires_at": _iso(lease.expires_at),
        "live": lease.live,
    }


# --- formatting helpers ----------------------------------------------------------------


def _aware(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ts(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, Timestamp):
        return None
    iso = datetime.fromtimestamp(value.time, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"t": value.time, "i": value.inc, "iso": iso}
