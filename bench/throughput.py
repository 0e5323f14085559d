"""Sections that compare syncd's rate with a baseline's: the sink limit (raw batched
upsert), the alternatives (a naive loop, LangChain) and tracing on against off."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import workload as w
from common import (
    BENCH_PYTHON,
    PYTHON,
    ROOT,
    Servers,
    alternate,
    fresh_chroma,
    load_average,
    log,
    median,
)
from context import (
    Context,
    chroma_view,
    compare,
    mongo_view,
    raw_upsert,
    syncd_drain,
)

# --- 1. sink limit ---------------------------------------------------------------------


def sink_limit(ctx: Context) -> dict[str, Any]:
    """syncd streaming inserts with precomputed 384-d vectors against one client upserting
    the same mapped records in slices of the server's maximum batch. Alternating A/B/B/A,
    each run on a fresh Chroma server, the load average taken before each."""
    n = ctx.sizes.sink_events
    coll = ctx.mongo.bench.sink
    log(f"sink limit: writing {n:,} documents with 384-dimension vectors")
    start, until = w.insert_fresh(ctx.mongo, coll, n, dims=384)
    table = w.pipeline_table("sink", "bench", "sink")
    max_batch = int(ctx.chroma.get_max_batch_size())
    runs: list[dict[str, Any]] = []
    for k, contender in alternate(["raw", "syncd"], ctx.sizes.sink_runs):
        load = load_average()
        with fresh_chroma(ctx.servers, f"sink-{contender}") as srv:
            if contender == "raw":
                raw = raw_upsert(srv.chroma_client(), table, n, batch=max_batch, dims=384)
                run = {"contender": "raw", "run": k + 1, "load": load,
                       "per_s": raw["per_s"], "wall_s": raw["wall_s"]}
            else:
                r = syncd_drain(srv, table, start, until)
                run = {"contender": "syncd", "run": k + 1, "load": load,
                       "per_s": n / r["wall_s"], "wall_s": r["wall_s"],
                       "cpu_us_per_event": r["cpu_s"] / n * 1e6}
        runs.append(run)
        log(f"  {contender} run {k + 1} (load {load:.1f}): {run['per_s']:,.0f}/s")
    coll.drop()
    raw_per_s = median([r["per_s"] for r in runs if r["contender"] == "raw"])
    ours = median([r["per_s"] for r in runs if r["contender"] == "syncd"])
    cpu = median([r["cpu_us_per_event"] for r in runs if r["contender"] == "syncd"])
    return {"events": n, "runs": ctx.sizes.sink_runs, "max_batch": max_batch,
            "raw_per_s": raw_per_s, "syncd_per_s": ours, "ratio": ours / raw_per_s,
            "syncd_cpu_us_per_event": cpu, "order": runs, "fresh_server_per_run": True,
            "load": [r["load"] for r in runs]}


# --- 2. alternatives -------------------------------------------------------------------


def _alternative(srv: Servers, kind: str, name: str, start: Any,
                 until: Any) -> dict[str, Any]:
    python = BENCH_PYTHON if kind == "langchain" else Path(PYTHON)
    # LangChain's record manager must start as empty as the collection, or it skips documents.
    (srv.workdir / f"{name}.db").unlink(missing_ok=True)
    cmd = [str(python), str(ROOT / "bench" / "alternatives.py"), kind,
           "--mongo", srv.mongo.uri, "--chroma-port", str(srv.chroma.port),
           "--database", "bench", "--collection", "changes", "--chroma-collection", name,
           "--start-at", f"{start.time}.{start.inc}", "--until", f"{until.time}.{until.inc}",
           "--workdir", str(srv.workdir)]
    env = {**os.environ, "ANONYMIZED_TELEMETRY": "False", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1_200, check=False,
                          env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def alternatives(ctx: Context) -> dict[str, Any]:
    """syncd and LangChain alternating (A/B/B/A...), then the naive loop once; each run on a
    fresh Chroma server, the load average taken before each."""
    s = ctx.sizes
    coll = ctx.mongo.bench.changes
    coll.drop()
    start = w.op_time(ctx.mongo)
    mix = w.write_change_set(coll, s.alt_inserts, s.alt_updates, s.alt_updates,
                             s.alt_deletes, dims=384)
    until = w.op_time(ctx.mongo)
    events = sum(mix.values())
    expected = mongo_view(coll)
    log(f"alternatives: {events:,} change events {mix}")
    out: dict[str, Any] = {"events": events, "mix": mix, "contenders": {}, "order": []}
    kinds = ["syncd", "langchain"]
    if not BENCH_PYTHON.exists():
        kinds.remove("langchain")
        out["contenders"]["langchain"] = {"error": ".venv-bench is missing (make bench makes it)"}
    plan = [*alternate(kinds, s.alt_runs), (0, "naive")]
    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in ("syncd", "naive",
                                                                      "langchain")}
    for k, kind in plan:
        name = f"alt-{kind}"
        load = load_average()
        with fresh_chroma(ctx.servers, name) as srv:
            client = srv.chroma_client()
            if kind == "syncd":
                r = syncd_drain(srv, w.pipeline_table(name, "bench", "changes"), start, until)
                view = chroma_view(client, name)
            else:
                r = _alternative(srv, kind, name, start, until)
                view = chroma_view(client, name, key="source" if kind == "langchain" else None)
        r["contents"] = compare(expected, view)
        r["load"] = load
        results[kind].append(r)
        out["order"].append({"contender": kind, "run": k + 1, "load": load,
                             "per_s": events / r["wall_s"]})
        log(f"  {kind} run {k + 1} (load {load:.1f}): {events / r['wall_s']:,.1f} events/s, "
            f"contents {r['contents']}")
    for kind, runs in results.items():
        if not runs:
            continue
        out["contenders"][kind] = {
            "runs": len(runs),
            "per_s": median([events / r["wall_s"] for r in runs]),
            "wall_s": median([r["wall_s"] for r in runs]),
            "cpu_us_per_event": median([r["cpu_s"] / events * 1e6 for r in runs]),
            "contents": runs[-1]["contents"],
            "versions": runs[-1].get("versions"),
        }
    coll.drop()
    c = out["contenders"] = {kind: out["contenders"][kind] for kind in ("syncd", "naive",
                             "langchain") if kind in out["contenders"]}
    if "per_s" in c.get("naive", {}):
        out["syncd_vs_naive"] = c["syncd"]["per_s"] / c["naive"]["per_s"]
    if "per_s" in c.get("langchain", {}):
        out["syncd_vs_langchain"] = c["syncd"]["per_s"] / c["langchain"]["per_s"]
    out["load"] = [x["load"] for x in out["order"]]
    return out


# --- 8. tracing ---------------------------------------------------------------------------


def tracing(ctx: Context) -> dict[str, Any]:
    """Tracing off against on (a dropping exporter), alternating A/B/B/A..., each run on a
    fresh Chroma server, the load average taken before each."""
    s = ctx.sizes
    n = s.tracing_events
    coll = ctx.mongo.bench.tracing
    start, until = w.insert_fresh(ctx.mongo, coll, n, dims=32)
    results: dict[str, list[dict[str, Any]]] = {"off": [], "noop": []}
    order = []
    for k, mode in alternate(["off", "noop"], s.tracing_runs):
        name = f"trace-{mode}"
        table = w.pipeline_table(name, "bench", "tracing", dims=32)
        load = load_average()
        with fresh_chroma(ctx.servers, name) as srv:
            r = syncd_drain(srv, table, start, until, tracing=mode)
        results[mode].append(r)
        order.append({"contender": mode, "run": k + 1, "load": load, "per_s": n / r["wall_s"]})
        log(f"tracing {mode} run {k + 1} (load {load:.1f}): {n / r['wall_s']:,.0f} events/s, "
            f"{r['cpu_s'] / n * 1e6:,.0f} µs CPU/event, {r['spans']:,} spans")
    coll.drop()
    off = median([n / r["wall_s"] for r in results["off"]])
    on = median([n / r["wall_s"] for r in results["noop"]])
    return {"events": n, "runs": s.tracing_runs, "off_per_s": off, "on_per_s": on,
            "ratio": on / off,
            "off_cpu_us": median([r["cpu_s"] / n * 1e6 for r in results["off"]]),
            "on_cpu_us": median([r["cpu_s"] / n * 1e6 for r in results["noop"]]),
            "spans": results["noop"][-1]["spans"], "order": order,
            "load": [x["load"] for x in order]}
