"""The systemd unit loads cleanly and agrees with the daemon's settings and exit codes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from syncd.config import Settings, load, validate
from syncd.errors import ExitCode

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "syncd.service"
TOML_EXAMPLE = SYSTEMD / "syncd.toml.example"
ENV_EXAMPLE = SYSTEMD / "syncd.env.example"
DUMMY_URI = "mongodb://syncd:dummy@db.example:27017/?replicaSet=rs0"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ordered (key, value) lists: keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def directive(name: str, section: str = "Service") -> list[str]:
    return [v for k, v in parse_unit(UNIT.read_text())[section] if k == name]


def one(name: str, section: str = "Service") -> str:
    values = directive(name, section)
    assert len(values) == 1, f"{name}= should appear once, found {values}"
    return values[0]


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``systemd-analyze verify`` on a copy whose ExecStart binary exists here."""
    executable = Path(sys.executable).with_name("syncd")
    if not executable.exists():
        executable = Path("/bin/true")
    rewritten, count = re.subn(
        r"^ExecStart=\S+", f"ExecStart={executable}", unit_text, flags=re.MULTILINE
    )
    assert count == 1
    copy = tmp_path / "syncd.service"
    copy.write_text(rewritten)
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        # recursive-errors=no: judge this unit, not the host's own units it depends on.
        ["systemd-analyze", "verify", "--man=no", "--recursive-errors=no", str(copy)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def unit_messages(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [
        line for line in (result.stdout + result.stderr).splitlines() if "syncd.service" in line
    ]


@needs_systemd_analyze
def test_unit_verifies_without_warnings(tmp_path: Path) -> None:
    result = verify(UNIT.read_text(), tmp_path)

    assert result.returncode == 0, result.stderr
    assert unit_messages(result) == []
    assert "Unknown" not in result.stderr


@needs_systemd_analyze
def test_verify_catches_a_misspelled_directive(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("WatchdogSec=", "WatchDogSec=")

    result = verify(broken, tmp_path)

    assert result.returncode != 0
    assert any("Unknown key" in line for line in unit_messages(result))


def test_notify_and_watchdog() -> None:
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert int(one("WatchdogSec")) > 0


def test_exec_start_runs_the_installed_config() -> None:
    assert one("ExecStart") == "/usr/local/bin/syncd run --config /etc/syncd/syncd.toml"


def test_stop_timeout_outlasts_the_drain_deadline() -> None:
    assert one("KillSignal") == "SIGTERM"
    assert float(one("TimeoutStopSec")) > Settings().shutdown_timeout_s
    toml = tomllib.loads(TOML_EXAMPLE.read_text())
    assert float(one("TimeoutStopSec")) > toml["shutdown_timeout_s"]


def test_restart_policy_leaves_operator_errors_alone() -> None:
    assert one("Restart") == "on-failure"
    prevented = {int(code) for code in one("RestartPreventExitStatus").split()}
    assert {ExitCode.CONFIG, ExitCode.HISTORY_LOST} <= prevented
    # Failures another replica or a retry can resolve must still restart.
    assert not prevented & {ExitCode.SOURCE, ExitCode.SINK, ExitCode.LEASE, ExitCode.INTERNAL}
    # A halt stops only its pipeline; `syncd run` never exits with HALTED, so listing it
    # would only pretend a halted service waits for an operator.
    assert ExitCode.HALTED not in prevented


def test_secrets_come_from_an_optional_root_only_file() -> None:
    assert directive("EnvironmentFile") == ["-/etc/syncd/syncd.env"]


def test_state_directory_is_the_working_directory() -> None:
    assert one("StateDirectory") == "syncd"
    assert one("WorkingDirectory") == "/var/lib/syncd"
    assert "/var/lib/syncd" in one("ReadWritePaths").split()


def test_hardening() -> None:
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "LockPersonality": "yes",
    }
    for key, value in expected.items():
        assert one(key) == value, key
    assert set(one("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert directive("MemoryDenyWriteExecute") == []


def test_sample_config_validates_with_the_uri_supplied_separately() -> None:
    data = tomllib.loads(TOML_EXAMPLE.read_text())
    assert "uri" not in data.get("mongodb", {}), "the URI holds credentials: keep it in syncd.env"
    assert "token" not in data.get("chroma", {})

    settings = validate({**data, "mongodb": {**data["mongodb"], "uri": DUMMY_URI}})

    assert settings.chroma.mode == "http"
    assert [p.name for p in settings.pipelines] == ["articles"]
    assert settings.pipelines[0].mapping.text == "body"


def env_file_assignments(text: str) -> dict[str, str]:
    """Every assignment in the example, including the commented-out optional ones."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            found[match[1]] = match[2]
    return found


def test_sample_env_and_config_load_together() -> None:
    env = env_file_assignments(ENV_EXAMPLE.read_text())
    assert "SYNCD_MONGODB_URI" in env

    settings = load(TOML_EXAMPLE, env=env)

    assert settings.mongodb.uri.get_secret_value() == env["SYNCD_MONGODB_URI"]
    assert settings.chroma.token is not None
    assert settings.pipelines[0].embedder.api_key_env in env
