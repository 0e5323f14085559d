"""Writes larger than Chroma takes in one request are sent in slices, never halted on.

Chroma's server refuses a request over about 40 MB (HTTP 413 "Payload too large"), and
a proxy in front of it may allow less. With small vectors syncd writes up to Chroma's
largest batch of records at once (a snapshot's page, a streaming write that takes
several reads); with large texts such a write is far over that. The documents here are
valid: they must all reach Chroma, and nothing may halt or be dead-lettered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from syncd import sink as sinks
from syncd.config import ChromaSettings
from syncd.errors import ExitCode, SinkRejectedError, SinkUnavailableError
from syncd.sink import ChromaSink, Upsert, WritePlan, make_client
from tests.harness.body_limit import BodyLimitProxy
from tests.harness.daemon import run_syncd

from . import oracle
from .helpers import settings_of, wait_caught_up, wait_until, write_config

BODY_CHARS = 40_000  # 1,200 documents: 48 MB of text, in a page of 5,461 (4-d vectors)
DOCS = 1_200


def large(key: int) -> dict[str, Any]:
    doc = oracle.document(key)
    doc["body"] = f"document {key} " + "lorem ipsum " * (BODY_CHARS // 12)
    return doc


@pytest.mark.timeout(300)
def test_a_backlog_of_large_texts_with_small_vectors_is_written_whole(
    tmp_path: Path, mongo_uri: str, chroma_server: Any, syncd_factory: Any
) -> None:
    db, coll = f"large_{uuid.uuid4().hex[:8]}", f"large-{uuid.uuid4().hex[:8]}"
    client: MongoClient[Any] = MongoClient(mongo_uri)
    try:
        docs = client[db]["docs"]
        for start in range(0, DOCS, 100):
            docs.insert_many([large(k) for k in range(start, start + 100)])
        cfg = write_config(
            tmp_path / "syncd.toml",
            mongo_uri=mongo_uri,
            chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port},
            checkpoint_db=f"{db}_syncd",
            pipelines=[oracle.pipeline("big", db, chroma_collection=coll)],
            extra={"telemetry": {"listen": ""}},
        )
        settings = settings_of(cfg)
        daemon = syncd_factory(["run"], cfg)
        wait_caught_up(client, db, settings, "big", 180, "the snapshot of large documents")
        stored = chroma_server.client().get_collection(coll, embedding_function=None)
        assert stored.count() == DOCS
        # Streaming: a backlog of as many, changed and new, read ahead and written together.
        daemon.terminate()
        assert daemon.wait(60) == ExitCode.OK, daemon.output()[-3000:]
        for start in range(0, DOCS, 100):
            docs.insert_many([large(k) for k in range(DOCS + start, DOCS + start + 100)])
        docs.update_many({"_id": {"$lt": 300}}, {"$set": {"body": "short now"}})
        again = syncd_factory(["run"], cfg)
        wait_caught_up(client, db, settings, "big", 180, "the backlog of large documents")
        problem = oracle.mismatch(docs.find(), stored)
        assert not problem, problem
        output = again.output() + daemon.output()
        assert "halted" not in output and "Traceback" not in output, output[-3000:]
        assert client[f"{db}_syncd"]["dead_letters"].count_documents({}) == 0
        again.terminate()
        assert again.wait(60) == ExitCode.OK, again.output()[-3000:]
    finally:
        client.drop_database(db)
        client.drop_database(f"{db}_syncd")
        client.close()


def test_a_slice_refused_as_too_large_is_written_in_halves(
    chroma_server: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # syncd's estimate of a write's size is only an estimate (and a proxy may take less
    # than Chroma): a slice the server refuses as too large is split until it is taken.
    monkeypatch.setattr(sinks, "WRITE_BYTES", 10**12)  # no slicing by size: one request
    name = f"halves-{uuid.uuid4().hex[:8]}"
    sink = ChromaSink(chroma_server.client, name)
    text = "x" * 1_000_000
    plan = WritePlan(
        upserts=[Upsert(f"i:{i}", f"{i} {text}", {"n": i}, [1.0, 0.0, 0.5, i]) for i in range(60)]
    )
    caplog.set_level(logging.INFO, logger="syncd.sink")
    sink.write(plan)  # 60 MB: over Chroma's limit
    stored = sink.get([u.id for u in plan.upserts])
    assert sorted(r.id for r in stored) == sorted(u.id for u in plan.upserts)
    texts = {r.id: r.document for r in stored}
    assert all(texts[u.id] == u.text for u in plan.upserts)
    assert "refused a write of 60 records as too large" in caplog.text
    chroma_server.client().delete_collection(name)


def test_a_large_write_not_answered_in_time_is_written_in_halves(
    chroma_server: Any,
    tcp_proxy_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A write Chroma cannot take within chroma.timeout_s (here: a slow link to it) would
    # time out again each time it was sent whole; its halves are each sent in time.
    monkeypatch.setattr(sinks, "WRITE_BYTES", 10**12)  # no slicing by size: one request
    proxy = tcp_proxy_factory(chroma_server.host, chroma_server.port)
    settings = ChromaSettings(mode="http", host="127.0.0.1", port=proxy.port, timeout_s=1.5)
    name = f"slow-{uuid.uuid4().hex[:8]}"
    sink = ChromaSink(lambda: make_client(settings), name)
    sink.open()
    text = "y" * 1_000_000
    plan = WritePlan(
        upserts=[Upsert(f"i:{i}", f"{i} {text}", {"n": i}, [1.0, 0.0, 0.5, i]) for i in range(8)]
    )
    proxy.set_latency(0.03)  # per 64 KB at most: 8 MB take 3.8 s or more, 1 MB 0.5 s
    caplog.set_level(logging.INFO, logger="syncd.sink")
    sink.write(plan)
    proxy.set_latency(0)
    assert "did not answer a write of 8 records within chroma.timeout_s" in caplog.text
    stored = sink.get([u.id for u in plan.upserts])
    assert {r.id: r.document for r in stored} == {u.id: u.text for u in plan.upserts}
    chroma_server.client().delete_collection(name)


def test_a_small_write_not_answered_in_time_is_not_split(
    chroma_server: Any, tcp_proxy_factory: Any
) -> None:
    # A small write that times out says Chroma is slow or gone, not that the write is too
    # large: it fails as it did, for the pipeline to retry whole, not in ever smaller parts.
    proxy = tcp_proxy_factory(chroma_server.host, chroma_server.port)
    settings = ChromaSettings(mode="http", host="127.0.0.1", port=proxy.port, timeout_s=1.0)
    sink = ChromaSink(lambda: make_client(settings), f"stalled-{uuid.uuid4().hex[:8]}")
    sink.open()
    proxy.hold(b"upsert")
    plan = WritePlan(
        upserts=[Upsert(f"i:{i}", "short", {"n": i}, [1.0, 0, 0, i]) for i in range(4)]
    )
    calls: list[int] = []
    original = sink._call

    def counted(method: str, **kwargs: Any) -> Any:
        if method == "upsert":
            calls.append(len(kwargs["ids"]))
        return original(method, **kwargs)

    sink._call = counted  # type: ignore[method-assign]
    with pytest.raises(SinkUnavailableError, match="Chroma unavailable"):
        sink.write(plan)
    proxy.release()
    assert calls == [4]


def test_a_record_refused_even_alone_is_named(chroma_server: Any) -> None:
    # A proxy in front of Chroma may refuse a request holding one large record: halving
    # ends at that record, the records before it are written, and the refusal names it
    # (the pipeline then halts at, or dead-letters, its document: tests/unit/test_pipeline.py).
    name = f"refused-{uuid.uuid4().hex[:8]}"
    sink = ChromaSink(chroma_server.client, name)
    big = "b" * 200_000  # a record a proxy may well refuse: not a misconfigured limit
    plan = WritePlan(
        upserts=[
            Upsert(f"i:{i}", f"text {i} {big if i == 5 else ''}", {"n": i}, [1.0, 0, 0, i])
            for i in range(8)
        ]
    )
    original = sink._call

    def proxy_limit(method: str, **kwargs: Any) -> Any:
        if method == "upsert" and "i:5" in kwargs["ids"]:
            raise SinkRejectedError("Chroma rejected the write: HTTP 413 (Payload too large)")
        return original(method, **kwargs)

    sink._call = proxy_limit  # type: ignore[method-assign]
    with pytest.raises(SinkRejectedError) as raised:
        sink.write(plan)
    assert raised.value.record_id == "i:5"
    assert sorted(r.id for r in sink.get([u.id for u in plan.upserts])) == [
        f"i:{i}" for i in range(5)
    ]
    chroma_server.client().delete_collection(name)


@dataclasses.dataclass
class Proxied:
    """A pipeline ``name`` over ``docs`` (documents 0-2 in), whose Chroma is behind
    ``proxy``; ``stored`` is its Chroma collection, ``letters`` its dead letters."""

    proxy: BodyLimitProxy
    client: MongoClient[Any]
    docs: Any
    cfg: Path
    settings: Any
    collection: str
    name: str
    chroma: Any  # a client of the Chroma server itself, not through the proxy

    @property
    def stored(self) -> Any:
        return self.chroma.get_collection(self.collection, embedding_function=None)

    @property
    def letters(self) -> Any:
        return self.client[f"{self.settings.pipeline(self.name).database}_syncd"]["dead_letters"]

    def row(self, state: str) -> dict[str, Any] | None:
        """The pipeline's `syncd status --json` row, if it is in ``state``."""
        done = run_syncd(["status", "--json"], self.cfg)
        row = {r["pipeline"]: r for r in json.loads(done.stdout)}.get(self.name)
        return row if row is not None and row.get("state") == state else None


@contextlib.contextmanager
def behind_a_proxy(
    tmp_path: Path, mongo_uri: str, chroma_server: Any, limit: int, name: str, **pipeline: Any
) -> Iterator[Proxied]:
    proxy = BodyLimitProxy(chroma_server.host, chroma_server.port, limit)
    db, coll = f"{name}_{uuid.uuid4().hex[:8]}", f"{name}-{uuid.uuid4().hex[:8]}"
    client: MongoClient[Any] = MongoClient(mongo_uri)
    try:
        docs = client[db]["docs"]
        docs.insert_many([oracle.document(k) for k in range(3)])
        cfg = write_config(
            tmp_path / "syncd.toml",
            mongo_uri=mongo_uri,
            chroma={"mode": "http", "host": "127.0.0.1", "port": proxy.port},
            checkpoint_db=f"{db}_syncd",
            pipelines=[oracle.pipeline(name, db, chroma_collection=coll, **pipeline)],
            extra={"telemetry": {"listen": ""}},
        )
        yield Proxied(
            proxy, client, docs, cfg, settings_of(cfg), coll, name, chroma_server.client()
        )
    finally:
        proxy.close()
        client.drop_database(db)
        client.drop_database(f"{db}_syncd")
        client.close()


@pytest.mark.parametrize("on_error", ["dead_letter", "halt"])
@pytest.mark.timeout(240)
def test_a_document_too_large_for_a_proxy_in_front_of_chroma_is_poison_for_itself_only(
    tmp_path: Path, mongo_uri: str, chroma_server: Any, syncd_factory: Any, on_error: str
) -> None:
    # A proxy that takes bodies of 2 MB at most: a 3 MB text cannot reach Chroma even
    # in a request of its own. That document is poison (README, Poison); the others are
    # mirrored. Dead-lettered: parked, streaming goes on. Halted: the halt names the
    # document, and fixing it lifts the halt by itself (halt_recheck_s).
    with behind_a_proxy(
        tmp_path, mongo_uri, chroma_server, 2_000_000, "lim", on_error=on_error,
        halt_recheck_s=1.0, mapping={"max_text_chars": 5_000_000},
    ) as p:  # fmt: skip
        daemon = syncd_factory(["run"], p.cfg)
        wait_caught_up(p.client, p.docs.database.name, p.settings, "lim", 60, "the snapshot")
        huge = {**oracle.document("huge"), "body": "huge " + "z" * 3_000_000}
        p.docs.insert_one(huge)
        p.docs.insert_many([oracle.document(k) for k in range(3, 6)])
        if on_error == "halt":  # another, after the halt: repair cannot write it either
            p.docs.insert_one({**huge, "_id": "huge2"})
        if on_error == "dead_letter":
            wait_caught_up(p.client, p.docs.database.name, p.settings, "lim", 90, "the rest")
            assert [e["key"] for e in p.letters.find({}, {"key": 1})] == ["s:huge"]
            # Held back, as verify counts it: exit 0, and the verdict says why.
            story = run_syncd(["explain", "lim", "s:huge"], p.cfg)
            assert story.returncode == ExitCode.OK, story.stdout + story.stderr
            assert "s:huge  MISSING" in story.stdout and "no records" not in story.stdout
            assert "verdict:  not synced: its change is parked as a dead letter" in story.stdout
            assert run_syncd(["verify", "lim"], p.cfg).returncode == ExitCode.OK
            problem = oracle.mismatch(p.docs.find({"_id": {"$ne": "huge"}}), p.stored)
            assert not problem, problem
        else:
            row = wait_until(lambda: p.row("halted"), 90, "the halt at the large document")
            assert row["halt"]["document_id"] == "'huge'", row
            assert p.letters.count_documents({}) == 0
            story = run_syncd(["explain", "lim", "s:huge"], p.cfg)
            assert story.returncode == ExitCode.OK, story.stdout + story.stderr  # held back
            assert "verdict:  not synced: the pipeline is halted at this document" in story.stdout
            # verify counts the document as halted, not missing, so repair leaves it to the
            # halt; it writes the changes after it, but not another document Chroma
            # refuses, and points to the halt (no dead letters here).
            checked = run_syncd(["verify", "lim"], p.cfg)
            assert "halted               1  e.g. s:huge" in checked.stdout, checked.stdout
            assert "missing              4" in checked.stdout, checked.stdout  # 3-5, huge2
            assert "the pipeline is halted at _id 'huge' (s:huge)" in checked.stdout
            repaired = run_syncd(["repair", "lim"], p.cfg)
            assert repaired.returncode == ExitCode.DRIFT_OR_FAILURE, repaired.stdout
            assert "re-applied 3 document(s)" in repaired.stdout, repaired.stdout
            assert "1 document(s) cannot be applied" in repaired.stdout, repaired.stdout
            assert "e.g. s:huge2;" in repaired.stdout, repaired.stdout
            assert f"`syncd status lim --config {p.cfg}` (the pipeline halts" in repaired.stdout
            assert "dlq" not in repaired.stdout, repaired.stdout
            p.docs.update_one({"_id": "huge2"}, {"$set": {"body": "small too"}})
            p.docs.update_one({"_id": "huge"}, {"$set": {"body": "small now"}})
            wait_caught_up(p.client, p.docs.database.name, p.settings, "lim", 90, "the lift")
            problem = oracle.mismatch(p.docs.find(), p.stored)
            assert not problem, problem
        assert p.proxy.refused >= 1
        assert daemon.is_running(), daemon.output()[-3000:]
        assert "Traceback" not in daemon.output()
        daemon.terminate()
        assert daemon.wait(60) == ExitCode.OK, daemon.output()[-3000:]


@pytest.mark.timeout(240)
def test_a_proxy_limit_below_any_record_is_an_outage_not_poison(
    tmp_path: Path, mongo_uri: str, chroma_server: Any, syncd_factory: Any
) -> None:
    # A proxy that refuses every write, however small (a misconfigured body limit), is
    # not about any document: under dead_letter nothing is parked and no record removed;
    # the pipeline retries, says so, and catches up once the limit is raised as the hint
    # says.
    with behind_a_proxy(
        tmp_path, mongo_uri, chroma_server, 50_000_000, "low", on_error="dead_letter"
    ) as p:
        daemon = syncd_factory(["run"], p.cfg)
        wait_caught_up(p.client, p.docs.database.name, p.settings, "low", 60, "the snapshot")
        p.proxy.limit = 1_000  # lookups (small reads) pass; no write of these records does
        p.docs.update_one({"_id": 1}, {"$set": {"body": "changed behind a bad proxy " * 100}})
        p.docs.insert_one({**oracle.document(3), "body": "new behind a bad proxy " * 100})
        row = wait_until(lambda: p.row("retrying"), 60, "the pipeline to retry")
        assert "client_max_body_size" in row["last_error"]["hint"], row
        assert p.letters.count_documents({}) == 0
        assert len(p.stored.get()["ids"]) == 3, "no record removed"
        p.proxy.limit = 10_000_000  # as the hint says
        wait_caught_up(p.client, p.docs.database.name, p.settings, "low", 90, "catching up")
        problem = oracle.mismatch(p.docs.find(), p.stored)
        assert not problem, problem
        assert p.letters.count_documents({}) == 0
        assert daemon.is_running(), daemon.output()[-3000:]


def test_verify_behind_a_proxy_that_refuses_its_reads_says_so(
    tmp_path: Path, mongo_uri: str, chroma_server: Any
) -> None:
    with behind_a_proxy(tmp_path, mongo_uri, chroma_server, 10, "vl") as p:
        p.chroma.create_collection(p.collection, embedding_function=None)
        done = run_syncd(["verify", "vl"], p.cfg)
        assert done.returncode == ExitCode.SINK, done.stdout + done.stderr
        assert "request body limit" in done.stderr and "Traceback" not in done.stderr
        assert "does not answer like a Chroma server" not in done.stderr
        p.proxy.limit = 10_000_000  # the hint followed: verify runs (and finds drift)
        done = run_syncd(["verify", "vl"], p.cfg)
        assert done.returncode == ExitCode.DRIFT_OR_FAILURE, done.stdout + done.stderr
        assert "missing" in done.stdout


def test_a_refusal_that_is_not_about_size_is_not_halved(chroma_server: Any) -> None:
    # Halving a write refused for what it asks (not its size) would find "the" record in
    # every half and dead-letter them all: such a refusal is raised as it comes.
    sink = ChromaSink(chroma_server.client, f"asks-{uuid.uuid4().hex[:8]}")
    plan = WritePlan(upserts=[Upsert(f"i:{i}", "t", {"n": i}, [1.0, 0, 0, i]) for i in range(8)])
    calls: list[int] = []

    def refuse(method: str, **kwargs: Any) -> Any:
        calls.append(len(kwargs.get("ids", [])))
        raise SinkRejectedError("Chroma rejected the write: HTTP 400 (quota exceeded)")

    sink._call = refuse  # type: ignore[method-assign]
    with pytest.raises(SinkRejectedError) as raised:
        sink.write(plan)
    assert calls == [8] and raised.value.record_id is None


def test_deletes_refused_as_too_large_are_halved_and_a_small_one_is_an_outage(
    chroma_server: Any,
) -> None:
    # A delete by ids is a write of the plan's records like any other: a proxy's body
    # limit halves it (before, the 413 on a delete stopped the daemon with exit 5); one
    # refused even alone is a misconfigured limit, retried as an outage, not a stop.
    proxy = BodyLimitProxy(chroma_server.host, chroma_server.port, 10_000_000)
    name = f"deletes-{uuid.uuid4().hex[:8]}"
    try:
        settings = ChromaSettings(mode="http", host="127.0.0.1", port=proxy.port)
        sink = ChromaSink(lambda: make_client(settings), name)
        sink.collection_id(create=True)
        ids = [f"s:a-rather-long-document-id-{i:04d}" for i in range(300)]
        sink.write(WritePlan(upserts=[Upsert(i, "t", {"n": 1}, [1.0, 0, 0, 1]) for i in ids]))
        proxy.limit = 3_000  # the 300 ids take about 12 KB
        sink.write(WritePlan(deletes=ids[:200]))
        assert proxy.refused >= 3  # 200, then 100 and 100 ids refused; 50 at a time pass
        stored = chroma_server.client().get_collection(name, embedding_function=None)
        assert sorted(stored.get(include=[])["ids"]) == ids[200:]
        proxy.limit = 10
        with pytest.raises(SinkUnavailableError) as raised:
            sink.write(WritePlan(deletes=ids[200:]))
        assert "request body limit" in (raised.value.hint or ""), raised.value.hint
        assert stored.count() == 100
    finally:
        proxy.close()
        with contextlib.suppress(Exception):
            chroma_server.client().delete_collection(name)


@pytest.mark.timeout(180)
def test_an_update_of_a_field_over_8_mib_is_streamed_like_any_other(
    tmp_path: Path, mongo_uri: str, chroma_server: Any, syncd_factory: Any
) -> None:
    """MongoDB fails a change stream whose event passes 16 MiB (BSONObjectTooLarge), and
    an update with its document looked up carries the fields it set twice: in
    ``updateDescription`` and in ``fullDocument``. A document holding a 9 MiB attachment
    beside its text is valid, and so is replacing that attachment: the update is synced,
    and the stream goes on past it."""
    db, coll = f"huge_{uuid.uuid4().hex[:8]}", f"huge-{uuid.uuid4().hex[:8]}"
    client: MongoClient[Any] = MongoClient(mongo_uri)
    try:
        docs = client[db]["docs"]
        docs.insert_one({**oracle.document(1), "attachment": "a" * (9 << 20)})
        cfg = write_config(
            tmp_path / "syncd.toml",
            mongo_uri=mongo_uri,
            chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port},
            checkpoint_db=f"{db}_syncd",
            pipelines=[oracle.pipeline("att", db, chroma_collection=coll)],
            extra={"telemetry": {"listen": ""}},
        )
        settings = settings_of(cfg)
        daemon = syncd_factory(["run"], cfg)
        wait_caught_up(client, db, settings, "att", 60, "the snapshot")
        new = oracle.document(1, version=1)
        docs.update_one({"_id": 1}, {"$set": {**new, "attachment": "b" * (9 << 20)}})
        docs.insert_one(oracle.document(2))  # after it in the stream
        wait_caught_up(client, db, settings, "att", 60, "the update of the attachment")
        stored = chroma_server.client().get_collection(coll, embedding_function=None)
        problem = oracle.mismatch(docs.find(), stored)
        assert not problem, problem
        assert daemon.is_running(), daemon.output()[-3000:]
        assert "Traceback" not in daemon.output(), daemon.output()[-3000:]
        daemon.terminate()
        assert daemon.wait(60) == ExitCode.OK, daemon.output()[-3000:]
    finally:
        client.drop_database(db)
        client.drop_database(f"{db}_syncd")
        client.close()
