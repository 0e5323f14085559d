"""A remote embedding service with latency: several requests in flight, nothing else changes.

The local OpenAI-compatible test server answers each request 100 ms after it arrived, as
a remote GPU service would. With `embed_concurrency = 4`, syncd keeps up to four
requests in flight; the mirror is exactly what the README's rules say, and an input the
API refuses is still that one document's poison (dead-lettered), whichever request was
answered first.
"""

from __future__ import annotations

import json
import shlex

import pytest

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd
from tests.harness.embedding_api import embedding_api

from . import oracle
from .helpers import diff, wait_caught_up
from .test_runbook import hinted


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

        # The refused document maps, and has no record on purpose: verify counts it as
        # dead-lettered, not missing, and is consistent; repair leaves it alone.
        checked = run_syncd(["verify", "--json", "remote"], cfg, env)
        assert checked.returncode == ExitCode.OK, checked.stdout + checked.stderr
        report = json.loads(checked.stdout)
        assert report["consistent"] and report["missing"]["count"] == 0, report
        assert report["dead_lettered"] == {"count": 1, "sample": ["i:1000"]}, report
        repaired = run_syncd(["repair", "remote"], cfg, env)
        assert repaired.returncode == ExitCode.OK, repaired.stdout + repaired.stderr
        assert letters.count_documents({}) == 1
        text = run_syncd(["verify", "remote"], cfg, env)
        assert "dead-lettered" in text.stdout and text.returncode == ExitCode.OK, text.stdout
        (command,) = hinted(text.stdout)  # fixed in MongoDB, then the hint
        assert command.split()[:4] == ["syncd", "dlq", "retry", "remote"], command
        docs.replace_one({"_id": 1000}, oracle.document(1000))
        retried = run_syncd(shlex.split(command)[1:], env=env)
        assert retried.returncode == ExitCode.OK, retried.stdout + retried.stderr
        after = json.loads(run_syncd(["verify", "--json", "remote"], cfg, env).stdout)
        assert after["consistent"] and after["dead_lettered"]["count"] == 0, after
        assert letters.count_documents({}) == 0
    problem = diff(oracle.embedded_by_the_api(list(docs.find())), oracle.actual(m.collection()))
    assert not problem, problem


@pytest.mark.timeout(240)
@pytest.mark.parametrize("garble", ["html", "short"])
def test_an_embedding_api_that_answered_well_and_then_garbles_is_retried(
    mongo_client, mirror, syncd_factory, garble
):
    """A proxy's maintenance page (200, HTML) or too few vectors, after right answers from
    the same URL: a passing fault. syncd keeps running, holds its checkpoint, and the
    changes made meanwhile arrive once the API answers well again."""
    with embedding_api(dimensions=32) as api:
        env = {"OPENAI_API_KEY": api.api_key}
        embedder = {"kind": "openai", "base_url": api.base_url, "model": "m", "dimensions": 32}
        m = mirror("garble", name="garble", env=env, embedder=embedder)
        docs = mongo_client[m.db]["docs"]
        docs.insert_many([oracle.document(i) for i in range(10)])
        daemon = syncd_factory(["run"], m.cfg, env)
        wait_caught_up(mongo_client, m.db, m.settings, "garble", 90, "snapshot")
        api.garble = garble
        docs.insert_many([oracle.document(i) for i in range(10, 20)])
        docs.replace_one({"_id": 3}, oracle.document(3, version=1))
        daemon.wait_for_output(r"retried as a passing fault", timeout=60)
        assert daemon.is_running(), daemon.output()[-3000:]
        api.garble = None
        wait_caught_up(mongo_client, m.db, m.settings, "garble", 90, "recovery")
        daemon.terminate()
        assert daemon.wait(30) == ExitCode.OK, daemon.output()[-3000:]
        problem = diff(oracle.embedded_by_the_api(list(docs.find())), oracle.actual(m.collection()))
        assert not problem, problem
