"""Stage one of the streaming loop: read, coalesce, map, look up and embed ahead.

While the pipeline's own thread (stage two, the only writer) writes batch N to Chroma,
reads it back and checkpoints it, a :class:`Planner` thread reads batch N+1 from the
change stream and plans it: coalesces it, maps it, looks up what Chroma holds for its
keys and embeds what changed. Batches are handed over in stream order through a queue
that holds at most one write's worth of events (``batch_size``, or under a backlog
:meth:`Planner.ahead_limit`, more for small vectors) and :data:`MAX_AHEAD` reads: under a
backlog one write's worth
is planned while one is written, so at most two are in memory whatever the backlog. The
writer takes everything planned meanwhile whose vectors are back in one write
(:meth:`Planner.more`): when changes trickle in, a change waits for the write in flight
and its own, not for a batch read ahead of it as well; under a backlog, small vectors do
not pay Chroma's fixed cost per write for every ``batch_size`` changes.

An embedding API's requests are only sent by the planner (:meth:`Applier.plan_ahead`):
the batch is handed over with its vectors on their way, the writer waits for them once
everything before it is written, and the planner meanwhile reads and maps the next
batch, whose requests queue behind the last one's. So the API is never idle while a
batch is read, mapped or written, and the requests in flight never exceed
``embed_concurrency``. A local embedder computes in the planner, as before.

What keeps the mirror exact while two batches are in flight:

* A key planned in batch N and changed again in N+1 is looked up for N+1 only once
  N's write of it is done (:class:`InFlight`); other keys are not held up. Reads written
  together never share a key, so one write applies each key's changes in stream order.
* The writer checkpoints strictly in order, and only after the batch is written: the
  planner never touches the checkpoint. An empty read is handed over too, so a quiet
  position moves only once everything before it is written.
* A batch with a collection event (drop, rename, dropDatabase, invalidate), or with a
  change that halts the pipeline, is handed over unplanned: the writer applies it
  the sequential way once everything before it is written, and the planner waits for
  that before it reads on (a purge changes what a lookup would find).
* An error in either stage ends both: the planner forwards its error in order (what
  it planned before is still written); the writer cancels the planner, and whatever
  was planned but not written is read again from the checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from syncd import plan as planning
from syncd.applier import Applier, Embedding, Planned
from syncd.checkpointing import Progress
from syncd.embedder import computes_elsewhere
from syncd.sink import (
    BYTES_PER_RECORD,
    BYTES_PER_VALUE,
    WRITE_BYTES,
    Sink,
    WritePlan,
    packed,
    update_bytes,
    upsert_bytes,
    write_size,
)
from syncd.source import Batch, Source
from syncd.telemetry import PipelineTelemetry

LIFECYCLE_OPS = frozenset({"drop", "rename", "dropDatabase"})
SEQUENTIAL_OPS = LIFECYCLE_OPS | {"invalidate"}
POLL_S = 0.1  # how soon a blocked stage notices it was cancelled
MAX_AHEAD = 16  # reads planned and not yet taken by the writer, at most
GATHER_S = 0.05  # while reads wait for the writer, the pause before the next one
READ_NS = 20_000_000  # a read's share of planning time, at most (it may wait for changes)
HOLD_MAX_S = 0.25  # the longest a read is held back for the write in flight to end

ItemT = TypeVar("ItemT")
PlannedT = TypeVar("PlannedT")


class Abandoned(Exception):
    """The planner was cancelled while it waited; its work is discarded."""


class InFlight:
    """Keys planned but not yet written; a lookup of one waits for that write."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._keys: Counter[str] = Counter()
        self._cancelled = False

    def add(self, keys: Iterable[str]) -> None:
        with self._cond:
            self._keys.update(keys)

    def done(self, keys: Iterable[str]) -> None:
        with self._cond:
            self._keys.subtract(keys)
            self._keys = +self._keys  # drop what reached zero
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def wait_written(self, keys: Sequence[str]) -> None:
        """Return once none of ``keys`` is in flight; raise Abandoned if cancelled."""
        with self._cond:
            while not self._cancelled and any(k in self._keys for k in keys):
                self._cond.wait(POLL_S)
            if self._cancelled:
                raise Abandoned


class GatedLookup:
    """Chroma's stored records of keys, read once no write of them is in flight."""

    def __init__(self, sink: Sink, in_flight: InFlight) -> None:
        self._sink = sink
        self._in_flight = in_flight

    def existing(self, keys: Sequence[str]) -> dict[str, dict[str, Mapping[str, Any]]]:
        self._in_flight.wait_written(keys)
        return self._sink.existing(keys)


class WriteClock:
    """When the write in flight will end, from what earlier writes took per event, and
    how long a read takes to be planned: the planner reads that long before the end, so
    that the next write carries what arrived meanwhile, not what arrived before it began.
    """

    MIN_EVENTS = 8  # writes smaller than this say more about Chroma's fixed cost
    WEIGHT = 0.2  # of the newest sample in the moving averages
    SHARE = 0.7  # of the expected write time: writes vary, and a late read idles the writer

    def __init__(self) -> None:
        self._open = 0  # items the writer took and has not written yet
        self._began = 0.0
        self._events = 0
        self._per_event_s: float | None = None
        self._plan_s = 0.0

    def took(self, events: int) -> None:
        if not self._open:
            self._began, self._events = time.monotonic(), 0
        self._open += 1
        self._events += events

    def wrote(self) -> None:
        self._open = max(0, self._open - 1)
        if not self._open and self._events >= self.MIN_EVENTS:
            sample = (time.monotonic() - self._began) / self._events
            self._per_event_s = self._average(self._per_event_s, sample)

    def planned(self, seconds: float) -> None:
        self._plan_s = self._average(self._plan_s, seconds)

    def read_at(self) -> float | None:
        """When to read for the write after the one in flight; None: read now (nothing
        is being written, or no write has been timed yet)."""
        if not self._open or self._per_event_s is None:
            return None
        return self._began + self.SHARE * self._per_event_s * self._events - self._plan_s

    def _average(self, old: float | None, sample: float) -> float:
        return sample if old is None else old + self.WEIGHT * (sample - old)


@dataclasses.dataclass
class StageTime:
    name: str
    started_ns: int
    ended_ns: int
    seconds: float
    error: BaseException | None = None


class StageRecorder:
    """Times the planner's stages; the writer replays them into the batch's trace."""

    def __init__(self) -> None:
        self.stages: list[StageTime] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started, clock = time.time_ns(), time.perf_counter()
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            seconds = time.perf_counter() - clock
            self.stages.append(StageTime(name, started, time.time_ns(), seconds, error))


@dataclasses.dataclass
class Item:
    """One read, handed from the planner to the writer."""

    batch: Batch | None = None  # None: the read failed (``error``)
    read: tuple[int, int] | None = None  # when the read started and ended (ns)
    ticket: int | None = None  # the read's place in the lag (PipelineTelemetry.read_ahead)
    stages: list[StageTime] = dataclasses.field(default_factory=list)
    planned: Planned | None = None
    embedding: Embedding | None = None  # planned but for vectors still being computed
    keys: list[str] = dataclasses.field(default_factory=list)  # in flight until written
    size: int = 0  # bytes its records add to a write, about (:func:`syncd.sink.upsert_bytes`)
    sequential: bool = False  # apply it the sequential way, after everything before it
    error: BaseException | None = None  # raise it, in its turn
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class Planner(threading.Thread):
    """Stage one: reads and plans batches ahead of the writer, in stream order."""

    def __init__(
        self,
        *,
        source: Source,
        applier: Applier,
        progress: Progress,
        telemetry: PipelineTelemetry,
        stop: threading.Event,
        read: Callable[[int], Batch],
    ) -> None:
        super().__init__(name=f"plan-{applier.settings.name}", daemon=True)
        self.source = source
        self.applier = applier
        self.progress = progress
        self.telemetry = telemetry
        self.stop = stop
        self._read = read
        self.in_flight = InFlight()
        self._lookup = GatedLookup(applier.sink, self.in_flight)
        self._ready: collections.deque[Item] = collections.deque()
        self._ready_events = 0
        self._ready_size = 0  # bytes of the records planned ahead, about
        self._backlog = False  # the last read was a whole one: the stream holds a backlog
        self._cond = threading.Condition()
        self._clock = WriteClock()
        # Reads are held back for the write in flight only when the planner computes the
        # vectors itself: an embedding API's round trip is not part of its planning time.
        self._hold = not computes_elsewhere(applier.embedder)

    # --- the writer's side ---------------------------------------------------------

    def next(self, timeout: float = POLL_S) -> Item | None:
        """The next item in stream order, or None if none came within ``timeout``."""
        with self._cond:
            if not self._ready and timeout > 0:
                self._cond.wait(timeout)
            if not self._ready:
                return None
            return self._take()

    def more(self, first: Item) -> list[Item]:
        """The items planned behind ``first`` that one write can apply with it: ready
        now (their vectors back, so ``first``'s write waits for nothing more), planned
        whole (no collection event, halt or error) and sharing no key with it or each
        other, up to :meth:`ahead_limit` events in all. In stream order."""
        if not _writable(first):
            return []
        keys = set(first.keys)
        events, size = _events(first), first.size
        limit = self._limit(full=_events(first) >= self.applier.settings.batch_size)
        taken: list[Item] = []
        with self._cond:
            while self._ready:
                item = self._ready[0]
                if not _writable(item) or events + _events(item) > limit:
                    break
                if size + item.size > WRITE_BYTES:
                    break
                if item.embedding is not None and not item.embedding.answered():
                    break
                if not keys.isdisjoint(item.keys):
                    break
                keys.update(item.keys)
                events += _events(item)
                size += item.size
                taken.append(self._take())
        return taken

    def ahead_limit(self) -> int:
        """Events planned ahead, and written together, at most: ``batch_size``, or as
        many as one write of their size carries (:func:`syncd.sink.write_size`) when each
        change makes one record whose vector's size is known. Reads stay ``batch_size``
        (the lookups and embedding requests keep their size); under a backlog the writer
        takes several at once, so small vectors do not pay Chroma's fixed cost per write
        for every ``batch_size`` changes."""
        settings = self.applier.settings
        if settings.mapping.chunk_size:
            return settings.batch_size
        embedder = self.applier.embedder
        dimensions = embedder.dimensions if embedder is not None else settings.embedder.dimensions
        return write_size(dimensions, self.applier.sink.max_batch, settings.batch_size)

    def _limit(self, *, full: bool) -> int:
        """:meth:`ahead_limit` under a backlog (``full``: reads come back whole), else
        ``batch_size``: when changes trickle in, a write takes what arrived during the
        one before it, and a larger one would only make those changes wait longer."""
        return self.ahead_limit() if full else self.applier.settings.batch_size

    def _take(self) -> Item:
        item = self._ready.popleft()
        self._ready_events -= _events(item)
        self._ready_size -= item.size
        self._clock.took(_events(item))
        self._cond.notify_all()
        return item

    def written(self, item: Item) -> None:
        """The writer applied ``item``: its keys may be looked up again."""
        if item.keys:
            self.in_flight.done(item.keys)
        item.done.set()
        with self._cond:
            self._clock.wrote()
            self._cond.notify_all()

    def close(self) -> None:
        """Stop planning and discard what was planned but not written."""
        self.in_flight.cancel()
        with self._cond:
            self._cond.notify_all()
        self.join()
        while (item := self.next(timeout=0)) is not None:
            _discard(item)

    # --- the planner's side ----------------------------------------------------------

    def run(self) -> None:
        try:
            while not self.stop.is_set() and not self.in_flight.cancelled:
                room = self._wait_room()
                if room is None:
                    return
                item = self._plan_next(room)
                if item.read is not None and _events(item):
                    began, ended = item.read  # a read that waited for changes counts less
                    waited = min(ended - began, READ_NS)
                    self._clock.planned((time.time_ns() - ended + waited) / 1e9)
                self._put(item)
                if item.error is not None:
                    return
                if item.sequential:
                    self._wait_applied(item)
                    if item.batch is not None and item.batch.invalidated:
                        # The stream ended (drop, rename, dropDatabase): carry on after it.
                        self.source.open(
                            self.progress.position(),
                            max_await_ms=self.applier.settings.batch_max_wait_ms,
                        )
        except Abandoned:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the writer, which raises it
            try:
                self._put(Item(error=exc))
            except Abandoned:
                return

    def _plan_next(self, room: int) -> Item:
        started = time.time_ns()
        try:
            batch = self._read(room)
        except BaseException as exc:
            self.telemetry.spans.read_failed(started, exc)
            raise
        item = Item(batch=batch, read=(started, time.time_ns()))
        self._backlog = len(batch.events) >= self.applier.settings.batch_size
        item.ticket = self.telemetry.read_ahead(batch.events)  # the lag counts it from now
        if not batch.events:
            return item
        if any(e["operationType"] in SEQUENTIAL_OPS for e in batch.events):
            item.sequential = True
            return item
        applier = self.applier
        changes = planning.coalesce(batch.events, prefixed=applier.prefixed)
        recorder = StageRecorder()
        try:
            planned = applier.plan_ahead(
                changes,
                write_if_poisoned=applier.dead_lettering,
                lookup=self._lookup,
                stage=recorder,
            )
        except Abandoned:
            raise
        except Exception as exc:  # noqa: BLE001 - raised by the writer in the batch's trace
            item.error, item.stages = exc, recorder.stages
            return item
        item.stages = recorder.stages
        if isinstance(planned, Embedding):
            item.embedding = planned  # a refused input is found once its answer is back
            item.size = _draft_size(planned.drafted, applier.embedder)
        elif planned.poisoned and not applier.dead_lettering:
            item.sequential = True  # a halt: the writer finds exactly where, as it always did
            return item
        else:
            item.planned = packed_ahead(planned)
            item.size = plan_size(planned.result.plan)
        item.keys = [c.key for c in changes]
        self.in_flight.add(item.keys)
        return item

    def _put(self, item: Item) -> None:
        with self._cond:
            if self.in_flight.cancelled:
                _discard(item)
                raise Abandoned
            self._ready.append(item)
            self._ready_events += _events(item)
            self._ready_size += item.size
            self._cond.notify_all()

    def _wait_room(self) -> int | None:
        """How many events the next read may take (at most ``batch_size``), once fewer
        than :meth:`ahead_limit` are planned and not yet taken by the writer (and, once a
        whole read waits, room for another whole one); None if the pipeline stops
        meanwhile.

        While reads wait for the writer, the next one waits :data:`GATHER_S` (or until
        the writer takes them): what arrives meanwhile is looked up in one call to Chroma,
        not one per change, and a writer that becomes free still finds it planned.

        When changes trickle in and the writer is busy with nothing waiting for it, the
        read waits until it can just be planned before that write ends
        (:class:`WriteClock`, at most :data:`HOLD_MAX_S`): the next write then carries
        what arrived during this one, where a read made at its start would leave those
        changes to the write after."""
        limit, batch_size = self._limit(full=self._backlog), self.applier.settings.batch_size
        with self._cond:
            now = time.monotonic()
            gather_until = now + GATHER_S if self._ready else 0.0
            hold_until = now + HOLD_MAX_S
            while True:
                if self.in_flight.cancelled:
                    raise Abandoned
                if self.stop.is_set():
                    return None
                room = min(batch_size, limit - self._ready_events)
                full = (
                    room <= 0
                    or (room < batch_size and self._ready_events >= batch_size)
                    or len(self._ready) >= MAX_AHEAD
                    or self._ready_size >= WRITE_BYTES  # large records: one write's bytes
                )  # once a whole read waits, no read smaller than a whole one
                if self._ready:
                    wait = gather_until - time.monotonic()
                else:
                    wait = self._hold_for(hold_until)
                if not full and wait <= 0:
                    return room
                self._cond.wait(POLL_S if full else min(POLL_S, wait))

    def _hold_for(self, hold_until: float) -> float:
        """Seconds to hold the next read back for the write in flight (see
        :meth:`_wait_room`); 0 or less: read now."""
        if not self._hold or self._backlog:
            return 0.0
        read_at = self._clock.read_at()
        if read_at is None:
            return 0.0
        return min(read_at, hold_until) - time.monotonic()

    def _wait_applied(self, item: Item) -> None:
        while not item.done.wait(POLL_S):
            if self.in_flight.cancelled:
                raise Abandoned


def plan_size(plan: WritePlan) -> int:
    """Bytes the plan's records add to a write, about."""
    return sum(map(upsert_bytes, plan.upserts)) + sum(map(update_bytes, plan.updates))


def _draft_size(drafted: planning.Draft, embedder: Any) -> int:
    """Bytes of a plan whose vectors are on their way, about: the texts to embed count
    with their vectors once they are back."""
    values = (getattr(embedder, "dimensions", None) or 0) * BYTES_PER_VALUE
    waiting = sum(len(record.text) + values + BYTES_PER_RECORD for _, record, _ in drafted.to_embed)
    return plan_size(drafted.plan) + waiting


def _events(item: Item) -> int:
    return len(item.batch.events) if item.batch is not None else 0


def _writable(item: Item) -> bool:
    """Planned whole, so that a write may apply it together with others."""
    return (
        item.batch is not None
        and bool(item.batch.events)
        and not item.sequential
        and item.error is None
        and (item.planned is not None or item.embedding is not None)
    )


def packed_ahead(planned: Planned) -> Planned:
    """Pack the plan's vectors as Chroma takes them (:func:`syncd.sink.packed`) in the
    planning thread, where it overlaps the write before it, not in the writer's turn."""
    planned.result.plan = packed(planned.result.plan)
    return planned


def _discard(item: Item) -> None:
    """Drop what was planned for ``item`` and will not be written."""
    if item.embedding is not None:
        item.embedding.cancel()


def ahead(
    items: Iterator[ItemT],
    plan: Callable[[ItemT, StageRecorder], PlannedT],
    *,
    name: str,
) -> Generator[tuple[ItemT, PlannedT, list[StageTime]], None, None]:
    """Plan each of ``items`` in a thread, one ahead of the caller, and yield them in order.

    For the snapshot's pages, whose keys never repeat: page N+1 is read from MongoDB,
    mapped and embedded while the caller writes page N. An error reading or planning is
    raised in its turn; closing the generator (the caller stopped or failed) stops the
    thread and drops what it planned.
    """
    handoff: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=1)
    cancelled = threading.Event()

    def put(message: tuple[Any, ...]) -> bool:
        while not cancelled.is_set():
            try:
                handoff.put(message, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                recorder = StageRecorder()
                planned = plan(item, recorder)
                if not put(("item", item, planned, recorder.stages)):
                    return
            put(("end",))
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            put(("error", exc))

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            try:
                message = handoff.get(timeout=POLL_S)
            except queue.Empty:
                if thread.is_alive():
                    continue
                raise RuntimeError(f"{name} ended without a word") from None
            if message[0] == "end":
                return
            if message[0] == "error":
                raise message[1]
            yield message[1], message[2], message[3]
    finally:
        cancelled.set()
        thread.join()
