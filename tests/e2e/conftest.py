"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .mirror import Mirror, make_mirror


@pytest.fixture
def mirror(
    tmp_path: Path, mongo_uri: str, mongo_client: Any, chroma_server: Any
) -> Iterator[Callable[..., Mirror]]:
    """`mirror(prefix, **options) -> Mirror` on the session's servers (see `make_mirror`);
    its databases are dropped after the test."""
    made: list[Mirror] = []

    def make(prefix: str, **options: Any) -> Mirror:
        made.append(make_mirror(tmp_path, mongo_uri, chroma_server, prefix, **options))
        return made[-1]

    yield make
    for db in {m.db for m in made}:
        mongo_client.drop_database(db)
        mongo_client.drop_database(f"{db}_syncd")
