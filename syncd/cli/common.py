"""Options and helpers shared by the verbs."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from syncd import hints
from syncd.errors import ConfigError

if TYPE_CHECKING:  # syncd.config loads pydantic: not needed for `--help` or a usage mistake
    from syncd.config import PipelineSettings, Settings

logger = logging.getLogger("syncd")
# The file the last load_settings read, for messages about what it lacks.
_loaded_from: Path | None = None


def config_file(text: str) -> Path:
    """An argparse type: a config file path; an empty one (``--config ''``, an unset
    variable in a script) is a mistake, not the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: name a TOML config file")
    return Path(text)


def add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration")
    group.add_argument(
        "--config",
        "-c",
        type=config_file,
        default=None,
        help="TOML config file (default: $SYNCD_CONFIG or ./syncd.toml)",
    )
    group.add_argument(
        "--log-format", choices=["text", "json"], default=None, help="log line format"
    )
    group.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default=None, help="log level"
    )


def load_settings(
    args: argparse.Namespace,
    *,
    require_file: bool = True,
    chroma: bool = False,
    **overrides: Any,
) -> Settings:
    """Settings for a verb. ``require_file``: a missing config file is an error even when
    none was named, as for every verb that works on pipelines (they come only from a
    file, which also says where stored ones are); ``chroma``: the verb
    opens Chroma, so an installation that cannot serve ``chroma.mode`` is a
    configuration error before anything is reached. The hints the process prints name
    the file it read (:mod:`syncd.hints`)."""
    from syncd import config

    values = {"log.format": args.log_format, "log.level": args.log_level, **overrides}
    settings = config.load(args.config, overrides=values, require_file=require_file or None)
    global _loaded_from
    _loaded_from = config.config_path_of(args.config)
    hints.use_config(args.config)
    if chroma:
        from syncd import chroma_install

        chroma_install.check(settings.chroma.mode)
    from syncd.logs import setup_logging

    setup_logging(settings.log)
    warn_unknown_variables()
    return settings


def warn_unknown_variables() -> None:
    """A warning for each ``SYNCD_*`` variable that sets nothing (a typo, most likely)."""
    from syncd import config

    for name, near in config.unknown_variables(os.environ):
        logger.warning(
            "%s is not a syncd setting and is ignored%s",
            name,
            f" (did you mean {near}?)" if near else "",
        )


def select_pipelines(settings: Settings, names: list[str] | None) -> list[PipelineSettings]:
    if not settings.pipelines:
        where = _loaded_from or "the config"
        raise ConfigError(
            f"no [[pipelines]] configured in {where}",
            hint=f"add at least one [[pipelines]] table to {where} (see README)",
        )
    if not names:
        return list(settings.pipelines)
    return [settings.pipeline(name) for name in names]


def stop_on_signals() -> threading.Event:
    """An event that SIGTERM and SIGINT set, for a long command that stops cleanly."""
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    return stop


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def whole_number(low: int, high: int = 1_000_000_000) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high`` (a mistake is exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high:,}, not {value}")
        return value

    return parse


def seconds(text: str) -> float:
    """An argparse type: a duration in seconds, finite, from 0 to a year."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and 0 <= value <= 366 * 86400):
        raise argparse.ArgumentTypeError(f"must be from 0 to 31,622,400 seconds, not {text}")
    return value


def add_subcommand_config_options(parser: argparse.ArgumentParser) -> None:
    """The configuration options again, after a sub-command (`syncd dlq list -c FILE`).

    Their defaults are suppressed so that a value given before the sub-command
    (`syncd dlq -c FILE list`) is not overwritten by the sub-command's default.
    """
    group = parser.add_argument_group("configuration")
    group.add_argument(
        "--config", "-c", type=config_file, default=argparse.SUPPRESS, help="TOML config file"
    )
    group.add_argument(
        "--log-format", choices=["text", "json"], default=argparse.SUPPRESS, help="log format"
    )
    group.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=argparse.SUPPRESS,
        help="log level",
    )
