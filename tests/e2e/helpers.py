"""Shared pieces of the end-to-end tests: configs, expected state, comparisons."""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

import tomli_w
from bson.timestamp import Timestamp
from prometheus_client.parser import text_string_to_metric_families
from pymongo import MongoClient

from syncd import config
from syncd.checkpoint import Checkpoint, open_store
from syncd.errors import ExitCode
from tests.harness.daemon import syncd_command, syncd_env

VOLATILE = ("syncd_cluster_time",)  # depends on which event wrote the record, not on content


def pipeline_table(name: str, database: str, **overrides: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "name": name,
        "database": database,
        "collection": "docs",
        "batch_size": 200,
        "batch_max_wait_ms": 100,
        "idle_checkpoint_interval_s": 0.5,
        "retry_max_backoff_s": 1.0,
        "mapping": {"text": "body", "metadata": ["title", "tags", "n", "seq", "nested"]},
        "embedder": {"kind": "hashing", "dimensions": 32},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(table.get(key), dict):
            table[key] = {**table[key], **value}
        else:
            table[key] = value
    return table


def write_config(
    path: Path,
    *,
    mongo_uri: str,
    chroma: Mapping[str, Any],
    pipelines: list[dict[str, Any]],
    checkpoint_db: str,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    data: dict[str, Any] = {
        "mongodb": {"uri": mongo_uri, "server_selection_timeout_ms": 5000},
        "chroma": dict(chroma),
        "checkpoint": {"store": "mongodb", "database": checkpoint_db},
        "telemetry": {"listen": "", "span_log_path": str(path.parent / "spans.jsonl")},
        "shutdown_timeout_s": 10,
        "pipelines": pipelines,
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path.write_text(tomli_w.dumps(_drop_none(data)))
    return path


def _drop_none(value: Any) -> Any:
    """TOML has no null: a None in a test's overrides means "leave the key out"."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def settings_of(path: Path, env: Mapping[str, str] | None = None) -> config.Settings:
    return config.load(path, env=dict(env or {}))


def load_checkpoint(settings: config.Settings, name: str) -> Checkpoint | None:
    client: MongoClient[dict[str, Any]] = MongoClient(settings.mongodb.uri.get_secret_value())
    try:
        return open_store(settings.checkpoint, client).load(name)
    finally:
        client.close()


def chroma_records(collection: Any) -> dict[str, dict[str, Any]]:
    got = collection.get(include=["documents", "metadatas", "embeddings"])
    out = {}
    for i, rid in enumerate(got["ids"]):
        out[rid] = {
            "document": got["documents"][i],
            "metadata": _stable(got["metadatas"][i] or {}),
            "embedding": [float(x) for x in got["embeddings"][i]],
        }
    return out


def _stable(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if k not in VOLATILE}


FLOAT_ULPS = 4  # README: metadata floats match within Chroma's own parsing error


def _same_value(want: Any, got: Any) -> bool:
    if isinstance(want, list) and isinstance(got, list):
        return len(want) == len(got) and all(map(_same_value, want, got))
    if isinstance(want, float) and isinstance(got, float) and want != got:
        return abs(want - got) <= FLOAT_ULPS * math.ulp(max(abs(want), abs(got)))
    return bool(want == got)


def _same(want: Mapping[str, Any], got: Mapping[str, Any]) -> bool:
    """Records are equal; embeddings within float32 precision (Chroma stores float32),
    metadata floats as Chroma stores them (a few units in the last place off)."""
    if want.get("document") != got.get("document"):
        return False
    meta_a, meta_b = want.get("metadata") or {}, got.get("metadata") or {}
    if meta_a.keys() != meta_b.keys() or not all(_same_value(meta_a[k], meta_b[k]) for k in meta_a):
        return False
    a, b = want.get("embedding") or [], got.get("embedding") or []
    return len(a) == len(b) and all(abs(x - y) <= 1e-5 for x, y in zip(a, b, strict=True))


def diff(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> str:
    missing = sorted(set(expected) - set(actual))
    orphans = sorted(set(actual) - set(expected))
    stale = sorted(k for k in set(expected) & set(actual) if not _same(expected[k], actual[k]))
    if not (missing or orphans or stale):
        return ""
    lines = [f"missing={len(missing)} orphans={len(orphans)} stale={len(stale)}"]
    lines += [f"  missing {k}" for k in missing[:5]]
    lines += [f"  orphan {k}" for k in orphans[:5]]
    for k in stale[:3]:
        lines.append(f"  stale {k}:\n    want {expected[k]}\n    got  {actual[k]}")
    return "\n".join(lines)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class Poller:
    """A daemon thread running `_run` while a `with` block lasts; `_run` polls until
    `stop` is set, at the block's end."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        self.thread.join(10)


def op_time_now(client: MongoClient[dict[str, Any]], db: str) -> Timestamp:
    """A fresh write's operation time: once a pipeline passes it, it passed every
    change made before this call."""
    with client.start_session() as session:
        client[db]["marker"].insert_one({}, session=session)
        assert session.operation_time is not None
        return session.operation_time


def wait_caught_up(
    client: MongoClient[dict[str, Any]],
    db: str,
    settings: config.Settings,
    name: str,
    timeout: float,
    what: str,
) -> None:
    """Wait until the pipeline has checkpointed past every change made before this call.

    The operation time is taken once, here: a fresh write on every poll would be a target
    that moves on with each poll.
    """
    op_time = op_time_now(client, db)
    wait_until(lambda: caught_up(settings, name, op_time), timeout, what)


def copy_and_stop(
    syncd_factory: Callable[..., Any],
    client: MongoClient[dict[str, Any]],
    cfg: Path,
    settings: config.Settings,
    db: str,
    *,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    name: str = "p",
) -> None:
    """Run `syncd run` with `cfg` until pipeline `name` has caught up with everything in
    `db` (its first copy), then SIGTERM: it must exit 0."""
    daemon = syncd_factory(["run"], cfg, env, log_path=log_path)
    wait_caught_up(client, db, settings, name, 90, "the first copy")
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()


def caught_up(settings: config.Settings, name: str, op_time: Timestamp) -> bool:
    cp = load_checkpoint(settings, name)
    return bool(
        cp is not None
        and cp.phase == "streaming"
        and cp.cluster_time is not None
        and cp.cluster_time >= op_time
    )


def http_get(url: str) -> tuple[int, str]:
    """Status and body; (0, "") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, ""


def metric_sample(metrics: str, name: str, **labels: str) -> float | None:
    """One sample's value from a Prometheus exposition, or None if absent."""
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def metric_at(listen: str, name: str, **labels: str) -> float | None:
    """One sample of the metrics syncd serves at `listen` (host:port), None if absent."""
    return metric_sample(http_get(f"http://{listen}/metrics")[1], name, **labels)


def log_records(output: str) -> list[dict[str, Any]]:
    """The JSON log lines of a `--log-format json` process, each flattened to its
    ``body`` as ``msg`` plus its attributes (pipeline, state, ...)."""
    records = []
    for line in output.splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "body" in entry:
            records.append({**entry.get("attributes", {}), "msg": str(entry["body"])})
    return records


def closed_pipe_run(args: list[str], cfg: Path | None) -> subprocess.CompletedProcess[bytes]:
    """Run syncd with stdout a pipe whose reader is gone, as `syncd ... | head` leaves it."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            syncd_command(args, cfg),
            env=syncd_env(),
            stdin=subprocess.DEVNULL,
            stdout=write,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
