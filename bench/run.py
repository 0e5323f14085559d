"""`make bench`: start a MongoDB (stand-in) and Chroma servers, measure, write BENCHMARKS.md.

    .venv/bin/python bench/run.py [--quick] [--only SECTION ...] [--budget SECONDS]
                                  [--size FIELD=N ...]
                                  [--output BENCHMARKS.md] [--results bench/results.json]

Every server and syncd process is started here and stopped at the end (the sections that
compare contenders start a fresh Chroma server for each run); the raw results also go to
bench/results.json (``--results`` elsewhere, e.g. for a smoke run that must not merge into
them). ``--quick`` shrinks every workload (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_PYTHON, ROOT, log, start_servers
from report import write_report
from sections import SECTIONS, Context, Sizes


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    from importlib.metadata import version

    import chromadb
    import pymongo

    info = {
        "cores": os.cpu_count(), "ram_gib": round(mem_kb / 1024 / 1024, 1), "cpu": cpu,
        "os": platform.platform(), "python": platform.python_version(),
        "chromadb": chromadb.__version__, "pymongo": pymongo.version,
        "syncd": version("syncd"),
        "load_before": os.getloadavg()[0],
    }
    try:
        import sentence_transformers
        import torch

        info["sentence_transformers"] = sentence_transformers.__version__
        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small workloads (smoke run)")
    parser.add_argument("--only", nargs="*", help="run only these sections")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results.json",
                        help="where the raw results go (a partial run merges into them)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="time the big sections may shrink to fit (default: "
                             f"{Sizes.budget_s:.0f}, so that `make bench` ends within 20 min)")
    parser.add_argument("--size", action="append", default=[], metavar="FIELD=N",
                        help="override one workload size (a field of bench/context.py's "
                             "Sizes, e.g. snapshot_docs=30000); may be repeated")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from bench/results.json without measuring")
    args = parser.parse_args()
    if args.report_only:
        write_report(json.loads(args.results.read_text()), args.output)
        return 0
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.budget:
        sizes.budget_s = args.budget
    for item in args.size:
        field, _, value = item.partition("=")
        if not hasattr(sizes, field) or not value:
            parser.error(f"--size {item}: not FIELD=N with a field of Sizes")
        setattr(sizes, field, type(getattr(sizes, field))(value))
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="syncd-bench-"))
    log(f"work directory {workdir}")
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "sections": {}}
    servers = start_servers(workdir, history_size=1_600_000)
    results["mongo_kind"] = servers.mongo.kind
    results["langchain_env"] = BENCH_PYTHON.exists()
    ctx = Context(servers, sizes, began, results["sections"])
    try:
        for name, section in SECTIONS:
            if args.only and name not in args.only:
                continue
            started, load = time.monotonic(), os.getloadavg()[0]
            try:
                outcome = section(ctx)
            except Exception as exc:
                traceback.print_exc()
                outcome = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            outcome["section_s"] = time.monotonic() - started
            outcome["load_span"] = [round(load, 2), round(os.getloadavg()[0], 2)]
            results["sections"][name] = outcome
            log(f"{name} took {outcome['section_s']:.0f}s")
    finally:
        servers.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["total_s"] = time.monotonic() - began
    results["machine"]["load_after"] = os.getloadavg()[0]
    raw = args.results
    if args.only and raw.exists():
        # A partial run replaces its own sections in the last full run's results.
        merged = json.loads(raw.read_text())
        for name, outcome in results["sections"].items():
            outcome["separate_run"] = {"total_s": results["total_s"], "budget_s": sizes.budget_s,
                                       "only": args.only}
            merged["sections"][name] = outcome
        results = merged
    raw.write_text(json.dumps(results, indent=1, default=str))
    write_report(results, args.output)
    log(f"wrote {args.output} in {results['total_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
