"""A remote embedding service with latency: several requests in flight, nothing else changes.

The local OpenAI-compatible test server answers each request 100 ms after it arrived, as
a remote GPU service would. With `embed_concurrency = 4`, syncd keeps up to four
requests in flight; the mirror is exactly what the README's rules say, and an input the
API refuses is still that one document's poison (dead-lettered), whichever request was
answered first.
"""

from __future__ import annotations

import pytest

from syncd.errors import ExitCode
from tests.harness.embedding_api import embedding_api

from . import oracle
from .helpers import diff, wait_caught_up


@pytest.mark.timeout(240)
def test_requests_in_flight_to_a_slow_embedding_api_mirror_exactly(
    mongo_client, mirror, syncd_factory
):
    with embedding_api(dimensions=32, delay_s=0.1) as api:
        api.refuse = lambda text: "refuse me" in text
        env = {"OPENAI_API_KEY": api.api_key}
        embedder = {
            "kind": "openai",
            "base_url": api.base_url,
            "model": "slow-embed",
            "dimensions": 32,
            "batch_size": 4,
            "embed_concurrency": 4,
        }
        m = mirror("remote", name="remote", env=env, on_error="dead_letter", embedder=embedder)
        db, cfg, settings = m.db, m.cfg, m.settings
        docs = mongo_client[db]["docs"]
        docs.insert_many([oracle.document(i) for i in range(60)])
        letters = mongo_client[f"{db}_syncd"]["dead_letters"]
        daemon = syncd_factory(["run"], cfg, env)
        wait_caught_up(mongo_client, db, settings, "remote", 90, "snapshot")
        # 60 texts in requests of 4: 15 requests, never more than 4 at once.
        assert 2 <= api.max_in_flight <= 4, api.max_in_flight

        # Changes streamed in one batch: new documents, changed texts, one the API refuses.
        changed = [oracle.document(i, version=1) for i in range(0, 60, 3)]
        for doc in changed:
            docs.replace_one({"_id": doc["_id"]}, doc)
        refused = {**oracle.document(1000), "body": "please refuse me"}
        docs.insert_many([oracle.document(i) for i in range(100, 130)] + [refused])
        docs.delete_one({"_id": 1})
        wait_caught_up(mongo_client, db, settings, "remote", 90, "changes")
        assert [d["key"] for d in letters.find()] == ["i:1000"]
        assert api.max_in_flight <= 4, api.max_in_flight

        daemon.terminate()
        assert daemon.wait(30) == ExitCode.OK, daemon.output()[-3000:]
        assert "Traceback" not in daemon.output()
    mirrored = [d for d in docs.find() if d["_id"] != 1000]
    problem = diff(oracle.embedded_by_the_api(mirrored), oracle.actual(m.collection()))
    assert not problem, problem
