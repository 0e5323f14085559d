"""`kill -9` while one batch is being written to Chroma and the next is already embedded:
the checkpoint covers only what is in Chroma, and a restart converges.

The state is reached for sure, whatever the machine's load: the proxy before Chroma
holds the write of batch N (its upsert never arrives, while lookups go through), and the
embedding API holds the requests of batch N and of what the planner reads after it
(up to ``batch_size`` changes, sent while the writer waits for N's vectors), until every
change after them is in the stream; then all of them are answered before the kill.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

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
HALF = DOCS // 2


def settled(count: Callable[[], int], quiet_s: float = 1.0) -> int:
    """``count()`` once it has not changed for ``quiet_s``."""
    value, since = count(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.1)
        if (now := count()) != value:
            value, since = now, time.monotonic()
    return value


@pytest.mark.timeout(400)
def test_kill9_with_a_batch_in_the_write_and_the_next_one_embedded(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory, tcp_proxy_factory
):
    db = f"staged_{uuid.uuid4().hex[:8]}"
    chroma_name = f"staged-{uuid.uuid4().hex[:8]}"
    proxy = tcp_proxy_factory(chroma_server.host, chroma_server.port)  # holds a write
    with embedding_api(dimensions=32) as api:
        # One request per batch (a batch holds fewer texts than the embedder's batch
        # size), and neither a held write nor a held embedding is given up on meanwhile.
        openai = {
            "kind": "openai",
            "base_url": api.base_url,
            "model": "m",
            "api_key": api.api_key,
            "batch_size": 64,
            "timeout_s": 600,
        }
        chroma = {"mode": "http", "host": proxy.host, "port": proxy.port, "timeout_s": 600}
        cfg = write_config(
            tmp_path / "syncd.toml",
            mongo_uri=mongo_uri,
            chroma=chroma,
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
        written: list[tuple[Timestamp, list[str]]] = []  # each burst: its last op time, ids
        coll = mongo_client[db]["docs"]

        def insert(first: int, end: int, burst: int) -> None:
            for start in range(first, end, burst):
                ids = list(range(start, start + burst))
                with mongo_client.start_session(causal_consistency=True) as session:
                    coll.insert_many(
                        [{"_id": i, "body": f"document number {i}"} for i in ids],
                        session=session,
                    )
                    assert session.operation_time is not None
                    written.append((session.operation_time, [f"i:{i}" for i in ids]))

        insert(0, HALF, BATCH)  # written and checkpointed: the kill has a checkpoint to judge
        wait_until(lambda: caught_up(settings, "staged", written[-1][0]), 120, "the first half")
        collection = chroma_server.client().get_collection(chroma_name, embedding_function=None)
        requests = api.requests
        proxy.hold(b"/upsert")  # batch N's write goes no further than the proxy
        api.hold()  # and the embeddings of N and N+1 wait until all the changes are in
        insert(HALF, DOCS, 1)  # one at a time: a checkpoint past any of them is caught
        wait_until(lambda: api.held() >= 2, 120, "the embeddings of batch N and after held")
        held = settled(api.held)  # the planner stops at batch_size changes read ahead
        api.release()

        def next_one_embedded() -> bool:
            # Batch N is in the write (held) and the API answered every request held,
            # those of the changes read after N too; nothing of them is in Chroma.
            return proxy.held == 1 and api.requests >= requests + held

        wait_until(next_one_embedded, 120, "batch N in the write and batch N+1 embedded")
        assert collection.count() == HALF, "the held write reached Chroma"
        daemon.kill()
        proxy.cut()  # the held write dies with the killed process's connection
        proxy.heal()

        cp = load_checkpoint(settings, "staged")
        assert cp is not None and cp.cluster_time is not None
        present = set(collection.get(include=[])["ids"])
        covered = [rid for op_time, ids in written if op_time <= cp.cluster_time for rid in ids]
        assert covered, "the kill came before any checkpoint: the test proved nothing"
        missing = [rid for rid in covered if rid not in present]
        assert not missing, f"checkpoint {cp.cluster_time} passes {missing[:5]}, not in Chroma"
        assert len(covered) < DOCS, "the kill came after the last checkpoint: nothing in flight"

        daemon.start()
        wait_until(lambda: caught_up(settings, "staged", written[-1][0]), 180, "catching up")
        daemon.terminate()
        assert daemon.wait(30) == 0, daemon.output()
        # The documents hold no metadata field; the vectors are the API's for each text.
        problem = oracle.mismatch(coll.find(), collection, metadata_fields=(), embed=api.vector)
        assert not problem, problem
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")
