"""Bad configuration: one line naming the key, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd, syncd_command, syncd_env


def good() -> dict[str, Any]:
    return {
        "mongodb": {"uri": "mongodb://127.0.0.1:1/?directConnection=true"},
        "chroma": {"mode": "embedded", "path": "chroma"},
        "pipelines": [
            {
                "name": "articles",
                "database": "app",
                "collection": "articles",
                "mapping": {"text": "body"},
            }
        ],
    }


def edit(path: str, value: Any) -> dict[str, Any]:
    data = good()
    node: Any = data
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return data


DELETE = object()

CASES: list[tuple[str, dict[str, Any] | str, str]] = [
    ("unknown top-level key", edit("colour", "blue"), "colour: unknown key"),
    ("unknown pipeline key", edit("pipelines.0.batch_sise", 5), "batch_sise: unknown key"),
    (
        "a pipeline's table at the top level",
        edit("embedder", {"kind": "hashing", "dimensions": 8}),
        "embedder: unknown key at the top level: embedder is a pipeline's setting: write the "
        "table as [pipelines.embedder], after its [[pipelines]] line",
    ),
    (
        "a pipeline's key at the top level",
        edit("batch_size", 100),
        "batch_size: unknown key at the top level: batch_size is a pipeline's setting: put it "
        "after a [[pipelines]] line",
    ),
    ("wrong type", edit("pipelines.0.batch_size", "many"), "pipelines[0].batch_size"),
    ("out of range", edit("pipelines.0.batch_size", 0), "pipelines[0].batch_size"),
    ("missing database", edit("pipelines.0.database", DELETE), "database: required"),
    ("missing mapping", edit("pipelines.0.mapping", DELETE), "mapping: required"),
    ("bad uri", edit("mongodb.uri", "postgres://x"), "mongodb: not a valid MongoDB URI"),
    ("uri without a host", edit("mongodb.uri", "mongodb://:27017/"), "URI (empty host name)"),
    ("uri host with an empty label", edit("mongodb.uri", "mongodb://db..local/"), "empty or over"),
    ("bad enum", edit("pipelines.0.on_error", "shrug"), "pipelines[0].on_error"),
    (
        "bad on_mapping_change",
        edit("pipelines.0.on_mapping_change", "resync"),
        "pipelines[0].on_mapping_change",
    ),
    ("bad chroma mode", edit("chroma.mode", "cloud"), "chroma.mode"),
    ("both text sources", edit("pipelines.0.mapping.text_template", "{a}"), "exactly one"),
    ("no text source", edit("pipelines.0.mapping.text", DELETE), "exactly one"),
    ("collection and collections", edit("pipelines.0.collections", ["a"]), "exactly one"),
    (
        "a collection listed twice",
        {
            **(d := edit("pipelines.0.collections", ["a", "b", "a"])),
            "pipelines": [{k: v for k, v in d["pipelines"][0].items() if k != "collection"}],
        },
        "pipelines[0].collections: 'a' listed more than once",
    ),
    ("bad pipeline name", edit("pipelines.0.name", "a b"), "pipelines[0].name"),
    (
        "empty pipeline name",
        edit("pipelines.0.name", ""),
        "pipelines[0].name: '' is not a pipeline name: use 1 to 63 letters, digits, '_', '-' "
        "and '.', starting with a letter or digit",
    ),
    (
        "empty text",
        edit("pipelines.0.mapping.text", ""),
        "pipelines[0].mapping.text: may not be empty; name the field whose value is the text",
    ),
    (
        "empty text_template",
        edit("pipelines.0.mapping", {"text_template": ""}),
        "pipelines[0].mapping.text_template: may not be empty",
    ),
    (
        "overlap >= size",
        edit("pipelines.0.mapping", {"text": "b", "chunk_size": 10, "chunk_overlap": 10}),
        "chunk_overlap",
    ),
    (
        "reserved metadata key",
        edit("pipelines.0.mapping", {"text": "b", "rename": {"a": "syncd_x"}}),
        "reserved prefix",
    ),
    (
        "reserved metadata field",
        edit("pipelines.0.mapping", {"text": "b", "metadata": ["syncd_id"]}),
        "pipelines[0].mapping: metadata field 'syncd_id' would become the reserved key",
    ),
    (
        "two fields renamed to one key",
        edit(
            "pipelines.0.mapping",
            {"text": "b", "metadata": ["a", "b"], "rename": {"a": "c", "b": "c"}},
        ),
        "would both be stored as metadata key 'c'",
    ),
    (
        "a rename onto another field's key",
        edit("pipelines.0.mapping", {"text": "b", "metadata": ["a", "c"], "rename": {"a": "c"}}),
        "would both be stored as metadata key 'c'",
    ),
    (
        "field embedder without field",
        edit("pipelines.0.embedder", {"kind": "field"}),
        "embedder.field is required",
    ),
    ("openai without url", edit("pipelines.0.embedder", {"kind": "openai"}), "base_url"),
    (
        "embed_concurrency for a local embedder",
        edit("pipelines.0.embedder", {"kind": "hashing", "embed_concurrency": 4}),
        'pipelines[0].embedder: embedder.embed_concurrency = 4 needs embedder.kind = "openai"',
    ),
    (
        "embed_concurrency zero",
        edit(
            "pipelines.0.embedder",
            {
                "kind": "openai",
                "base_url": "http://127.0.0.1:1/v1",
                "model": "m",
                "embed_concurrency": 0,
            },
        ),
        "pipelines[0].embedder.embed_concurrency: Input should be greater than or equal to 1",
    ),
    (
        "embed_concurrency a bool",
        edit(
            "pipelines.0.embedder",
            {
                "kind": "openai",
                "base_url": "http://127.0.0.1:1/v1",
                "model": "m",
                "embed_concurrency": True,
            },
        ),
        "pipelines[0].embedder.embed_concurrency: must be a whole number of requests",
    ),
    ("bad listen", edit("telemetry", {"listen": "nowhere"}), "telemetry.listen"),
    ("lease renew >= ttl", edit("lease", {"ttl_s": 5, "renew_every_s": 5}), "renew_every_s"),
    ("bad filter operator", edit("pipelines.0.filter", {"n": {"$near": 1}}), "$near"),
    (
        "chroma name too short",
        edit("pipelines.0.name", "ab"),
        "pipelines[0].name: 'ab' is also the Chroma collection's name, and Chroma needs 3-512",
    ),
    (
        "chroma collection with '..'",
        edit("pipelines.0.chroma_collection", "a..b"),
        "pipelines[0].chroma_collection: 'a..b' is not a valid Chroma collection name",
    ),
    (
        "chroma collection an IP",
        edit("pipelines.0.chroma_collection", "10.0.0.1"),
        "not an IP address",
    ),
    (
        "chroma collection ends in '-'",
        edit("pipelines.0.chroma_collection", "abc-"),
        "pipelines[0].chroma_collection: 'abc-'",
    ),
    ("not TOML", "this is = not [ toml", "not valid TOML"),
    ("listen port too big", edit("telemetry", {"listen": "127.0.0.1:99999"}), "telemetry.listen"),
    (
        "template spec that cannot format text",
        edit("pipelines.0.mapping", {"text_template": "{title:d}"}),
        "cannot format text",
    ),
    (
        "template conversion",
        edit("pipelines.0.mapping", {"text_template": "{title!r}"}),
        "text_template",
    ),
    (
        "template position",
        edit("pipelines.0.mapping", {"text_template": "{0}"}),
        "pipelines[0].mapping.text_template: {0} is not a field path",
    ),
    (
        "template index",
        edit("pipelines.0.mapping", {"text_template": "{a[0]}"}),
        "{a[0]} is not a field path",
    ),
    (
        "template attribute",
        edit("pipelines.0.mapping", {"text_template": "{a.__class__}"}),
        "{a.__class__} is not a field path",
    ),
    ("nan", edit("lease", {"ttl_s": float("nan")}), "lease.ttl_s"),
    ("infinite duration", edit("shutdown_timeout_s", float("inf")), "shutdown_timeout_s"),
    ("duration too long to wait", edit("shutdown_timeout_s", 1e300), "shutdown_timeout_s"),
    (
        "halt recheck over a year",
        edit("pipelines.0.halt_recheck_s", 40_000_000),
        "pipelines[0].halt_recheck_s: Input should be less than or equal to 31622400",
    ),
    (
        "progress interval over a year",
        edit("log", {"progress_every_s": 40_000_000}),
        "log.progress_every_s: Input should be less than or equal to 31622400",
    ),
    ("huge sample", edit("telemetry", {"verify_sample_size": 2**62}), "verify_sample_size"),
    ("bad database name", edit("pipelines.0.database", "a.b"), "not a MongoDB database name"),
    (
        "bad collection name",
        edit("pipelines.0.collection", "system.x"),
        "not a MongoDB collection name",
    ),
    ("bad checkpoint database", edit("checkpoint", {"database": ""}), "checkpoint.database"),
    (
        "dots in a collection name",
        edit("checkpoint", {"collection": "../x"}),
        "checkpoint.collection",
    ),
    ("chroma host with a port", edit("chroma", {"mode": "http", "host": "h:1"}), "chroma.host"),
    (
        "chroma tenant too short",
        edit("chroma", {"mode": "embedded", "tenant": ""}),
        "chroma.tenant",
    ),
    (
        "blank checkpoint path",
        edit("checkpoint", {"store": "file", "path": " "}),
        "checkpoint.path",
    ),
    ("empty uri_file key", edit("mongodb", {"uri_file": ""}), "uri_file is empty"),
    (
        "missing uri_file",
        edit("mongodb", {"uri_file": "/nonexistent/uri"}),
        "cannot read mongodb.uri_file",
    ),
    ("a bool for a number", edit("chroma", {"mode": "http", "port": True}), "chroma.port"),
    # TOML has types: quotes make text, which the file's values are not converted from
    (
        "a number in quotes",
        edit("chroma", {"mode": "http", "port": "8000"}),
        "chroma.port: Input should be a valid integer, not text: write it without quotes",
    ),
    (
        "a boolean in quotes",
        edit("chroma", {"mode": "http", "ssl": "true"}),
        "chroma.ssl: Input should be a valid boolean, not text: write it without quotes",
    ),
    (
        "a token and an Authorization header",
        edit("chroma", {"mode": "http", "token": "t0ken", "headers": {"authorization": "x"}}),
        "chroma: chroma.token (or token_file) and chroma.headers.authorization both set the "
        "Authorization header: keep one",
    ),
    (
        "an OTLP endpoint that is no URL",
        edit("telemetry", {"traces": "otlp_http", "otlp_endpoint": "collector at port 4318"}),
        "telemetry.otlp_endpoint: not an endpoint: expected http://HOST:PORT/v1/traces",
    ),
    (
        "HOST:PORT for OTLP/HTTP",
        edit("telemetry", {"traces": "otlp_http", "otlp_endpoint": "collector:4318"}),
        "telemetry.otlp_endpoint: OTLP/HTTP needs a URL, such as http://HOST:4318/v1/traces",
    ),
    (
        "an OTLP endpoint with a port out of range",
        edit("telemetry", {"otlp_endpoint": "http://u:secretpw@collector:99999/v1/traces"}),
        "telemetry.otlp_endpoint: not an endpoint",
    ),
    (
        "leases asked for beside the file store",
        {**good(), "checkpoint": {"store": "file"}, "lease": {"enabled": True}},
        'lease.enabled = true needs checkpoint.store = "mongodb"',
    ),
    (
        "an OTLP/gRPC endpoint that is no HOST:PORT",
        edit("telemetry", {"traces": "otlp_grpc", "otlp_endpoint": "[::1]"}),
        "telemetry.otlp_endpoint: not an endpoint",
    ),
    (
        "a lease setting under [chroma]",
        edit("chroma.ttl_s", 3),
        "chroma.ttl_s: unknown key here: it is a setting of [lease]",
    ),
    (
        "an embedder setting under [[pipelines]]",
        edit("pipelines.0.kind", "hashing"),
        "pipelines[0].kind: unknown key here: it is a setting of [pipelines.embedder]",
    ),
    (
        "[pipelines] written for [[pipelines]]",
        {**good(), "pipelines": good()["pipelines"][0]},
        "pipelines: is one table, not a list of them: write each pipeline under a "
        "[[pipelines]] line (two brackets)",
    ),
    ("no pipelines", edit("pipelines", []), "no [[pipelines]] configured"),
    ("empty file", "", "no [[pipelines]] configured"),
]


@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_exits_2_with_one_line(tmp_path: Path, data: Any, expected: str) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text(data if isinstance(data, str) else tomli_w.dumps(data))
    result = run_syncd(["check"], config=path, timeout=60)
    stderr = result.stderr.strip()
    assert result.returncode == ExitCode.CONFIG, (result.returncode, stderr, result.stdout)
    assert "Traceback" not in stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert expected in stderr, stderr
    assert stderr.startswith("syncd: error: ")


@pytest.mark.parametrize("command", [["run"], ["check"], ["check", "--offline"]])
def test_a_name_chroma_refuses_stops_every_command_before_it_starts(
    tmp_path: Path, command: list[str]
) -> None:
    """Chroma wants 3 characters or more; the pipeline name is the default collection name."""
    path = tmp_path / "syncd.toml"
    path.write_text(tomli_w.dumps(edit("pipelines.0.name", "ab")))
    result = run_syncd(command, config=path, timeout=60)
    assert result.returncode == ExitCode.CONFIG, (result.returncode, result.stderr)
    assert result.stderr.strip().splitlines() == [
        f"syncd: error: {path}: pipelines[0].name: 'ab' is also the Chroma collection's name, "
        "and Chroma needs 3-512 characters from letters, digits, '.', '_' and '-', starting "
        "and ending with a letter or digit; rename the pipeline or set chroma_collection"
    ]


@pytest.mark.parametrize(
    "command",
    [["run"], ["check"], ["check", "--offline"], ["map", "articles", "--document", '{"_id": 1}']],
)
def test_a_reserved_metadata_field_stops_every_command_alike(
    tmp_path: Path, command: list[str]
) -> None:
    """`check` said "config ok" where `run` and `map` refused the mapping."""
    path = tmp_path / "syncd.toml"
    path.write_text(tomli_w.dumps(edit("pipelines.0.mapping.metadata", ["syncd_id"])))
    result = run_syncd(command, config=path, timeout=60)
    assert result.returncode == ExitCode.CONFIG, (result.returncode, result.stderr)
    assert result.stderr.strip().splitlines() == [
        f"syncd: error: {path}: pipelines[0].mapping: metadata field 'syncd_id' would become "
        "the reserved key 'syncd_id'; add a mapping.rename entry for it"
    ]


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    result = run_syncd(["check"], config=tmp_path / "absent.toml", timeout=60)
    assert result.returncode == ExitCode.CONFIG
    assert "absent.toml not found" in result.stderr


def test_password_never_echoed(tmp_path: Path) -> None:
    data = edit("mongodb.uri", "mongodb://user:hunter2secret@127.0.0.1:1/?replicaSet=rs0")
    data["pipelines"][0]["batch_size"] = -1
    path = tmp_path / "syncd.toml"
    path.write_text(tomli_w.dumps(data))
    result = run_syncd(["check"], config=path, timeout=60)
    assert result.returncode == ExitCode.CONFIG
    assert "hunter2secret" not in result.stderr + result.stdout


def test_check_offline_accepts_a_good_config(tmp_path: Path) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text(tomli_w.dumps(good()))
    result = run_syncd(["check", "--offline"], config=path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "config ok: 1 pipeline(s)" in result.stdout


@pytest.mark.parametrize("content", ["", "\n\n"], ids=["empty", "blank lines"])
def test_an_empty_uri_file_is_an_error_not_the_default_uri(tmp_path: Path, content: str) -> None:
    uri_file = tmp_path / "uri"
    uri_file.write_text(content)
    data = edit("mongodb", {"uri_file": str(uri_file)})
    path = tmp_path / "syncd.toml"
    path.write_text(tomli_w.dumps(data))
    result = run_syncd(["check", "--offline"], config=path, timeout=60)
    assert result.returncode == ExitCode.CONFIG, result.stdout
    assert result.stderr.strip().endswith(f"mongodb.uri_file {uri_file} is empty")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: d, "Is a directory"),
        (lambda d: (d / "c.toml").write_bytes(b"\xff\xfe[x]\n") and d / "c.toml", "not UTF-8"),
        (lambda d: d / "absent" / "c.toml", "not found"),
    ],
    ids=["a directory", "not UTF-8", "missing"],
)
def test_a_config_path_that_is_no_config_file(tmp_path: Path, make: Any, expected: str) -> None:
    result = run_syncd(["check", "--offline"], config=make(tmp_path), timeout=60)
    assert result.returncode == ExitCode.CONFIG
    stderr = result.stderr.strip()
    assert len(stderr.splitlines()) == 1 and expected in stderr, stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    "command",
    [
        ["check"],
        ["status"],
        ["run"],
        ["snapshot", "orph"],
        ["verify", "orph"],
        ["repair", "orph"],
        ["resume", "orph"],
        ["rebuild", "orph"],
        ["dlq", "list", "orph"],
        ["wait", "orph", "--after", "now"],
        ["explain", "orph", "i:1"],
        ["map", "orph", "--document", "{}"],
        ["tokens", "show"],
        ["tokens", "history", "orph"],
        ["tokens", "set", "orph", "--at", "2024-01-01T00:00:00Z", "--yes"],
        ["tokens", "reset", "orph", "--yes"],
    ],
    ids=lambda c: c[0] if c[0] not in ("dlq", "tokens") else " ".join(c[:2]),
)
def test_no_default_config_file_is_one_message_for_every_verb(
    tmp_path: Path, command: list[str]
) -> None:
    """Pipelines come only from a config file: with none named and no ./syncd.toml, every
    verb that works on pipelines says so alike, naming the file and how to point at one."""
    env = {"SYNCD_CONFIG": ""}  # as if unset, whatever the test's environment holds
    result = run_syncd(command, env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == ExitCode.CONFIG, (result.returncode, result.stderr)
    assert result.stderr.strip().splitlines() == [
        f"syncd: error: config file syncd.toml not found in {tmp_path.resolve()}; point at one "
        "with --config PATH or SYNCD_CONFIG=PATH, or create syncd.toml here (see README)"
    ]


@pytest.mark.parametrize("command", [["run"], ["rebuild", "articles"]])
def test_a_bad_listen_flag_is_named_as_the_flag(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text(tomli_w.dumps(good()))
    result = run_syncd([*command, "--listen", "notahostport"], config=path, timeout=60)
    assert result.returncode == ExitCode.CONFIG, (result.returncode, result.stderr)
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("syncd: error: --listen: expected HOST:PORT"), line
    assert "telemetry.listen" not in line and str(path) not in line, line


def _refused_with(tmp_path: Path, env: dict[str, str]) -> tuple[Path, str]:
    """A good config file and ``env``: the config file and the one line `check` refuses with."""
    path = tmp_path / "syncd.toml"
    path.write_text(tomli_w.dumps(good()))
    result = run_syncd(["check", "--offline"], config=path, env=env, timeout=60)
    assert result.returncode == ExitCode.CONFIG, (result.returncode, result.stdout, result.stderr)
    (line,) = result.stderr.strip().splitlines()
    return path, line


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SYNCD_CHROMA__PORT", "abc"),
        ("SYNCD_MONGODB_URI", "http://not-mongodb"),
        # a pipeline's setting, by name or position (these were blamed on the file)
        ("SYNCD_PIPELINES__ARTICLES__BATCH_SIZE", "abc"),
        ("SYNCD_PIPELINES__0__BATCH_SIZE", "abc"),
        ("SYNCD_PIPELINES__ARTICLES__FILTER", '{"$bogus": 1}'),
        ("SYNCD_PIPELINES__ARTICLES__MAPPING__CHUNK_SIZE", "-1"),
        ("SYNCD_CHROMA__HEADERS", '{"X Key": "v"}'),
        ("SYNCD_CHROMA__HEADERS", '{"X-Key": 5}'),
        ("SYNCD_PIPELINES__NOPE__BATCH_SIZE", "5"),
    ],
)
def test_a_bad_value_from_the_environment_is_named_as_the_variable(
    tmp_path: Path, variable: str, value: str
) -> None:
    path, line = _refused_with(tmp_path, {variable: value})
    # "VAR: ..." for a value; "VAR (table): ..." for a check of the table it is in
    assert line.startswith((f"syncd: error: {variable}: ", f"syncd: error: {variable} (")), line
    assert str(path) not in line, line


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"SYNCD_MONGODB_URI": "mongodb://a:1", "SYNCD_MONGODB__URI": "mongodb://b:1"},
            "SYNCD_MONGODB_URI and SYNCD_MONGODB__URI both set mongodb.uri; keep one",
        ),
        (
            {"SYNCD_CHROMA_TOKEN": "a-SECRET", "SYNCD_CHROMA__TOKEN": "b-SECRET"},
            "SYNCD_CHROMA_TOKEN and SYNCD_CHROMA__TOKEN both set chroma.token; keep one",
        ),
        (
            {"SYNCD_PIPELINES__ARTICLES__BATCH_SIZE": "5", "SYNCD_PIPELINES__0__BATCH_SIZE": "6"},
            "SYNCD_PIPELINES__0__BATCH_SIZE and SYNCD_PIPELINES__ARTICLES__BATCH_SIZE both set "
            "pipelines[0].batch_size; keep one",
        ),
    ],
    ids=["shortcut and table", "token twice", "pipeline by position and by name"],
)
def test_one_setting_given_by_two_variables_is_refused(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    """Which of the two won depended on the order of the environment, without a word."""
    _path, line = _refused_with(tmp_path, env)
    assert line == f"syncd: error: {expected}", line


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--config", "A", "check", "--offline", "--config", "B"], "--config"),
        (["check", "-c", "A", "--offline", "--config=B"], "--config"),
        (
            ["check", "--offline", "--config", "A", "--log-level", "info", "--log-level=debug"],
            "--log-level",
        ),
        (["dlq", "-c", "A", "list", "articles", "-c", "B"], "--config"),
        # abbreviations argparse takes for them
        (["config", "show", "--conf", "A", "--config", "B"], "--config"),
        (
            ["config", "show", "--config", "A", "--log-l", "debug", "--log-level", "info"],
            "--log-level",
        ),
    ],
)
def test_a_configuration_option_given_twice_is_refused(
    tmp_path: Path, args: list[str], option: str
) -> None:
    """One of the two was used without a word, and which one depended on the position."""
    for name in ("A", "B"):
        (tmp_path / name).write_text(tomli_w.dumps(good()))
    argv = [
        str(tmp_path / a) if a in ("A", "B") else a.replace("=B", f"={tmp_path / 'B'}")
        for a in args
    ]
    result = run_syncd(argv, timeout=60)
    assert result.returncode == ExitCode.CONFIG, (result.stdout, result.stderr)
    assert f"syncd: error: {option} is given twice: give it once" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_an_otel_endpoint_written_for_grpc_is_refused_for_otlp_http(tmp_path: Path) -> None:
    """The HTTP exporter took "collector:4318" and every export failed, with "config ok"."""
    _path, line = _refused_with(
        tmp_path, {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}
    )
    assert line == (
        "syncd: error: OTEL_EXPORTER_OTLP_ENDPOINT: OTLP/HTTP needs a URL, such as "
        "http://HOST:4318/v1/traces (HOST:PORT is how OTLP/gRPC is written)"
    ), line
    # gRPC sent user:password as the host name, and its exporter's messages showed them
    _path, line = _refused_with(
        tmp_path,
        {
            "OTEL_TRACES_EXPORTER": "otlp_grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://usr:PW-SECRET@127.0.0.1:4317",
        },
    )
    assert line.startswith(
        "syncd: error: OTEL_EXPORTER_OTLP_ENDPOINT: OTLP/gRPC takes no user:password"
    ), line
    assert "PW-SECRET" not in line
    grpc = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317",
    }
    result = _check_offline(tmp_path, good(), grpc)
    assert result.returncode == 0, result.stderr


def test_a_config_file_that_starts_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Some Windows editors write one; it was "Invalid statement (at line 1, column 1)"."""
    path = tmp_path / "syncd.toml"
    path.write_bytes(b"\xef\xbb\xbf" + tomli_w.dumps(good()).encode())
    result = run_syncd(["check", "--offline"], config=path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "config ok: 1 pipeline(s)" in result.stdout


def _check_offline(tmp_path: Path, data: dict[str, Any], env: dict[str, str]) -> Any:
    path = tmp_path / "syncd.toml"
    path.write_text(tomli_w.dumps(data))
    return run_syncd(["check", "--offline"], config=path, env=env, timeout=60)


def test_a_secret_from_the_environment_replaces_the_files_secret_file(tmp_path: Path) -> None:
    """mongodb.uri_file in the file and SYNCD_MONGODB_URI: the variable wins, as every
    other variable does over the file (the file's URI was used, silently)."""
    uri_file = tmp_path / "uri"
    uri_file.write_text("mongodb://127.0.0.1:27017/?directConnection=true\n")
    data = edit("mongodb", {"uri_file": str(uri_file)})
    result = _check_offline(tmp_path, data, {"SYNCD_MONGODB_URI": "http://not-mongodb"})
    assert result.returncode == ExitCode.CONFIG, (result.stdout, result.stderr)
    assert "SYNCD_MONGODB_URI" in result.stderr and "not a valid MongoDB URI" in result.stderr
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    data = edit("chroma", {"mode": "http", "token_file": str(token_file)})
    result = _check_offline(tmp_path, data, {"SYNCD_CHROMA_TOKEN": ""})
    assert result.returncode == ExitCode.CONFIG, (result.stdout, result.stderr)
    assert "SYNCD_CHROMA_TOKEN (chroma): token is empty" in result.stderr, result.stderr
    # `config show` says which layer decided both keys of the pair
    import json

    path = tmp_path / "syncd.toml"
    path.write_text(tomli_w.dumps(edit("mongodb", {"uri_file": str(uri_file)})))
    env = {"SYNCD_MONGODB_URI": "mongodb://from-env:1"}
    shown = run_syncd(["config", "show", "--json"], config=path, env=env, timeout=60)
    assert shown.returncode == 0, shown.stderr
    settings = {s["key"]: s for s in json.loads(shown.stdout)["settings"]}
    for key in ("mongodb.uri", "mongodb.uri_file"):
        assert settings[key]["source"] == "environment", settings[key]
        assert settings[key]["detail"] == "SYNCD_MONGODB_URI", settings[key]
    assert settings["mongodb.uri"]["value"] == "mongodb://from-env:1"
    assert settings["mongodb.uri_file"]["value"] is None


@pytest.mark.parametrize(
    ("table", "env", "expected"),
    [
        (
            {"uri": "mongodb://127.0.0.1:1", "uri_file": "URI"},
            {},
            "mongodb: uri and uri_file are both set: keep one",
        ),
        (
            {},
            {"SYNCD_MONGODB_URI": "mongodb://127.0.0.1:1", "SYNCD_MONGODB__URI_FILE": "URI"},
            "SYNCD_MONGODB_URI and SYNCD_MONGODB__URI_FILE (mongodb): uri and uri_file are both "
            "set: keep one",
        ),
        (
            {},
            {"SYNCD_CHROMA_TOKEN": "t", "SYNCD_CHROMA__TOKEN_FILE": "URI"},
            "SYNCD_CHROMA_TOKEN and SYNCD_CHROMA__TOKEN_FILE (chroma): token and token_file are "
            "both set: keep one",
        ),
        (
            {},
            {"SYNCD_CHROMA_TOKEN": "  "},
            "SYNCD_CHROMA_TOKEN (chroma): token is empty: set the Chroma server's token, or leave "
            "it out for a server without authentication",
        ),
    ],
    ids=["both in the file", "both in the environment", "token both", "blank token"],
)
def test_a_secret_given_twice_or_empty_is_refused_naming_where(
    tmp_path: Path, table: dict[str, str], env: dict[str, str], expected: str
) -> None:
    uri_file = tmp_path / "uri"
    uri_file.write_text("mongodb://127.0.0.1:27017\n")
    fill = {k: str(uri_file) if v == "URI" else v for k, v in table.items()}
    env = {k: str(uri_file) if v == "URI" else v for k, v in env.items()}
    result = _check_offline(tmp_path, edit("mongodb", fill) if fill else good(), env)
    assert result.returncode == ExitCode.CONFIG, (result.stdout, result.stderr)
    (line,) = result.stderr.strip().splitlines()
    assert line.endswith(expected), line


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"SYNCD_CHROMA_TOKEN": "tok-SECRET\nX-Injected: 1"},
            "SYNCD_CHROMA_TOKEN (chroma): token holds",
        ),
        ({"SYNCD_CHROMA_TOKEN": "tök-SECRET"}, "SYNCD_CHROMA_TOKEN (chroma): token holds"),
        (
            {"SYNCD_CHROMA__HEADERS": '{"X-Key": "val-SECRET\\r\\nX: 1"}'},
            "SYNCD_CHROMA__HEADERS (chroma): headers.X-Key holds",
        ),
        (
            {"SYNCD_CHROMA__HEADERS": '{"X Key": "val-SECRET"}'},
            "SYNCD_CHROMA__HEADERS (chroma): headers: 'X Key' is not an HTTP header name",
        ),
        (
            {"SYNCD_CHROMA__HEADERS": '{"X-Key": " "}'},
            "SYNCD_CHROMA__HEADERS (chroma): headers.X-Key is empty",
        ),
        ({"SYNCD_CHROMA_TOKEN": "tok\tSECRET"}, "SYNCD_CHROMA_TOKEN (chroma): token holds"),
        (
            {"SYNCD_CHROMA__HEADERS": '{"X-Key": "a-SECRET", "x-key": "b-SECRET"}'},
            "SYNCD_CHROMA__HEADERS (chroma): headers: 'X-Key' and 'x-key' are one header",
        ),
    ],
    ids=[
        "token line break",
        "token non-ascii",
        "header line break",
        "header name",
        "blank",
        "token tab",
        "one header twice",
    ],
)
def test_a_token_or_header_no_http_request_can_carry_is_refused_without_its_value(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    """They reached the HTTP client, which quoted the value in its error and exited 5."""
    result = _check_offline(tmp_path, edit("chroma", {"mode": "http"}), env)
    assert result.returncode == ExitCode.CONFIG, (result.stdout, result.stderr)
    (line,) = result.stderr.strip().splitlines()
    assert expected in line, line
    assert "SECRET" not in result.stdout + result.stderr


def test_an_unknown_syncd_variable_is_warned_about_with_the_name_it_resembles(
    tmp_path: Path,
) -> None:
    env = {"SYNCD_MONGO_URI": "mongodb://x:1", "SYNCD_ZZZ": "1"}
    result = _check_offline(tmp_path, good(), env)
    assert result.returncode == 0, result.stderr
    assert (
        "SYNCD_MONGO_URI is not a syncd setting and is ignored (did you mean SYNCD_MONGODB_URI?)"
        in result.stderr
    ), result.stderr
    assert "SYNCD_ZZZ is not a syncd setting and is ignored\n" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("variable", "meant", "value"),
    [
        ("SYNCD_CHROMA_HOST", "SYNCD_CHROMA__HOST", "chroma.internal"),
        ("SYNCD_TELEMETRY_OTLP_ENDPOINT", "SYNCD_TELEMETRY__OTLP_ENDPOINT", "http://c:4318"),
        ("SYNCD_PIPELINES_0_BATCH_SIZE", "SYNCD_PIPELINES__0__BATCH_SIZE", "7"),
    ],
)
def test_a_variable_missing_its_double_underscore_is_pointed_at_its_table_form(
    tmp_path: Path, variable: str, meant: str, value: str
) -> None:
    """SYNCD_CHROMA_HOST was said to resemble SYNCD_CHROMA_TOKEN. `config show`, the
    command to look at the environment with, did not warn at all."""
    path = tmp_path / "syncd.toml"
    path.write_text(tomli_w.dumps(good()))
    for command in (["check", "--offline"], ["config", "show"]):
        result = run_syncd(command, config=path, env={variable: value}, timeout=60)
        assert result.returncode == 0, result.stderr
        expected = f"{variable} is not a syncd setting and is ignored (did you mean {meant}?)"
        assert expected in result.stderr, (command, result.stderr)
    # the suggestion works
    result = run_syncd(["config", "show", "--json"], config=path, env={meant: value}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "is not a syncd setting" not in result.stderr
    shown = {e["key"]: e for e in json.loads(result.stdout)["settings"]}
    key = meant.removeprefix("SYNCD_").lower().replace("__0__", "[0].").replace("__", ".")
    assert shown[key]["source"] == "environment" and shown[key]["detail"] == meant, shown[key]


def test_config_show_shows_the_trace_settings_the_otel_variables_give(tmp_path: Path) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text(tomli_w.dumps(good()))
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://user:pw-SECRET@collector:4318",
    }
    result = run_syncd(["config", "show", "--json"], config=path, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    shown = {e["key"]: e for e in json.loads(result.stdout)["settings"]}
    assert shown["telemetry.traces"] == {
        "key": "telemetry.traces",
        "value": "otlp",
        "source": "environment",
        "detail": "OTEL_TRACES_EXPORTER",
    }
    endpoint = shown["telemetry.otlp_endpoint"]
    assert endpoint["detail"] == "OTEL_EXPORTER_OTLP_ENDPOINT", endpoint
    assert endpoint["value"] == "http://user:***@collector:4318", endpoint
    assert "pw-SECRET" not in result.stdout + result.stderr


def test_a_config_file_named_in_bytes_that_are_not_utf8_is_shown_as_named(tmp_path: Path) -> None:
    """The file system takes any bytes: such a --config is read, and printed back as the
    same bytes, also where stdout is strict about UTF-8 (a UTF-8 locale but C.UTF-8)."""
    path = Path(os.fsdecode(bytes(tmp_path) + b"/\xff.toml"))
    path.write_text(tomli_w.dumps(good()))
    result = subprocess.run(
        syncd_command(["config", "show"], path),
        env=syncd_env({"PYTHONIOENCODING": "utf-8:strict"}),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == ExitCode.OK, result.stderr.decode(errors="replace")
    assert result.stdout.startswith(b"# config file: " + os.fsencode(path) + b"\n")


def test_every_mistake_in_a_file_is_shown_in_one_run(tmp_path: Path) -> None:
    """Three mistakes: the first is the error, the other two follow it, each naming its
    key, so that one run shows all there is to fix; an environment variable's mistake is
    named as the variable."""
    data = edit("chroma.colour", "blue")
    data["pipelines"][0]["batch_size"] = -1
    data["pipelines"][0]["on_error"] = "explode"
    path = tmp_path / "syncd.toml"
    path.write_text(tomli_w.dumps(data))
    env = {"SYNCD_CHROMA__PORT": "abc"}
    result = run_syncd(["check", "--offline"], config=path, env=env, timeout=60)
    assert result.returncode == ExitCode.CONFIG, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    first, *more = result.stderr.strip().splitlines()
    assert first.startswith("syncd: error: "), first
    said = [first.removeprefix("syncd: error: "), *(m.removeprefix("  also ") for m in more)]
    assert all(m.startswith("  also ") for m in more), more
    assert sorted(said) == sorted(
        [
            f"{path}: chroma.colour: unknown key",
            f"{path}: pipelines[0].batch_size: Input should be greater than or equal to 1",
            f"{path}: pipelines[0].on_error: Input should be 'halt' or 'dead_letter'",
            "SYNCD_CHROMA__PORT: Input should be a valid integer, unable to parse string as an "
            "integer",
        ]
    ), said


def test_a_list_or_a_table_is_set_from_the_environment_as_json(tmp_path: Path) -> None:
    import json

    path = tmp_path / "syncd.toml"
    path.write_text(tomli_w.dumps(good()))
    env = {
        "SYNCD_PIPELINES__ARTICLES__MAPPING__METADATA": '["title", "author.name"]',
        "SYNCD_PIPELINES__ARTICLES__MAPPING__RENAME": '{"author.name": "author"}',
    }
    shown = run_syncd(["config", "show", "--json"], config=path, env=env, timeout=60)
    assert shown.returncode == 0, shown.stderr
    settings = {s["key"]: s for s in json.loads(shown.stdout)["settings"]}
    metadata = settings["pipelines[0].mapping.metadata"]
    assert metadata["value"] == ["title", "author.name"], metadata
    assert metadata["source"] == "environment", metadata
    assert settings["pipelines[0].mapping.rename"]["value"] == {"author.name": "author"}


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "SYNCD_PIPELINES__ARTICLES__MAPPING__METADATA",
            "title,author.name",
            "SYNCD_PIPELINES__ARTICLES__MAPPING__METADATA: pipelines.articles.mapping.metadata "
            "takes a list: write it as JSON, e.g. "
            'SYNCD_PIPELINES__ARTICLES__MAPPING__METADATA=\'["title", "author.name"]\'',
        ),
        (
            "SYNCD_CHROMA__HEADERS",
            "X-Api-Key: s3cretvalue",
            "SYNCD_CHROMA__HEADERS: chroma.headers takes a table: write it as JSON, e.g. "
            'SYNCD_CHROMA__HEADERS=\'{"X-Request-Source": "syncd"}\'',
        ),
    ],
)
def test_a_list_or_a_table_that_is_no_json_is_refused_with_the_form_to_use(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    _, line = _refused_with(tmp_path, {variable: value})
    assert line.startswith("syncd: error: ") and expected in line, line
    assert "s3cretvalue" not in line


@pytest.mark.parametrize(
    "endpoint",
    ["[::1]:4317", "[2001:db8::1]:4317", "localhost:4317", "http://[::1]:4318/v1/traces"],
)
def test_an_otlp_endpoint_in_any_form_the_exporters_take_is_accepted(
    tmp_path: Path, endpoint: str
) -> None:
    data = edit("telemetry", {"traces": "otlp_grpc", "otlp_endpoint": endpoint})
    path = tmp_path / "syncd.toml"
    path.write_text(tomli_w.dumps(data))
    result = run_syncd(["check", "--offline"], config=path, timeout=60)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr


@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
)
def test_an_otlp_endpoint_variable_that_is_no_endpoint_is_named(
    tmp_path: Path, variable: str
) -> None:
    _, line = _refused_with(tmp_path, {variable: "http://u:s3cretvalue@bad host:1"})
    assert line.startswith(f"syncd: error: {variable}: not an endpoint"), line
    assert "s3cretvalue" not in line


@pytest.mark.parametrize("flag", [["--config", "{path}"], ["--config={path}"]])
def test_the_config_flag_may_come_before_the_command(tmp_path: Path, flag: list[str]) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text(tomli_w.dumps(good()))
    given = [part.format(path=path) for part in flag]
    result = run_syncd([*given, "check", "--offline"], timeout=60)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert "config ok: 1 pipeline(s)" in result.stdout


def test_an_unknown_otel_traces_exporter_is_named_before_anything_runs(tmp_path: Path) -> None:
    """OTEL_TRACES_EXPORTER=zipkin: `check` said "config ok", and `run` failed only later."""
    _path, line = _refused_with(tmp_path, {"OTEL_TRACES_EXPORTER": "otlp,zipkin"})
    assert line == (
        "syncd: error: OTEL_TRACES_EXPORTER: unknown trace exporter 'zipkin'; "
        "use none, console, otlp, otlp_http or otlp_grpc"
    )


@pytest.mark.parametrize("command", [["check"], ["tokens", "show"], ["run"]])
def test_an_empty_config_flag_is_a_usage_error_not_the_current_directory(
    tmp_path: Path, command: list[str]
) -> None:
    result = run_syncd([*command, "--config", ""], None, timeout=60, cwd=tmp_path)
    assert result.returncode == ExitCode.CONFIG, (result.returncode, result.stderr)
    (line,) = result.stderr.strip().splitlines()
    assert "argument --config/-c: is empty: name a TOML config file" in line, line
