"""`syncd snapshot PIPELINE` at a document it cannot apply (`on_error = "halt"`): the
command stops with exit 6, and its hint names what to run, exactly: the same command
(with the config file it was given) after fixing the document, or after setting
`on_error = "dead_letter"`. A one-shot command has nothing to restart."""

from __future__ import annotations

import json
from typing import Any

import pytest

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd

from .oracle import document
from .test_halts import _hinted_commands, _run_hinted, _set_pipeline_option

TOO_LONG = "a body far too long for this mapping"  # > 30 characters


def _halted(done: Any, cfg: Any) -> list[list[str]]:
    """The snapshot stopped at _id 'long' with exit 6; the commands its hint names."""
    assert done.returncode == ExitCode.HALTED, done.stdout + done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("syncd: error: ") and "'long'" in line, done.stderr
    assert "restart" not in line and "resume" not in line, line
    commands = _hinted_commands(line)
    expected = ["syncd", "snapshot", "p", "--config", str(cfg.absolute())]
    assert commands and all(command == expected for command in commands), line
    assert 'set on_error = "dead_letter" and run `' in line, line
    return commands


@pytest.mark.timeout(300)
def test_a_halted_snapshot_names_itself_to_run_again_after_a_fix_or_under_dead_letter(
    mirror, mongo_client
):
    m = mirror("snaphalt", metadata=["title", "n"], mapping={"max_text_chars": 30},
               snapshot_batch_size=10)  # fmt: skip
    docs = mongo_client[m.db]["docs"]
    docs.insert_many([document(i) for i in range(25)] + [dict(document("long"), body=TOO_LONG)])

    commands = _halted(run_syncd(["snapshot", "p"], m.cfg, timeout=180), m.cfg)
    # status says the command halted there and what to run, not that a process vanished.
    status = run_syncd(["status", "p", "--json"], m.cfg)
    assert status.returncode == ExitCode.DRIFT_OR_FAILURE, status.stdout + status.stderr
    (row,) = json.loads(status.stdout)
    assert row["state"] == "halted" and "down" not in row, row
    assert row["last_error"]["document_id"] == "'long'", row
    assert _hinted_commands(row["last_error"]["hint"])[0] == commands[0], row
    text = run_syncd(["status", "p"], m.cfg).stdout
    assert "p: halted" in text and "killed" not in text, text
    docs.update_one({"_id": "long"}, {"$set": {"body": "short now"}})
    done = _run_hinted(commands[0], m.cfg)
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    assert "continuing the interrupted snapshot of p" in done.stdout, done.stdout
    problem = m.mismatch(docs.find())
    assert not problem, problem

    # Long again: the next snapshot halts there, and its hint's second way sets it aside.
    docs.update_one({"_id": "long"}, {"$set": {"body": TOO_LONG}})
    commands = _halted(run_syncd(["snapshot", "p"], m.cfg, timeout=180), m.cfg)
    _set_pipeline_option(m.cfg, on_error="dead_letter")
    done = _run_hinted(commands[-1], m.cfg)
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    problem = m.mismatch(docs.find({"body": {"$ne": TOO_LONG}}))
    assert not problem, problem
