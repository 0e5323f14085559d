"""Bad input against real servers: one clear line, the documented exit code, never a
traceback; and every hint such an error prints, followed exactly, converges."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import uuid
from typing import Any

import pytest

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd, syncd_command, syncd_env
from tests.harness.embedding_api import embedding_api
from tests.harness.ports import free_port

from .helpers import (
    closed_pipe_run,
    pipeline_table,
    settings_of,
    wait_caught_up,
    wait_until,
    write_config,
)

DOCS = [{"_id": n, "body": f"document number {n}", "title": f"t{n}"} for n in range(1, 6)]


def oracle(docs: list[dict[str, Any]]) -> dict[str, str]:
    """What Chroma must hold, from the README: an int _id n is record i:n, its text the body."""
    return {f"i:{doc['_id']}": doc["body"] for doc in docs}


def chroma_texts(collection: Any) -> dict[str, str]:
    got = collection.get(include=["documents"])
    return dict(zip(got["ids"], got["documents"], strict=True))


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one `syncd: error:` line a mistake prints; no traceback anywhere."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("syncd: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def hinted_command(line: str) -> list[str]:
    """The `syncd ...` command a hint names, as argv without the leading `syncd`."""
    match = re.search(r"`syncd ([^`]+)`", line)
    assert match, line
    return shlex.split(match[1])


@pytest.fixture
def setup(tmp_path, mongo_uri, mongo_client, chroma_server):
    db = f"bad_{uuid.uuid4().hex[:8]}"
    chroma_name = f"bad-{uuid.uuid4().hex[:8]}"
    cfg = write_config(
        tmp_path / "syncd.toml",
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port},
        checkpoint_db=f"{db}_syncd",
        pipelines=[pipeline_table("bad", db, chroma_collection=chroma_name)],
        extra={"lease": {"ttl_s": 3, "renew_every_s": 1}},
    )
    yield cfg, db, chroma_name
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("field", "value"),
    [("epoch", "seven"), ("cluster_time", "yesterday"), ("token", {"_data": 42})],
)
def test_a_tampered_checkpoint_is_exit_4_and_its_hint_converges(
    setup, mongo_client, chroma_server, syncd_factory, field, value
):
    cfg, db, chroma_name = setup
    settings = settings_of(cfg)
    coll = mongo_client[db]["docs"]
    coll.insert_many([dict(d) for d in DOCS])
    daemon = syncd_factory(["run"], cfg)
    wait_caught_up(mongo_client, db, settings, "bad", 60, "the first run to catch up")
    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()

    checkpoints = mongo_client[f"{db}_syncd"]["checkpoints"]
    assert checkpoints.update_one({"_id": "bad"}, {"$set": {field: value}}).matched_count == 1
    # While it was tampered with, MongoDB and Chroma moved apart.
    coll.insert_one({"_id": 6, "body": "written while the checkpoint was broken", "title": "t6"})
    collection = chroma_server.client().get_collection(chroma_name)
    collection.delete(ids=["i:1"])

    hints = set()
    result = run_syncd(["run"], cfg, timeout=60)
    assert result.returncode == ExitCode.SOURCE, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr  # the daemon logs why it stopped
    lines = [x for x in result.stderr.splitlines() if "checkpoint cannot be read" in x]
    assert lines, result.stderr
    assert f"read: {field} " in lines[-1], lines[-1]
    hints.add(tuple(hinted_command(lines[-1])))
    # The commands that describe pipelines show it as failed, with why and what to run.
    for args in (["status"], ["status", "--json"], ["tokens", "show"], ["tokens", "show", "bad"]):
        result = run_syncd(args, cfg, timeout=60)
        assert result.returncode == ExitCode.DRIFT_OR_FAILURE, (args, result.stderr)
        reason, what_to_do = _shown_unreadable(result, "bad")
        assert f"read: {field} " in reason, reason
        hints.add(tuple(hinted_command(what_to_do)))
    (hint,) = hints
    # Named with --config, the commands' hints name it too; run exactly as printed.
    assert hint == ("tokens", "reset", "bad", "--yes", "--config", str(cfg.absolute()))

    followed = run_syncd(list(hint), timeout=60)
    assert followed.returncode == 0, followed.stderr
    daemon.start()
    expected = oracle([*DOCS, {"_id": 6, "body": "written while the checkpoint was broken"}])
    wait_until(lambda: chroma_texts(collection) == expected, 90, "the stores to converge")
    shown = run_syncd(["tokens", "show", "bad", "--json"], cfg, timeout=60)
    assert shown.returncode == 0, shown.stderr
    (entry,) = json.loads(shown.stdout)["pipelines"]
    assert isinstance(entry["epoch"], int) and entry["phase"] in ("snapshot", "streaming")


def _shown_unreadable(result: subprocess.CompletedProcess[str], name: str) -> tuple[str, str]:
    """What `syncd status` or `syncd tokens show` (text or --json) says of pipeline `name`,
    whose checkpoint cannot be read: (the reason, what to run)."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert not any(x.startswith("syncd: error:") for x in result.stderr.splitlines())
    if result.stdout.startswith("{") or result.stdout.startswith("["):
        data = json.loads(result.stdout)
        rows = data["pipelines"] if isinstance(data, dict) else data
        (row,) = [r for r in rows if r["pipeline"] == name]
        if "error" in row:  # tokens show
            return row["error"]["message"], row["error"]["hint"]
        assert row["state"] == "failed", row
        return row["last_error"]["error"], row["last_error"]["hint"]
    blocks: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in result.stdout.splitlines():
        if line and not line[0].isspace():  # "NAME: ..." starts a pipeline's lines
            lines = blocks.setdefault(line.split(":", 1)[0], [])
        lines.append(line)
    lines = blocks[name]
    reason = next(x for x in lines if "cannot be read" in x)
    hint = next(x for x in lines if "what to do" in x)
    return reason, hint


@pytest.mark.timeout(180)
def test_an_unreadable_checkpoint_fails_its_pipeline_in_status_and_shows_the_others(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db = f"bad_{uuid.uuid4().hex[:8]}"
    cfg = write_config(
        tmp_path / "syncd.toml",
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port},
        checkpoint_db=f"{db}_syncd",
        pipelines=[
            pipeline_table(name, db, collection=name, chroma_collection=f"{db}-{name}")
            for name in ("good", "bad")
        ],
    )
    try:
        for name in ("good", "bad"):
            mongo_client[db][name].insert_many([dict(d) for d in DOCS])
        daemon = syncd_factory(["run"], cfg)
        for name in ("good", "bad"):
            wait_caught_up(mongo_client, db, settings_of(cfg), name, 60, f"{name} to catch up")
        daemon.terminate()
        assert daemon.wait(30) == 0, daemon.output()
        checkpoints = mongo_client[f"{db}_syncd"]["checkpoints"]
        tampered = {"$set": {"phase": 42, "token": "garbage"}}
        assert checkpoints.update_one({"_id": "bad"}, tampered).matched_count == 1

        status = run_syncd(["status"], cfg, timeout=60)
        assert status.returncode == ExitCode.DRIFT_OR_FAILURE, status.stderr
        assert "good: stopped" in status.stdout, status.stdout
        assert "bad: failed" in status.stdout, status.stdout
        reason, hint = _shown_unreadable(status, "bad")
        assert "the stored checkpoint cannot be read" in reason, reason
        reset = ["tokens", "reset", "bad", "--yes", "--config", str(cfg.absolute())]
        assert hinted_command(hint) == reset  # the file named by --config, as printed

        rows = json.loads(run_syncd(["status", "--json"], cfg, timeout=60).stdout)
        assert {r["pipeline"]: r["state"] for r in rows} == {"good": "stopped", "bad": "failed"}

        shown = run_syncd(["tokens", "show", "--json"], cfg, timeout=60)
        assert shown.returncode == ExitCode.DRIFT_OR_FAILURE, shown.stderr
        entries = {e["pipeline"]: e for e in json.loads(shown.stdout)["pipelines"]}
        assert entries["good"]["error"] is None and entries["good"]["phase"] == "streaming"
        assert entries["good"]["position"] is not None
        assert entries["bad"]["stored"] and entries["bad"]["position"] is None
        assert f"`{shlex.join(['syncd', *reset])}`" in entries["bad"]["error"]["hint"]
        text = run_syncd(["tokens", "show"], cfg, timeout=60)
        assert text.returncode == ExitCode.DRIFT_OR_FAILURE, text.stderr
        assert "good: streaming" in text.stdout, text.stdout
        assert "bad: the stored checkpoint cannot be read" in text.stdout, text.stdout

        followed = run_syncd(hinted_command(hint), timeout=60)
        assert followed.returncode == 0, followed.stderr
        after = run_syncd(["status"], cfg, timeout=60)
        assert after.returncode == ExitCode.OK, after.stdout + after.stderr
        assert "bad: never run" in after.stdout, after.stdout
    finally:
        mongo_client.drop_database(db)
        mongo_client.drop_database(f"{db}_syncd")


@pytest.mark.timeout(120)
def test_tokens_refuse_an_unknown_pipeline_and_leave_nothing_behind(setup, mongo_client):
    cfg, db, _ = setup
    stored = mongo_client[f"{db}_syncd"]
    for args in (
        ["tokens", "reset", "UNKNOWN", "--yes"],
        ["tokens", "set", "UNKNOWN", "--at", "2024-01-01T00:00:00Z", "--yes"],
        ["tokens", "show", "UNKNOWN"],
        ["tokens", "history", "UNKNOWN"],
    ):
        result = run_syncd(args, cfg, timeout=60)
        assert result.returncode == ExitCode.CONFIG, (args, result.stderr)
        assert "no pipeline named 'UNKNOWN' (known: bad)" in one_error_line(result)
    for name in stored.list_collection_names():
        assert stored[name].count_documents({"_id": {"$regex": "UNKNOWN"}}) == 0, name


@pytest.mark.parametrize(
    "args",
    [
        ["tokens", "history", "bad", "-n", "-5"],
        ["tokens", "history", "bad", "-n", "0"],
        ["tokens", "history", "bad", "-n", "x"],
        ["dlq", "list", "bad", "--limit", "99999999999999999999"],
        ["verify", "bad", "--sample", "-1"],
        ["wait", "bad", "--after", "1.1", "--timeout", "nan"],
        ["wait", "bad", "--after", "1.1", "--timeout", "inf"],
        ["wait", "bad", "--after", "9999-12-31T23:59:59Z"],
        ["wait", "bad", "--after", "0001-01-01"],
        ["tokens", "set", "bad", "--at", "9999-12-31T23:59:59Z", "--yes"],
        ["explain", "bad", "dec:abc"],
        ["explain", "bad", 'doc:{"a":1}'],
        ["explain", "bad", "i:99999999999999999999"],
        ["run", "--listen", "127.0.0.1:99999"],
        ["status", "--log-level", "loud"],
        ["nonsense"],
    ],
    ids=" ".join,
)
def test_odd_arguments_are_one_line_and_exit_2(setup, args):
    cfg, _, _ = setup
    result = run_syncd(args, cfg if args[0] != "nonsense" else None, timeout=60)
    assert result.returncode == ExitCode.CONFIG, (result.returncode, result.stderr)
    line = one_error_line(result)
    assert result.stderr.strip() == line, result.stderr


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("[1, 2]", "--document: not a JSON document: expected a JSON object"),
        ("42", "--document: not a JSON document: expected a JSON object"),
        ('"text"', "--document: not a JSON document: expected a JSON object"),
        ("no-such-file.json", "cannot read document file no-such-file.json: No such file"),
        # the last value was used, the first dropped without a word
        (
            '{"_id": 1, "body": "a", "x": {"k": 1, "k": 2}}',
            "--document: not a JSON document: the key 'k' appears twice in one object",
        ),
    ],
    ids=["array", "number", "string", "missing file", "a key twice"],
)
def test_a_document_that_is_json_but_no_object_is_not_read_as_a_file(setup, document, expected):
    """`--document '[1,2]'` was looked for as a file named [1,2]."""
    cfg, _, _ = setup
    result = run_syncd(["map", "bad", "--document", document], cfg, timeout=60)
    assert result.returncode == ExitCode.CONFIG, (result.returncode, result.stderr)
    assert expected in one_error_line(result), result.stderr


NOT_UTF8 = "s:\udcff"  # the byte 0xff as Python decodes argv: run_syncd passes it as is


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["map", "bad", "--document", '{"_id":1,"body":"\\ud800"}'], r"\ud800"),
        (["map", "bad", "--document", '{"_id":"\\ud800","body":"x"}'], r"\ud800"),
        (["map", "bad", "--document", '{"_id":"\\ud800","body":"x"}', "--json"], r"\ud800"),
        (["map", "bad", "--document", "bin.json"], "bin.json: not UTF-8 text"),
        (["map", "bad", "--document", "-"], "stdin: not UTF-8 text"),
        (["map", "bad", "--document", "deep.json"], "nested too deeply"),
        (["explain", "bad", NOT_UTF8], r"ID 's:\xff' is not UTF-8 text"),
        (["map", "bad", "--id", NOT_UTF8], r"--id 's:\xff' is not UTF-8 text"),
        (["dlq", "show", "bad", NOT_UTF8], r"KEY 's:\xff' is not UTF-8 text"),
        (["dlq", "retry", "bad", NOT_UTF8], r"KEY 's:\xff' is not UTF-8 text"),
        (["explain", "bad", 'doc:{"a":"s:\\ud800"}'], "MongoDB cannot hold that _id"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "",
)
def test_text_that_is_not_utf8_is_one_line_and_exit_2(setup, tmp_path, args, named):
    """A lone surrogate in JSON, a file or stdin that is not UTF-8, JSON nested past
    Python's recursion limit, and an argument with bytes that are not UTF-8."""
    cfg, _, _ = setup
    (tmp_path / "bin.json").write_bytes(b'\xff\xfe{\x00"\x00_\x00')
    (tmp_path / "deep.json").write_text('{"_id": 1, "a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with (tmp_path / "bin.json").open("rb") as stdin:
        result = subprocess.run(
            syncd_command(args, cfg),
            env=syncd_env(None),
            cwd=tmp_path,
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == ExitCode.CONFIG, (result.returncode, result.stderr)
    line = one_error_line(result)
    assert result.stderr.strip() == line, result.stderr
    assert named in line, line


@pytest.mark.parametrize("variable", ["SYNCD_PIPELINES__BAD__MAPPING__TEXT", "SYNCD_CHROMA_TOKEN"])
def test_an_environment_variable_that_is_not_utf8_is_named_and_exit_2(setup, variable):
    cfg, _, _ = setup
    result = run_syncd(["map", "bad", "--document", '{"_id": 1}'], cfg, env={variable: "\udcff"})
    assert result.returncode == ExitCode.CONFIG, (result.returncode, result.stderr)
    assert f"${variable} is not UTF-8 text" in one_error_line(result)


@pytest.mark.timeout(240)
def test_output_into_a_closed_pipe_exits_quietly(setup, mongo_client, syncd_factory):
    cfg, db, _ = setup
    mongo_client[db]["docs"].insert_many([dict(d) for d in DOCS])
    daemon = syncd_factory(["run"], cfg)
    wait_caught_up(mongo_client, db, settings_of(cfg), "bad", 60, "the run to catch up")
    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()
    for args, config in [
        (["tokens", "decode", "82612F653E000000022B0229296E04", "--json"], None),
        (["tokens", "show", "--json"], cfg),
        (["tokens", "history", "bad", "--json"], cfg),
        (["status", "--json"], cfg),
        (["verify", "bad", "--json"], cfg),
        (["dlq", "list", "bad", "--json"], cfg),
        (["explain", "bad", "i:1", "--json"], cfg),
        (["check"], cfg),
    ]:
        result = closed_pipe_run(args, config)
        assert result.stderr.decode() == "", (args, result.stderr.decode())
        assert result.returncode == ExitCode.DRIFT_OR_FAILURE, args


@pytest.mark.timeout(120)
def test_an_unwritable_file_checkpoint_store_fails_check_and_run(tmp_path, setup):
    cfg, _, _ = setup
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    text = cfg.read_text().replace('store = "mongodb"', f'store = "file"\npath = "{not_a_dir}/cp"')
    cfg.write_text(text)

    check = run_syncd(["check"], cfg, timeout=60)
    assert check.returncode != 0 and "Traceback" not in check.stderr + check.stdout
    (failed,) = [line for line in check.stdout.splitlines() if line.startswith("FAIL")]
    assert failed.startswith("FAIL  checkpoint store (file,") and "Not a directory" in failed

    run = run_syncd(["run"], cfg, timeout=60)
    assert run.returncode == ExitCode.CONFIG, run.stderr
    assert "Traceback" not in run.stderr
    assert "cannot use checkpoint.path" in run.stderr and "Not a directory" in run.stderr


@pytest.mark.timeout(300)
def test_check_refuses_a_changed_mapping_as_run_does(setup, mongo_uri, mongo_client, chroma_server):
    cfg, db, chroma_name = setup
    mongo_client[db]["docs"].insert_many([dict(d) for d in DOCS])
    first = run_syncd(["snapshot", "bad"], cfg, timeout=120)
    assert first.returncode == 0, first.stderr
    # The text comes from another field now; on_mapping_change is "refuse", the default.
    write_config(
        cfg,
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port},
        checkpoint_db=f"{db}_syncd",
        pipelines=[
            pipeline_table("bad", db, chroma_collection=chroma_name, mapping={"text": "title"})
        ],
        extra={"lease": {"ttl_s": 3, "renew_every_s": 1}},
    )
    refused = "the pipeline's mapping changed since its records were written"
    check = run_syncd(["check"], cfg, timeout=90)
    assert check.returncode == ExitCode.CONFIG, check.stdout + check.stderr
    assert "Traceback" not in check.stderr + check.stdout
    (failed,) = [line for line in check.stdout.splitlines() if line.startswith("FAIL")]
    assert failed.startswith(f"FAIL  pipeline bad: mapping: {refused}")

    run = run_syncd(["run"], cfg, timeout=90)
    assert run.returncode == ExitCode.CONFIG, run.stderr
    assert "Traceback" not in run.stderr
    # With leases, run refuses before it joins the other processes (test_ha.py).
    stopped = next(line for line in run.stderr.splitlines() if refused in line)
    assert stopped.startswith("syncd: error: "), run.stderr
    assert hinted_command(stopped) == hinted_command(failed)

    followed = run_syncd(hinted_command(failed), timeout=120)
    assert followed.returncode == 0, followed.stderr
    again = run_syncd(["check"], cfg, timeout=90)
    assert again.returncode == 0, again.stdout + again.stderr


@pytest.mark.timeout(180)
def test_check_embeds_a_probe_and_holds_it_against_the_collection(
    tmp_path, mongo_uri, mongo_client, chroma_server
):
    db = f"chk_{uuid.uuid4().hex[:8]}"
    chroma_name = f"chk-{uuid.uuid4().hex[:8]}"
    collection = chroma_server.client().create_collection(
        chroma_name, embedding_function=None, metadata={"hnsw:space": "cosine"}
    )
    collection.add(ids=["x"], documents=["x"], embeddings=[[0.5] * 16])

    def check(embedder: dict[str, Any], **pipeline: Any) -> subprocess.CompletedProcess[str]:
        cfg = write_config(
            tmp_path / "syncd.toml",
            mongo_uri=mongo_uri,
            chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port},
            checkpoint_db=f"{db}_syncd",
            pipelines=[
                pipeline_table(
                    "chk", db, chroma_collection=chroma_name, embedder=embedder, **pipeline
                )
            ],
        )
        return run_syncd(["check"], cfg, timeout=90)

    def line(result: subprocess.CompletedProcess[str], what: str) -> str:
        assert "Traceback" not in result.stderr + result.stdout, result.stderr
        (found,) = [x for x in result.stdout.splitlines() if f"pipeline chk: {what}" in x]
        return found

    same = check({"kind": "hashing", "dimensions": 16})
    assert same.returncode == 0, same.stdout + same.stderr
    assert (
        line(same, "embedder hashing")
        == "ok    pipeline chk: embedder hashing, 16-dimensional vectors"
    )
    assert "16-dimensional" in line(same, f"Chroma collection {chroma_name}")

    other = check({"kind": "hashing", "dimensions": 32})
    assert other.returncode != 0
    assert "holds 16-dimensional vectors, but the pipeline's embedder makes 32" in line(
        other, f"Chroma collection {chroma_name}"
    )

    distance = check({"kind": "hashing", "dimensions": 16}, distance="ip")
    assert distance.returncode != 0
    assert "exists with distance 'cosine'" in line(distance, f"Chroma collection {chroma_name}")

    with embedding_api(dimensions=24) as api:
        openai = {"kind": "openai", "base_url": api.base_url, "model": "m", "api_key": api.api_key}
        wrong = check({**openai, "dimensions": 16})
        assert wrong.returncode != 0
        refused = line(wrong, "embedder openai")
        assert refused.startswith("FAIL") and "24-dimensional vectors" in refused, refused
        assert api.inputs == ["syncd check: one probe input"]
        # A key the API refuses is a configuration mistake (exit 2), as README says.
        bad_key = check({**openai, "api_key": "sk-wrong-12345", "dimensions": 24})
        assert bad_key.returncode == ExitCode.CONFIG, bad_key.stdout + bad_key.stderr
        assert "refused the credentials" in line(bad_key, "embedder openai")
        assert "sk-wrong-12345" not in bad_key.stdout + bad_key.stderr
    closed = f"http://127.0.0.1:{free_port()}/v1"
    down = check({"kind": "openai", "base_url": closed, "model": "m", "api_key": "sk-x-12345"})
    assert down.returncode == ExitCode.SINK, down.stdout + down.stderr  # unreachable: exit 5
    assert line(down, "embedder openai").startswith("FAIL  pipeline chk: embedder openai:")
    mongo_client.drop_database(f"{db}_syncd")


@pytest.mark.timeout(300)
def test_check_sends_the_trace_exporter_an_empty_export(setup, phoenix_server):
    cfg, _, _ = setup
    text = cfg.read_text()
    cfg.write_text(
        text.replace(
            "[telemetry]",
            '[telemetry]\ntraces = "otlp_http"\n'
            f'otlp_endpoint = "{phoenix_server.otlp_http_endpoint}"',
        )
    )
    up = run_syncd(["check"], cfg, timeout=90)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "ok    trace exporter otlp_http to " in up.stdout

    closed = f"http://127.0.0.1:{free_port()}"
    cfg.write_text(
        text.replace(
            "[telemetry]", f'[telemetry]\ntraces = "otlp_http"\notlp_endpoint = "{closed}"'
        )
    )
    down = run_syncd(["check"], cfg, timeout=90)
    assert down.returncode == ExitCode.DRIFT_OR_FAILURE, down.stdout + down.stderr
    assert "Traceback" not in down.stderr + down.stdout
    (failed,) = [x for x in down.stdout.splitlines() if x.startswith("FAIL")]
    assert failed.startswith(f"FAIL  trace exporter otlp_http to {closed}/v1/traces:"), failed

    # The endpoint the OTEL_* variables give is the one named (it said "the OTEL_* default")
    cfg.write_text(text.replace("[telemetry]", '[telemetry]\ntraces = "otlp_http"'))
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"{closed}?tenant=t1"}
    down = run_syncd(["check"], cfg, env=env, timeout=90)
    assert down.returncode == ExitCode.DRIFT_OR_FAILURE, down.stdout + down.stderr
    (failed,) = [x for x in down.stdout.splitlines() if x.startswith("FAIL")]
    assert failed.startswith(f"FAIL  trace exporter otlp_http to {closed}/v1/traces?tenant=t1:")


@pytest.mark.timeout(120)
def test_a_span_log_path_that_is_a_directory_fails_check_and_explain(
    tmp_path, setup, chroma_server
):
    cfg, _, chroma_name = setup
    chroma_server.client().create_collection(
        chroma_name, embedding_function=None, metadata={"hnsw:space": "cosine"}
    )
    text = cfg.read_text()
    start = text.index("span_log_path = ")
    end = text.index("\n", start)
    cfg.write_text(f'{text[:start]}span_log_path = "{tmp_path}"{text[end:]}')

    check = run_syncd(["check"], cfg, timeout=60)
    assert check.returncode != 0 and "Traceback" not in check.stderr + check.stdout
    (failed,) = [line for line in check.stdout.splitlines() if line.startswith("FAIL")]
    assert failed.startswith(f"FAIL  span log {tmp_path}:") and "Is a directory" in failed

    explain = run_syncd(["explain", "bad", "i:1"], cfg, timeout=60)
    assert explain.returncode == ExitCode.CONFIG, explain.stderr
    assert "telemetry.span_log_path" in one_error_line(explain)


@pytest.mark.timeout(120)
def test_dead_letters_syncd_did_not_write_are_skipped_with_a_warning(setup, mongo_client):
    cfg, db, _ = setup
    mongo_client[f"{db}_syncd"]["dead_letters"].insert_many(
        [{"pipeline": "bad", "key": 5, "attempts": "x"}, {"pipeline": "bad"}]
    )
    for args in (["dlq", "list", "bad"], ["dlq", "list", "bad", "--json"], ["dlq", "retry", "bad"]):
        result = run_syncd(args, cfg, timeout=60)
        assert result.returncode == 0, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert result.stderr.count("that syncd did not write") == 2, result.stderr


@pytest.mark.timeout(180)
def test_a_lease_edited_by_hand_is_only_a_lock_taken_again(
    setup, mongo_client, chroma_server, syncd_factory
):
    cfg, db, chroma_name = setup
    settings = settings_of(cfg)
    coll = mongo_client[db]["docs"]
    coll.insert_many([dict(d) for d in DOCS])
    daemon = syncd_factory(["run"], cfg)
    wait_caught_up(mongo_client, db, settings, "bad", 60, "the first run to catch up")
    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()
    leases = mongo_client[f"{db}_syncd"]["leases"]
    edited = leases.update_one({"_id": "bad"}, {"$set": {"epoch": "x", "expires_at": "soon"}})
    assert edited.matched_count == 1

    shown = run_syncd(["tokens", "show", "bad", "--json"], cfg, timeout=60)
    assert shown.returncode == 0, shown.stderr
    (entry,) = json.loads(shown.stdout)["pipelines"]
    assert entry["lease"]["live"] is False and entry["lease"]["expires_at"] is None

    daemon.start()
    coll.insert_one({"_id": 6, "body": "after the lease was edited"})
    collection = chroma_server.client().get_collection(chroma_name)
    expected = oracle([*DOCS, {"_id": 6, "body": "after the lease was edited"}])
    wait_until(lambda: chroma_texts(collection) == expected, 90, "the stores to converge")
    lease = leases.find_one({"_id": "bad"})
    assert lease is not None and isinstance(lease["epoch"], int)


@pytest.mark.timeout(180)
def test_a_tls_or_port_mix_up_names_the_setting_to_fix(setup, mongo_uri, chroma_server):
    cfg, db, chroma_name = setup
    # chroma.ssl = true against a plain-HTTP Chroma: the TLS handshake fails.
    write_config(
        cfg,
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port,
                "ssl": True, "timeout_s": 5},
        checkpoint_db=f"{db}_syncd",
        pipelines=[pipeline_table("bad", db, chroma_collection=chroma_name)],
    )  # fmt: skip
    tls = run_syncd(["check"], cfg, timeout=90)
    assert tls.returncode == ExitCode.SINK, tls.stdout + tls.stderr
    assert "does not speak TLS: set chroma.ssl = false" in tls.stdout + tls.stderr, tls.stdout
    assert "Traceback" not in tls.stdout + tls.stderr
    # The hint followed: chroma.ssl = false, and Chroma answers.
    write_config(
        cfg,
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port,
                "ssl": False, "timeout_s": 5},
        checkpoint_db=f"{db}_syncd",
        pipelines=[pipeline_table("bad", db, chroma_collection=chroma_name)],
    )  # fmt: skip
    fixed = run_syncd(["check"], cfg, timeout=90)
    assert "does not speak TLS" not in fixed.stdout + fixed.stderr, fixed.stdout
    assert not [line for line in fixed.stdout.splitlines() if "FAIL" in line and "Chroma" in line]
    # A MongoDB URI pointing at Chroma's port: something answers, but not as MongoDB.
    wrong = f"mongodb://127.0.0.1:{chroma_server.port}/?directConnection=true"
    mongo = run_syncd(
        ["check"], cfg, timeout=90,
        env={"SYNCD_MONGODB_URI": wrong, "SYNCD_MONGODB__SERVER_SELECTION_TIMEOUT_MS": "2000"},
    )  # fmt: skip
    assert mongo.returncode == ExitCode.SOURCE, mongo.stdout + mongo.stderr
    assert "does not answer like MongoDB: check the host and port" in mongo.stdout + mongo.stderr
    assert "Traceback" not in mongo.stdout + mongo.stderr
