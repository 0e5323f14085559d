"""Any value for any key: validation refuses it in one line naming the key, or accepts a
value the daemon can use: what it is accepted for does not fail later, at run time.

The end-to-end tests (tests/e2e/test_config_errors.py, test_bad_input.py) pin the cases
found by fuzzing the whole CLI against real servers; this keeps the class closed.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo import MongoClient

from syncd import config, redact
from syncd.errors import ConfigError
from syncd.mapping import Mapper

BASE: dict[str, Any] = {
    "shutdown_timeout_s": 5,
    "mongodb": {"uri": "mongodb://127.0.0.1:1/?directConnection=true"},
    "chroma": {"mode": "http", "host": "127.0.0.1", "port": 8000, "tenant": "default_tenant"},
    "checkpoint": {"store": "mongodb", "database": "syncd", "collection": "cp", "history": 5},
    "lease": {"enabled": True, "ttl_s": 15, "renew_every_s": 5},
    "telemetry": {
        "listen": "127.0.0.1:9464",
        "traces": "none",
        "event_sample_ratio": 1.0,
        "span_log_path": "spans.jsonl",
        "verify_sample_size": 10,
    },
    "log": {"format": "text", "level": "info"},
    "pipelines": [
        {
            "name": "fuzz",
            "database": "fz",
            "collection": "docs",
            "filter": {"status": "ok"},
            "batch_size": 10,
            "idle_checkpoint_interval_s": 1,
            "retry_max_backoff_s": 2,
            "mapping": {"text_template": "{title}: {body}", "metadata": ["title"]},
            "embedder": {"kind": "hashing", "dimensions": 16, "timeout_s": 5},
        }
    ],
}


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list) and node and isinstance(node[0], dict):
        for index, value in enumerate(node):
            yield from _leaves(value, (*path, index))
    else:
        yield path


LEAVES = list(_leaves(BASE))
ODD = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "\x00", "{x:d}", "{}", "a.b", "$x", "system.x", "h:99999", "../x"]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.sampled_from([math.inf, -math.inf, math.nan, 1e308, -0.0]),
    st.booleans(),
    st.lists(st.text(max_size=4), max_size=3),
    st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
)


@pytest.fixture
def clean_secrets() -> Iterator[None]:
    """Validation registers secrets process-wide; do not let random ones mask later tests."""
    saved = set(redact._registered)
    yield
    redact._registered.clear()
    redact._registered.update(saved)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(path=st.sampled_from(LEAVES), value=ODD)
def test_any_value_is_accepted_or_one_line_naming_the_key(
    tmp_path: Path, clean_secrets: None, path: tuple[Any, ...], value: Any
) -> None:
    data = copy.deepcopy(BASE)
    node: Any = data
    for part in path[:-1]:
        node = node[part]
    original, node[path[-1]] = node[path[-1]], value
    file = tmp_path / "syncd.toml"
    file.write_text(tomli_w.dumps(data))
    try:
        accepted = config.load(file, env={})
    except ConfigError as exc:
        line = exc.describe()
        assert "\n" not in line and line.startswith(f"{file}: "), line
        named = ".".join(str(p) for p in path if not isinstance(p, int))
        assert path[-1] in line or named.split(".")[0] in line, (named, line)
        return
    if isinstance(value, bool) and type(original) in (int, float):
        pytest.fail(f"{path}: {value} taken for a number")
    assert_usable(accepted)


def assert_usable(accepted: config.Settings) -> None:
    """What the daemon does with these values first: wait on them, bind, map a document."""
    for section in (accepted, accepted.lease, accepted.telemetry, *accepted.pipelines):
        for name, value in section:
            if isinstance(value, float) and not isinstance(value, bool):
                assert math.isfinite(value) and value <= threading.TIMEOUT_MAX, (name, value)
    if accepted.telemetry.listen:
        assert 0 <= int(accepted.telemetry.listen.rpartition(":")[2]) <= 65535
    client: MongoClient[dict[str, Any]] = MongoClient(connect=False)
    try:
        client[accepted.checkpoint.database][accepted.checkpoint.collection]
        for pipeline in accepted.pipelines:
            for collection in (*pipeline.source_collections, pipeline.dead_letter_collection):
                client[pipeline.database][collection]  # pymongo refuses names MongoDB would
            document = {"_id": 1, "title": "a title", "body": "a body", "status": "ok"}
            Mapper(pipeline).map(document)
    finally:
        client.close()
