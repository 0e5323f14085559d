"""`kill -9` while one batch is being written to Chroma and the next is already embedded:
the checkpoint covers only what is in Chroma, and a restart converges."""

from __future__ import annotations

import uuid

import pytest
from bson.timestamp import Timestamp

from tests.harness.embedding_api import embedding_api

from . import oracle
from .helpers import (
    caught_up,
    load_checkpoint,
    pipeline_table,
    settings_of,
    wait_until,
    write_config,
)

BATCH = 20
DOCS = 240


@pytest.mark.timeout(400)
def test_kill9_with_a_batch_in_the_write_and_the_next_one_embedded(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory, tcp_proxy_factory
):
    db = f"staged_{uuid.uuid4().hex[:8]}"
    chroma_name = f"staged-{uuid.uuid4().hex[:8]}"
    proxy = tcp_proxy_factory(chroma_server.host, chroma_server.port)  # slows Chroma down
    with embedding_api(dimensions=32) as api:
        openai = {"kind": "openai", "base_url": api.base_url, "model": "m", "api_key": api.api_key}
        cfg = write_config(
            tmp_path / "syncd.toml",
            mongo_uri=mongo_uri,
            chroma={"mode": "http", "host": proxy.host, "port": proxy.port},
            checkpoint_db=f"{db}_syncd",
            pipelines=[
                pipeline_table(
                    "staged", db, batch_size=BATCH, embedder=openai, chroma_collection=chroma_name
                )
            ],
        )
        settings = settings_of(cfg)
        daemon = syncd_factory(["run"], cfg)
        wait_until(
            lambda: (
                (cp := load_checkpoint(settings, "staged")) is not None and cp.phase == "streaming"
            ),
            120,
            "streaming",
        )
        proxy.set_latency(0.3)
        written: list[tuple[Timestamp, list[str]]] = []  # each burst: its last op time, ids
        coll = mongo_client[db]["docs"]
        for start in range(0, DOCS, BATCH):
            ids = list(range(start, start + BATCH))
            with mongo_client.start_session(causal_consistency=True) as session:
                coll.insert_many(
                    [{"_id": i, "body": f"document number {i}"} for i in ids], session=session
                )
                assert session.operation_time is not None
                written.append((session.operation_time, [f"i:{i}" for i in ids]))
        collection = chroma_server.client().get_collection(chroma_name, embedding_function=None)

        def embedded_ahead() -> bool:
            # More than a batch embedded beyond what Chroma holds: as only one batch is
            # written at a time, one is in the write and the next is already embedded.
            embedded = len({t for t in api.inputs if t.startswith("document number")})
            return embedded > collection.count() + BATCH

        wait_until(embedded_ahead, 120, "a batch embedded while the one before is written")
        daemon.kill()

        cp = load_checkpoint(settings, "staged")
        assert cp is not None and cp.cluster_time is not None
        present = set(collection.get(include=[])["ids"])
        covered = [rid for op_time, ids in written if op_time <= cp.cluster_time for rid in ids]
        assert covered, "the kill came before any checkpoint: the test proved nothing"
        missing = [rid for rid in covered if rid not in present]
        assert not missing, f"checkpoint {cp.cluster_time} passes {missing[:5]}, not in Chroma"
        assert len(covered) < DOCS, "the kill came after the last checkpoint: nothing in flight"

        proxy.set_latency(0.0)
        daemon.start()
        wait_until(lambda: caught_up(settings, "staged", written[-1][0]), 180, "catching up")
        daemon.terminate()
        assert daemon.wait(30) == 0, daemon.output()
        # The documents hold no metadata field; the vectors are the API's for each text.
        problem = oracle.mismatch(coll.find(), collection, metadata_fields=(), embed=api.vector)
        assert not problem, problem
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")
