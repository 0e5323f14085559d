"""Every syncd command is a fresh process, so what it imports is paid on every run.

`--help` and a usage mistake need no driver, no settings model and no Chroma client;
commands that only read checkpoints (`status`, `tokens show`, `dlq list`) need no Chroma
client, embedding client or tracing SDK. Each case runs the command in a child
interpreter, as `syncd` runs it, and reads which of the heavy packages ended up in
`sys.modules`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from syncd.cli import VERBS
from tests.harness.daemon import syncd_env

from .helpers import pipeline_table, write_config

HEAVY = ("chromadb", "pymongo", "bson", "pydantic", "httpx", "opentelemetry.sdk")

# main() as `python -m syncd` calls it, then the heavy packages that were imported
PROBE = """
import json, sys
from syncd.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "imported": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def _imported(args: list[str]) -> tuple[int, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        env=syncd_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    last = done.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    return int(result["code"] or 0), list(result["imported"])


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        *[[verb, "--help"] for verb in VERBS],
        ["tokens", "show", "--help"],
        ["dlq", "list", "--help"],
        ["status", "--no-such-option"],
        ["no-such-verb"],
    ],
    ids=" ".join,
)
def test_help_and_usage_mistakes_import_no_heavy_package(args: list[str]) -> None:
    code, imported = _imported(args)
    assert code in (0, 2)
    assert imported == []


@pytest.mark.parametrize(
    "args", [["status"], ["tokens", "show"], ["dlq", "list", "cli-imports"]], ids=" ".join
)
def test_commands_that_read_checkpoints_import_no_chroma_embedding_or_tracing_client(
    tmp_path: Path, mongo_uri: str, args: list[str]
) -> None:
    db = f"imp_{uuid.uuid4().hex[:8]}"
    cfg = write_config(
        tmp_path / "syncd.toml",
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": "127.0.0.1", "port": 9},
        checkpoint_db=f"{db}_syncd",
        pipelines=[pipeline_table("cli-imports", db)],
    )
    code, imported = _imported([*args, "--config", str(cfg)])
    assert code == 0
    assert "pymongo" in imported  # the command did read the checkpoint store
    assert [m for m in imported if m in ("chromadb", "httpx", "opentelemetry.sdk")] == []
