"""The setup most end-to-end tests share: one pipeline, as the oracle describes it,
between a MongoDB and a Chroma server. The `mirror` fixture (conftest.py) makes them on
the session's servers; tests that start servers of their own call `make_mirror`."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from syncd import config

from . import oracle
from .helpers import settings_of, write_config

NO_LEASE: Mapping[str, Any] = {"enabled": False}


@dataclass
class Mirror:
    """A pipeline `name` from `db.docs` (unless told otherwise) to the Chroma collection
    `coll`, its checkpoints in `<db>_syncd`."""

    cfg: Path
    settings: config.Settings
    name: str
    db: str
    coll: str
    metadata: Sequence[str]
    chroma: Any

    def collection(self) -> Any:
        return self.chroma.client().get_collection(self.coll, embedding_function=None)

    def mismatch(self, docs: Any, **options: Any) -> str:
        """ "" when the Chroma collection holds exactly `docs`, mapped by the oracle."""
        options.setdefault("metadata_fields", self.metadata)
        return oracle.mismatch(docs, self.collection(), **options)


def make_mirror(
    path: Path,
    mongo_uri: str,
    chroma: Any,
    prefix: str,
    *,
    name: str = "p",
    metadata: Sequence[str] = oracle.METADATA,
    lease: Mapping[str, Any] | None = NO_LEASE,
    extra: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    db: str | None = None,
    coll: str | None = None,
    **pipeline: Any,
) -> Mirror:
    """Write `path/syncd-<random>.toml` for one oracle pipeline (`pipeline` adds to its
    table); `db` and `coll` name an existing pair, else fresh names start with `prefix`."""
    db = db or f"{prefix}_{uuid.uuid4().hex[:8]}"
    coll = coll or f"{prefix}-{uuid.uuid4().hex[:8]}"
    more = dict(extra or {})
    if lease is not None:
        more["lease"] = dict(lease)
    cfg = write_config(
        path / f"syncd-{uuid.uuid4().hex[:6]}.toml",
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": chroma.host, "port": chroma.port},
        checkpoint_db=f"{db}_syncd",
        extra=more,
        pipelines=[
            oracle.pipeline(name, db, chroma_collection=coll, metadata=metadata, **pipeline)
        ],
    )
    return Mirror(cfg, settings_of(cfg, env), name, db, coll, tuple(metadata), chroma)
