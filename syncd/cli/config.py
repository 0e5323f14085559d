"""`syncd config show`: the effective configuration, secrets redacted.

``--json`` prints ``{"config_file": str, "config_file_exists": bool, "settings": [{"key":
str, "value": any, "source": "default" | "file" | "environment" | "flag", "detail": str |
null}, ...]}``; ``detail`` names the file, variable or flag. Keys may be added, never
renamed.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from syncd.cli.common import (
    add_config_options,
    add_subcommand_config_options,
    print_json,
    warn_unknown_variables,
)
from syncd.errors import ExitCode


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "config",
        help="show the effective configuration and where each value came from",
        description="Settings merge defaults < config file < SYNCD_* environment < command "
        "line. `syncd config show` prints the result with secrets as ***.",
    )
    add_config_options(parser)
    subs = parser.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    show = subs.add_parser(
        "show",
        help="every setting, its value and its source (default, file, environment, flag)",
        description="Every setting after file, environment and flags are merged, with the "
        "layer that decided it. Secrets (URI passwords, tokens, API keys, headers) print as "
        "***. Exit 2 if the configuration is invalid.",
    )
    add_subcommand_config_options(show)
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_show)


def _show(args: argparse.Namespace) -> int:
    from syncd.config_sources import effective
    from syncd.logs import setup_logging

    overrides = {"log.format": args.log_format, "log.level": args.log_level}
    settings, path, entries = effective(args.config, overrides=overrides)
    setup_logging(settings.log)
    warn_unknown_variables()
    if args.json:
        print_json(
            {
                "config_file": str(path),
                "config_file_exists": path.exists(),
                "settings": [e.to_json() for e in entries],
            }
        )
        return ExitCode.OK
    print(f"# config file: {path}{'' if path.exists() else ' (not found: defaults apply)'}")
    width = max(len(e.key) for e in entries)
    for e in entries:
        where = e.source + (f": {e.detail}" if e.detail else "")
        print(f"{e.key:<{width}} = {json.dumps(e.value, default=str)}  # {where}")
    return ExitCode.OK
