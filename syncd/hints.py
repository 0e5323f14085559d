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
