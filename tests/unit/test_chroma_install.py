"""Which Chroma package serves which mode: the errors an installation mistake gets."""

from __future__ import annotations

import pytest

from syncd import chroma_install
from syncd.errors import ConfigError, ExitCode


def installed(monkeypatch: pytest.MonkeyPatch, **versions: str) -> None:
    names = {k.replace("_", "-"): v for k, v in versions.items()}
    monkeypatch.setattr(chroma_install, "_version", names.get)


def test_different_versions_of_the_two_packages_name_the_command_that_aligns_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    installed(monkeypatch, chromadb="1.5.9", chromadb_client="1.5.8")
    for mode in ("http", "embedded"):
        with pytest.raises(ConfigError) as info:
            chroma_install.check(mode)
        assert info.value.exit_code == ExitCode.CONFIG
        assert "pip install 'chromadb-client==1.5.9'" in info.value.describe()


def test_the_http_only_client_serves_http_and_names_the_extra_for_embedded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    installed(monkeypatch, chromadb_client="1.5.9")
    chroma_install.check("http")
    with pytest.raises(ConfigError) as info:
        chroma_install.check("embedded")
    assert "pip install 'syncd[embedded]'" in info.value.describe()


def test_no_chroma_package_at_all_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    installed(monkeypatch)
    with pytest.raises(ConfigError, match="no Chroma client is installed"):
        chroma_install.check("http")
