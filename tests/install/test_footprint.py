"""`pip install syncd` without extras: an HTTP-only install small enough for a container.

Installs the package from a copy of its sources into a fresh virtual environment (pip
takes the dependencies from the package index, or its cache), measures it against the
200 MB goal and runs the commands an operator runs first. In-process Chroma is the
``embedded`` extra; asking for it here must be one clear line naming that extra.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOAL_BYTES = 200 * 1024 * 1024

# One worker builds the install once: under pytest-xdist the module stays together.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("footprint")]


def _tree_size(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink() and p.is_file())


def _env() -> dict[str, str]:
    # Nothing of the test run's own environment may make the worktree importable.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = os.defpath
    return env


@pytest.fixture(scope="module")
def base_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("footprint")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "syncd", source / "syncd", ignore=shutil.ignore_patterns("__pycache__"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=_env())
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=work,
        timeout=600,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


def _syncd(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "syncd"), *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=cwd,
        timeout=120,
        check=False,
    )


def test_base_install_fits_the_size_goal_without_in_process_chroma(base_install: Path) -> None:
    size = _tree_size(base_install)
    assert size <= GOAL_BYTES, f"base install is {size / 2**20:.0f} MB, goal 200 MB"
    probe = subprocess.run(
        [
            str(base_install / "bin" / "python"),
            "-c",
            "import importlib.util as u, sys; "
            "sys.exit([m for m in ('chromadb_rust_bindings', 'onnxruntime', 'kubernetes', "
            "'torch') if u.find_spec(m)] or 0)",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        check=False,
    )
    assert probe.returncode == 0, f"in-process packages installed: {probe.stderr}"


def test_help_and_offline_check_run_in_the_base_install(base_install: Path, tmp_path: Path) -> None:
    helped = _syncd(base_install, "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "check" in helped.stdout and "config" in helped.stdout

    config = tmp_path / "syncd.toml"
    config.write_text(
        '[chroma]\nmode = "http"\nhost = "chroma.internal"\n\n'
        '[[pipelines]]\nname = "articles"\ndatabase = "app"\ncollection = "articles"\n'
        '[pipelines.mapping]\ntext = "body"\n'
    )
    checked = _syncd(base_install, "check", "--offline", "--config", str(config), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "config ok: 1 pipeline(s)" in checked.stdout
    assert not (tmp_path / "syncd-data").exists()


def test_embedded_mode_without_the_extra_is_a_config_error_naming_it(
    base_install: Path, tmp_path: Path
) -> None:
    config = tmp_path / "syncd.toml"
    config.write_text(
        '[chroma]\nmode = "embedded"\npath = "./chroma"\n\n'
        '[[pipelines]]\nname = "articles"\ndatabase = "app"\ncollection = "articles"\n'
        '[pipelines.mapping]\ntext = "body"\n'
    )
    for args in (["check", "--offline"], ["verify", "articles"]):
        result = _syncd(base_install, *args, "--config", str(config), cwd=tmp_path)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "syncd[embedded]" in result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "chroma").exists()


def test_offline_check_without_a_config_file_is_a_config_error(
    base_install: Path, tmp_path: Path
) -> None:
    result = _syncd(base_install, "check", "--offline", cwd=tmp_path)
    assert result.returncode == 2, result.stdout
    assert "syncd.toml" in result.stderr and "Traceback" not in result.stderr
