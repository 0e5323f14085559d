"""`syncd completion bash|zsh|fish`: print a shell completion script.

The script asks syncd itself what to complete (argcomplete), so it always matches the
installed version's commands and options, and completes PIPELINE from the config file.
"""

from __future__ import annotations

import argparse
from typing import Any

from syncd.errors import ExitCode

SHELLS = {
    "bash": 'eval "$(syncd completion bash)"   # in ~/.bashrc',
    "zsh": 'eval "$(syncd completion zsh)"    # in ~/.zshrc (after compinit)',
    "fish": "syncd completion fish > ~/.config/fish/completions/syncd.fish",
}


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh or fish)",
        description="Print the completion script for SHELL. Install it with: "
        + "; ".join(SHELLS.values()),
    )
    parser.add_argument("shell", choices=list(SHELLS), metavar="SHELL", help="bash|zsh|fish")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from argcomplete.shell_integration import shellcode

    print(shellcode(["syncd"], shell=args.shell), end="")
    return ExitCode.OK


def pipeline_names(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """PIPELINE completions: the names in the config file the command line points at."""
    from syncd import config
    from syncd.errors import SyncdError

    try:
        settings = config.load(getattr(parsed_args, "config", None))
    except SyncdError:
        return []
    return [p.name for p in settings.pipelines if p.name.startswith(prefix)]
