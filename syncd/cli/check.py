"""`syncd check`: validate the config and reach every server.

``--json`` prints ``{"ok": bool, "config": {"path": str, "pipelines": int}, "offline":
bool, "checks": [{"check": str, "ok": bool, "error": str | null, "exit_code": int |
null}, ...]}`` (``checks`` is empty with ``--offline``). Keys may be added, never
renamed.
"""

from __future__ import annotations

import argparse
from typing import Any

from syncd.cli.common import add_config_options, load_settings, print_json, select_pipelines
from syncd.errors import ExitCode, SyncdError
from syncd.redact import redact_text


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "check",
        help="validate the config, reach every server, embed a probe, write a checkpoint",
        description="Validate the config (a config file with at least one pipeline), then do "
        "once what the daemon does first: reach MongoDB and Chroma, open each change stream, "
        "embed one probe input and compare its size with embedder.dimensions and the existing "
        "collection (and its distance), write to the checkpoint store, and send the trace "
        "exporter an empty export. Exit 0 when all pass; 2 for a bad or missing config (or "
        'one this installation cannot serve, such as chroma.mode = "embedded" without '
        "syncd[embedded]); otherwise the exit code of the first check that failed (4 for "
        "MongoDB, 5 for Chroma or the embedding API, as in the README's table; 1 if it has "
        "none). An embedded Chroma directory that does not exist yet is reported, not created. "
        'A pipeline whose mapping changed under on_mapping_change = "rebuild" is not held '
        "against the live collection's distance and vector size: its line says that `syncd "
        "run` will rebuild it beside the live collection, or it fails (exit 2) when `syncd "
        "run` would refuse to, the previous collection of the last rebuild being still kept. "
        'Under on_mapping_change = "refuse", a pipeline whose mapping changed fails (exit 2) '
        "with the message and hint `syncd run` stops with.",
    )
    add_config_options(parser)
    parser.add_argument("--offline", action="store_true", help="validate the config only")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from syncd import chroma_install
    from syncd.config import config_path_of

    settings = load_settings(args)
    select_pipelines(settings, None)  # a config without pipelines would run nothing
    chroma_install.check(settings.chroma.mode)
    path = str(config_path_of(args.config))
    results: list[dict[str, Any]] = []
    if not args.json:
        print(f"config ok: {len(settings.pipelines)} pipeline(s)")
    if not args.offline:
        from syncd.checks import run_checks

        for line, error in run_checks(settings):
            results.append(_result(line, error))
            if args.json:
                continue
            if error is None:
                print(f"ok    {line}")
            else:
                print(f"FAIL  {line}: {results[-1]['error']}")
    ok = all(r["ok"] for r in results)
    if args.json:
        print_json(
            {
                "ok": ok,
                "config": {"path": path, "pipelines": len(settings.pipelines)},
                "offline": bool(args.offline),
                "checks": results,
            }
        )
    failed = [r["exit_code"] or ExitCode.DRIFT_OR_FAILURE for r in results if not r["ok"]]
    return int(failed[0]) if failed else ExitCode.OK


def _result(line: str, error: BaseException | None) -> dict[str, Any]:
    if error is None:
        return {"check": line, "ok": True, "error": None, "exit_code": None}
    text = error.describe() if isinstance(error, SyncdError) else redact_text(str(error))
    code = int(error.exit_code) if isinstance(error, SyncdError) else None
    return {"check": line, "ok": False, "error": text, "exit_code": code}
