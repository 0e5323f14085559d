"""Changes completed with their documents as they are now, found by record id.

Two kinds of change need the document as it is in MongoDB now rather than as the
event carried it: an update that came without one (``full_document =
"whenAvailable"`` on a collection without post-images, or ``updateLookup`` after the
document was deleted), and a poison change whose document may have been fixed since.
Both are read by ``_id`` and matched by :func:`syncd.source.id_key`, never by the
value's own equality (NaN, ``True == 1 == 1.0``, unhashable Decimal128).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from typing import Any, Protocol

from syncd.plan import Change
from syncd.source import id_key


class Fetcher(Protocol):
    def fetch(self, collection: str, ids: list[Any]) -> dict[str, dict[str, Any]]: ...


def bare(change: Change) -> bool:
    """An update that came without its document."""
    return change.document is None and change.operation == "update"


def with_documents(source: Fetcher, changes: Sequence[Change]) -> list[Change]:
    """Bare updates get the document as it is now, as ``updateLookup`` would read it;
    one that is not found is gone, and the plan removes its records."""
    wanted = [c for c in changes if bare(c)]
    if not wanted:
        return list(changes)
    found = current(source, wanted)
    return [
        dataclasses.replace(c, document=found.get((c.collection, id_key(c.source_id))))
        if bare(c)
        else c
        for c in changes
    ]


def refetched(source: Fetcher, changes: Sequence[Change], keys: Collection[str]) -> list[Change]:
    """The changes with those keyed ``keys`` carrying the document as it is now.

    For poison changes: an event carries the document as it was; if it has been fixed
    (or deleted) since, applying the current state is what replaying the later events
    would do anyway, so the mirror converges without halting on a problem already solved.
    """
    found = current(source, [c for c in changes if c.key in keys])
    out = []
    for change in changes:
        if change.key not in keys:
            out.append(change)
            continue
        doc = found.get((change.collection, id_key(change.source_id)))
        operation = change.operation if doc is not None else "delete"
        out.append(dataclasses.replace(change, document=doc, operation=operation))
    return out


def current(source: Fetcher, changes: Sequence[Change]) -> dict[tuple[str, str], dict[str, Any]]:
    """The current documents of these changes, by (collection, id_key of ``_id``)."""
    by_coll: dict[str, list[Any]] = {}
    for change in changes:
        by_coll.setdefault(change.collection, []).append(change.source_id)
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for coll, ids in by_coll.items():
        for key, doc in source.fetch(coll, ids).items():
            found[(coll, key)] = doc
    return found
