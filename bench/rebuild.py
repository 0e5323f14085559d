"""The rebuild section: `syncd rebuild` of N synced documents after a metadata-only
mapping change (vectors reused: nothing embedded) and after an embedder change (every
text embedded again), each from the same start, against a fresh snapshot of the same
documents with the new mapping. Texts embedded are counted by the OpenAI-compatible test
server (`tests/harness/embedding_api.py`), which counts every input."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import workload as w
from common import PYTHON, ROOT, drain, drop_collection, load_average, log
from context import Context, settings

from syncd.checkpoint import open_store

DIMS, NEW_DIMS = 32, 16
LIVE, FRESH = "rebuilt", "rebuilt-fresh"  # Chroma collections
COLLECTIONS = (LIVE, f"{LIVE}--v1", f"{LIVE}--v2", FRESH)
FULL_DOCS = 10_000
QUICK_DOCS = 500
RUNS = 4  # what the section's time is spent on: the first sync and three timed copies
SECTION_S = 180.0  # the section's share of the budget at most


def rebuild(ctx: Context) -> dict[str, Any]:
    from tests.harness.embedding_api import EmbeddingAPI

    wanted = QUICK_DOCS if ctx.sizes.snapshot_docs < 50_000 else FULL_DOCS
    # Embedding-bound: shrink to what the snapshot section's rate fits in the time left.
    rate = ctx.results.get("snapshot", {}).get("per_s", 300.0)
    fits = int(min(SECTION_S, ctx.remaining() - 60) * rate * 0.5 / RUNS / 500) * 500
    n = max(QUICK_DOCS, min(wanted, fits))
    coll = ctx.mongo.bench.rebuild
    coll.drop()
    log(f"rebuild: writing {n:,} documents")
    w.insert_docs(coll, range(n), dims=0)
    api, other = EmbeddingAPI(dimensions=DIMS).start(), EmbeddingAPI(dimensions=NEW_DIMS).start()
    old = None
    try:
        def table(name: str, collection: str, server: Any, dims: int,
                  metadata: list[str]) -> dict[str, Any]:
            embedder = {"kind": "openai", "base_url": server.base_url, "model": "counting",
                        "api_key": server.api_key, "dimensions": dims}
            return w.pipeline_table(name, "bench", "rebuild", chroma_collection=collection,
                                    embedder=embedder,
                                    mapping={"text": "body", "metadata": metadata})

        metadata = list(w.USER_METADATA)
        old = ctx.servers.config("rb-old", [table("rb", LIVE, api, DIMS, metadata)])
        meta_cfg = ctx.servers.config("rb-meta", [table("rb", LIVE, api, DIMS, metadata[:1])])
        model_cfg = ctx.servers.config("rb-model", [table("rb", LIVE, other, NEW_DIMS, metadata)])
        fresh_cfg = ctx.servers.config(
            "rb-fresh", [table("rbfresh", FRESH, api, DIMS, metadata[:1])])
        for name in COLLECTIONS:
            drop_collection(ctx.chroma, name)
        _forget(ctx, old, "rb", "rbfresh")
        drain(old, "rb", snapshot=True, timeout=max(60.0, ctx.remaining() - 60))
        out: dict[str, Any] = {"documents": n, "wanted": wanted}
        for key, cfg, server in (("metadata_only", meta_cfg, api),
                                 ("embedder_change", model_cfg, other)):
            load = load_average()
            before = len(server.inputs)
            wall = _syncd(["rebuild", "rb"], cfg)
            out[key] = {"wall_s": wall, "embedded": len(server.inputs) - before,
                        "per_s": n / wall, "load": load}
            log(f"  rebuild, {key.replace('_', ' ')} (load {load:.1f}): "
                f"{wall:.1f} s, {out[key]['embedded']:,} texts embedded")
            # Back to the same start: the previous collection live again, the new one gone.
            _syncd(["rebuild", "rb", "--rollback"], cfg)
            _syncd(["rebuild", "rb", "--drop-previous"], old)
        load = load_average()
        before = len(api.inputs)
        fresh = drain(fresh_cfg, "rbfresh", snapshot=True,
                      timeout=max(60.0, ctx.remaining() - 30))
        out["fresh_snapshot"] = {"wall_s": fresh["wall_s"], "per_s": n / fresh["wall_s"],
                                 "embedded": len(api.inputs) - before, "load": load}
        log(f"  fresh snapshot with the new mapping (load {load:.1f}): {fresh['wall_s']:.1f} s")
    finally:
        api.close()
        other.close()
        for name in COLLECTIONS:
            drop_collection(ctx.chroma, name)
        if old is not None:
            _forget(ctx, old, "rb", "rbfresh")
        coll.drop()
    out["process_start_included"] = True
    return out


def _forget(ctx: Context, cfg: Any, *pipelines: str) -> None:
    """No checkpoint, rebuild record or dead letters of an earlier run."""
    store = open_store(settings(cfg).checkpoint, ctx.mongo)
    for name in pipelines:
        for suffix in ("", "~rebuild", "~switch"):
            store.delete(name + suffix)
        ctx.mongo.syncd_bench.dead_letters.delete_many({"pipeline": {"$regex": f"^{name}(~|$)"}})


def _syncd(args: list[str], cfg: Any) -> float:
    """Run one syncd command to completion; its wall time (interpreter start included)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    began = time.perf_counter()
    proc = subprocess.run([PYTHON, "-m", "syncd", *args, "--config", str(cfg)], env=env,
                          capture_output=True, text=True, timeout=1_800, check=False)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"syncd {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall
