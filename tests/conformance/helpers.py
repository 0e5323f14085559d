"""Small helpers shared by the conformance tests (plain pymongo, no syncd code)."""

from __future__ import annotations

import struct
import time
from typing import Any

from bson import Timestamp


def token_time(token: dict[str, Any]) -> Timestamp:
    """The cluster time leading a resume token: CType 0x82 then 8 bytes big-endian."""
    data = bytes.fromhex(token["_data"])
    assert data[0] == 0x82, token
    seconds, increment = struct.unpack(">II", data[1:9])
    return Timestamp(seconds, increment)


def next_events(stream: Any, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Read exactly `count` events from a change stream, failing after `timeout` seconds."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(events) < count:
        assert time.monotonic() < deadline, f"only {len(events)} of {count} events: {events}"
        event = stream.try_next()
        if event is not None:
            events.append(event)
    return events


def no_more_events(stream: Any, wait: float = 0.5) -> None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        event = stream.try_next()
        assert event is None, f"unexpected event {event}"
