"""Where a snapshot's time and CPU go: syncd, the MongoDB server, the Chroma server, and
each page's stages at the start and at the end of the scan.

Writes N documents (32-dimension vectors, as the snapshot section) once, then per run
snapshots them with ``bench/drain.py --snapshot --stage-times`` into a fresh Chroma server,
reading each server process's ``utime + stime`` before and after (as
``bench/cpu_split.py``), and, with ``--raw``, upserts the same records in slices of the
server's maximum batch into a fresh server, timing each slice. Prints µs of CPU per
document for each process, the median seconds per page of each stage (``find``, ``map``,
``lookup``, ``write``, ``checkpoint_save``) over the first and the last fifth of the
pages, and the rate of the first and the last window of each contender.

    .venv/bin/python bench/snapshot_split.py [--docs 20000] [--runs 1] [--raw]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload as w
from common import drain, fresh_chroma, load_average, log, start_servers
from context import raw_upsert
from cpu_split import cpu_seconds
from snapshot import windows

from syncd.checkpoint import open_store
from syncd.config import load as load_config


def stage_medians(stages: list[list], part: slice) -> dict[str, float]:
    """Median ms per occurrence of each stage within ``part`` of the occurrences."""
    by: dict[str, list[float]] = {}
    for _t, name, seconds in stages:
        by.setdefault(name, []).append(seconds)
    return {name: round(statistics.median(v[part]) * 1e3, 1) for name, v in by.items()
            if v[part]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--raw", action="store_true", help="also time a raw upsert")
    args = parser.parse_args()
    n = args.docs
    window = max(1_000, n // 5)
    with tempfile.TemporaryDirectory(prefix="syncd-snap-split-") as tmp:
        servers = start_servers(Path(tmp), history_size=n * 2)
        try:
            mongo = servers.mongo_client()
            coll = mongo.bench.snap
            coll.drop()
            w.insert_docs(coll, range(n), dims=32, slice_size=10_000)
            table = w.pipeline_table("snap", "bench", "snap", dims=32)
            for k in range(args.runs):
                if args.raw:
                    with fresh_chroma(servers, f"raw-{k}") as srv:
                        load = load_average()
                        c0 = cpu_seconds(srv.chroma.pid)
                        client = srv.chroma_client()
                        max_batch = int(client.get_max_batch_size())
                        r = raw_upsert(client, table, n, batch=max_batch, dims=32)
                        c1 = cpu_seconds(srv.chroma.pid)
                        row = {"contender": "raw", "run": k + 1, "load": load,
                               "per_s": round(r["per_s"]), "chroma_us": round((c1 - c0) / n * 1e6),
                               "windows": [round(x["per_s"]) for x in
                                           windows(r["progress"], window)]}
                        log(json.dumps(row))
                with fresh_chroma(servers, f"syncd-{k}") as srv:
                    cfg = srv.config("snap", [table])
                    open_store(load_config(cfg, env={}).checkpoint, mongo).delete("snap")
                    load_ = load_average()
                    time.sleep(0.5)
                    m0, c0 = cpu_seconds(srv.mongo.pid), cpu_seconds(srv.chroma.pid)
                    r = drain(cfg, "snap", snapshot=True, stage_times=True, timeout=3_600)
                    m1, c1 = cpu_seconds(srv.mongo.pid), cpu_seconds(srv.chroma.pid)
                progress = [*r["progress"], [r["wall_s"], n]]
                stages = r["stages"]
                pages = max(1, len([s for s in stages if s[1] == "write"]))
                fifth = max(1, pages // 5)
                row = {"contender": "syncd", "run": k + 1, "load": load_,
                       "per_s": round(n / r["wall_s"]),
                       "syncd_us": round(r["cpu_s"] / n * 1e6),
                       "mongo_us": round((m1 - m0) / n * 1e6),
                       "chroma_us": round((c1 - c0) / n * 1e6),
                       "threads": r["thread_cpu_s"],
                       "windows": [round(x["per_s"]) for x in windows(progress, window)],
                       "first_ms": stage_medians(stages, slice(0, fifth)),
                       "last_ms": stage_medians(stages, slice(-fifth, None))}
                log(json.dumps(row))
        finally:
            servers.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
