"""The syncd commands that hints name, as an operator can run them.

Every hint that tells the operator to run a syncd command builds it here, so that it
carries the config file this process was given with ``--config PATH`` when that is not
the file found without it: a hint printed by ``syncd run --config etc/syncd.toml``
works when pasted into the same shell, and one stored in MongoDB (a halt's, a failed pipeline's
"what to do") names the file of the process that wrote it, whoever shows it. The path
is made absolute, so the command works from any directory.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

_config: str | None = None  # the config file this process read, when not the default


def use_config(path: Path | str | None) -> None:
    """Record the config file named by ``--config`` (None: none was). A file found without
    the flag (``$SYNCD_CONFIG``, else ``./syncd.toml``) is found the same way by the
    command a hint names, so it is not named."""
    global _config
    from syncd.config import config_path_of

    if path is None or Path(path) == config_path_of(None):
        _config = None
    else:
        _config = str(Path(path).absolute())


def command(*words: str) -> str:
    """``syncd WORDS... [--config PATH]``, quoted for a shell."""
    config = ["--config", _config] if _config else []
    return shlex.join(["syncd", *words, *config])


def again(argv: Sequence[str] | None = None) -> str:
    """The command this process runs (its arguments ``argv``, default ``sys.argv[1:]``),
    for a hint that says to run it again: as typed, but with the config file named as
    :func:`command` names it, ``--config PATH`` made absolute at the end (or left out
    when it is found without it), in place of every ``-c X``, ``-cX``, ``-c=X``,
    ``--config X`` or ``--config=X`` (or an abbreviation argparse takes for
    ``--config``) the operator typed."""
    words = list(sys.argv[1:] if argv is None else argv)
    kept: list[str] = []
    rest: list[str] = []
    skip = False
    for i, word in enumerate(words):
        if skip:
            skip = False
        elif word == "--":  # what follows is positional
            rest = words[i:]
            break
        elif word == "-c" or _config_flag(word):
            skip = True  # its value is the next word
        elif word.startswith("-c") or (
            word.startswith("--") and "=" in word and _config_flag(word.split("=", 1)[0])
        ):
            pass  # -cX, -c=X, --config=X
        else:
            kept.append(word)
    config = ["--config", _config] if _config else []
    return shlex.join(["syncd", *kept, *config, *rest])


def with_flags(command: str, *flags: str) -> str:
    """``command``, as :func:`command` or :func:`again` made it, with ``flags`` it lacks
    added before its ``--config PATH``, which stays last, and before a ``--``."""
    words = shlex.split(command)
    at = words.index("--") if "--" in words else len(words)
    if at >= 2 and words[at - 2] == "--config":
        at -= 2
    words[at:at] = [flag for flag in flags if flag not in words[:at]]
    return shlex.join(words)


def _config_flag(word: str) -> bool:
    """``--config``, or a prefix of it that argparse takes for it (``--conf``)."""
    return len(word) >= 3 and "--config".startswith(word)
