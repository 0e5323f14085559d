"""The commands that explain syncd to its operator: `config show`, `map`, shell
completion, `check --json` and `check`'s lack of side effects, each run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import tomllib
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd, syncd_command, syncd_env

from .helpers import pipeline_table, write_config

SECRET = "pa55-w0rd-never-shown"


def _multi_config(tmp_path: Path, mongo_uri: str, chroma_server: Any, db: str) -> Path:
    return write_config(
        tmp_path / "syncd.toml",
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port},
        checkpoint_db=f"{db}_syncd",
        pipelines=[
            pipeline_table(
                "multi",
                db,
                collection=None,
                collections=["a", "b"],
                chroma_collection=f"cli-{uuid.uuid4().hex[:8]}",
                filter={"status": "published"},
                mapping={"metadata": ["title", "n"]},
            )
        ],
    )


# --- config show ------------------------------------------------------------------------


def test_config_show_names_each_values_source_and_hides_secrets(tmp_path: Path) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text(
        tomli_w.dumps(
            {
                "mongodb": {"uri": f"mongodb://app:{SECRET}@db.internal:27017/?replicaSet=rs0"},
                "chroma": {"mode": "http", "host": "from-file"},
                "pipelines": [
                    {
                        "name": "articles",
                        "database": "app",
                        "collection": "articles",
                        "mapping": {"text": "body"},
                        "embedder": {
                            "kind": "openai",
                            "base_url": "https://llm.internal/v1",
                            "model": "m",
                        },
                    }
                ],
            }
        )
    )
    env = {
        "SYNCD_CHROMA__PORT": "8123",
        "SYNCD_PIPELINES__ARTICLES__BATCH_SIZE": "77",
        "SYNCD_CHROMA_TOKEN": f"tok-{SECRET}",
        "OPENAI_API_KEY": f"sk-{SECRET}",
    }
    shown = run_syncd(["config", "show", "--json", "--log-level", "debug"], path, env=env)
    assert shown.returncode == 0, shown.stderr
    assert SECRET not in shown.stdout + shown.stderr
    data = json.loads(shown.stdout)
    assert data["config_file"] == str(path) and data["config_file_exists"] is True
    by_key = {e["key"]: e for e in data["settings"]}

    def seen(key: str) -> tuple[Any, str, Any]:
        entry = by_key[key]
        return entry["value"], entry["source"], entry["detail"]

    assert seen("chroma.host") == ("from-file", "file", str(path))
    assert seen("chroma.port") == (8123, "environment", "SYNCD_CHROMA__PORT")
    assert seen("chroma.ssl") == (False, "default", None)
    assert seen("log.level") == ("debug", "flag", "--log-level")
    assert seen("pipelines[0].batch_size") == (
        77,
        "environment",
        "SYNCD_PIPELINES__ARTICLES__BATCH_SIZE",
    )
    assert seen("pipelines[0].mapping.text") == ("body", "file", str(path))
    assert seen("chroma.token") == ("***", "environment", "SYNCD_CHROMA_TOKEN")
    assert seen("pipelines[0].embedder.api_key") == ("***", "environment", "OPENAI_API_KEY")
    assert seen("mongodb.uri")[0] == "mongodb://app:***@db.internal:27017/?replicaSet=rs0"

    text = run_syncd(["config", "show"], path, env=env)
    assert text.returncode == 0, text.stderr
    assert SECRET not in text.stdout + text.stderr
    port_line = next(line for line in text.stdout.splitlines() if line.startswith("chroma.port "))
    assert port_line.split("=", 1)[1].strip() == "8123  # environment: SYNCD_CHROMA__PORT"


def test_config_show_without_a_file_shows_the_defaults_and_a_bad_one_exits_2(
    tmp_path: Path,
) -> None:
    shown = run_syncd(["config", "show"], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == "# config file: syncd.toml (not found: defaults apply)"
    assert "chroma.mode" in shown.stdout and "# default" in shown.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text('[chroma]\nport = "many"\n')
    result = run_syncd(["config", "show"], bad)
    assert result.returncode == ExitCode.CONFIG
    assert "chroma.port" in result.stderr and "Traceback" not in result.stderr


# --- map ----------------------------------------------------------------------------------


def test_map_shows_the_records_a_document_becomes_without_writing(
    tmp_path: Path, mongo_uri: str, mongo_client: Any, chroma_server: Any
) -> None:
    db = f"map_{uuid.uuid4().hex[:8]}"
    cfg = _multi_config(tmp_path, mongo_uri, chroma_server, db)
    mongo_client[db]["b"].insert_one(
        {
            "_id": 7,
            "body": ["first line", "second line"],
            "title": "T",
            "n": 3,
            "status": "published",
        }
    )
    doc_file = tmp_path / "doc.json"
    doc_file.write_text(
        '{"_id": {"$oid": "65a1c2d3e4f5a6b7c8d9e0f1"}, "body": 12.5, '
        '"title": "num", "status": "published"}'
    )
    runs = {
        "from_mongodb": ["map", "multi", "--id", "b/i:7", "--json"],
        "inline": [
            "map",
            "multi",
            "--collection",
            "a",
            "--json",
            "--document",
            '{"_id": "x", "body": "hello", "status": "published", "n": 1}',
        ],
        "file": ["map", "multi", "--collection", "a", "--document", str(doc_file), "--json"],
        "filtered_out": [
            "map",
            "multi",
            "--collection",
            "a",
            "--document",
            '{"_id": "y", "body": "hi", "status": "draft"}',
        ],
        "poison": [
            "map",
            "multi",
            "--collection",
            "a",
            "--document",
            '{"_id": "z", "body": {"not": "text"}, "status": "published"}',
        ],
        "no_collection": ["map", "multi", "--document", '{"_id": 1, "body": "b"}'],
        "absent": ["map", "multi", "--id", "b/i:404"],
        "text": ["map", "multi", "--id", "b/i:7"],
    }
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(runs, pool.map(lambda a: run_syncd(a, cfg), runs.values()), strict=True))

    fetched = json.loads(results["from_mongodb"].stdout)
    assert results["from_mongodb"].returncode == 0, results["from_mongodb"].stderr
    [record] = fetched["records"]
    # The README's rules: a multi-collection id is COLLECTION/ID and carries syncd_coll; a
    # list of strings is one text, joined by newlines.
    assert record["id"] == "b/i:7" and fetched["key"] == "b/i:7"
    assert record["text"] == "first line\nsecond line"
    assert record["metadata"]["syncd_coll"] == "b"
    assert record["metadata"]["syncd_id"] == "b/i:7"
    assert {k: v for k, v in record["metadata"].items() if not k.startswith("syncd_")} == {
        "title": "T",
        "n": 3,
    }
    assert record["metadata"]["syncd_hash"] == record["content_hash"]
    assert len(record["content_hash"]) == 64 and len(record["text_hash"]) == 64

    inline = json.loads(results["inline"].stdout)
    assert [r["id"] for r in inline["records"]] == ["a/s:x"]
    from_file = json.loads(results["file"].stdout)
    assert from_file["records"][0]["text"] == "12.5"  # a number is stored as its text
    assert from_file["records"][0]["id"] == "a/oid:65a1c2d3e4f5a6b7c8d9e0f1"

    assert results["filtered_out"].returncode == 0
    assert "does not match the pipeline filter" in results["filtered_out"].stdout
    assert results["poison"].returncode == ExitCode.DRIFT_OR_FAILURE
    assert "cannot be mapped" in results["poison"].stdout
    assert "not text" in results["poison"].stdout
    for name in ("no_collection", "absent"):
        assert results[name].returncode == ExitCode.CONFIG, results[name].stdout
        assert "Traceback" not in results[name].stderr
    assert "--collection" in results["no_collection"].stderr
    assert (
        "b/i:7" in results["text"].stdout and '"first line\\nsecond line"' in results["text"].stdout
    )

    # Nothing was written: the pipeline's Chroma collection was never even created.
    target = tomllib.loads(cfg.read_text())["pipelines"][0]["chroma_collection"]
    assert target not in [c.name for c in chroma_server.client().list_collections()]
    mongo_client.drop_database(db)


def test_map_refuses_a_document_whose_metadata_keys_collide(tmp_path: Path) -> None:
    """{"a.b": 1, "a": {"b": 2}} flattens to "a.b" twice: one value would be lost unseen."""
    cfg = tmp_path / "syncd.toml"
    cfg.write_text(
        '[mongodb]\nuri = "mongodb://127.0.0.1:1/?directConnection=true"\n'
        '[[pipelines]]\nname = "notes"\ndatabase = "app"\ncollection = "notes"\n'
        '[pipelines.mapping]\ntext = "body"\nmetadata = ["title"]\n'
    )
    clash = '{"_id": "c", "body": "x", "title": {"a.b": 1, "a": {"b": 2}}}'
    result = run_syncd(["map", "notes", "--json", "--document", clash], cfg, timeout=60)
    assert result.returncode == ExitCode.DRIFT_OR_FAILURE, (result.stdout, result.stderr)
    error = json.loads(result.stdout)["error"]
    assert error["class"] == "MappingError"
    assert "metadata key 'title.a.b' would hold two different values" in error["message"]

    # The README's list rules: null items are dropped, a mix becomes strings.
    listed = '{"_id": "l", "body": "x", "title": [1, "a", null, {"x": 1}]}'
    result = run_syncd(["map", "notes", "--json", "--document", listed], cfg, timeout=60)
    assert result.returncode == 0, result.stderr
    [record] = json.loads(result.stdout)["records"]
    assert record["metadata"]["title"] == ["1", "a", '{"x":1}']


def test_map_reads_a_field_whose_name_holds_dots_and_refuses_two_values_for_one_path(
    tmp_path: Path,
) -> None:
    """MongoDB allows {"a.b": 1}; the path a.b used to reach only {"a": {"b": ...}}, so the
    value was dropped without a word, and beside a nested a.b one of the two was lost."""
    cfg = tmp_path / "syncd.toml"
    cfg.write_text(
        '[mongodb]\nuri = "mongodb://127.0.0.1:1/?directConnection=true"\n'
        '[[pipelines]]\nname = "notes"\ndatabase = "app"\ncollection = "notes"\n'
        '[pipelines.mapping]\ntext_template = "{t.x}"\nmetadata = ["a", "a.b"]\n'
    )
    dotted = '{"_id": 1, "t.x": "dotted text", "a.b": 7}'
    result = run_syncd(["map", "notes", "--json", "--document", dotted], cfg, timeout=60)
    assert result.returncode == 0, (result.stdout, result.stderr)
    [record] = json.loads(result.stdout)["records"]
    assert record["text"] == "dotted text"
    assert record["metadata"]["a.b"] == 7

    both = '{"_id": 2, "t": {"x": "y"}, "a.b": 1, "a": {"b": 2}}'
    result = run_syncd(["map", "notes", "--json", "--document", both], cfg, timeout=60)
    assert result.returncode == ExitCode.DRIFT_OR_FAILURE, (result.stdout, result.stderr)
    error = json.loads(result.stdout)["error"]
    assert error["class"] == "MappingError"
    assert "field 'a.b' reaches two different values" in error["message"]


# --- completion ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shell", "marker"),
    [
        ("bash", "complete -o nospace -o default -o bashdefault -F"),
        ("zsh", "#compdef syncd"),
        ("fish", "complete --command syncd"),
    ],
)
def test_completion_scripts_are_generated_for_each_shell(shell: str, marker: str) -> None:
    result = run_syncd(["completion", shell])
    assert result.returncode == 0, result.stderr
    assert marker in result.stdout
    assert "_ARGCOMPLETE" in result.stdout


def test_completion_offers_commands_sub_commands_options_and_pipeline_names(
    tmp_path: Path,
) -> None:
    (tmp_path / "syncd.toml").write_text(
        '[[pipelines]]\nname = "articles"\ndatabase = "app"\ncollection = "a"\n'
        '[pipelines.mapping]\ntext = "body"\n'
        '[[pipelines]]\nname = "authors"\ndatabase = "app"\ncollection = "b"\n'
        '[pipelines.mapping]\ntext = "bio"\n'
    )

    def complete(line: str) -> list[str]:
        # What the generated scripts do: run syncd with the line in the environment; it
        # writes the candidates to file descriptor 8.
        env = syncd_env(
            {
                "_ARGCOMPLETE": "1",
                "_ARGCOMPLETE_IFS": "\n",
                "COMP_LINE": line,
                "COMP_POINT": str(len(line)),
            }
        )
        result = subprocess.run(
            ["bash", "-c", 'exec "$@" 8>&1 9>/dev/null', "complete", *syncd_command([])],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return sorted(c.strip() for c in result.stdout.split("\n") if c.strip())

    assert "dlq" in complete("syncd dl")
    assert {"list", "show", "retry", "purge"} <= set(complete("syncd dlq "))
    assert complete("syncd verify a") == ["articles", "authors"]
    assert complete("syncd dlq list au") == ["authors"]
    assert "--json" in complete("syncd check --")


# --- check --------------------------------------------------------------------------------


def test_check_json_and_no_side_effects(tmp_path: Path, mongo_uri: str, chroma_server: Any) -> None:
    db = f"chk_{uuid.uuid4().hex[:8]}"
    embedded = write_config(
        tmp_path / "embedded.toml",
        mongo_uri=mongo_uri,
        chroma={"mode": "embedded", "path": "./syncd-data/chroma"},
        checkpoint_db=f"{db}_syncd",
        pipelines=[pipeline_table("chk", db)],
    )
    result = run_syncd(["check", "--json"], embedded, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["offline"] is False
    assert report["config"] == {"path": str(embedded), "pipelines": 1}
    chroma_check = next(c for c in report["checks"] if c["check"].startswith("Chroma"))
    assert "not created yet" in chroma_check["check"]
    assert all(c["ok"] and c["error"] is None for c in report["checks"])
    assert not (tmp_path / "syncd-data").exists(), "check created the embedded Chroma directory"

    class Closed:
        host, port = "127.0.0.1", 9  # discard: nothing listens there

    http = _multi_config(tmp_path, mongo_uri, Closed, db)
    failed = run_syncd(["check", "--json"], http, timeout=120)
    assert failed.returncode == ExitCode.SINK, failed.stdout + failed.stderr
    report = json.loads(failed.stdout)
    chroma_check = next(c for c in report["checks"] if c["check"].startswith("Chroma"))
    assert report["ok"] is False and chroma_check["ok"] is False
    assert chroma_check["error"] and chroma_check["exit_code"] == ExitCode.SINK

    offline = run_syncd(["check", "--offline", "--json"], http)
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout) == {
        "ok": True,
        "config": {"path": str(http), "pipelines": 1},
        "offline": True,
        "checks": [],
    }


def test_check_without_a_config_file_or_pipelines_is_a_config_error(tmp_path: Path) -> None:
    for args in (["check", "--offline"], ["check"]):
        result = run_syncd(args, cwd=tmp_path)
        assert result.returncode == ExitCode.CONFIG, result.stdout
        assert "syncd.toml not found" in result.stderr and "Traceback" not in result.stderr
    empty = tmp_path / "empty.toml"
    empty.write_text("[log]\nlevel = 'info'\n")
    result = run_syncd(["check", "--offline"], empty)
    assert result.returncode == ExitCode.CONFIG, result.stdout
    assert "no [[pipelines]]" in result.stderr
