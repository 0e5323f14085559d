"""The command a hint says to run again names the config file as every hint does:
``--config`` with the path made absolute, whatever way the operator typed it, and not
at all when the file is the one found without it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd import hints


@pytest.fixture(autouse=True)
def _in_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SYNCD_CONFIG", raising=False)
    yield
    hints.use_config(None)


@pytest.mark.parametrize(
    "typed",
    [
        ["rebuild", "art", "-c", "v4.toml"],
        ["rebuild", "art", "-cv4.toml"],
        ["rebuild", "art", "-c=v4.toml"],
        ["rebuild", "--config", "v4.toml", "art"],
        ["rebuild", "art", "--config=v4.toml"],
        ["rebuild", "art", "--conf", "v4.toml"],
        ["rebuild", "-c", "elsewhere.toml", "art", "--config", "v4.toml"],  # the last one counts
    ],
)
def test_the_config_file_is_named_once_with_its_absolute_path(tmp_path, typed):
    hints.use_config("v4.toml")
    assert hints.again(typed) == f"syncd rebuild art --config {tmp_path / 'v4.toml'}"


def test_the_other_words_are_kept_as_typed_and_quoted(tmp_path):
    hints.use_config("my conf.toml")
    typed = ["tokens", "reset", "art", "-c", "my conf.toml", "--yes"]
    path = tmp_path / "my conf.toml"
    assert hints.again(typed) == f"syncd tokens reset art --yes --config '{path}'"


def test_words_after_a_double_dash_stay_last_and_untouched(tmp_path):
    hints.use_config("v4.toml")
    typed = ["rebuild", "-c", "v4.toml", "--", "-c"]
    assert hints.again(typed) == f"syncd rebuild --config {tmp_path / 'v4.toml'} -- -c"


def test_without_a_config_option_nothing_is_added():
    hints.use_config(None)
    assert hints.again(["rebuild", "art", "--force"]) == "syncd rebuild art --force"


def test_a_config_file_found_without_the_option_is_not_named(monkeypatch):
    # $SYNCD_CONFIG finds it for the command the hint names, as for other hints.
    monkeypatch.setenv("SYNCD_CONFIG", "/etc/syncd/v4.toml")
    hints.use_config("/etc/syncd/v4.toml")
    assert hints.again(["rebuild", "art", "-c", "/etc/syncd/v4.toml"]) == "syncd rebuild art"
    assert hints.command("rebuild", "art") == "syncd rebuild art"


def test_flags_a_hint_adds_go_before_the_config_file_and_a_double_dash(tmp_path):
    hints.use_config("my conf.toml")
    path = tmp_path / "my conf.toml"
    typed = hints.again(["tokens", "set", "art", "-c", "my conf.toml", "--at", "2024-01-01"])
    forced = hints.with_flags(hints.with_flags(typed, "--yes"), "--force")
    assert forced == f"syncd tokens set art --at 2024-01-01 --yes --force --config '{path}'"
    assert hints.with_flags(forced, "--yes", "--force") == forced  # none twice
    rest = hints.again(["rebuild", "-c", "my conf.toml", "--", "-c"])
    assert hints.with_flags(rest, "--force") == f"syncd rebuild --force --config '{path}' -- -c"
    hints.use_config(None)
    assert hints.with_flags("syncd snapshot art", "--force") == "syncd snapshot art --force"
