"""Does Chroma hold what mapping a document produces? One record, compared.

Used by verify, repair and explain alike, so that they judge a record the same way.
``syncd_cluster_time`` is not compared: it says which event wrote a record, not what
the record holds. Metadata floats are compared as Chroma stores them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from syncd.identity import CLUSTER_TIME_KEY, HASH_KEY
from syncd.mapping import Record
from syncd.sink import StoredRecord

VOLATILE_KEYS = frozenset({CLUSTER_TIME_KEY})


def differs(record: Record, stored: StoredRecord) -> bool:
    """Whether Chroma's copy of a record is not what mapping the document produces."""
    if stored.metadata.get(HASH_KEY) != record.content_hash:
        return True
    if (stored.document or "") != record.text:
        return True
    return not same_metadata(record.metadata, stored.metadata)


def same_metadata(expected: Mapping[str, Any], stored: Mapping[str, Any]) -> bool:
    """Whether Chroma holds ``expected`` (volatile keys aside), floats as Chroma stores them."""
    want, got = _stable(expected), _stable(stored)
    return want.keys() == got.keys() and all(same_value(want[k], got[k]) for k in want)


# Chroma stores a metadata float as a 64-bit double, but not always the double it was
# sent: it parses the number's decimal text with a fast parser that can land a unit or
# two in the last place (ULP) away, and the server parses it twice (client JSON, then
# its own log). Measured with chromadb 1.5: about 1 float in 8 comes back changed, by
# at most 3 ULP, and writing it again can move it again. So a float matches within
# this many ULP; any change a person or program makes is far larger.
FLOAT_ULPS = 4


def same_value(expected: Any, stored: Any) -> bool:
    """One metadata value: floats within FLOAT_ULPS, lists item by item, the rest exactly."""
    if isinstance(expected, list) and isinstance(stored, list):
        return len(expected) == len(stored) and all(map(same_value, expected, stored))
    if isinstance(expected, float) and isinstance(stored, float):
        if expected == stored:
            return True
        scale = max(abs(expected), abs(stored))
        return math.isfinite(scale) and abs(expected - stored) <= FLOAT_ULPS * math.ulp(scale)
    return bool(expected == stored)


def differing_keys(expected: Mapping[str, Any], stored: Mapping[str, Any]) -> list[str]:
    """The keys (volatile ones aside) present on one side only or with different values."""
    want, got = _stable(expected), _stable(stored)
    return sorted(
        k
        for k in want.keys() | got.keys()
        if k not in want or k not in got or not same_value(want[k], got[k])
    )


def _stable(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if k not in VOLATILE_KEYS}
