"""How many documents a snapshot reads and writes at once: ``snapshot_batch_size`` when
set, else by the vector's size (README: at least 1,000, up to Chroma's largest batch)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from syncd.config import PipelineSettings
from syncd.embedder import HashingEmbedder
from syncd.mapping import Mapper
from syncd.pipeline import Pipeline
from syncd.snapshot import page_size
from syncd.telemetry import Telemetry
from tests.doubles import MemorySink, MemoryStore
from tests.unit.test_pipeline import FakeSource


def settings(**extra: Any) -> PipelineSettings:
    return PipelineSettings.model_validate(
        {"name": "p", "database": "app", "collection": "docs", "mapping": {"text": "body"}, **extra}
    )


@pytest.mark.parametrize(
    ("dimensions", "max_batch", "want"),
    [
        (32, 5461, 5461),  # small vectors: Chroma's largest batch
        (128, 5461, 3125),  # 400,000 values
        (384, 5461, 1041),
        (1536, 5461, 1000),  # never below 1,000
        (32, 2000, 2000),
        (None, 5461, 1000),  # not known before the first vector
    ],
)
def test_an_unset_page_holds_a_bounded_number_of_vector_values(
    dimensions: int | None, max_batch: int, want: int
) -> None:
    assert page_size(settings(), dimensions, max_batch) == want


def test_an_unset_page_of_chunked_texts_stays_at_1000() -> None:
    # A document's records (and vectors) are not known before it is mapped.
    chunked = settings(mapping={"text": "body", "chunk_size": 40})
    assert page_size(chunked, 8, 5461) == 1000


def test_a_set_page_is_kept_whatever_the_vectors() -> None:
    assert page_size(settings(snapshot_batch_size=7), 32, 5461) == 7
    assert page_size(settings(snapshot_batch_size=50_000), 1536, 5461) == 50_000


class PagedSource(FakeSource):
    def __init__(self, current: dict[Any, dict[str, Any]]) -> None:
        super().__init__(current)
        self.pages: list[int] = []

    def scan(
        self, collection: str, *, batch_size: int = 1000, **kw: Any
    ) -> Iterator[list[dict[str, Any]]]:
        self.pages.append(batch_size)
        return super().scan(collection, batch_size=batch_size, **kw)


class Writes(MemorySink):
    max_batch = 5000

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def write(self, plan: Any) -> None:
        self.sizes.append(len(plan.upserts))
        super().write(plan)


@pytest.mark.parametrize(("extra", "page"), [({}, 5000), ({"snapshot_batch_size": 1500}, 1500)])
def test_the_snapshot_reads_and_writes_pages_of_that_size(
    extra: Mapping[str, Any], page: int
) -> None:
    source = PagedSource({i: {"_id": i, "body": f"text {i}"} for i in range(6000)})
    sink = Writes()
    s = settings(embedder={"kind": "hashing", "dimensions": 8}, **extra)
    p = Pipeline(
        s,
        source=source,
        sink=sink,
        store=MemoryStore(),
        mapper=Mapper(s),
        embedder=HashingEmbedder(8),
        telemetry=Telemetry.disabled().pipeline("p"),
    )
    cp = p.progress.load()
    p.progress.open_sink(cp)
    p.snapshotter().run(cp)
    assert source.pages == [page]
    assert sink.sizes == [page] * (6000 // page) + ([6000 % page] if 6000 % page else [])
    assert len(sink.records) == 6000
