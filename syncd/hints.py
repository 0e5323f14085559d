"""The syncd commands that hints name, as an operator can run them.

Every hint that tells the operator to run a syncd command builds it here, so that it
carries the config file this process read when that is not the default
(``--config PATH``): a hint printed by ``syncd run --config etc/syncd.toml`` works when
pasted into the same shell, and one stored in MongoDB (a halt's, a failed pipeline's
"what to do") names the file of the process that wrote it, whoever shows it. The path
is made absolute, so the command works from any directory.
"""

from __future__ import annotations

import shlex
from pathlib import Path

_config: str | None = None  # the config file this process read, when not the default


def use_config(path: Path | str | None) -> None:
    """Record the config file this process read (None or the default: name none)."""
    global _config
    from syncd.config import DEFAULT_CONFIG_PATH

    if path is None or Path(path) == Path(DEFAULT_CONFIG_PATH):
        _config = None
    else:
        _config = str(Path(path).absolute())


def command(*words: str) -> str:
    """``syncd WORDS... [--config PATH]``, quoted for a shell."""
    config = ["--config", _config] if _config else []
    return shlex.join(["syncd", *words, *config])
