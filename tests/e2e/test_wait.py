"""Read-your-writes: `syncd wait` and `syncd.waiting.wait_for` return only once the
write is in Chroma, and time out with a non-zero exit when no daemon applies it."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid

from syncd.waiting import wait_for
from tests.harness.daemon import run_syncd, syncd_command, syncd_env

from .helpers import load_checkpoint, pipeline_table, settings_of, wait_until, write_config


def test_wait_returns_once_the_write_is_visible_and_times_out_without_a_daemon(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db = f"wait_{uuid.uuid4().hex[:8]}"
    coll_name = f"wait-{uuid.uuid4().hex[:8]}"
    cfg = write_config(
        tmp_path / "syncd.toml",
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port},
        checkpoint_db=f"{db}_syncd",
        pipelines=[pipeline_table("w", db, chroma_collection=coll_name)],
    )
    settings = settings_of(cfg)
    coll = mongo_client[db]["docs"]
    daemon = syncd_factory(["run"], cfg)
    wait_until(
        lambda: (cp := load_checkpoint(settings, "w")) is not None and cp.phase == "streaming",
        60,
        "the first checkpoint",
    )
    collection = chroma_server.client().get_collection(coll_name, embedding_function=None)

    # The daemon is frozen, so the write cannot reach Chroma until it is resumed.
    daemon.pause()
    with mongo_client.start_session(causal_consistency=True) as session:
        coll.insert_one({"_id": "a", "body": "read me back"}, session=session)
        op_time = session.operation_time
    assert op_time is not None
    waiter = subprocess.Popen(
        syncd_command(
            ["wait", "w", "--after", f"{op_time.time}.{op_time.inc}", "--timeout", "60"], cfg
        ),
        env=syncd_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(6)  # longer than the CLI's start-up, so it is polling by now
        assert waiter.poll() is None, "wait returned while the daemon could not have applied"
        assert collection.get(ids=["s:a"])["ids"] == []
        daemon.resume()
        out, err = waiter.communicate(timeout=60)
    finally:
        waiter.kill()
    assert waiter.returncode == 0, out + err
    assert collection.get(ids=["s:a"], include=["documents"])["documents"] == ["read me back"]

    # The Python API, with a resume token as the target.
    with coll.watch() as stream, mongo_client.start_session() as session:
        coll.insert_one({"_id": "b", "body": "second"}, session=session)
        token = stream.next()["_id"]
    assert wait_for(settings, "w", token, timeout=30)
    assert collection.get(ids=["s:b"])["ids"] == ["s:b"]

    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()
    with mongo_client.start_session(causal_consistency=True) as session:
        coll.insert_one({"_id": "c", "body": "nobody applies this"}, session=session)
        late = session.operation_time
    started = time.monotonic()
    assert not wait_for(settings, "w", late, timeout=1.5)
    assert time.monotonic() - started >= 1.5
    timed_out = run_syncd(
        ["wait", "w", "--after", f"{late.time}.{late.inc}", "--timeout", "2"], cfg
    )
    assert timed_out.returncode == 1, timed_out.stdout + timed_out.stderr
    assert "timed out after 2 s" in timed_out.stderr
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


def test_ctrl_c_interrupts_a_wait_and_says_so(tmp_path, mongo_uri, mongo_client, chroma_server):
    """SIGINT 3 s into a 60 s wait: the wait ends at once and says it was interrupted,
    not that it timed out; exit 1, as `syncd snapshot` and `syncd rebuild` interrupted."""
    db = f"wait_{uuid.uuid4().hex[:8]}"
    cfg = write_config(
        tmp_path / "syncd.toml",
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port},
        checkpoint_db=f"{db}_syncd",
        pipelines=[pipeline_table("w", db, chroma_collection=f"wait-{db}")],
    )
    waiter = subprocess.Popen(
        syncd_command(["wait", "w", "--after", "2099-01-01T00:00:00Z", "--timeout", "60"], cfg),
        env=syncd_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)
        assert waiter.poll() is None, waiter.communicate()
        started = time.monotonic()
        waiter.send_signal(signal.SIGINT)
        out, err = waiter.communicate(timeout=20)
    finally:
        waiter.kill()
    assert time.monotonic() - started < 10
    assert "timed out" not in err and "Traceback" not in err, err
    second = "4070908800.4294967295"  # the whole second 2099-01-01T00:00:00Z
    assert err == f"syncd: interrupted: pipeline 'w' has no checkpoint yet, short of {second}\n"
    assert out == "" and waiter.returncode == 1, (out, err)  # not 0: nothing was seen applied
