"""Sections that run the real `syncd run` daemon: lag under a steady write rate, and
memory while draining a large backlog."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import workload as w
from common import PYTHON, ROOT, drop_collection, load_average, log
from context import Context, settings

from syncd.checkpoint import Checkpoint, open_store
from syncd.mapping import Mapper
from tests.harness.daemon import SyncdProcess

# --- the daemon, for lag and memory ------------------------------------------------------


class Daemon:
    """`syncd run` as its own process, started at a seeded position."""

    def __init__(self, ctx: Context, name: str, table: dict[str, Any]) -> None:
        self.ctx = ctx
        self.name = name
        self.config = ctx.servers.config(name, [table])
        self.settings = settings(self.config)
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


class Tailer:
    """bench/alternatives.py's ``tailer`` as its own process: the change stream written to
    Chroma a batch at a time with nothing else (no lookup, no checkpoint): the
    hand-written loop syncd's lag is compared with."""

    def __init__(self, ctx: Context, name: str, start: Any) -> None:
        self.ctx, self.name = ctx, name
        forever = f"{2**31 - 1}.0"
        self.process = SyncdProcess([], command=[
            PYTHON, str(ROOT / "bench" / "alternatives.py"), "tailer",
            "--mongo", ctx.servers.mongo.uri, "--chroma-port", str(ctx.servers.chroma.port),
            "--database", "bench", "--collection", "lag", "--chroma-collection", name,
            "--start-at", f"{start.time}.{start.inc}", "--until", forever],
            log_path=ctx.servers.workdir / f"{name}.log", cwd=ctx.servers.workdir)

    def start(self) -> None:
        drop_collection(self.ctx.chroma, self.name)
        self.process.start()

    def stop(self) -> None:
        self.process.stop(timeout=30)
        drop_collection(self.ctx.chroma, self.name)


# --- 3. lag ----------------------------------------------------------------------------------

POLL_S = 0.01  # the reader's pause between two looks at Chroma


def _lag_run(ctx: Context, daemon: Any, coll: Any, rate: float | None, seconds: float,
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
            time.sleep(POLL_S)
            if not writing.is_set() and time.monotonic() - stopped[0] > 60:
                return

    load = load_average()
    stopped = [float("inf")]
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    # Built before the clock starts: under load, building them took most of a short window.
    docs = [w.document(k, dims=32)
            for k in range(first_id, first_id + int((rate or 2_500) * seconds))]
    began = time.monotonic()
    i = first_id
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

    return {"target_rate": rate, "achieved_rate": count / write_s, "load": load,
            "writes": count,
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
        flat_seconds = min(seconds, 5.0)
        flat_out = _lag_run(ctx, daemon, coll, None, flat_seconds, 0)
        # Sustained: what syncd applied from the writer's start until the last write was
        # visible, or the writer's own pace if syncd kept up with it.
        sustained = flat_out["writes"] / max(flat_out["drain_s"], flat_seconds)
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
    # A hand-written loop at the same half rate, written to the same Chroma server.
    tailer = Tailer(ctx, "lagtailer", w.op_time(ctx.mongo))
    tailer.start()
    try:
        probe = 10**9 + 2
        coll.insert_one(w.document(probe, dims=32))
        _wait_visible(ctx, tailer.name, f"i:{probe}", tailer.process)
        bare = _lag_run(ctx, tailer, coll, max(1.0, sustained * 0.5), seconds,
                         tuned["next_id"])
        bare["share_of_max"] = 0.5
        log(f"  bare tailer at {bare['target_rate']:,.0f}/s: p50 {bare['p50_ms']:,.0f} ms, "
            f"p99 {bare['p99_ms']:,.0f} ms")
    finally:
        tailer.stop()
    return {"max_sustained_per_s": sustained, "flat_out": flat_out, "runs": runs,
            "tuned": tuned, "tailer": bare, "seconds_per_rate": seconds}


def _wait_visible(ctx: Context, name: str, record_id: str, process: Any) -> None:
    """Until ``record_id`` is in the collection ``name`` (the process is reading)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not process.is_running():
            raise RuntimeError(f"{name} exited:\n{process.output()[-3000:]}")
        try:
            got = ctx.chroma.get_collection(name).get(ids=[record_id], include=[])["ids"]
        except Exception:  # not created yet
            got = []
        if got:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{name} did not write {record_id} within 120 s")


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
    load = load_average()
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
            "rss_mb_samples": [round(kb / 1024, 1) for kb in samples], "load": load}


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


