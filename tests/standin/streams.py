"""``$changeStream`` cursors over the store's history, with MongoDB's start and resume rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import codec
import tokens
from bson.raw_bson import RawBSONDocument
from mongoeco.core.aggregation.stages import apply_pipeline
from mongoeco.core.filtering import QueryEngine, compile_filter
from mongoeco.types import Timestamp
from store import INTERNAL_DBS, CommandError, Event, Store, id_key

MAX_BATCH_BYTES = 16 * 1024 * 1024 - 64 * 1024
# The most a change event may take once the pipeline has shaped it (BSONObjMaxInternalSize):
# past it the server fails the getMore with BSONObjectTooLarge, as MongoDB does.
MAX_EVENT_BYTES = 16 * 1024 * 1024 + 16 * 1024
FULL_DOCUMENT = ("default", "updateLookup", "whenAvailable", "required")
BEFORE_CHANGE = ("off", "whenAvailable", "required")
NON_RESUMABLE = ("NonResumableChangeStreamError",)


def history_lost() -> CommandError:
    return CommandError(
        286,
        "ChangeStreamHistoryLost",
        "Resume of change stream was not possible, as the resume point may no "
        "longer be in the oplog.",
        NON_RESUMABLE,
    )


def fatal(message: str) -> CommandError:
    return CommandError(280, "ChangeStreamFatalError", message, NON_RESUMABLE)


def too_large(event: RawBSONDocument) -> CommandError:
    size = len(event.raw)
    return CommandError(
        10334,
        "BSONObjectTooLarge",
        f"BSONObj size: {size} (0x{size:X}) is invalid. Size must be between 0 and "
        f"{MAX_EVENT_BYTES}(16MB) First element: _id: {event['_id']}",
    )


def _dropped_fields(stage: dict[str, Any]) -> list[str] | None:
    """The top-level fields a ``$project`` that only excludes, or an ``$unset``, drops;
    None for any other stage (it goes through the aggregation engine)."""
    if len(stage) != 1:
        return None
    name, spec = next(iter(stage.items()))
    if name == "$project" and isinstance(spec, dict) and spec:
        names = list(spec) if all(v in (0, False) for v in spec.values()) else None
    elif name == "$unset":
        names = [spec] if isinstance(spec, str) else spec if isinstance(spec, list) else None
    else:
        return None
    if not names or not all(isinstance(n, str) and "." not in n and n != "_id" for n in names):
        return None
    return names


@dataclass
class ChangeStream:
    store: Store
    db: str | None  # None: whole cluster
    coll: str | None  # None: whole database (or cluster)
    spec: dict[str, Any]
    stages: list[dict[str, Any]]
    pos: int = 0
    closed: bool = False
    last_token: dict[str, str] | None = None
    last_returned: bool = False
    _match_plans: list[Any] = field(default_factory=list)
    # The stages are $match stages, then only top-level exclusions (``_dropped``): the
    # stream filters and drops fields itself, without the aggregation engine.
    _simple: bool = False
    _dropped: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.full_document = self.spec.get("fullDocument", "default")
        self.before_change = self.spec.get("fullDocumentBeforeChange", "off")
        if self.full_document not in FULL_DOCUMENT:
            raise CommandError(9, "FailedToParse", f"unknown fullDocument {self.full_document!r}")
        if self.before_change not in BEFORE_CHANGE:
            raise CommandError(
                9, "FailedToParse", f"unknown fullDocumentBeforeChange {self.before_change!r}"
            )
        first = next(
            (i for i, st in enumerate(self.stages) if "$match" not in st), len(self.stages)
        )
        dropped = [_dropped_fields(st) for st in self.stages[first:]]
        if all(names is not None for names in dropped):
            self._match_plans = [compile_filter(st["$match"]) for st in self.stages[:first]]
            self._dropped = tuple(n for names in dropped for n in names or ())
            self._simple = True
        else:
            for st in self.stages:
                name = next(iter(st))
                if name not in (
                    "$match",
                    "$project",
                    "$addFields",
                    "$set",
                    "$unset",
                    "$replaceRoot",
                    "$replaceWith",
                    "$redact",
                ):
                    raise CommandError(
                        40602,
                        "Location40602",
                        f"{name} is not permitted in a $changeStream pipeline",
                    )
        self.pos = self._start_seq()

    # -- where to start -----------------------------------------------------
    def _start_seq(self) -> int:
        spec, store = self.spec, self.store
        given = [k for k in ("resumeAfter", "startAfter", "startAtOperationTime") if k in spec]
        if len(given) > 1:
            raise CommandError(
                40674,
                "Location40674",
                "Only one type of resume option is allowed, but multiple were found.",
            )
        if not given:
            return store.next_seq
        if given[0] == "startAtOperationTime":
            ts = spec["startAtOperationTime"]
            if not isinstance(ts, Timestamp):
                raise CommandError(14, "TypeMismatch", "startAtOperationTime must be a timestamp")
            return self._checked_seq((ts.time, ts.inc), inclusive=True)
        try:
            data = tokens.decode(spec[given[0]])
        except tokens.InvalidToken as exc:
            raise CommandError(260, "InvalidResumeToken", str(exc)) from exc
        if data.from_invalidate and given[0] == "resumeAfter":
            raise CommandError(
                260,
                "InvalidResumeToken",
                "Attempting to resume a change stream using 'resumeAfter' is not "
                "allowed from an invalidate notification.",
            )
        if data.token_type == tokens.HIGH_WATER_MARK:
            return self._checked_seq(data.ts, inclusive=True)
        seq = self._checked_seq(data.ts, inclusive=False)
        if not store.has_event_at(data.ts):
            raise fatal("cannot resume stream; the resume token was not found.")
        return seq

    def _checked_seq(self, ts: tuple[int, int], *, inclusive: bool) -> int:
        store = self.store
        if ts < store.floor_ts:
            raise history_lost()
        return store.seq_at_or_after(ts) if inclusive else store.seq_after(ts)

    # -- reading ------------------------------------------------------------
    def _in_scope(self, ev: Event) -> bool:
        if self.db is None:
            return ev.db not in INTERNAL_DBS
        if ev.db != self.db or (ev.coll or "").startswith("system."):
            return False
        return self.coll is None or ev.coll == self.coll

    def _invalidates(self, ev: Event) -> bool:
        if self.coll is not None:
            return ev.op in ("drop", "rename")
        return self.db is not None and ev.op == "dropDatabase"

    def _shape(self, ev: Event) -> dict[str, Any] | RawBSONDocument | None:
        plain = self.full_document == "default" and self.before_change == "off"
        if plain and not self.stages:
            return ev.raw()
        reshaped = (ev.op == "update" and self.full_document != "default") or (
            ev.op in ("update", "replace", "delete") and self.before_change != "off"
        )
        if not reshaped and (not self.stages or self._simple):
            # Sent as stored, if its $match stages let it through and it has none of the
            # fields dropped: no need to encode it anew.
            if self._match_plans and self._pipeline(ev.doc) is None:
                return None
            raw = ev.raw()
            # A name absent from the bytes is no field of the event: no need to parse it.
            if not any(n.encode() + b"\x00" in ev.encoded and n in raw for n in self._dropped):
                return raw
            return self._pipeline(ev.doc)
        doc = dict(ev.doc)
        if ev.op == "update" and self.full_document != "default":
            if self.full_document == "updateLookup":
                coll = self.store.get(ev.db, ev.coll or "")
                key = id_key(doc["documentKey"]["_id"])
                doc["fullDocument"] = coll.docs.get(key) if coll else None
            elif ev.pre is not None:
                doc["fullDocument"] = ev.post
            elif self.full_document == "required":
                raise CommandError(
                    47,
                    "NoMatchingDocument",
                    "Change stream was configured to require a post-image for all "
                    "update, delete and replace events, but the post-image was not "
                    f"found for event: {doc['_id']}",
                )
            else:
                doc["fullDocument"] = None
        if ev.op in ("update", "replace", "delete") and self.before_change != "off":
            if ev.pre is None and self.before_change == "required":
                raise CommandError(
                    47,
                    "NoMatchingDocument",
                    "Change stream was configured to require a pre-image for all "
                    "update, delete and replace events, but the pre-image was not "
                    f"found for event: {doc['_id']}",
                )
            doc["fullDocumentBeforeChange"] = ev.pre
        return self._pipeline(doc)

    def _pipeline(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        if not self.stages:
            return doc
        token = doc["_id"]
        if self._simple:
            if not all(QueryEngine.match_plan(doc, plan) for plan in self._match_plans):
                return None
            if any(n in doc for n in self._dropped):
                return {k: v for k, v in doc.items() if k not in self._dropped}
            return doc
        out = apply_pipeline([doc], self.stages)
        if not out:
            return None
        if out[0].get("_id") != token:
            raise fatal(
                "Encountered an event whose _id field, which contains the resume token, "
                "was modified by the pipeline. Modifying the _id field of an event makes "
                "it impossible to resume the stream from that point."
            )
        return out[0]

    def _invalidate_doc(self, ev: Event) -> dict[str, Any]:
        token = tokens.encode(
            ev.ts,
            from_invalidate=True,
            collection_uuid=ev.coll_uuid,
            event_id={"operationType": ev.op},
        )
        return {
            "_id": {"_data": token},
            "operationType": "invalidate",
            "clusterTime": Timestamp(*ev.ts),
            "wallTime": ev.doc["wallTime"],
        }

    def read(self, limit: int | None) -> list[Any]:
        """Return the next events available now (possibly none) without waiting."""
        store = self.store
        if self.closed:
            return []
        if self.pos < store.base_seq:
            raise history_lost()
        out: list[Any] = []
        size = 0
        while self.pos < store.next_seq and (limit is None or len(out) < limit):
            ev = store.event_at(self.pos)
            self.pos += 1
            self.last_returned = False
            if not self._in_scope(ev):
                continue
            shaped = self._shape(ev)
            if shaped is not None:
                item = (
                    shaped
                    if isinstance(shaped, RawBSONDocument)
                    else RawBSONDocument(codec.encode(shaped))
                )
                if len(item.raw) > MAX_EVENT_BYTES:
                    raise too_large(item)
                out.append(item)
                size += len(item.raw)
                self.last_token = {"_data": ev.token}
                self.last_returned = True
            if self._invalidates(ev):
                inv = self._pipeline(self._invalidate_doc(ev))
                if inv is not None:
                    out.append(RawBSONDocument(codec.encode(inv)))
                self.last_token = {"_data": self._invalidate_doc(ev)["_id"]["_data"]}
                self.closed = True
                break
            if size >= MAX_BATCH_BYTES:
                break
        return out

    def post_batch_token(self) -> dict[str, str]:
        store = self.store
        if self.closed and self.last_token is not None:
            return self.last_token
        if self.pos < store.next_seq:
            if self.last_returned and self.last_token is not None:
                return self.last_token
            ts = store.event_at(max(self.pos, store.base_seq)).ts
            return {"_data": tokens.encode(ts, token_type=tokens.HIGH_WATER_MARK)}
        return {"_data": tokens.encode(store.hwm_ts(), token_type=tokens.HIGH_WATER_MARK)}
