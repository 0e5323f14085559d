"""`syncd rebuild PIPELINE` at a document the new mapping cannot apply: the command
stops with exit 6 (HALTED) and a hint whose commands work as printed, `syncd status`
shows the halt in the rebuild, and running the hinted command after the fix (or under
`on_error = "dead_letter"`) continues the build from where it halted, in the snapshot
and while catching up, to the switch."""

from __future__ import annotations

import json
from typing import Any

import pytest

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd

from .helpers import copy_and_stop, log_records
from .oracle import document
from .test_halts import _hinted_commands, _run_hinted, _set_pipeline_option

TOO_LONG = "a body far too long for the new mapping"  # > 30 characters


def _mirrors(mirror: Any, prefix: str, **new: Any) -> tuple[Any, Any]:
    old = mirror(prefix)
    # A metadata change, and texts held to 30 characters: a longer one cannot be mapped.
    changed = mirror(prefix, db=old.db, coll=old.coll, metadata=["title", "n"],
                     mapping={"max_text_chars": 30}, snapshot_batch_size=10, **new)  # fmt: skip
    return old, changed


def _halted_in_the_snapshot(
    mirror: Any, name: str, mongo_client: Any, syncd_factory: Any, tmp_path: Any
) -> tuple[Any, Any, list[str], Any]:
    """A first copy with the old mapping, then `syncd rebuild p` with the new one, halted
    at the long text (the string _id comes after the numbers): the new mirror, the
    documents, the command its hint names and the rebuild's output."""
    old, new = _mirrors(mirror, name)
    docs = mongo_client[old.db]["docs"]
    docs.insert_many([document(i) for i in range(25)] + [dict(document("long"), body=TOO_LONG)])
    copy_and_stop(
        syncd_factory, mongo_client, old.cfg, old.settings, old.db, log_path=tmp_path / "old.log"
    )
    done = run_syncd(["rebuild", "p"], new.cfg, timeout=180)
    return new, docs, _halted(done, "'long'"), done


def _halted(done: Any, key: str) -> list[str]:
    """The rebuild stopped at `key` with exit 6; the command its hint names, as printed."""
    assert done.returncode == ExitCode.HALTED, done.stdout + done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("syncd: error: ") and key in line, done.stderr
    commands = _hinted_commands(line)
    assert commands, line
    assert all(command[:2] == ["syncd", "rebuild"] for command in commands), line
    assert "resume" not in line and "restart" not in line, line
    return commands[0]


def _rebuild_halt(cfg: Any) -> dict[str, Any]:
    done = run_syncd(["status", "--json"], cfg)
    assert done.returncode == ExitCode.DRIFT_OR_FAILURE, done.stdout  # one is halted
    row = next(row for row in json.loads(done.stdout) if row["pipeline"] == "p")
    assert "halt" not in row, row  # the live pipeline is not halted, its rebuild is
    return dict(row["rebuild"]["halt"])


@pytest.mark.timeout(300)
def test_a_halted_rebuild_continues_with_the_command_its_hint_names_in_snapshot_and_catching_up(
    tmp_path, mirror, mongo_client, syncd_factory
):
    new, docs, command, done = _halted_in_the_snapshot(
        mirror, "rbcmdhalt", mongo_client, syncd_factory, tmp_path
    )
    halt = _rebuild_halt(new.cfg)
    assert halt["document_id"] == "'long'" and halt["error_class"] == "OversizedError", halt
    assert halt["hint"] in done.stderr, (halt, done.stderr)
    text = run_syncd(["status", "p"], new.cfg).stdout
    assert "_id 'long' (s:long)" in text and f"what to do     {halt['hint']}" in text, text
    # A document the snapshot has passed, written meanwhile: the build meets it while
    # catching up.
    docs.insert_one(dict(document(-1), body=TOO_LONG))
    docs.update_one({"_id": "long"}, {"$set": {"body": "short now"}})
    done = _run_hinted(command, new.cfg)
    command = _halted(done, "-1")
    assert "continuing the rebuild of p" in done.stdout, done.stdout
    halt = _rebuild_halt(new.cfg)
    assert halt["document_id"] == "-1" and "resume_token" in halt, halt

    docs.update_one({"_id": -1}, {"$set": {"body": "short too"}})
    done = _run_hinted(command, new.cfg)
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    assert "rebuild of p switched" in done.stdout, done.stdout
    problem = new.mismatch(docs.find())
    assert not problem, problem
    row = json.loads(run_syncd(["status", "--json"], new.cfg).stdout)[0]
    assert row["rebuild"]["state"] == "switched" and "halt" not in row["rebuild"], row


@pytest.mark.timeout(300)
def test_the_hint_of_a_rebuild_given_a_relative_config_path_works_from_another_directory(
    tmp_path, mirror, mongo_client, syncd_factory
):
    old, new = _mirrors(mirror, "rbrelcfg")
    docs = mongo_client[old.db]["docs"]
    docs.insert_many([document(i) for i in range(25)] + [dict(document("long"), body=TOO_LONG)])
    copy_and_stop(
        syncd_factory, mongo_client, old.cfg, old.settings, old.db, log_path=tmp_path / "old.log"
    )
    # `syncd rebuild p -c FILE` in the directory of FILE; the hints are run from another.
    here, elsewhere = new.cfg.parent, tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_syncd(["rebuild", "p", "-c", new.cfg.name], cwd=here, timeout=180)
    printed = _halted(done, "'long'")
    assert printed == ["syncd", "rebuild", "p", "--config", str(new.cfg.absolute())], printed
    shown = _rebuild_halt(new.cfg)["hint"]  # what `syncd status` shows, stored by it
    assert shown in done.stderr and _hinted_commands(shown)[0] == printed, shown

    docs.insert_one(dict(document(-1), body=TOO_LONG))  # met while catching up
    docs.update_one({"_id": "long"}, {"$set": {"body": "short now"}})
    done = run_syncd(printed[1:], cwd=elsewhere, timeout=180)
    assert "continuing the rebuild of p" in done.stdout, done.stdout + done.stderr
    _halted(done, "-1")

    docs.update_one({"_id": -1}, {"$set": {"body": "short too"}})
    done = run_syncd(_hinted_commands(shown)[0][1:], cwd=elsewhere, timeout=180)
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    assert "rebuild of p switched" in done.stdout, done.stdout
    problem = new.mismatch(docs.find())
    assert not problem, problem


@pytest.mark.timeout(300)
def test_a_halted_rebuild_sets_the_document_aside_when_its_hint_is_run_under_dead_letter(
    tmp_path, mirror, mongo_client, syncd_factory
):
    new, docs, command, done = _halted_in_the_snapshot(
        mirror, "rbcmddead", mongo_client, syncd_factory, tmp_path
    )
    assert 'set on_error = "dead_letter" and run `' in done.stderr, done.stderr
    docs.insert_one(dict(document(-1), body=TOO_LONG))  # met while catching up
    _set_pipeline_option(new.cfg, on_error="dead_letter")
    done = _run_hinted(command, new.cfg)
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    assert "rebuild of p switched" in done.stdout, done.stdout
    listed = run_syncd(["dlq", "list", "p", "--json"], new.cfg)
    assert sorted(e["key"] for e in json.loads(listed.stdout)) == ["i:-1", "s:long"], listed.stdout
    problem = new.mismatch(docs.find({"body": {"$ne": TOO_LONG}}))
    assert not problem, problem


@pytest.mark.timeout(300)
def test_a_rebuild_halted_within_a_page_counts_the_documents_it_checkpointed(
    tmp_path, mirror, mongo_client, syncd_factory
):
    old, new = _mirrors(mirror, "rbcount", extra={"log": {"progress_every_s": 0}})
    docs = mongo_client[old.db]["docs"]
    # Pages of 10: the third, 20..29, halts at 22; the others of it are written all the
    # same, its checkpoint stays before it.
    docs.insert_many([document(i) for i in range(30)])
    docs.update_one({"_id": 22}, {"$set": {"body": TOO_LONG}})
    copy_and_stop(
        syncd_factory, mongo_client, old.cfg, old.settings, old.db, log_path=tmp_path / "old.log"
    )
    done = run_syncd(["rebuild", "p", "--log-format", "json"], new.cfg, timeout=180)
    command = _halted(done, "22")
    built = new.chroma.client().get_collection(f"{new.coll}--v2", embedding_function=None)
    assert built.count() == 29, built.count()  # written: all but 22

    # What the count counts, it says: the 20 documents checkpointed, in the progress
    # line, `syncd status` and its --json alike.
    lines = [r for r in log_records(done.stderr) if r.get("operation") == "snapshot"]
    assert lines and all(r["unit"] == "documents checkpointed" for r in lines), lines
    assert lines[-1]["done"] == 20, lines
    row = json.loads(run_syncd(["status", "--json"], new.cfg).stdout)[0]
    assert row["rebuild"]["snapshot_scanned"] == 20, row
    text = run_syncd(["status", "p"], new.cfg).stdout
    assert "(snapshot), 20 documents checkpointed" in text, text

    docs.update_one({"_id": 22}, {"$set": {"body": "short now"}})
    done = _run_hinted(command, new.cfg)
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    problem = new.mismatch(docs.find())
    assert not problem, problem
