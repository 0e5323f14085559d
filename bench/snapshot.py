"""The snapshot section: syncd's initial sync of a large collection against a raw upsert of
the same records, and whether its rate holds from the first 10,000 documents to the last."""

from __future__ import annotations

import itertools
from typing import Any

import workload as w
from common import alternate, drain, fresh_chroma, load_average, log, median
from context import Context, raw_upsert, settings

from syncd.checkpoint import open_store
from syncd.config import PipelineSettings
from syncd.snapshot import page_size


def windows(progress: list[list[float]], size: int) -> list[dict[str, float]]:
    """Documents/s over each ``size`` documents scanned, from (seconds, scanned) samples:
    the time a boundary was crossed is interpolated between the samples around it."""
    crossings: list[float] = [0.0]
    boundary = size
    before_t, before = 0.0, 0.0
    for t, scanned in progress:
        while scanned >= boundary:  # before < boundary <= scanned
            crossings.append(before_t + (t - before_t) * (boundary - before) / (scanned - before))
            boundary += size
        before_t, before = t, scanned
    return [{"from": k * size, "to": (k + 1) * size, "seconds": b - a, "per_s": size / (b - a)}
            for k, (a, b) in enumerate(itertools.pairwise(crossings)) if b > a]


def snapshot(ctx: Context) -> dict[str, Any]:
    """syncd's snapshot against one client upserting the same records in slices of the
    server's maximum batch into a fresh collection, each on a fresh Chroma server (raw
    first, then syncd; A/B/B/A with two runs), the load average taken before each."""
    wanted = n = ctx.sizes.snapshot_docs
    runs = ctx.sizes.snapshot_runs
    # Chroma-bound, like the 32-dimension inserts of the tracing section: shrink to what fits
    # for both contenders, keeping time for the 100,000-event memory run after it.
    rate = ctx.results.get("tracing", {}).get("off_per_s", 400.0)
    fits = int((ctx.remaining() - 90) * rate * 0.8 / (2 * runs) / 10_000) * 10_000
    if fits < n:
        n = max(10_000, fits)
    coll = ctx.mongo.bench.snap
    coll.drop()
    log(f"snapshot: writing {n:,} documents (32-dimension vectors)")
    w.insert_docs(coll, range(n), dims=32, slice_size=10_000)
    name = "snap"
    table = w.pipeline_table(name, "bench", "snap", dims=32)
    max_batch = int(ctx.chroma.get_max_batch_size())
    # Progress moves a page at a time: windows of whole pages (the page syncd picks here).
    page = page_size(PipelineSettings.model_validate(table), 32, max_batch)
    window = 10_000 if n >= 50_000 else max(1_000, n // 5)
    window = -(-window // page) * page
    order: list[dict[str, Any]] = []
    syncd_runs: list[dict[str, Any]] = []
    raw_runs: list[dict[str, Any]] = []
    for k, contender in alternate(["raw", "syncd"], runs):
        load = load_average()
        with fresh_chroma(ctx.servers, f"snap-{contender}") as srv:
            if contender == "raw":
                raw = raw_upsert(srv.chroma_client(), table, n, batch=max_batch, dims=32)
                raw_runs.append(raw)
                order.append({"contender": "raw", "run": k + 1, "load": load,
                              "per_s": raw["per_s"], "wall_s": raw["wall_s"]})
            else:
                cfg = srv.config(name, [table])
                open_store(settings(cfg).checkpoint, ctx.mongo).delete(name)
                # Bounded by what is left of the budget: past it, report how far it got.
                r = drain(cfg, name, snapshot=True, timeout=max(60.0, ctx.remaining() - 90))
                done = (r["scanned"] or 0) if r["timed_out"] else n
                r["documents"] = done
                r["records"] = srv.chroma_client().get_collection(name).count()
                progress = list(r.get("progress") or [])
                if not r["timed_out"]:  # the samples are where the count moved: add the end
                    progress.append([r["wall_s"], n])
                r["windows"] = windows(progress, window)
                syncd_runs.append(r)
                order.append({"contender": "syncd", "run": k + 1, "load": load,
                              "per_s": done / r["wall_s"], "wall_s": r["wall_s"]})
        log(f"  {contender} run {k + 1} (load {load:.1f}): {order[-1]['per_s']:,.0f}/s")
    coll.drop()
    last = syncd_runs[-1]
    raw_per_s = median([x["per_s"] for x in order if x["contender"] == "raw"])
    ours = median([x["per_s"] for x in order if x["contender"] == "syncd"])
    wins = last["windows"]
    out: dict[str, Any] = {
        "documents": last["documents"], "wanted": wanted, "written": n,
        "records": last["records"], "wall_s": last["wall_s"], "timed_out": last["timed_out"],
        "per_s": ours, "raw_per_s": raw_per_s, "ratio": ours / raw_per_s,
        "cpu_us_per_document": last["cpu_s"] / max(1, last["documents"]) * 1e6,
        "peak_rss_mb": last["peak_rss_mb"], "progress": last.get("progress") or [],
        "window": window, "page": page, "windows": wins, "max_batch": max_batch, "runs": runs,
        "order": order, "load": [x["load"] for x in order], "fresh_server_per_run": True,
    }
    if len(wins) >= 2:
        out["last_vs_first_window"] = wins[-1]["per_s"] / wins[0]["per_s"]
    # The baseline's own windows (records upserted, upsert time only): whether Chroma slows
    # as the collection grows whoever writes, beside syncd's.
    raw_wins = windows(raw_runs[-1]["progress"], window) if raw_runs else []
    out["raw_windows"] = raw_wins
    if len(raw_wins) >= 2:
        out["raw_last_vs_first_window"] = raw_wins[-1]["per_s"] / raw_wins[0]["per_s"]
    return out
