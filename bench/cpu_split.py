"""Where the CPU of a streaming drain goes: syncd, the MongoDB server, the Chroma server.

Writes N inserts with precomputed 384-d vectors once, then drains them with
``bench/drain.py`` into a fresh Chroma server per run, reading each server process's
``utime + stime`` (``/proc/PID/stat``, its threads and children included) before and
after the drain. syncd's figure is the drain process's own (``getrusage``, first read to
the checkpoint covering the last event). Prints µs of CPU per event for each, per run.

    .venv/bin/python bench/cpu_split.py [--events 5000] [--runs 3] [--profile DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload as w
from common import fresh_chroma, load_average, log, start_servers
from context import syncd_drain

TICK = os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            children = task / "children"
            if children.exists():
                todo.extend(int(c) for c in children.read_text().split())
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and the live processes below it."""
    total = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / TICK


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=5_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", type=Path, help="write each drain's cProfile here")
    args = parser.parse_args()
    n = args.events
    with tempfile.TemporaryDirectory(prefix="syncd-cpu-split-") as tmp:
        servers = start_servers(Path(tmp), history_size=n * 4)
        try:
            mongo = servers.mongo_client()
            coll = mongo.bench.sink
            start = w.op_time(mongo)
            w.insert_docs(coll, range(n), dims=384)
            until = w.op_time(mongo)
            table = w.pipeline_table("sink", "bench", "sink")
            rows = []
            for k in range(args.runs):
                with fresh_chroma(servers, f"split-{k}") as srv:
                    assert srv.mongo.pid is not None and srv.chroma.pid is not None
                    load = load_average()
                    time.sleep(0.5)
                    m0, c0 = cpu_seconds(srv.mongo.pid), cpu_seconds(srv.chroma.pid)
                    kw = {}
                    if args.profile:
                        args.profile.mkdir(parents=True, exist_ok=True)
                        kw["profile"] = args.profile / f"drain-{k}.prof"
                    r = syncd_drain(srv, table, start, until, **kw)
                    m1, c1 = cpu_seconds(srv.mongo.pid), cpu_seconds(srv.chroma.pid)
                row = {"run": k + 1, "load": load, "per_s": round(n / r["wall_s"]),
                       "syncd_us": round(r["cpu_s"] / n * 1e6),
                       "mongo_us": round((m1 - m0) / n * 1e6),
                       "chroma_us": round((c1 - c0) / n * 1e6)}
                rows.append(row)
                log(json.dumps(row))
            for key in ("syncd_us", "mongo_us", "chroma_us", "per_s"):
                vals = sorted(r[key] for r in rows)
                best = vals[-1] if key == "per_s" else vals[0]
                log(f"{key}: best {best}, each {[r[key] for r in rows]}")
        finally:
            servers.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
