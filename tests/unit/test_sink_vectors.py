"""Vectors packed for Chroma ahead of the write: the same vectors reach Chroma."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from syncd.sink import ChromaSink, MetadataUpdate, Upsert, WritePlan, packed

DIMS = 4


def plan_of(n: int) -> WritePlan:
    # 1/3 and the like are not float32 values: a float32 copy that drifted would show
    vectors = [[1 / (3 + i), -(i + 0.1), 1e-7 * (i + 1), 12345.678] for i in range(n)]
    return WritePlan(
        upserts=[Upsert(f"i:{i}", f"text {i}", {"n": i}, v) for i, v in enumerate(vectors)],
        updates=[MetadataUpdate("i:99", {"n": 99})],
        deletes=["i:98"],
    )


def test_packed_adds_float32_vectors_and_changes_nothing_else() -> None:
    plan = plan_of(3)
    out = packed(plan)
    assert out == plan  # ids, texts, metadata, embeddings, updates, deletes
    for before, after in zip(plan.upserts, out.upserts, strict=True):
        assert after.vector.dtype == np.float32
        assert after.vector.tolist() == np.asarray(before.embedding, dtype=np.float32).tolist()
    assert all(u.vector is None for u in plan.upserts), "the plan given is not changed"
    empty = WritePlan(deletes=["i:1"])
    assert packed(empty) is empty


def test_chroma_stores_the_same_vectors_packed_or_not(
    chroma_persistent_client: Any, chroma_collection_name: str
) -> None:
    """Lists (as the sink always sent them), packed arrays, and a slice with only some
    packed (sent as lists) leave the very same vectors in Chroma."""
    plan = plan_of(5)
    some = packed(plan)
    variants = {
        "lists": plan,
        "packed": packed(plan),
        "mixed": WritePlan(upserts=some.upserts[:2] + plan.upserts[2:]),
    }
    stored: dict[str, dict[str, Any]] = {}
    for how, variant in variants.items():
        sink = ChromaSink(lambda: chroma_persistent_client, f"{chroma_collection_name}-{how}")
        sink.write(variant)
        got = sink.get([u.id for u in plan.upserts], include_embeddings=True)
        stored[how] = {r.id: r.embedding for r in got}
    assert len(stored["lists"]) == 5
    for u in plan.upserts:  # Chroma keeps float32: close to what was sent, not equal
        assert stored["lists"][u.id] == pytest.approx(list(u.embedding), rel=1e-6)
    assert stored["packed"] == stored["lists"]
    assert stored["mixed"] == stored["lists"]


def test_writes_are_sliced_by_records_and_by_bytes() -> None:
    from syncd.sink import WRITE_BYTES, sized_slices, upsert_bytes

    small = [Upsert(f"i:{i}", "t", {"n": i}, [0.0] * DIMS) for i in range(10)]
    assert [len(s) for s in sized_slices(small, 4, upsert_bytes)] == [4, 4, 2]
    third = WRITE_BYTES // 3
    large = [Upsert(f"i:{i}", "x" * third, {}, [0.0] * DIMS) for i in range(7)]
    sliced = list(sized_slices(large, 1000, upsert_bytes))
    assert [len(s) for s in sliced] == [2, 2, 2, 1]  # three would be over WRITE_BYTES
    assert [u.id for s in sliced for u in s] == [u.id for u in large]  # in order
    huge = [Upsert("i:0", "x" * (2 * WRITE_BYTES), {}, [0.0] * DIMS), *small[:2]]
    assert [len(s) for s in sized_slices(huge, 1000, upsert_bytes)] == [1, 2]  # alone
    # Texts and metadata count in UTF-8, as chromadb sends them: "漢" is 3 bytes.
    ascii_text = upsert_bytes(Upsert("i:1", "a" * 10, {"m": "a" * 10}, []))
    assert upsert_bytes(Upsert("i:1", "漢" * 10, {"m": "a" * 10}, [])) == ascii_text + 20
    assert upsert_bytes(Upsert("i:1", "a" * 10, {"m": "😀" * 10}, [])) == ascii_text + 30
