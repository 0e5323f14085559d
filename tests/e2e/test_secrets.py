"""Nothing secret leaks: a run with credentials in every place syncd takes them from, and
secrets inside the documents it records, and then every output it has is searched."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.harness.daemon import run_syncd
from tests.harness.embedding_api import EmbeddingAPI
from tests.harness.ports import free_port

from .helpers import pipeline_table, settings_of, wait_caught_up, wait_until, write_config


def secret(kind: str) -> str:
    return f"sekret-{kind}-{uuid.uuid4().hex[:10]}"


def fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as exc:  # /readyz answers 503 with a body too
        return str(exc.read().decode())


@pytest.mark.timeout(240)
def test_no_output_of_a_run_holds_a_secret(
    tmp_path: Path, mongo_uri: str, mongo_client: Any, chroma_server: Any, syncd_factory: Any
) -> None:
    db = f"sec_{uuid.uuid4().hex[:8]}"
    credentials = {
        "aws session token in the URI": secret("aws"),
        "Chroma token": secret("chroma"),
        "Chroma header": secret("header"),
        "embedding API key": secret("apikey"),
    }
    in_documents = {
        "password field": secret("docpw"),
        "nested api_key": secret("docak"),
        "Secret field": secret("docsc"),
        "token field": secret("doctk"),
        "basic auth": secret("docbasic"),
        "aws key": secret("docaws"),
        "private key": secret("docpk"),
    }
    separator = "&" if "?" in mongo_uri else "/?"
    uri = (
        f"{mongo_uri}{separator}authMechanismProperties="
        f"AWS_SESSION_TOKEN:{credentials['aws session token in the URI']}"
    )
    api = EmbeddingAPI(dimensions=16, api_key=credentials["embedding API key"]).start()
    port = free_port()
    spans = tmp_path / "spans.jsonl"
    cfg = write_config(
        tmp_path / "syncd.toml",
        mongo_uri=uri,
        chroma={
            "mode": "http",
            "host": chroma_server.host,
            "port": chroma_server.port,
            "headers": {"X-Api-Key": credentials["Chroma header"]},
        },
        checkpoint_db=f"{db}_syncd",
        pipelines=[
            pipeline_table(
                "sec",
                db,
                chroma_collection=f"sec-{uuid.uuid4().hex[:8]}",
                embedder={
                    "kind": "openai",
                    "base_url": api.base_url,
                    "model": "m",
                    "dimensions": 16,
                    "api_key_env": "SYNCD_TEST_EMBEDDING_KEY",
                },
            )
        ],
        extra={
            "telemetry": {
                "listen": f"127.0.0.1:{port}",
                "traces": "console",
                "record_content": True,
                "span_log_path": str(spans),
            },
            "log": {"level": "debug"},
        },
    )
    env = {
        # with the line break a variable set from a file keeps: stripped, as a file is
        "SYNCD_CHROMA_TOKEN": credentials["Chroma token"] + "\n",
        "SYNCD_TEST_EMBEDDING_KEY": credentials["embedding API key"],
    }
    coll = mongo_client[db]["docs"]
    secrets = {**credentials, **in_documents}
    try:
        daemon = syncd_factory(["run"], cfg, env)
        # Changes, not the initial copy, are what spans and the span log record.
        daemon.wait_for_output(r"-> streaming", timeout=60)
        for n in range(3):
            coll.insert_one(
                {
                    "_id": n,
                    "body": f"plain text {n}",
                    "title": f"title {n}",
                    "password": in_documents["password field"],
                    "profile": {
                        "api_key": in_documents["nested api_key"],
                        "Secret": in_documents["Secret field"],
                    },
                    "token": in_documents["token field"],
                    "note": f"Authorization: Basic {in_documents['basic auth']}",
                    "aws": f"aws_secret_access_key={in_documents['aws key']} region=eu-west-1",
                    "tls": f"privateKey={in_documents['private key']}",
                }
            )
        coll.update_one({"_id": 1}, {"$set": {"body": "changed"}})
        coll.delete_one({"_id": 2})
        settings = settings_of(cfg, env)
        try:
            wait_caught_up(mongo_client, db, settings, "sec", 60, "the run to catch up")
            wait_until(lambda: spans.exists() and spans.stat().st_size > 0, 30, "the span log")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{daemon.output()[-3000:]}") from None
        outputs = {
            "/metrics": fetch(f"http://127.0.0.1:{port}/metrics"),
            "/readyz": fetch(f"http://127.0.0.1:{port}/readyz"),
            "/healthz": fetch(f"http://127.0.0.1:{port}/healthz"),
        }
        daemon.terminate()
        assert daemon.wait(30) == 0, daemon.output()
        log = daemon.output()
        assert "syncd.document" in log and "region=eu-west-1" in log, "content was not recorded"
        assert "DEBUG" in log
        outputs["daemon log and console spans"] = log
        outputs["span log"] = spans.read_text()
        for args in (["status", "--json"], ["check"], ["tokens", "show", "--json"]):
            result = run_syncd(args, cfg, env, timeout=90)
            assert result.returncode == 0, (args, result.stdout, result.stderr)
            outputs[" ".join(args)] = result.stdout + result.stderr
        assert "AWS_SESSION_TOKEN:***" in outputs["check"]

        secrets["TLS key password"] = secret("tls")
        tls = cfg.read_text().replace(
            "authMechanismProperties=",
            f"tlsCertificateKeyFilePassword={secrets['TLS key password']}&authMechanismProperties=",
        )
        cfg.write_text(tls.replace("selection_timeout_ms = 5000", "selection_timeout_ms = 500"))
        failed = run_syncd(["check"], cfg, env, timeout=90)
        assert failed.returncode != 0 and "tlsCertificateKeyFilePassword=***" in failed.stdout
        outputs["check with a TLS key password"] = failed.stdout + failed.stderr
    finally:
        api.close()
        mongo_client.drop_database(db)
        mongo_client.drop_database(f"{db}_syncd")

    leaks = [
        f"{what} in {where}"
        for where, text in outputs.items()
        for what, value in secrets.items()
        if value in text
    ]
    assert not leaks, leaks


def test_a_credential_in_the_otlp_endpoint_query_is_masked(tmp_path: Path) -> None:
    """An OTLP backend that takes its API key in the URL (`?key=`): `config show` and a
    refusal that echoes the settings show the endpoint, never the key."""
    key = secret("otlpkey")
    cfg = write_config(
        tmp_path / "syncd.toml",
        mongo_uri="mongodb://127.0.0.1:1/?directConnection=true",
        chroma={"mode": "http", "host": "127.0.0.1", "port": 1},
        checkpoint_db="db_syncd",
        pipelines=[pipeline_table("otlp", "db")],
        extra={
            "telemetry": {
                "traces": "otlp",
                "otlp_endpoint": f"https://otlp.example.com:4318/v1/traces?key={key}",
            }
        },
    )
    for args in (["config", "show"], ["config", "show", "--json"]):
        result = run_syncd(args, cfg, timeout=60)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        assert "otlp.example.com" in result.stdout, result.stdout
        assert key not in result.stdout + result.stderr, (args, result.stdout)
