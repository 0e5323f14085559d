"""Metadata-only updates never re-embed: embedder calls equal text changes."""

from __future__ import annotations

from syncd.errors import ExitCode
from tests.harness.embedding_api import embedding_api

from .helpers import wait_caught_up


def test_metadata_only_updates_make_zero_embedder_calls(mirror, mongo_client, syncd_factory):
    with embedding_api(dimensions=32) as api:
        env = {"SYNCD_TEST_EMBED_KEY": api.api_key}
        embedder = {
            "kind": "openai",
            "base_url": api.base_url,
            "model": "test-embed",
            "dimensions": 32,
            "api_key_env": "SYNCD_TEST_EMBED_KEY",
        }
        m = mirror("emb", name="emb", metadata=["title", "tags", "n"], embedder=embedder, env=env)
        cfg, settings, db = m.cfg, m.settings, m.db
        docs = mongo_client[db]["docs"]
        docs.insert_many([{"_id": i, "body": f"text number {i}", "n": i} for i in range(40)])
        daemon = syncd_factory(["run"], cfg, env)
        wait_caught_up(mongo_client, db, settings, "emb", 60, "snapshot")
        assert len(api.inputs) == 40, "the snapshot embeds each text once"

        # 30 metadata-only updates (add, change and remove metadata fields) ...
        for i in range(30):
            if i % 3 == 0:
                docs.update_one({"_id": i}, {"$set": {"n": 1000 + i, "title": "t"}})
            elif i % 3 == 1:
                docs.update_one({"_id": i}, {"$unset": {"n": ""}})
            else:
                docs.replace_one({"_id": i}, {"body": f"text number {i}", "tags": ["x"]})
        # ... and 7 updates that change the text.
        for i in range(30, 37):
            docs.update_one({"_id": i}, {"$set": {"body": f"new text {i}"}})
        wait_caught_up(mongo_client, db, settings, "emb", 60, "updates applied")
        assert len(api.inputs) == 47, api.inputs[40:]
        assert sorted(api.inputs[40:]) == sorted(f"new text {i}" for i in range(30, 37))

        daemon.terminate()
        assert daemon.wait(30) == ExitCode.OK, daemon.output()
        assert api.api_key not in daemon.output()
        problem = m.mismatch(docs.find(), embed=api.vector)
        assert not problem, problem
