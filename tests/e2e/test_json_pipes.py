"""Every `--json` command writing into a reader that has gone away (`syncd ... | head`)
exits quietly: the ones test_bad_input does not already run, among them those that
change something."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd

from .helpers import closed_pipe_run
from .mirror import Mirror


@pytest.mark.timeout(300)
def test_every_json_command_into_a_closed_pipe_exits_quietly(
    mongo_client: Any, mirror: Callable[..., Mirror]
) -> None:
    # Long operations log their progress on stderr every log.progress_every_s (10 s by
    # default), whatever stdout is: a repair slowed past that by a busy machine would
    # write lines this test is not about. An hour keeps them out of every run, so an
    # empty stderr means what it should: the closed pipe made syncd say nothing.
    m = mirror("pipe", on_error="dead_letter", embedder={"kind": "hashing", "dimensions": 32},
               extra={"log": {"progress_every_s": 3600}})  # fmt: skip
    db, cfg = m.db, m.cfg
    docs = mongo_client[db]["docs"]
    docs.insert_many([{"_id": i, "body": f"body {i}", "title": f"t{i}"} for i in range(30)])
    docs.insert_one({"_id": "bad", "body": {"not": "text"}})  # a dead letter to show
    snap = run_syncd(["snapshot", "p"], cfg)
    assert snap.returncode == 0, snap.stdout + snap.stderr
    shown = run_syncd(["tokens", "show", "p", "--json"], cfg)
    token = json.loads(shown.stdout)["pipelines"][0]["position"]["token"]
    assert token, shown.stdout

    reads: list[list[str]] = [
        ["check", "--json"],
        ["check", "--offline", "--json"],
        ["config", "show", "--json"],
        ["verify", "p", "--sample", "5", "--json"],
        ["repair", "p", "--dry-run", "--json"],
        ["dlq", "show", "p", "s:bad", "--json"],
        ["map", "p", "--id", "i:1", "--json"],
    ]
    writes: list[list[str]] = [
        ["repair", "p", "--json"],
        ["dlq", "retry", "p", "--json"],
        ["dlq", "purge", "p", "--yes", "--json"],
        ["tokens", "set", "p", "--token", token, "--yes", "--json"],
        ["tokens", "reset", "p", "--yes", "--json"],
    ]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda a: (a, closed_pipe_run(a, cfg)), reads))
    results += [(a, closed_pipe_run(a, cfg)) for a in writes]  # in order: each changes state
    for args, result in results:
        assert result.stderr.decode() == "", (args, result.stderr.decode())
        assert result.returncode == ExitCode.DRIFT_OR_FAILURE, (args, result.returncode)
