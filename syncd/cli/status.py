"""`syncd status`: each pipeline's state, position, lag, last error and dead letters."""

from __future__ import annotations

import argparse
from typing import Any

from syncd.cli.common import add_config_options, load_settings, print_json, select_pipelines
from syncd.errors import ExitCode

# Stopped until someone acts: a halt in force, or a fatal error that stopped the process.
# Down: a running state is recorded, but no process holds the pipeline's lease.
STOPPED_BY_ERROR = frozenset({"halted", "failed", "down"})


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "status",
        help="show each pipeline's state, position, lag and last error",
        description="Read what the daemon recorded next to each checkpoint: its state "
        "(starting, snapshotting, streaming, retrying, halted: at a change it cannot "
        "apply, failed: a fatal error stopped it and its process, stopped, rebuilding: a changed "
        "mapping is built beside the live collection, down: with leases, a running state "
        "is recorded but no process holds the pipeline's lease: its process stopped "
        "without recording why, or lost the lease while MongoDB was unreachable and has "
        "not taken it back yet), a halt in force "
        "(the pipeline's, or one of the rebuild `syncd run` runs for it under "
        'on_mapping_change = "rebuild"; a halted `syncd rebuild` is shown with the rebuild) '
        "with the document, reason, resume token and what to do, the last error and what to "
        "run next, the checkpoint position and age, the lag behind MongoDB and the number of "
        "dead letters. Works whether or not the daemon runs. A pipeline whose stored "
        "checkpoint cannot be read is failed, with the reason and what to run. Exit 1 when a "
        "pipeline or its `syncd rebuild` is halted, or a pipeline failed or is down.",
    )
    add_config_options(parser)
    parser.add_argument("pipelines", nargs="*", metavar="PIPELINE", help="default: all")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    from syncd.runtime import Runtime
    from syncd.status import collect

    pipelines = select_pipelines(settings, args.pipelines)
    runtime = Runtime(settings)
    try:
        rows = collect(runtime, pipelines)
    finally:
        runtime.close()
    if args.json:
        print_json(rows)
    else:
        for row in rows:
            _print(row)
    stuck = any(
        row["state"] in STOPPED_BY_ERROR or (row.get("rebuild") or {}).get("halt") for row in rows
    )
    return ExitCode.DRIFT_OR_FAILURE if stuck else ExitCode.OK


def _print(row: dict[str, Any]) -> None:
    print(f"{row['pipeline']}: {row['state']}  ({row['namespace']} -> {row['chroma_collection']})")
    if "state_age_s" in row:
        by = row.get("process", "?")
        print(f"  since          {row['state_since']} ({_ago(row['state_age_s'])}, {by})")
    if "position" in row:
        age = f", checkpointed {_ago(row['checkpoint_age_s'])}" if "checkpoint_age_s" in row else ""
        where = (
            row.get("position_text") or f"cluster time {row['position']} ({row['position_time']})"
        )
        print(f"  position       {where}{age}")
    elif row.get("phase") == "snapshot":
        copied = row.get("snapshot_scanned", 0)
        print(f"  position       snapshot in progress, {copied} documents checkpointed")
    if "lag_s" in row:
        print(f"  lag            {row['lag_s']} s behind MongoDB")
    print(f"  dead letters   {row['dead_letters']}")
    rebuild = row.get("rebuild")
    if rebuild:
        print(f"  rebuild        {_rebuild_line(rebuild)}")
        if rebuild.get("halt"):  # `syncd rebuild` halted; the pipeline is not held
            _print_halt(rebuild["halt"], in_rebuild=True)
    halt = row.get("halt")
    if halt:
        _print_halt(halt, in_rebuild=bool(halt.get("rebuild")))
        return
    down = row.get("down")
    if down:
        expired = down.get("lease_expired_at")
        when = f", lease expired {expired} ({_ago(down['lease_expired_age_s'])})" if expired else ""
        print(f"  recorded       {down['recorded_state']}{when}")
        print(f"  reason         {down['reason']}")
        print(f"  what to do     {down['hint']}")
    error = row.get("last_error")
    if error:
        where = f" (_id {error['document_id']})" if "document_id" in error else ""
        print(f"  last error     {error.get('error_class', '')}: {error.get('error', '')}{where}")
        if "hint" in error:
            print(f"  what to do     {error['hint']}")


def _print_halt(halt: dict[str, Any], *, in_rebuild: bool) -> None:
    where = _where(halt) + (", in its rebuild," if in_rebuild else "")
    print(f"  halted at      {where} since {halt['since']} ({halt['by']})")
    print(f"  reason         {halt['error_class']}: {halt['reason']}")
    if "resume_token" in halt:
        print(f"  resume token   {halt['resume_token']}")
    print(f"  what to do     {halt['hint']}")


def _rebuild_line(rebuild: dict[str, Any]) -> str:
    parts = [str(rebuild["state"])]
    if rebuild.get("collection"):
        parts.append(f"into {rebuild['collection']} ({rebuild.get('phase', '?')})")
    if "snapshot_scanned" in rebuild:
        parts.append(f"{rebuild['snapshot_scanned']} documents checkpointed")
    if "lag_s" in rebuild:
        parts.append(f"{rebuild['lag_s']} s behind MongoDB")
    if rebuild.get("to_embed"):
        guess = rebuild["to_embed"]
        tokens = guess.get("tokens_estimate")
        more = f", about {tokens} tokens (estimated)" if tokens is not None else ""
        parts.append(f"embedding about {guess['texts']} texts{more}")
    if rebuild.get("previous_collection"):
        parts.append(f"previous collection kept as {rebuild['previous_collection']}")
    return ", ".join(parts)


def _where(halt: dict[str, Any]) -> str:
    if "document_id" not in halt:
        return halt.get("namespace") or "a change"
    return f"_id {halt['document_id']} ({halt['key']}) in {halt.get('namespace', '?')}"


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"
