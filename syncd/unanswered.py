"""Writes Chroma did not answer, looked at again once they can no longer land.

A write that Chroma does not answer (within ``chroma.timeout_s``, or at all: a cut
connection, a gateway's timeout) is sent again, whole or in halves, and the pipeline
moves on once that is acknowledged. The request that went unanswered may still be
applied later: a proxy or load balancer that delivers it late, or a Chroma that runs a
request after its client gave up. Landing after a later write of the same records, it
puts an older version back (or a record of a document deleted since), and no change
event will ever correct it.

So the sink notes the record ids of every write that failed without an answer
(:class:`Unanswered`), and once :attr:`Unanswered.settle_s` has passed since the last
such failure of a record, the pipeline's writer compares its document's records with
MongoDB's current state, as ``syncd repair`` does, and re-applies the documents that
differ (through :func:`syncd.settling.apply_until_settled`, which is safe beside the
running pipeline). The normal write path only pays for noting the ids of a failed write.
A document whose newer change the pipeline has read but not written yet differs too:
its current state is then applied a little early, which is harmless (the pipeline
applies that change after it), and counted with the others.

A request held back longer than the settle delay can still land unnoticed (``syncd
verify`` finds it, ``syncd repair`` fixes it), and so can one of a process that stopped
before its recheck was due: the ids are kept in memory only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from syncd.consistency import Checker, Report
from syncd.identity import base_id
from syncd.settling import Applies, Settled, Target, apply_until_settled, fetch_current
from syncd.source import id_key

log = logging.getLogger(__name__)

# The settle delay is this many times chroma.timeout_s, at most SETTLE_MAX_S: a server
# that runs a request after its client gave up, or a proxy that delivers it late, is
# expected to be done with it within a few times the time a client waits for an answer.
SETTLE_FACTOR = 3
SETTLE_MAX_S = 600.0
RECHECK_KEYS = 500  # record ids looked at in one recheck (the rest wait for the next)


def settle_delay(timeout_s: float) -> float:
    """Seconds after a write went unanswered before its records are looked at again."""
    return min(SETTLE_FACTOR * timeout_s, SETTLE_MAX_S)


class Unanswered:
    """Record ids of writes that failed without an answer, with when they last did.

    Thread-safe: the sink notes ids from whichever thread writes, the pipeline's
    writer takes them once they are due.
    """

    def __init__(self, settle_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settle_s = settle_s
        self._clock = clock
        self._lock = threading.Lock()
        # id -> when its write last went unanswered; oldest first (re-noted ids move last)
        self._since: dict[str, float] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._since)

    def note(self, record_ids: Iterable[str]) -> None:
        now = self._clock()
        with self._lock:
            for rid in record_ids:
                self._since.pop(rid, None)
                self._since[rid] = now

    def due(self) -> bool:
        """Some ids have waited the settle delay (cheap: the writer asks between writes)."""
        with self._lock:
            first = next(iter(self._since.values()), None)
        return first is not None and self._clock() - first >= self.settle_s

    def take_due(self, limit: int = RECHECK_KEYS) -> dict[str, float]:
        """Remove and return up to ``limit`` ids that have waited the settle delay."""
        cutoff = self._clock() - self.settle_s
        taken: dict[str, float] = {}
        with self._lock:
            for rid, since in self._since.items():
                if since > cutoff or len(taken) >= limit:
                    break
                taken[rid] = since
            for rid in taken:
                del self._since[rid]
        return taken

    def put_back(self, taken: dict[str, float]) -> None:
        """Ids whose recheck failed: due again at once (unless noted again meanwhile)."""
        with self._lock:
            for rid, since in taken.items():
                if rid not in self._since:
                    self._since[rid] = since
            ordered = sorted(self._since.items(), key=lambda item: item[1])
            self._since = dict(ordered)


def recheck(pipeline: Applies, checker: Checker, record_ids: Iterable[str]) -> list[str]:
    """Re-apply, from MongoDB's current state, the documents behind ``record_ids``
    whose records differ from what the pipeline would make of them now (records
    missing, stale or extra, or records of a document gone or filtered out).
    Returns the keys of the documents re-applied."""
    keys = sorted({base_id(rid) for rid in record_ids})
    located = {key: where for key in keys if (where := checker.locate(key)) is not None}
    current = fetch_current(pipeline, located.values())
    report = Report(pipeline.settings.name, sampled=True)
    present: dict[str, list[dict[str, object]]] = {}
    absent: list[Target] = []
    for key, (collection, source_id) in located.items():
        doc = current.get((collection, id_key(source_id)))
        if doc is not None and checker.mapper.matches(doc):
            present.setdefault(collection, []).append(doc)
        else:
            absent.append(Target(key, collection, source_id, doc, operation="recheck"))
    targets: list[Target] = []
    for collection, docs in present.items():
        drift = checker.compare_documents(collection, docs, report, extra_records=True)
        targets.extend(
            Target(key, coll, doc["_id"], doc, operation="recheck")
            for key, (coll, doc) in drift.documents.items()
        )
    if absent:
        stored = pipeline.sink.existing([t.key for t in absent])
        targets.extend(t for t in absent if stored.get(t.key))
    if not targets:
        return []
    _report(pipeline, targets, apply_until_settled(pipeline, targets))
    return [t.key for t in targets]


def _report(pipeline: Applies, targets: Sequence[Target], settled: Settled) -> None:
    log.warning(
        "a write Chroma did not answer in time may have been applied late; re-applied %d "
        "document(s) that differed from MongoDB, e.g. %s",
        len(targets), [t.key for t in targets[:3]],
        extra={"pipeline": pipeline.settings.name},
    )  # fmt: skip
    if settled.poisoned_keys:
        log.warning(
            "%d re-applied document(s) cannot be applied now, e.g. %s; the pipeline "
            "handles their next change by its error policy",
            len(settled.poisoned_keys), sorted(settled.poisoned_keys)[:3],
            extra={"pipeline": pipeline.settings.name},
        )  # fmt: skip
