"""`syncd tokens`: read, decode and move pipelines' resume positions.

Sub-commands: ``decode HEX``, ``show [PIPELINE]``, ``history PIPELINE``,
``set PIPELINE (--token HEX | --at ISO-8601)`` and ``reset PIPELINE``. The logic lives
in :mod:`syncd.positions`; this module parses, asks for confirmation and prints.

JSON output (``--json``) is stable: keys are always present (null when unknown) and
new keys may be added, never renamed. The README documents these shapes for users
(keep the two alike). Shared shapes:

* ``TIME``: ``{"t": seconds, "i": increment, "iso": "2024-05-01T12:00:00Z"}``, a
  MongoDB cluster time;
* ``DECODED``: ``{"clusterTime": TIME, "version": 0|1|2, "tokenType": "event" |
  "highWaterMark" | null, "txnOpIndex": int, "fromInvalidate": bool, "uuid": str |
  null, "documentKey": extended JSON | null, "eventIdentifier": extended JSON | null,
  "fragmentNum": int | null}``;
* ``POSITION``: ``{"kind": "token" | "start_at", "token": HEX | null, "start_after":
  bool, "decoded": DECODED | null, "start_at": TIME | null}`` (``start_after``: the
  token ends an invalidated stream and is resumed with ``startAfter``);
* ``LEASE``: ``{"owner": "host:pid:uuid", "epoch": int, "expires_at": ISO | null,
  "live": bool}`` (liveness by the MongoDB server's clock).

``decode HEX --json`` prints ``{"token": HEX, ...DECODED}``.

``show --json`` prints ``{"pipelines": [ENTRY, ...]}``, one entry per configured or
stored pipeline (and per `syncd rebuild` under way, whose build's position is stored as
``PIPELINE~rebuild``): ``{"pipeline": str, "rebuild_of": PIPELINE | null (set for a
rebuild's build, which is not a pipeline), "configured": bool, "stored": bool, "phase":
"snapshot" | "streaming" | null, "position": POSITION | null, "cluster_time": TIME |
null, "wall_time": ISO | null (when the checkpoint was written), "age_s": float | null
(now - wall_time), "lag_s": float | null (now - cluster time), "epoch": int | null,
"updated_by": str | null, "snapshot": {"collection", "scanned", "started_at"} | null,
"lease": LEASE | null, "chroma_collection_id": str | null (the Chroma collection the
checkpoint describes), "error": {"message": str, "hint": str | null} | null (set when the
stored checkpoint cannot be read; the position keys are then null)}``. Exit 1 when a
checkpoint cannot be read (the others are still shown).

``history PIPELINE --json`` prints ``{"pipeline": str, "entries": [{"at": ISO,
"set_by": str, "reason": str, "phase": str, "cluster_time": TIME | null, "wall_time":
ISO | null, "position": POSITION | null}, ...]}``, oldest first, the last ``--limit``.

``set --json`` prints ``{"pipeline": str, "previous": POSITION | null, "position":
POSITION, "cluster_time": TIME, "epoch": int, "set_by": "user@host"}``; ``reset
--json`` prints ``{"pipeline": str, "deleted": bool, "epoch": int}``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from syncd import hints
from syncd.cli.common import (
    add_config_options,
    config_file,
    load_settings,
    print_json,
    whole_number,
)
from syncd.errors import ConfigError, ExitCode


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "tokens",
        help="show, decode and move pipelines' resume positions",
        description="Inspect where each pipeline stands in the MongoDB change stream, rewind "
        "or skip it to a token or a time, or reset it to re-snapshot.",
    )
    add_config_options(parser)  # `syncd tokens -c FILE show` as well as `... show -c FILE`
    subs = parser.add_subparsers(dest="tokens_command", metavar="SUBCOMMAND", required=True)

    decode = subs.add_parser("decode", help="decode a resume token (no config needed)")
    decode.add_argument("token", metavar="HEX", help="the token's _data, as hex")
    _config_options(decode)  # accepted like every command's, though decode reads no config
    _json_option(decode)
    decode.set_defaults(handler=_decode)

    show = subs.add_parser("show", help="each pipeline's stored position, lag and lease")
    _config_options(show)
    show.add_argument("pipeline", metavar="PIPELINE", nargs="?")
    _json_option(show)
    show.set_defaults(handler=_show)

    history = subs.add_parser("history", help="past positions and who set them")
    _config_options(history)
    history.add_argument("pipeline", metavar="PIPELINE")
    history.add_argument(
        "--limit", "-n", type=whole_number(1), default=20, help="entries (default 20)"
    )
    _json_option(history)
    history.set_defaults(handler=_history)

    move = subs.add_parser(
        "set",
        help="rewind or skip a pipeline to a token or a time",
        description="Point PIPELINE at a resume token or a cluster time. With --at, every "
        "change at or after that second is replayed (idempotent). Refused while a live "
        "daemon holds the pipeline's lease unless --force.",
    )
    _config_options(move)
    move.add_argument("pipeline", metavar="PIPELINE")
    where = move.add_mutually_exclusive_group(required=True)
    where.add_argument("--token", metavar="HEX", help="resume after this token")
    where.add_argument("--at", metavar="ISO-8601", help="start at this time (UTC if no offset)")
    _change_options(move)
    move.set_defaults(handler=_set)

    reset = subs.add_parser(
        "reset",
        help="delete a pipeline's checkpoint so its next run re-snapshots",
        description="Delete PIPELINE's checkpoint (and its history). The next run copies "
        "every document again, then streams.",
    )
    _config_options(reset)
    reset.add_argument("pipeline", metavar="PIPELINE")
    _change_options(reset)
    reset.set_defaults(handler=_reset)


def _config_options(parser: argparse.ArgumentParser) -> None:
    """The shared config options again, after the sub-command.

    Their defaults are suppressed so that a value given before the sub-command is not
    overwritten by the sub-command's default.
    """
    group = parser.add_argument_group("configuration")
    group.add_argument(
        "--config", "-c", type=config_file, default=argparse.SUPPRESS, help="TOML config file"
    )
    group.add_argument("--log-format", choices=["text", "json"], default=argparse.SUPPRESS)
    group.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default=argparse.SUPPRESS
    )


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help='print JSON (its shape: README, "Operating: tokens")'
    )


def _change_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    parser.add_argument(
        "--force",
        action="store_true",
        help="proceed even while a live daemon holds the pipeline (it is fenced out)",
    )
    _json_option(parser)


# --- handlers ---------------------------------------------------------------------------


def _decode(args: argparse.Namespace) -> int:
    from syncd import positions

    data = positions.decode(args.token)
    if args.json:
        print_json(data)
    else:
        print(_decoded_text(data))
    return ExitCode.OK


def _show(args: argparse.Namespace) -> int:
    from syncd import positions

    entries = _with_runtime(args, lambda rt: positions.show(rt, args.pipeline))
    if args.json:
        print_json({"pipelines": entries})
    else:
        print("\n\n".join(_entry_text(e) for e in entries) or "no pipelines")
    unreadable = any(e["error"] for e in entries)
    return ExitCode.DRIFT_OR_FAILURE if unreadable else ExitCode.OK


def _history(args: argparse.Namespace) -> int:
    from syncd import positions

    data = _with_runtime(args, lambda rt: positions.history(rt, args.pipeline, args.limit))
    if args.json:
        print_json(data)
        return ExitCode.OK
    if not data["entries"]:
        print(f"{args.pipeline}: no history")
    for entry in data["entries"]:
        where = _position_text(entry["position"])
        print(f"{entry['at']}  {entry['phase'] or '-':9}  {where}")
        print(f"    {entry['reason']} (by {entry['set_by']})")
    return ExitCode.OK


def _set(args: argparse.Namespace) -> int:
    from syncd import positions
    from syncd.exclusive import ensure_free

    hints.use_config(args.config)  # the refusal's hint names the file, as others do
    positions.refuse_internal(args.pipeline, "moved")
    at = positions.parse_at(args.at) if args.at else None
    if args.token:
        positions.decode(args.token)  # refuse garbage before asking anything
    target = f"token {args.token}" if args.token else f"{args.at} (replays changes from then)"

    def run(rt: Any) -> dict[str, Any]:
        rt.settings.pipeline(args.pipeline)  # an unknown name: say so before asking
        command = _confirmed_again()
        ensure_free(rt, args.pipeline, force=args.force, command=command)
        _confirm(args, f"Move pipeline {args.pipeline!r} to {target}?")
        return positions.set_position(
            rt, args.pipeline, token=args.token, at=at, force=args.force, command=command
        )

    data = _with_runtime(args, run)
    if args.json:
        print_json(data)
    else:
        print(f"{args.pipeline}: was {_position_text(data['previous'])}")
        print(f"{args.pipeline}: now {_position_text(data['position'])} (epoch {data['epoch']})")
        print(f"the next `{hints.command('run')}` of this pipeline resumes there")
    return ExitCode.OK


def _reset(args: argparse.Namespace) -> int:
    from syncd import positions
    from syncd.exclusive import ensure_free

    hints.use_config(args.config)  # the refusal's hint names the file, as others do
    positions.refuse_internal(args.pipeline, "reset")

    def run(rt: Any) -> dict[str, Any]:
        rt.settings.pipeline(args.pipeline)  # an unknown name: say so before asking
        command = _confirmed_again()
        ensure_free(rt, args.pipeline, force=args.force, command=command)
        _confirm(args, f"Delete the checkpoint of {args.pipeline!r}? Its next run re-snapshots.")
        return positions.reset(rt, args.pipeline, force=args.force, command=command)

    data = _with_runtime(args, run)
    if args.json:
        print_json(data)
    elif data["deleted"]:
        print(f"{args.pipeline}: checkpoint deleted; the next run copies every document again")
    else:
        print(f"{args.pipeline}: there was no checkpoint; the next run starts with a snapshot")
    return ExitCode.OK


# --- helpers ------------------------------------------------------------------------------


def _with_runtime(args: argparse.Namespace, work: Callable[[Any], Any]) -> Any:
    from syncd.runtime import Runtime

    # A config file is required, as by every verb that works on pipelines: without one,
    # the default mongodb.uri would be asked for stored pipelines it most likely lacks.
    runtime = Runtime(load_settings(args))
    try:
        return work(runtime)
    finally:
        runtime.close()


def _confirmed_again() -> str:
    """This command as a hint names it (with --force added, to fence a daemon out): with
    --yes, so that it runs as printed where stdin is no terminal to confirm at."""
    return hints.with_flags(hints.again(), "--yes")


def _confirm(args: argparse.Namespace, question: str) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise ConfigError(
            "refusing to change a pipeline's position without confirmation: stdin is not a "
            "terminal",
            hint="pass --yes to confirm",
        )
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise ConfigError("not confirmed; nothing changed")


def _decoded_text(data: dict[str, Any]) -> str:
    ts = data["clusterTime"]
    lines = [
        f"cluster time    {ts['t']}.{ts['i']}  ({ts['iso']})",
        f"version         {data['version']}",
        f"type            {data['tokenType'] or '-'}",
        f"txnOpIndex      {data['txnOpIndex']}",
        f"fromInvalidate  {str(data['fromInvalidate']).lower()}",
        f"uuid            {data['uuid'] or '-'}",
        f"documentKey     {_compact(data['documentKey'])}",
    ]
    if data["eventIdentifier"] is not None:
        lines.append(f"eventIdentifier {_compact(data['eventIdentifier'])}")
    if data["fragmentNum"] is not None:
        lines.append(f"fragmentNum     {data['fragmentNum']}")
    return "\n".join(lines)


def _compact(value: Any) -> str:
    import json

    return "-" if value is None else json.dumps(value, separators=(", ", ": "))


def _position_text(position: dict[str, Any] | None) -> str:
    from syncd.positions import position_text

    return position_text(position)


def _entry_text(entry: dict[str, Any]) -> str:
    name = entry["pipeline"]
    if entry["error"]:
        lines = [f"{name}: {entry['error']['message']}"]
        if entry["error"]["hint"]:
            lines.append(f"  what to do  {entry['error']['hint']}")
    elif not entry["stored"]:
        lines = [f"{name}: no checkpoint (the next run starts with a snapshot)"]
    else:
        lines = [
            f"{name}: {entry['phase']}, epoch {entry['epoch']}, written by {entry['updated_by']}",
            f"  position  {_position_text(entry['position'])}",
            f"  written   {entry['wall_time'] or '-'} ({_seconds(entry['age_s'])} ago)",
            f"  lag       {_seconds(entry['lag_s'])} behind now",
        ]
        if entry["position"] and entry["position"]["token"]:
            lines.append(f"  token     {entry['position']['token']}")
        lines.append(f"  chroma    collection id {entry['chroma_collection_id'] or 'not recorded'}")
        if entry["snapshot"]:
            snap = entry["snapshot"]
            lines.append(f"  snapshot  {snap['scanned']} documents scanned so far")
    lease = entry["lease"]
    if lease:
        state = "live" if lease["live"] else "expired"
        lines.append(f"  lease     {lease['owner']}, epoch {lease['epoch']}, {state}")
    if entry["rebuild_of"]:
        pipeline = entry["rebuild_of"]
        lines.append(
            f"  (not a pipeline: the new collection `{hints.command('rebuild', pipeline)}` "
            f"builds; `{hints.command('status')}` shows the rebuild)"
        )
    elif not entry["configured"]:
        lines.append("  (not in the config file)")
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"
