"""The benchmark curves as pictures beside BENCHMARKS.md (matplotlib, no display needed).

``draw(results)`` writes one PNG per curve into bench/charts/ and returns, per report
section, the pictures' paths relative to the repository root (where BENCHMARKS.md is).
A section without the figures a picture needs gets none.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHARTS = ROOT / "bench" / "charts"
# No version or date in the files: the same results give the same bytes.
_PNG = {"Software": None}


def draw(results: dict[str, Any]) -> dict[str, list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 10, "axes.grid": True,
                         "grid.alpha": 0.3, "svg.hashsalt": "syncd"})
    CHARTS.mkdir(parents=True, exist_ok=True)
    s = results["sections"]
    made: dict[str, list[str]] = {}
    for key, fn in (("lag", _lag), ("alternatives", _throughput), ("snapshot", _snapshot),
                    ("remote_embedder", _remote)):
        section = s.get(key)
        if not section or section.get("error"):
            continue
        figure = fn(plt, s)
        if figure is None:
            continue
        path = CHARTS / f"{key}.png"
        figure.savefig(path, metadata=_PNG, bbox_inches="tight")
        plt.close(figure)
        made[key] = [str(path.relative_to(ROOT))]
    return made


def _lag(plt: Any, s: dict[str, Any]) -> Any:
    r = s["lag"]
    runs = sorted(r["runs"], key=lambda x: x["achieved_rate"])
    if not runs:
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    rates = [x["achieved_rate"] for x in runs]
    for key, label in (("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99")):
        axes.plot(rates, [x[key] for x in runs], marker="o", label=label)
    tuned = r.get("tuned")
    if tuned:
        axes.scatter([tuned["achieved_rate"]] * 3,
                     [tuned["p50_ms"], tuned["p95_ms"], tuned["p99_ms"]],
                     marker="x", color="black", label="p50/p95/p99, batch_max_wait_ms 50")
    axes.axvline(r["max_sustained_per_s"], color="grey", linestyle="--",
                 label=f"max sustained {r['max_sustained_per_s']:.0f}/s")
    axes.set_xlabel("insert rate (documents/s)")
    axes.set_ylabel("write to visible in Chroma (ms)")
    axes.set_title("Lag percentiles by write rate (syncd run, defaults)")
    axes.set_ylim(bottom=0)
    axes.legend()
    return figure


def _throughput(plt: Any, s: dict[str, Any]) -> Any:
    bars: list[tuple[str, float]] = []
    names = {"syncd": "syncd", "langchain": "LangChain index()", "naive": "per-event loop"}
    for name, c in s["alternatives"]["contenders"].items():
        if "per_s" in c:
            bars.append((names.get(name, name), c["per_s"]))
    sink = s.get("sink_limit") or {}
    if "raw_per_s" in sink:
        bars.append(("raw batched upserts\n(no MongoDB)", sink["raw_per_s"]))
        bars.append(("syncd on the\nsame inserts", sink["syncd_per_s"]))
    if not bars:
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    labels, values = zip(*bars, strict=True)
    colors = ["tab:blue" if label.startswith("syncd") else "tab:grey" for label in labels]
    drawn = axes.barh(labels, values, color=colors)
    axes.bar_label(drawn, fmt="%.0f/s", padding=3)
    axes.invert_yaxis()
    axes.set_xlabel("events applied per second")
    axes.set_title("Throughput against the baselines")
    axes.set_xlim(right=max(values) * 1.2)
    return figure


def _snapshot(plt: Any, s: dict[str, Any]) -> Any:
    samples = s["snapshot"].get("progress")
    if not samples or len(samples) < 3:
        return None
    points = [(b[0], (b[1] - a[1]) / (b[0] - a[0]))
              for a, b in itertools.pairwise(samples) if b[0] > a[0]]
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([t for t, _ in points], [rate for _, rate in points],
              label="documents/s over each interval")
    overall = s["snapshot"]["per_s"]
    axes.axhline(overall, color="grey", linestyle="--", label=f"overall {overall:.0f}/s")
    axes.set_xlabel("seconds since the snapshot started")
    axes.set_ylabel("documents/s")
    axes.set_ylim(bottom=0)
    axes.set_title(f"Snapshot rate over time ({s['snapshot']['documents']:,} documents)")
    windows = s["snapshot"].get("windows") or []
    if windows:  # the rate per window of documents, drawn where each window ended
        ends, at = [0.0], 0.0
        for x in windows:
            at += x["seconds"]
            ends.append(at)
        rates = [x["per_s"] for x in windows]
        axes.step(ends, [rates[0], *rates], where="pre", color="tab:orange",
                  label=f"documents/s per {s['snapshot']['window']:,} documents")
    if "raw_per_s" in s["snapshot"]:
        raw = s["snapshot"]["raw_per_s"]
        axes.axhline(raw, color="black", linestyle=":", label=f"raw upsert {raw:.0f}/s")
    axes.legend()
    return figure


def _remote(plt: Any, s: dict[str, Any]) -> Any:
    r = s["remote_embedder"]
    curve = r.get("curve") or []
    if "sink_per_s" not in r or not curve:
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    levels = [x["embed_concurrency"] for x in curve]
    axes.plot(levels, [x["per_s"] for x in curve], marker="o", label="syncd, 100 ms per request")
    axes.plot(levels, [x["bound_per_s"] for x in curve], linestyle="--", color="grey",
              label="bound: min(sink limit, concurrency x batch / latency)")
    axes.plot(levels, [x["bound_per_s"] * r["bound_share_target"] for x in curve],
              linestyle=":", color="grey", label=f"{r['bound_share_target']} of the bound")
    axes.axhline(r["no_latency"]["per_s"], color="tab:green", linestyle="-.",
                 label=f"no latency {r['no_latency']['per_s']:.0f}/s")
    axes.set_xscale("log", base=2)
    axes.set_xticks(levels, [str(c) for c in levels])
    axes.set_xlabel("embed_concurrency (requests in flight)")
    axes.set_ylabel("events/s")
    axes.set_ylim(bottom=0)
    axes.set_title("Remote embedder (100 ms per request) against its bound")
    axes.legend()
    return figure
