"""The staged loop with an embedding API (the test server, a real OpenAIEmbedder): a
batch's requests are only sent by the planner, which reads the next batch while they
run, so the API is not idle between batches; never more than ``embed_concurrency``
requests are in flight, vectors keep their order, and a refused input still poisons
only its document, at its place in the stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from bson.timestamp import Timestamp

from syncd.embedder import OpenAIEmbedder
from syncd.errors import HaltedError, SinkUnavailableError
from syncd.sink import WritePlan
from tests.harness.embedding_api import EmbeddingAPI
from tests.unit.test_pipeline import T0, event
from tests.unit.test_staging import (
    WAIT_S,
    StreamSource,
    checkpointed,
    checkpointed_changes,
    checkpoints,
    covering,
    gated,
    run_until,
    written_before_checkpoint,
)


@pytest.fixture
def api() -> Iterator[EmbeddingAPI]:
    server = EmbeddingAPI(dimensions=8).start()
    try:
        yield server
    finally:
        server.close()


def remote(p: Any, api: EmbeddingAPI, concurrency: int, batch_size: int = 2) -> OpenAIEmbedder:
    embedder = OpenAIEmbedder(
        base_url=api.base_url,
        model="m",
        api_key=api.api_key,
        batch_size=batch_size,
        concurrency=concurrency,
    )
    p.applier.embedder = embedder
    return embedder


def eventually(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT_S
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def stream(*batches: list[str]) -> StreamSource:
    """Batches of inserts, one document per text, numbered from 1 in stream order."""
    n, out = 0, []
    for texts in batches:
        batch = []
        for text in texts:
            n += 1
            batch.append(event(n, "insert", n, {"body": text}))
        out.append(batch)
    return StreamSource(out)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_the_next_batch_is_read_and_sent_while_the_last_ones_requests_run(
    api: EmbeddingAPI, concurrency: int
) -> None:
    # Every request is held unanswered. The sequential planner stayed in batch 1's
    # embedding; now batch 1 is handed over with its vectors on their way, and the
    # batches behind it are read and their requests queued (sent at once when a slot is
    # free) up to batch_size (2) events beyond what the writer holds: batch 4 is not read.
    source = stream(["a"], ["b"], ["c"], ["d"])
    waiting = threading.Event()  # batches 2-4 happen once the writer waits for batch 1
    source.arrivals = {k: waiting for k in range(1, 4)}
    p, log, sink, _store, _, _ = gated(source=source, batch_size=2)
    embedder = remote(p, api, concurrency)
    finish = p.applier.finish

    def finishing(embedding: Any) -> Any:
        waiting.set()
        return finish(embedding)

    p.applier.finish = finishing
    sink.release.set()  # writes go through; the API is what holds the pipeline here
    api.hold(0)
    seen: dict[str, Any] = {}

    def watch() -> None:
        try:
            seen["batch 2 read"] = eventually(lambda: source.reads >= 2)
            seen["requests held"] = eventually(lambda: api.held() >= concurrency)
            time.sleep(0.3)  # room for a wrong read of batch 4, or a request too many
            seen["reads"], seen["held"] = source.reads, api.held()
            seen["writes"] = sink.writes
        finally:
            api.release()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert run_until(p, checkpointed(p, 4)) is None
    finally:
        watcher.join(WAIT_S)
        embedder.close()
    assert seen["batch 2 read"], "batch 2 was not read while batch 1's request ran"
    assert seen["reads"] == 3 and seen["writes"] == 0, seen
    assert seen["held"] == concurrency, "requests in flight beyond embed_concurrency"
    assert api.max_in_flight <= concurrency
    assert sorted(api.inputs) == ["a", "b", "c", "d"], "each text is sent once"
    done = checkpointed_changes(log)
    assert done == sorted(set(done)) and done[-1] == 4, done
    for n in done:  # each checkpoint follows the write of every record it covers
        assert written_before_checkpoint(log, n) == n
    for n, text in enumerate(["a", "b", "c", "d"], start=1):
        assert sink.records[f"i:{n}"]["embedding"] == api.vector(text)


def test_vectors_of_requests_in_flight_at_once_keep_their_records(api: EmbeddingAPI) -> None:
    texts = [f"text {n} " + "word " * (n % 7) for n in range(40)]
    source = stream(texts[:15], texts[15:])
    p, _log, sink, _store, _, _ = gated(source=source)
    sink.release.set()
    api.delay_s = 0.02
    embedder = remote(p, api, concurrency=4, batch_size=3)
    stages: list[tuple[str, float]] = []
    stage_at = p.applier.telemetry.stage_at

    def recorded(name: str, started_ns: int, ended_ns: int, seconds: float, error: Any) -> None:
        stages.append((name, seconds))
        stage_at(name, started_ns, ended_ns, seconds, error)

    p.applier.telemetry.stage_at = recorded
    written: list[WritePlan] = []
    write = sink.write

    def keep(plan: WritePlan) -> None:
        written.append(plan)
        write(plan)

    sink.write = keep
    try:
        assert run_until(p, checkpointed(p, 40)) is None
    finally:
        embedder.close()
    assert 2 <= api.max_in_flight <= 4
    # Each batch's embedding is one stage, from its requests to its last answer.
    embeds = [seconds for name, seconds in stages if name == "embed"]
    assert len(embeds) == 2 and min(embeds) >= 0.02, stages
    # The vectors reach the sink packed as Chroma takes them, as a local embedder's do.
    upserts = [u for plan in written for u in plan.upserts]
    assert len(upserts) == 40
    assert all(isinstance(u.vector, np.ndarray) and u.vector.dtype == np.float32 for u in upserts)
    assert {rid: r["embedding"] for rid, r in sink.records.items()} == {
        f"i:{n}": api.vector(text) for n, text in enumerate(texts, start=1)
    }


def test_a_refused_input_planned_ahead_is_dead_lettered_alone(api: EmbeddingAPI) -> None:
    source = stream(["a", "b"], ["c", "refuse me", "d"], ["e"])
    source.current = {4: {"_id": 4, "body": "refuse me"}}  # still refused when read again
    p, log, sink, _store, dlq, _ = gated(on_error="dead_letter", source=source)
    sink.release.set()
    api.refuse = lambda text: text == "refuse me"
    embedder = remote(p, api, concurrency=2)
    try:
        assert run_until(p, checkpointed(p, 6)) is None
    finally:
        embedder.close()
    assert [item.change.source_id for item in dlq.items] == [4]
    assert log.calls.index("dead-letter 1") < covering(log, 4)
    assert set(sink.records) == {"i:1", "i:2", "i:3", "i:5", "i:6"}
    assert sink.records["i:5"]["embedding"] == api.vector("d")


def test_a_refused_input_planned_ahead_halts_at_its_change(api: EmbeddingAPI) -> None:
    source = stream(["a"], ["b", "refuse me", "d"], ["e"])
    source.current = {3: {"_id": 3, "body": "refuse me"}}
    p, _log, sink, store, dlq, _ = gated(on_error="halt", source=source)
    sink.release.set()
    api.refuse = lambda text: text == "refuse me"
    embedder = remote(p, api, concurrency=2)
    try:
        raised = run_until(p, lambda: False)
    finally:
        embedder.close()
    assert isinstance(raised, HaltedError) and raised.document_id == 3
    assert set(sink.records) == {"i:1", "i:2"}
    assert store.saved[-1].cluster_time == Timestamp(T0, 2)
    assert dlq.items == []


def test_submitted_calls_share_embed_concurrency_and_keep_their_order(
    api: EmbeddingAPI,
) -> None:
    embedder = OpenAIEmbedder(
        base_url=api.base_url, model="m", api_key=api.api_key, batch_size=1, concurrency=2
    )
    api.hold(0)
    try:
        first = embedder.submit(["a", "b", "c"])  # both return at once
        second = embedder.submit(["d"])
        assert eventually(lambda: api.held() == 2)
        time.sleep(0.2)  # room for a request too many
        assert api.held() == 2, "requests in flight beyond embed_concurrency"
        api.release()
        assert second.result() == [api.vector("d")]
        assert first.result() == [api.vector(t) for t in "abc"]
    finally:
        api.release()
        embedder.close()
    assert api.max_in_flight == 2
    assert sorted(api.inputs) == ["a", "b", "c", "d"]


def test_an_outage_of_the_api_for_a_batch_planned_ahead_is_retried(api: EmbeddingAPI) -> None:
    # Batch 2's request fails as an unreachable API does, while batch 1 is written: the
    # writer raises it in batch 2's turn, nothing past batch 1 is checkpointed, and the
    # retry reads batch 2 again from the checkpoint.
    source = stream(["a"], ["b"], ["c"])
    p, log, sink, store, _, _ = gated(source=source)
    embedder = remote(p, api, concurrency=2)
    post = embedder._post
    failed: list[int] = []

    def unreachable_once(batch: Any) -> Any:
        if "b" in batch and not failed:
            failed.append(len(store.saved))
            raise SinkUnavailableError("embedding API unreachable (ConnectError)")
        return post(batch)

    embedder._post = unreachable_once  # type: ignore[method-assign]
    threading.Timer(0.3, sink.release.set).start()
    try:
        assert run_until(p, checkpointed(p, 3)) is None
    finally:
        embedder.close()
    assert failed, "the outage never happened: the test proved nothing"
    assert checkpoints(log)[0] == f"checkpoint {Timestamp(T0, 1)}"
    times = [cp.cluster_time for cp in store.saved[1:]]
    assert times == sorted(times)
    for n, text in enumerate(["a", "b", "c"], start=1):
        assert sink.records[f"i:{n}"]["embedding"] == api.vector(text)
