"""The staged loop with test doubles: batch N+1 is read, looked up and embedded while
batch N is written, and still every checkpoint follows its write, in stream order."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from bson.timestamp import Timestamp

from syncd.applier import Planned
from syncd.checkpoint import Checkpoint
from syncd.config import PipelineSettings
from syncd.errors import HaltedError, TransientError
from syncd.plan import PlanResult
from syncd.sink import WRITE_BYTES, WritePlan
from syncd.source import Batch, Position
from syncd.staging import InFlight, Item, Planner, ahead
from syncd.tokens import covered_through
from tests.doubles import MemorySink
from tests.unit.test_pipeline import T0, FakeSource, event, make, token

WAIT_S = 20.0  # generous: only a broken rule makes a test wait this long


class StreamSource(FakeSource):
    """A change stream of fixed batches that re-opens after any token, as MongoDB does.

    ``arrivals``: a batch (by index) whose event is not set has not happened yet: reads
    find nothing new until it is set."""

    def __init__(
        self,
        batches: list[list[dict[str, Any]]],
        current: Any = None,
        arrivals: Mapping[int, threading.Event] | None = None,
    ) -> None:
        super().__init__(current)
        self.batches = batches
        self.events = [e for b in batches for e in b]
        self.next_index = 0
        self.reads = 0
        self.arrivals = dict(arrivals or {})

    def open(self, position: Position, *, max_await_ms: int) -> None:
        after = position.resume_after or position.start_after
        self.next_index = 0
        if after is not None:
            self.next_index = 1 + next(i for i, e in enumerate(self.events) if e["_id"] == after)

    def read_batch(self, max_events: int, max_wait_s: float) -> Batch:
        start = self.next_index
        if start >= len(self.events) or not self._arrived(start):
            time.sleep(0.01)
            last = self.events[start - 1]["_id"] if start else None
            return Batch([], dict(last) if last is not None else None)
        # the batch boundaries as given, whatever position the stream re-opened at
        end, seen = start, 0
        for batch in self.batches:
            seen += len(batch)
            if seen > start:
                end = seen
                break
        events = self.events[start:end]
        self.next_index = end
        self.reads += 1
        return Batch(events, events[-1]["_id"])

    def _arrived(self, start: int) -> bool:
        seen = 0
        for index, batch in enumerate(self.batches):
            if seen == start:
                gate = self.arrivals.get(index)
                return gate is None or gate.is_set()
            seen += len(batch)
        return True


def run_until(p: Any, done: Callable[[], bool]) -> BaseException | None:
    """Run the pipeline in a thread until ``done()``; return what it raised, if anything."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            p.run()
        except BaseException as exc:
            raised.append(exc)

    p.checkpoint = None
    p.store.saved.append(
        Checkpoint(pipeline="p", fingerprint=p.mapper.fingerprint, chroma_collection_id="coll-1")
    )
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not done() and not raised and time.monotonic() < deadline:
        time.sleep(0.01)
    p.stop.set()
    thread.join(WAIT_S)
    assert not thread.is_alive(), "the pipeline did not stop"
    assert not [t for t in threading.enumerate() if t.name == "plan-p"], "planner thread leaked"
    return raised[0] if raised else None


def checkpointed(p: Any, n: int) -> Callable[[], bool]:
    def done() -> bool:
        cp = p.store.saved[-1] if p.store.saved else None
        return cp is not None and cp.cluster_time == Timestamp(T0, n)

    return done


def checkpoints(log: Any) -> list[str]:
    return [c for c in log.calls if c.startswith("checkpoint")]


def _change(checkpoint: str) -> int:
    """The change a logged checkpoint covers (the increment of its cluster time)."""
    return int(checkpoint.rsplit(", ", 1)[1].rstrip(")"))


def checkpointed_changes(log: Any) -> list[int]:
    """The change each checkpoint covers, in order."""
    return [_change(c) for c in checkpoints(log)]


def covering(log: Any, n: int) -> int:
    """Where in the log the first checkpoint at or past the change at ``n`` is."""
    for index, call in enumerate(log.calls):
        if call.startswith("checkpoint") and _change(call) >= n:
            return index
    raise AssertionError(f"no checkpoint covers change {n}: {log.calls}")


def writes(calls: Sequence[str]) -> list[int]:
    """The records of each write among ``calls``, in order."""
    return [int(c.split()[1]) for c in calls if c.startswith("write ")]


def written_before_checkpoint(log: Any, n: int) -> int:
    """Records written before the checkpoint that covers the change at ``n``."""
    return sum(writes(log.calls[: log.calls.index(f"checkpoint {Timestamp(T0, n)}")]))


def idle_planner(p: Any) -> Planner:
    """A planner of ``p``'s parts, not started, whose reads find nothing: for tests that
    hand it items themselves."""
    return Planner(
        source=p.source,
        applier=p.applier,
        progress=getattr(p, "progress", None),  # type: ignore[arg-type]
        telemetry=getattr(p, "telemetry", None),  # type: ignore[arg-type]
        stop=threading.Event(),
        read=lambda room: Batch([], None),
    )


class GatedSink(MemorySink):
    """Holds the first write until released; records lookups in the shared log."""

    def __init__(self, log: Any) -> None:
        super().__init__(log)
        self.writing = threading.Event()
        self.release = threading.Event()
        self.held = False

    def existing(self, keys: Sequence[str]) -> dict[str, dict[str, Mapping[str, Any]]]:
        self.log.calls.append(f"lookup {','.join(keys)}")
        return super().existing(keys)

    def write(self, plan: WritePlan) -> None:
        if not self.held:
            self.held = True
            self.writing.set()
            assert self.release.wait(WAIT_S), "never released"
        super().write(plan)


def gated(
    on_error: str = "halt", source: Any = None, batch_size: int | None = None
) -> tuple[Any, ...]:
    p, log, _sink, store, dlq, emb = make(on_error=on_error, source=source, batch_size=batch_size)
    sink = GatedSink(log)
    p.applier.sink = p.progress.sink = sink
    return p, log, sink, store, dlq, emb


def test_the_next_batch_is_planned_while_one_is_written() -> None:
    second = threading.Event()  # batch 2 happens once batch 1's write has begun
    source = StreamSource(
        [[event(1, "insert", 1, {"body": "a"})], [event(2, "insert", 2, {"body": "b"})]],
        arrivals={1: second},
    )
    p, log, sink, _store, _, emb = gated(source=source)
    write = sink.write

    def arriving(plan: WritePlan) -> None:
        second.set()
        write(plan)

    sink.write = arriving
    embedded_b = threading.Event()
    embed = emb.embed

    def watch(texts: Sequence[str]) -> list[list[float]]:
        out = embed(texts)
        if "b" in texts:
            embedded_b.set()
        return out

    emb.embed = watch

    def release_when_planned() -> None:
        assert sink.writing.wait(WAIT_S)
        # batch 1's write is held: batch 2 must be read, looked up and embedded meanwhile
        if embedded_b.wait(WAIT_S):
            log.calls.append("batch 2 planned")
        sink.release.set()

    helper = threading.Thread(target=release_when_planned, daemon=True)
    helper.start()
    assert run_until(p, checkpointed(p, 2)) is None
    helper.join(WAIT_S)
    assert log.calls.index("batch 2 planned") < log.calls.index("write 1")
    assert checkpoints(log) == [f"checkpoint {Timestamp(T0, 1)}", f"checkpoint {Timestamp(T0, 2)}"]
    assert log.calls.index("write 1") < log.calls.index(f"checkpoint {Timestamp(T0, 1)}")
    assert set(sink.records) == {"i:1", "i:2"}


@pytest.mark.parametrize("largest", [3, 1000])
def test_what_arrives_during_a_write_is_planned_meanwhile_and_written_together(
    largest: int,
) -> None:
    # While batch 1's write is held, the planner reads and plans what comes, up to
    # batch_size (3) events beyond the write: changes trickle in (reads come back
    # smaller than batch_size), so however much one write may carry (Chroma's largest
    # batch: 3 or 1,000 here), a larger write would only make them wait longer. Then it
    # reads nothing more; the writer takes those in one write (a change waits for the
    # write in flight and its own), and the rest after it. Every checkpoint follows the
    # write that covers it.
    writing = threading.Event()  # batches 2-6 happen once batch 1's write has begun
    source = StreamSource(
        [[event(n, "insert", n, {"body": str(n)})] for n in range(1, 7)],
        arrivals={k: writing for k in range(1, 6)},
    )
    p, log, sink, _store, _, emb = gated(source=source, batch_size=3)
    sink.max_batch = largest
    sink.writing = writing
    ahead_at_reads: list[int] = []  # events read and not yet written, as each read starts
    read = source.read_batch

    def counting(max_events: int, max_wait_s: float) -> Any:
        if source.next_index < len(source.events):
            ahead_at_reads.append(source.next_index - len(sink.records))
        return read(max_events, max_wait_s)

    source.read_batch = counting  # type: ignore[method-assign]

    def release_when_planned() -> None:
        assert sink.writing.wait(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while "4" not in emb.texts and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # room for a wrong read of batch 5 (the test fails if it happens)
        log.calls.append(f"reads while batch 1 is written: {source.reads}")
        sink.release.set()

    helper = threading.Thread(target=release_when_planned, daemon=True)
    helper.start()
    assert run_until(p, checkpointed(p, 6)) is None
    helper.join(WAIT_S)
    assert "reads while batch 1 is written: 4" in log.calls
    assert max(ahead_at_reads) <= 1 + 3, ahead_at_reads  # the write's event, and 3 ahead
    assert writes(log.calls)[:2] == [1, 3] and sum(writes(log.calls)) == 6, writes(log.calls)
    done = checkpointed_changes(log)
    assert done[:2] == [1, 4] and done[-1] == 6 and done == sorted(set(done)), done
    for n in done:  # each checkpoint follows the writes of every record it covers
        assert written_before_checkpoint(log, n) == n
    assert set(sink.records) == {f"i:{n}" for n in range(1, 7)}


def test_while_changes_trickle_in_a_read_waits_for_the_end_of_the_write_in_flight() -> None:
    # Changes arrive all the time and the writer is busy: a read made as a write begins
    # would leave what arrives during that write to the write after the next one. Once
    # writes have been timed, the planner reads shortly before the write in flight ends.
    per_event_s, size = 0.02, 5
    source = StreamSource(
        [
            [event(n, "insert", n, {"body": str(n)}) for n in range(k, k + size)]
            for k in range(1, 1 + 8 * size, size)
        ]
    )
    p, log, sink, _store, _, _ = make(source=source)
    spans: list[tuple[float, float]] = []  # each write's start and end
    reads: list[float] = []
    write, read = sink.write, source.read_batch

    def slow(plan: WritePlan) -> None:
        began = time.monotonic()
        time.sleep(per_event_s * len(plan.upserts))  # Chroma's time, by the records
        write(plan)
        spans.append((began, time.monotonic()))

    def timed(max_events: int, max_wait_s: float) -> Any:
        if source.next_index < len(source.events):
            reads.append(time.monotonic())
        return read(max_events, max_wait_s)

    sink.write = slow
    source.read_batch = timed  # type: ignore[method-assign]
    assert run_until(p, checkpointed(p, 8 * size)) is None
    assert set(sink.records) == {f"i:{n}" for n in range(1, 1 + 8 * size)}
    assert checkpointed_changes(log) == sorted(set(checkpointed_changes(log)))
    # From the third write on (the first two timed the writes), the first read made
    # during a write comes in its second half, not as it begins.
    into: list[float] = []
    for began, ended in spans[2:]:
        during = [t for t in reads if began <= t < ended]
        if during:
            into.append((during[0] - began) / (ended - began))
    assert into and min(into) >= 0.4, (into, spans, reads)


def test_small_vectors_are_planned_ahead_and_written_beyond_batch_size() -> None:
    # 8-dimension vectors: one write carries up to Chroma's largest batch (1,000 here),
    # so while batch 1's write is held the planner reads on past batch_size (3), each
    # read still at most batch_size events, and the writer takes them all in one write.
    writing = threading.Event()
    source = StreamSource(
        [[event(n, "insert", n, {"body": str(n)}) for n in range(1, 3)]]
        + [[event(n, "insert", n, {"body": str(n)}) for n in range(k, k + 3)] for k in (3, 6, 9)]
        + [[event(12, "insert", 12, {"body": "12"})]],
        arrivals={k: writing for k in range(1, 5)},
    )
    p, log, sink, _store, _, emb = gated(source=source, batch_size=3)
    sink.writing = writing
    sizes: list[int] = []
    read = source.read_batch

    def counting(max_events: int, max_wait_s: float) -> Any:
        batch = read(max_events, max_wait_s)
        assert len(batch.events) <= max_events <= 3
        if batch.events:
            sizes.append(len(batch.events))
        return batch

    source.read_batch = counting  # type: ignore[method-assign]

    def release_when_planned() -> None:
        assert sink.writing.wait(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while "12" not in emb.texts and time.monotonic() < deadline:
            time.sleep(0.01)
        sink.release.set()

    helper = threading.Thread(target=release_when_planned, daemon=True)
    helper.start()
    assert run_until(p, checkpointed(p, 12)) is None
    helper.join(WAIT_S)
    assert sizes == [2, 3, 3, 3, 1], sizes
    assert writes(log.calls) == [2, 10], writes(log.calls)
    assert checkpointed_changes(log) == [2, 12]
    for n in (2, 12):
        assert written_before_checkpoint(log, n) == n
    assert set(sink.records) == {f"i:{n}" for n in range(1, 13)}


API = {"kind": "openai", "base_url": "http://embed.example", "model": "m"}


@pytest.mark.parametrize(
    ("embedder", "mapping", "answered", "expected"),
    [
        ({"kind": "field", "field": "v", "dimensions": 32}, {}, None, 5461),
        ({"kind": "field", "field": "v", "dimensions": 384}, {}, None, 1041),
        ({"kind": "field", "field": "v", "dimensions": 4096}, {}, None, 500),
        ({"kind": "hashing", "dimensions": 32}, {"chunk_size": 200}, None, 500),
        (API, {}, 0, 500),  # the API's size is not known before its first answer
        (API, {}, 64, 5461),
    ],
)
def test_how_far_ahead_the_planner_reads(
    embedder: dict[str, Any], mapping: dict[str, Any], answered: int | None, expected: int
) -> None:
    # Events planned ahead (and written together) at most: as many as hold 400,000
    # vector values, at least batch_size (500) and at most Chroma's largest batch (5,461).
    settings = PipelineSettings.model_validate(
        {
            "name": "p",
            "database": "app",
            "collection": "docs",
            "mapping": {"text": "body", **mapping},
            "embedder": embedder,
        }
    )
    sink = MemorySink()
    sink.max_batch = 5461
    made = None if answered is None else SimpleNamespace(dimensions=answered or None)
    applier = SimpleNamespace(settings=settings, embedder=made, sink=sink)
    planner = idle_planner(SimpleNamespace(source=FakeSource(), applier=applier))
    assert planner.ahead_limit() == expected


def test_a_write_does_not_wait_for_vectors_of_reads_planned_behind_it() -> None:
    # An embedding API's answers come in order: a read planned behind the first whose
    # vectors are not back yet ends what the write takes, so the write is not held up.
    planner = idle_planner(make(batch_size=10)[0])

    class Vectors:
        def __init__(self, back: bool) -> None:
            self.back = back

        def answered(self) -> bool:
            return self.back

        def cancel(self) -> None:
            pass

    def item(key: int, back: bool) -> Item:
        events = [event(key, "insert", key, {"body": "x"})]
        return Item(
            batch=Batch(events, events[-1]["_id"]),
            embedding=Vectors(back),  # type: ignore[arg-type]
            keys=[f"i:{key}"],
        )

    answered, waiting, after = item(2, True), item(3, False), item(4, True)
    answered.size = 1
    for queued in (answered, waiting, after):
        planner._put(queued)
    assert planner.more(item(1, False)) == [answered]
    assert planner.next(timeout=0) is waiting
    waiting.embedding.back = True  # type: ignore[union-attr]
    assert planner.more(waiting) == [after]


def test_a_write_takes_reads_planned_ahead_up_to_its_bytes() -> None:
    # Large texts: what one write carries is bounded by bytes too (Chroma refuses
    # requests over about 40 MB), however many records it may hold.
    planner = idle_planner(make(batch_size=10)[0])

    def item(key: int, size: int) -> Item:
        events = [event(key, "insert", key, {"body": "x"})]
        planned = Planned(changes=[], result=PlanResult(WritePlan(), [], 0, []))
        return Item(
            batch=Batch(events, events[-1]["_id"]), planned=planned, keys=[f"i:{key}"], size=size
        )

    third = WRITE_BYTES // 3
    queued = [item(2, third), item(3, third), item(4, third)]
    for each in queued:
        planner._put(each)
    assert planner.more(item(1, third)) == queued[:2], "a third more would be over"
    assert planner._wait_room() == 9, "one more read: the next write has room"
    planner._put(item(5, WRITE_BYTES))
    threading.Timer(0.5, planner.stop.set).start()
    assert planner._wait_room() is None, "a write's bytes planned ahead: no read until taken"


def test_a_write_takes_reads_planned_ahead_only_while_they_share_no_key() -> None:
    # Keys already in a write end what it takes: each key's changes stay in stream order.
    planner = idle_planner(make(batch_size=10)[0])

    def item(*keys: int, sequential: bool = False) -> Item:
        events = [event(k, "insert", k, {"body": "x"}) for k in keys]
        planned = Planned(changes=[], result=PlanResult(WritePlan(), [], 0, []))
        return Item(
            batch=Batch(events, events[-1]["_id"]),
            planned=None if sequential else planned,
            keys=[f"i:{k}" for k in keys],
            sequential=sequential,
        )

    first, second, shared, after = item(1, 2), item(3), item(2, 4), item(5)
    for queued in (second, shared, after):
        planner._put(queued)
    assert planner.more(first) == [second]
    assert planner.next(timeout=0) is shared
    assert planner.more(shared) == [after]

    sequential = item(7, sequential=True)
    for queued in (item(6), sequential, item(8)):
        planner._put(queued)
    taken = planner.more(item(9))
    assert [i.keys for i in taken] == [["i:6"]], "nothing past a read applied on its own"
    assert planner.next(timeout=0) is sequential
    assert planner.next(timeout=0) is not None and planner.next(timeout=0) is None

    fits, too_many = item(30), item(31)
    planner._put(fits)
    planner._put(too_many)
    planner.applier.sink.max_batch = 10  # type: ignore[misc]  # one write: 10 records
    assert planner.more(item(*range(20, 29))) == [fits], "10 events at most (one write)"
    assert planner.next(timeout=0) is too_many


def test_a_key_in_flight_is_looked_up_only_after_its_write() -> None:
    # Written in batch 1, changed in batch 2 (a metadata key removed, same text): planned
    # against batch 1's records it is not re-embedded and ends in batch 2's state.
    source = StreamSource(
        [
            [event(1, "insert", 1, {"body": "a", "tag": "x"})],
            [event(2, "update", 1, {"body": "a", "n": 2}), event(3, "insert", 2, {"body": "b"})],
        ]
    )
    p, log, sink, _store, _, emb = gated(source=source)

    def release_later() -> None:
        assert sink.writing.wait(WAIT_S)
        time.sleep(0.3)  # room for a wrong early lookup to happen (the test fails if it does)
        log.calls.append("released")
        sink.release.set()

    helper = threading.Thread(target=release_later, daemon=True)
    helper.start()
    assert run_until(p, checkpointed(p, 3)) is None
    helper.join(WAIT_S)
    second = [c for c in log.calls if c.startswith("lookup") and "i:1" in c][1]
    assert log.calls.index("released") < log.calls.index(second)
    assert emb.texts == ["a", "b"], "an unchanged text must not be embedded again"
    meta = sink.records["i:1"]["metadata"]
    assert meta["n"] == 2 and "tag" not in meta


def test_in_flight_waits_only_for_its_own_keys() -> None:
    flight = InFlight()
    flight.add(["i:1"])
    flight.wait_written(["i:2"])  # another key: no wait
    waited = threading.Event()

    def lookup() -> None:
        flight.wait_written(["i:2", "i:1"])
        waited.set()

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    assert not waited.wait(0.2)
    flight.done(["i:1"])
    assert waited.wait(WAIT_S)


def test_a_failed_write_never_lets_a_later_checkpoint_through() -> None:
    source = StreamSource(
        [
            [event(1, "insert", 1, {"body": "a"})],
            [event(2, "insert", 2, {"body": "b"})],
            [event(3, "insert", 3, {"body": "c"})],
        ]
    )
    p, log, sink, store, _, _ = make(source=source)
    saved_at_failure: list[int] = []
    write = sink.write

    def failing_once(plan: WritePlan) -> None:
        if not saved_at_failure:
            saved_at_failure.append(len(store.saved))
            time.sleep(0.2)  # the planner reads and plans ahead meanwhile
            raise TransientError("chroma down")
        write(plan)

    sink.write = failing_once
    assert run_until(p, checkpointed(p, 3)) is None
    assert saved_at_failure == [1], "only the starting checkpoint existed at the failure"
    times = [covered_through(cp.token) for cp in store.saved[1:] if cp.token]
    assert times == sorted(times)
    # after the failure, the first checkpoint follows a write of everything it covers
    first = checkpoints(log)[0]
    assert sum(writes(log.calls)[:1]) == _change(first)
    assert log.calls.index(next(c for c in log.calls if c.startswith("write "))) < (
        log.calls.index(first)
    )
    assert set(sink.records) == {"i:1", "i:2", "i:3"}
    assert source.reads > 3, "the batches planned but not written were read again"


def test_a_halt_stops_at_the_poison_change_of_a_batch_planned_ahead() -> None:
    still_bad = {3: {"_id": 3, "nobody": "still poison"}}
    source = StreamSource(
        [
            [event(1, "insert", 1, {"body": "a"})],
            [
                event(2, "insert", 2, {"body": "b"}),
                event(3, "insert", 3, {"nobody": "x"}),
                event(4, "insert", 4, {"body": "d"}),
            ],
            [event(5, "insert", 5, {"body": "e"})],
        ],
        current=still_bad,
    )
    p, _log, sink, store, dlq, _ = make(on_error="halt", source=source)
    raised = run_until(p, lambda: False)
    assert isinstance(raised, HaltedError) and raised.document_id == 3
    assert set(sink.records) == {"i:1", "i:2"}
    assert store.saved[-1].cluster_time == Timestamp(T0, 2)
    assert dlq.items == []


def test_dead_letters_are_parked_in_order_and_streaming_goes_on() -> None:
    still_bad = {3: {"_id": 3, "nobody": "still poison"}}
    source = StreamSource(
        [
            [event(1, "insert", 1, {"body": "a"})],
            [event(2, "insert", 2, {"body": "b"}), event(3, "insert", 3, {"nobody": "x"})],
            [event(4, "insert", 4, {"body": "d"})],
        ],
        current=still_bad,
    )
    p, log, sink, _store, dlq, _ = make(on_error="dead_letter", source=source)
    assert run_until(p, checkpointed(p, 4)) is None
    assert [i.change.source_id for i in dlq.items] == [3]
    assert log.calls.index("dead-letter 1") < covering(log, 3)
    assert set(sink.records) == {"i:1", "i:2", "i:4"}


def test_a_drop_is_applied_after_the_write_in_flight_and_before_anything_after_it() -> None:
    drop = {
        "_id": token(2),
        "operationType": "drop",
        "clusterTime": Timestamp(T0, 2),
        "ns": {"db": "app", "coll": "docs"},
    }
    source = StreamSource(
        [
            [event(1, "insert", 1, {"body": "a"})],
            [drop],
            [event(3, "insert", 1, {"body": "a"})],  # the same text again: must be written
        ]
    )
    p, _log, sink, store, _, _ = gated(source=source)
    threading.Timer(0.3, sink.release.set).start()
    assert run_until(p, checkpointed(p, 3)) is None
    assert set(sink.records) == {"i:1"}, "planned before the purge, the record would be lost"
    assert store.saved[-1].cluster_time == Timestamp(T0, 3)


def test_the_lag_counts_changes_read_ahead_until_they_are_applied() -> None:
    # Batch 2 is read while batch 1's write is held, then waits in its embedding after
    # batch 1 is applied: read but not applied all along, its wait is the lag.
    source = StreamSource(
        [[event(1, "insert", 1, {"body": "a"})], [event(2, "insert", 2, {"body": "b"})]]
    )
    p, _log, sink, _store, _, emb = gated(source=source)
    embedding_b, release_b = threading.Event(), threading.Event()
    embed = emb.embed

    def held(texts: Sequence[str]) -> list[list[float]]:
        if "b" in texts:
            embedding_b.set()
            assert release_b.wait(WAIT_S), "never released"
        return embed(texts)

    emb.embed = held
    seen: dict[str, float] = {}

    def watch() -> None:
        try:
            assert sink.writing.wait(WAIT_S) and embedding_b.wait(WAIT_S)
            seen["batch 1 written, batch 2 read ahead"] = p.telemetry.lag_seconds()
            sink.release.set()
            deadline = time.monotonic() + WAIT_S
            while not checkpointed(p, 1)() and time.monotonic() < deadline:
                time.sleep(0.01)
            seen["batch 1 applied, batch 2 embedding"] = p.telemetry.lag_seconds()
        finally:
            sink.release.set()
            release_b.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert run_until(p, lambda: checkpointed(p, 2)() and p.telemetry.lag_seconds() == 0) is None
    watcher.join(WAIT_S)
    age = time.time() - T0  # both batches' changes carry cluster times of second T0
    assert seen["batch 1 written, batch 2 read ahead"] >= age - 60
    assert seen["batch 1 applied, batch 2 embedding"] >= age - 60, "batch 2 waits unseen"
    assert p.telemetry.lag_seconds() == 0


@pytest.mark.parametrize("batches", [1, 3])
def test_stop_ends_both_stages(batches: int) -> None:
    source = StreamSource(
        [[event(n, "insert", n, {"body": str(n)})] for n in range(1, batches + 1)]
    )
    p, _log, sink, _store, _, _ = make(source=source)
    assert run_until(p, checkpointed(p, batches)) is None
    assert len(sink.records) == batches


def test_ahead_plans_the_next_page_while_one_is_written_and_keeps_order() -> None:
    planned_3 = threading.Event()

    def plan(page: int, stage: Any) -> Any:
        with stage("map"):
            if page == 3:
                planned_3.set()
            return f"plan {page}"

    seen = []
    pages = ahead(iter([1, 2, 3]), plan, name="ahead-test")
    for page, planned, stages in pages:
        if page == 2:
            assert planned_3.wait(WAIT_S), "page 3 was not planned while page 2 was written"
        seen.append((page, planned, [s.name for s in stages]))
    assert seen == [(1, "plan 1", ["map"]), (2, "plan 2", ["map"]), (3, "plan 3", ["map"])]


def test_ahead_raises_a_planning_error_in_its_turn_and_stops_on_close() -> None:
    def plan(page: int, stage: Any) -> Any:
        if page == 2:
            raise TransientError("mongodb down")
        return page

    pages = ahead(iter([1, 2, 3]), plan, name="ahead-test")
    assert next(pages)[0] == 1
    with pytest.raises(TransientError):
        next(pages)

    endless = ahead(iter(range(10**9)), lambda page, stage: page, name="ahead-endless")
    assert next(endless)[0] == 0
    endless.close()
    assert not [t for t in threading.enumerate() if t.name == "ahead-endless"]


def test_the_planner_hands_the_writer_its_vectors_packed() -> None:
    # Packing each vector as Chroma takes it is the planner's work, done while the batch
    # before is written; the writer only sends it.
    source = StreamSource(
        [[event(1, "insert", 1, {"body": "a"}), event(2, "insert", 2, {"body": "b"})]]
    )
    p, _log, sink, _store, _, _emb = gated(source=source)
    sink.release.set()
    written: list[WritePlan] = []
    write = sink.write

    def keep(plan: WritePlan) -> None:
        written.append(plan)
        write(plan)

    sink.write = keep
    assert run_until(p, checkpointed(p, 2)) is None
    upserts = [u for plan in written for u in plan.upserts]
    assert [u.id for u in upserts] == ["i:1", "i:2"]
    for u in upserts:
        assert u.vector is not None and u.vector.dtype == np.float32
        assert u.vector.tolist() == np.asarray(u.embedding, dtype=np.float32).tolist()
