"""/metrics, /healthz and /readyz over real HTTP, following pipeline state changes."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from syncd.config import Settings
from syncd.errors import ConfigError, TransientError
from syncd.telemetry import Telemetry


@pytest.fixture
def telemetry(tmp_path: Path) -> Iterator[Telemetry]:
    settings = Settings.model_validate(
        {
            "telemetry": {
                "listen": "127.0.0.1:0",
                "traces": "none",
                "span_log_path": "",
                "heartbeat_timeout_s": 0.3,
            }
        }
    )
    telemetry = Telemetry(settings)
    telemetry.start()
    yield telemetry
    telemetry.shutdown()


def get(telemetry: Telemetry, path: str, accept: str | None = None) -> tuple[int, str, str]:
    assert telemetry.http_address is not None
    host, port = telemetry.http_address
    request = urllib.request.Request(f"http://{host}:{port}{path}")
    if accept:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


def get_json(telemetry: Telemetry, path: str) -> tuple[int, Any]:
    status, content_type, body = get(telemetry, path)
    assert content_type == "application/json"
    return status, json.loads(body)


def test_metrics_endpoint_serves_the_prometheus_exposition(telemetry):
    p = telemetry.pipeline("articles")
    p.applied("insert", 3)
    p.batch_done(3, 0.05)
    p.set_state("streaming")
    status, content_type, body = get(telemetry, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert 'syncd_events_applied_total{operation="insert",pipeline="articles"} 3.0' in body
    assert 'syncd_batch_size_count{pipeline="articles"} 1.0' in body
    assert 'syncd_pipeline_state{pipeline="articles",state="streaming"} 1.0' in body
    assert 'syncd_pipeline_ready{pipeline="articles"} 1.0' in body
    status, content_type, body = get(
        telemetry, "/metrics", accept="application/openmetrics-text; version=1.0.0"
    )
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")


def test_readyz_follows_retrying_recovered_and_halted(telemetry):
    status, body = get_json(telemetry, "/readyz")
    assert status == 503 and body["ready"] is False, "no pipeline has started yet"

    articles = telemetry.pipeline("articles")
    comments = telemetry.pipeline("comments")
    articles.set_state("streaming")
    comments.set_state("snapshotting")
    status, body = get_json(telemetry, "/readyz")
    assert status == 200 and body["ready"] is True
    assert body["pipelines"]["comments"]["state"] == "snapshotting"

    error = TransientError("cannot reach mongodb://syncd:hunter2@db:27017")
    articles.retrying(error, attempt=1, delay=1.0)
    articles.retrying(error, attempt=2, delay=2.0)
    status, body = get_json(telemetry, "/readyz")
    assert status == 503
    assert list(body["not_ready"]) == ["articles"]
    assert "cannot reach mongodb://syncd:***@db:27017" in body["not_ready"]["articles"]
    assert body["pipelines"]["articles"]["attempts"] == 2
    assert "hunter2" not in json.dumps(body)

    articles.recovered()
    status, body = get_json(telemetry, "/readyz")
    assert status == 200 and body["pipelines"]["articles"]["state"] == "streaming"

    comments.set_state("halted", error=ValueError("mapping failed for _id 7"))
    status, body = get_json(telemetry, "/readyz")
    assert status == 503
    assert body["not_ready"] == {"comments": "ValueError: mapping failed for _id 7"}


def test_healthz_turns_503_when_a_running_loop_stops_heartbeating(telemetry):
    p = telemetry.pipeline("articles")
    p.set_state("streaming")
    p.heartbeat()
    status, body = get_json(telemetry, "/healthz")
    assert status == 200 and body["healthy"] is True
    time.sleep(0.4)
    status, body = get_json(telemetry, "/healthz")
    assert status == 503
    assert list(body["stale"]) == ["articles"]
    assert body["pipelines"]["articles"]["heartbeat_age_s"] >= 0.3
    p.heartbeat()
    status, _ = get_json(telemetry, "/healthz")
    assert status == 200
    time.sleep(0.4)
    p.set_state("halted", error=ValueError("poison"))
    status, _ = get_json(telemetry, "/healthz")
    assert status == 200, "a halted loop is expected to be quiet; restarting will not help"


def test_unknown_path_is_404_and_head_has_no_body(telemetry):
    status, _, body = get(telemetry, "/nope")
    assert status == 404 and "/metrics" in body
    assert telemetry.http_address is not None
    host, port = telemetry.http_address
    request = urllib.request.Request(f"http://{host}:{port}/metrics", method="HEAD")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) > 0
        assert response.read() == b""


def test_a_busy_port_is_a_config_error_naming_the_address(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = Settings.model_validate(
            {"telemetry": {"listen": f"127.0.0.1:{port}", "span_log_path": ""}}
        )
        telemetry = Telemetry(settings)
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            telemetry.start()
        telemetry.shutdown()


def test_shutdown_closes_the_listener(tmp_path):
    settings = Settings.model_validate(
        {"telemetry": {"listen": "127.0.0.1:0", "traces": "none", "span_log_path": ""}}
    )
    telemetry = Telemetry(settings)
    telemetry.start()
    assert telemetry.http_address is not None
    host, port = telemetry.http_address
    status, _, _ = get(telemetry, "/healthz")
    assert status == 200
    telemetry.shutdown()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=2)


def test_a_standby_holding_no_pipeline_is_ready_and_says_so(telemetry):
    status, body = get_json(telemetry, "/readyz")
    assert status == 503, "before the first round of leases nothing says it is a standby"
    telemetry.standby_ready()
    status, body = get_json(telemetry, "/readyz")
    assert status == 200 and body["standby"] is True and "standby" in body["message"]

    p = telemetry.pipeline("articles")  # took a lease: judged by that pipeline now
    status, body = get_json(telemetry, "/readyz")
    assert status == 503 and body["not_ready"] == {"articles": "starting"}
    p.set_state("streaming")
    status, body = get_json(telemetry, "/readyz")
    assert status == 200 and "standby" not in body

    p.set_state("stopped")  # handed over or lost: a standby again
    status, body = get_json(telemetry, "/readyz")
    assert status == 200 and body["standby"] is True


def test_a_draining_process_is_not_ready(telemetry):
    telemetry.pipeline("articles").set_state("streaming")
    assert get_json(telemetry, "/readyz")[0] == 200
    telemetry.draining()
    status, body = get_json(telemetry, "/readyz")
    assert status == 503 and "draining" in body["reason"] and "not_ready" not in body


def test_a_process_that_cannot_read_the_leases_is_not_a_ready_standby(telemetry):
    telemetry.standby_ready("cannot read the leases: MongoDB unavailable")
    status, body = get_json(telemetry, "/readyz")
    assert status == 503 and "standby" not in body
    assert body["reason"] == "cannot read the leases: MongoDB unavailable"
    assert "not_ready" not in body  # it maps pipelines only: no pipeline named ""
    telemetry.standby_ready()  # MongoDB back: the next round read them
    status, body = get_json(telemetry, "/readyz")
    assert status == 200 and body["standby"] is True
