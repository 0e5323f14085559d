"""A rebuild that changes the embedder says how much it will embed: the texts and, for
an `openai` embedder, the tokens (estimated as characters / 4), printed at the start
and shown by `syncd status` while it runs."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

from syncd.errors import ExitCode
from tests.harness.daemon import SyncdProcess, run_syncd
from tests.harness.embedding_api import embedding_api

from .helpers import diff, pipeline_table, settings_of, wait_caught_up, write_config
from .oracle import actual, document, embedded_by_the_api

DOCS = 60
DIMENSIONS = 16  # the old collection's hashing vectors have 32: nothing can be reused


def test_an_embedder_change_says_how_many_texts_and_tokens_it_embeds(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    suffix = uuid.uuid4().hex[:8]
    db, coll = f"rbest_{suffix}", f"rbest-{suffix}"
    with embedding_api(dimensions=DIMENSIONS) as api:
        env = {"SYNCD_TEST_EMBED_KEY": api.api_key}

        def config(path: str, embedder: dict[str, Any]) -> Path:
            table = pipeline_table(
                "p",
                db,
                chroma_collection=coll,
                snapshot_batch_size=10,
                mapping={"text": "body", "metadata": ["n"]},
            )
            table["embedder"] = embedder
            return write_config(
                tmp_path / path,
                mongo_uri=mongo_uri,
                chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port},
                checkpoint_db=f"{db}_syncd",
                pipelines=[table],
            )

        old_cfg = config("old.toml", {"kind": "hashing", "dimensions": 32})
        new_cfg = config(
            "new.toml",
            {
                "kind": "openai",
                "base_url": api.base_url,
                "model": "test-embed",
                "dimensions": DIMENSIONS,
                "api_key_env": "SYNCD_TEST_EMBED_KEY",
                "batch_size": 10,
            },
        )
        docs = mongo_client[db]["docs"]
        docs.insert_many([document(i) for i in range(DOCS)])
        daemon = syncd_factory(["run"], old_cfg)
        wait_caught_up(mongo_client, db, settings_of(old_cfg), "p", 90, "the first copy")
        daemon.terminate()
        assert daemon.wait(30) == ExitCode.OK, daemon.output()

        # Fewer documents than the sample: the estimate is the exact count.
        tokens = round(sum(len(doc["body"]) for doc in docs.find()) / 4)
        said = f"about {DOCS} texts to embed ({DOCS} documents), about {tokens} tokens"
        rebuild = SyncdProcess(["rebuild", "p"], new_cfg, env, log_path=tmp_path / "rb.log")
        rebuild.start()
        try:
            rebuild.wait_for_output(re.escape(said), 120)
            # Printed once recorded; frozen there, it is still building.
            rebuild.pause()
            row = _rebuild_row(new_cfg, env)
            assert row["state"] == "building", row
            assert row["to_embed"] == {
                "documents": DOCS,
                "texts": DOCS,
                "tokens_estimate": tokens,
            }, row
            text = run_syncd(["status"], new_cfg, env)
            assert f"embedding about {DOCS} texts, about {tokens} tokens (estimated)" in (
                text.stdout
            ), text.stdout
            rebuild.resume()
            assert rebuild.wait(180) == ExitCode.OK, rebuild.output()
        finally:
            rebuild.kill()
        # The sample that shows the embedder differs, then every text once.
        assert len(api.inputs) == 3 + DOCS, len(api.inputs)
        want = embedded_by_the_api(docs.find(), dimensions=DIMENSIONS, metadata_fields=["n"])
        chroma = chroma_server.client()
        problem = diff(want, actual(chroma.get_collection(coll)))
        assert not problem, problem
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


def _rebuild_row(cfg: Path, env: dict[str, str]) -> dict[str, Any]:
    """The rebuild's part of `syncd status --json`."""
    done = run_syncd(["status", "--json"], cfg, env)
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    return dict(json.loads(done.stdout)[0].get("rebuild") or {})
