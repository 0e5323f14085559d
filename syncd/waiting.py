"""Read-your-writes: block until a pipeline has applied everything up to a MongoDB time.

An application that wrote to MongoDB passes the operation time of its write (the
session's ``operation_time``, or the resume token of the change) and gets ``True``
once the pipeline's checkpoint has reached it, which means the write's effect is in
Chroma (the checkpoint never passes an event that is not applied, or dead-lettered).

Cluster times order operations; several events of one transaction share one. A
checkpoint *at* the target time inside a transaction may not cover the rest of the
transaction, so it counts only when its token is not an event of a transaction.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from bson.timestamp import Timestamp
from pymongo import MongoClient

from syncd.checkpoint import Checkpoint, CheckpointStore, open_store
from syncd.config import Settings
from syncd.errors import ConfigError
from syncd.source import make_client
from syncd.tokens import InvalidResumeToken, decode_resume_token, token_cluster_time

Target = Timestamp | Mapping[str, Any] | str | bytes

_T_I = re.compile(r"^(\d+)\.(\d+)$")
_HEX = re.compile(r"^[0-9A-Fa-f]+$")
_END_OF_SECOND = 0xFFFFFFFF


def wait_for(
    settings: Settings,
    pipeline: str,
    after: Target,
    timeout: float,
    *,
    poll_s: float = 0.1,
) -> bool:
    """Block until ``pipeline`` has applied everything up to ``after``; False on timeout.

    ``after`` is a ``bson.Timestamp`` (e.g. ``session.operation_time``) or a resume
    token (``{"_data": hex}``, hex text or raw bytes).
    """
    settings.pipeline(pipeline)  # a ConfigError for an unknown name, before waiting
    target = target_time(after)
    client: MongoClient[dict[str, Any]] = make_client(settings.mongodb)
    try:
        store = open_store(settings.checkpoint, client)
        return wait_with(store, pipeline, target, timeout, poll_s=poll_s) is not None
    finally:
        client.close()


def wait_with(
    store: CheckpointStore,
    pipeline: str,
    target: Timestamp,
    timeout: float,
    *,
    poll_s: float,
    stop: threading.Event | None = None,
) -> Checkpoint | None:
    """The first checkpoint that covers ``target``, or None when ``timeout`` passes or
    ``stop`` is set first."""
    deadline = time.monotonic() + timeout
    stop = stop or threading.Event()
    while not stop.is_set():
        cp = store.load(pipeline)
        if cp is not None and covers(cp, target):
            return cp
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        stop.wait(min(poll_s, remaining))
    return None


def covers(cp: Checkpoint, target: Timestamp) -> bool:
    if cp.phase != "streaming" or cp.cluster_time is None:
        return False
    if cp.cluster_time > target:
        return True
    return cp.cluster_time == target and not _inside_transaction(cp.token)


def _inside_transaction(token: Mapping[str, Any] | None) -> bool:
    """Whether the checkpoint sits on an event of a multi-document transaction."""
    if token is None:
        return False
    try:
        decoded = decode_resume_token(token)
    except InvalidResumeToken:
        return True  # cannot tell: wait for a later position
    return decoded.token_type != 0 and decoded.txn_op_index > 0


def target_time(after: Target) -> Timestamp:
    """The operation time to wait for, from a Timestamp or a resume token."""
    if isinstance(after, Timestamp):
        return after
    try:
        return token_cluster_time(after)
    except InvalidResumeToken as exc:
        raise ConfigError(f"not a resume token: {exc}") from None


def parse_after(text: str) -> Timestamp:
    """``T.I`` (a cluster time), ISO-8601, or a resume token's hex ``_data``.

    ISO-8601 has no increment: it means every operation in that second, so the
    target is the end of the second.
    """
    text = text.strip()
    match = _T_I.match(text)
    if match:
        seconds, inc = int(match[1]), int(match[2])
        if seconds > _END_OF_SECOND or inc > _END_OF_SECOND:
            raise ConfigError(f"--after {text}: seconds and increment must fit in 32 bits")
        return Timestamp(seconds, inc)
    moment = _iso(text)
    if moment is not None:
        if not 0 <= moment.timestamp() <= _END_OF_SECOND:
            raise ConfigError(f"--after {text}: cluster times run from 1970 to 2106")
        return Timestamp(int(moment.timestamp()), _END_OF_SECOND)
    if _HEX.match(text):
        return target_time(text)
    raise ConfigError(
        f"--after {text!r}: expected T.I (e.g. 1718000000.3), an ISO-8601 time "
        "(e.g. 2024-06-10T06:13:20Z) or a resume token's hex"
    )


def _iso(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
