"""Vectors a rebuild takes from the live collection instead of embedding again.

A rebuild with the same embedder as the live collection (only metadata, the filter or
chunk boundaries changed) needs no new vector for a text the live collection already
holds: the record's ``syncd_text_hash`` finds it. Whether the embedder is the same is
not taken on trust: :func:`same_embedder` embeds a sample of the live collection's
texts and compares the vectors with the stored ones. With another embedder (or
dimensions) every text is embedded again.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from typing import Any

from syncd.embedder import Embedder, InputRejectedError
from syncd.errors import from_sink
from syncd.identity import TEXT_HASH_KEY

log = logging.getLogger(__name__)

SAMPLE = 3  # texts embedded to compare: all a metadata-only rebuild embeds
TOLERANCE = 1e-4  # Chroma stores float32; the same model gives the same vector


def text_hash(text: str) -> str:
    """As the mapping stores it in ``syncd_text_hash``."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def same_embedder(embedder: Embedder, live: Any) -> bool:
    """Do ``embedder``'s vectors for a sample of the live collection's texts equal the
    stored ones? False for an empty collection: nothing to reuse."""
    try:
        got = live.get(limit=SAMPLE, include=["documents", "embeddings"])
    except Exception as exc:
        raise from_sink(exc, namespace=f"chroma:{live.name}") from exc
    texts = [text for text in got["documents"] if isinstance(text, str)]
    stored = [
        list(vector)
        for vector, text in zip(got["embeddings"], got["documents"], strict=True)
        if isinstance(text, str)
    ]
    if not texts:
        return False
    fresh = embedder.embed(texts)
    return all(_close(a, b) for a, b in zip(fresh, stored, strict=True))


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(
        math.isclose(float(x), float(y), rel_tol=TOLERANCE, abs_tol=TOLERANCE)
        for x, y in zip(a, b, strict=True)
    )


class ReusingEmbedder:
    """An embedder that first looks for each text's vector in the live collection."""

    def __init__(self, inner: Embedder, live: Any) -> None:
        self.inner = inner
        self.live = live
        self.identity = inner.identity
        self.dimensions = inner.dimensions
        self.reused = 0
        self.embedded = 0

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        hashes = [text_hash(text) for text in texts]
        found = self._stored(sorted(set(hashes)))
        missing = [i for i, h in enumerate(hashes) if h not in found]
        try:
            fresh = self.inner.embed([texts[i] for i in missing]) if missing else []
        except InputRejectedError as exc:
            exc.input_index = missing[exc.input_index]  # as an index into ``texts``
            raise
        self.embedded += len(missing)
        self.reused += len(texts) - len(missing)
        out: list[list[float]] = [found.get(h, []) for h in hashes]
        for index, vector in zip(missing, fresh, strict=True):
            out[index] = vector
        return out

    def _stored(self, hashes: list[str]) -> dict[str, list[float]]:
        if not hashes:
            return {}
        try:
            got = self.live.get(
                where={TEXT_HASH_KEY: {"$in": hashes}}, include=["metadatas", "embeddings"]
            )
        except Exception as exc:
            raise from_sink(exc, namespace=f"chroma:{self.live.name}") from exc
        out: dict[str, list[float]] = {}
        for meta, vector in zip(got["metadatas"], got["embeddings"], strict=True):
            digest = (meta or {}).get(TEXT_HASH_KEY)
            if isinstance(digest, str):
                out[digest] = [float(x) for x in vector]
        return out

    def close(self) -> None:
        self.inner.close()
