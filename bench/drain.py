"""Drain a backlog with syncd's Pipeline in a fresh process and report what it cost.

The process builds the pipeline exactly as ``syncd run`` does (Telemetry, Runtime,
Runtime.pipeline), without the lease thread and the HTTP listener, so start-up
(imports, connecting) is outside the measured window. It prints one JSON line:
wall seconds, this process's CPU seconds (user + system, every thread but the
script's own watcher) and each thread's, peak RSS, the events applied and the texts
embedded. ``--profile`` profiles every thread by its CPU time.

    .venv/bin/python bench/drain.py --config FILE --pipeline NAME
        (--start-at T.I --until T.I | --snapshot) [--tracing off|noop] [--profile FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bson.timestamp import Timestamp
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from syncd import config, embedder
from syncd.checkpoint import Checkpoint
from syncd.mapping import Mapper
from syncd.runtime import Runtime
from syncd.telemetry import Telemetry


class CountingExporter(SpanExporter):
    """Receives every span through the SDK's BatchSpanProcessor and drops it."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class CountingEmbedder:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.identity = inner.identity
        self.dimensions = inner.dimensions
        self.texts = 0
        self.calls = 0

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls += 1
        self.texts += len(texts)
        return self.inner.embed(texts)  # type: ignore[no-any-return]

    def submit(self, texts: Sequence[str]) -> Any:
        """Send texts ahead as the wrapped embedder does (an API), counting them."""
        pending = embedder.submit(self.inner, texts)
        if pending is not None:
            self.calls += 1
            self.texts += len(texts)
        return pending

    def close(self) -> None:
        self.inner.close()


# How often the watcher looks for the checkpoint that ends the window: the window's
# resolution. Every 5 ms, its wake-ups cost 70-90 µs of CPU per event in drains of
# 5,000 events (its thread's own CPU, at 150-200 events/s).
WATCH_S = 0.02
WATCHER = "drain-watch"


def _ts(text: str) -> Timestamp:
    t, _, i = text.partition(".")
    return Timestamp(int(t), int(i or 0))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """VmHWM: ru_maxrss would carry over the parent's size from before exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _profile_threads(skip: threading.Thread) -> list[Any]:
    """cProfile profilers: the first for the pipeline's thread, one more for every thread
    started from now on (the planner, which reads, maps and looks up ahead of the writer),
    except ``skip`` (this script's watcher). They count each thread's own CPU time: with
    two busy threads, wall time would charge a call with the other thread's turns at the
    GIL (hashing a vector releases the GIL and waits to get it back)."""
    import cProfile

    profilers: list[Any] = [cProfile.Profile(time.thread_time)]

    def start(frame: Any, event: str, arg: Any) -> None:
        # The first event of a new thread: hand the thread over to a profiler of its own.
        sys.setprofile(None)
        if threading.current_thread() is not skip:
            profiler = cProfile.Profile(time.thread_time)
            profilers.append(profiler)
            profiler.enable()

    threading.setprofile(start)
    return profilers


def _dump_profiles(profilers: list[Any], path: str) -> None:
    """All threads' profiles merged into one pstats file at ``path``."""
    import pstats

    for profiler in profilers:
        profiler.create_stats()
    stats = pstats.Stats(profilers[0])
    for profiler in profilers[1:]:
        if profiler.stats:
            stats.add(profiler)
    stats.dump_stats(path)


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) of each live thread of this process, by thread name."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        name = names.get(int(task.name), f"thread {task.name}")
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _time_stages(pipeline: Any, out: list[tuple[float, str, float]]) -> None:
    """Append (seconds since now, stage, its seconds) for each stage the telemetry times,
    each page the snapshot's scan reads ("find") and each checkpoint save."""
    began = time.perf_counter()
    telemetry = pipeline.applier.telemetry
    observe = telemetry._observe_stage

    def observed(name: str, seconds: float) -> None:
        out.append((round(time.perf_counter() - began, 3), name, seconds))
        observe(name, seconds)

    telemetry._observe_stage = observed
    scan = pipeline.source.scan

    def timed_scan(*a: Any, **kw: Any) -> Any:
        pages = scan(*a, **kw)
        while True:
            clock = time.perf_counter()
            try:
                page = next(pages)
            except StopIteration:
                return
            observed("find", time.perf_counter() - clock)
            yield page

    pipeline.source.scan = timed_scan
    save = pipeline.progress.save

    def timed_save(*a: Any, **kw: Any) -> Any:
        clock = time.perf_counter()
        try:
            return save(*a, **kw)
        finally:
            out.append((round(time.perf_counter() - began, 3), "checkpoint_save",
                        time.perf_counter() - clock))

    pipeline.progress.save = timed_save


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--start-at")
    parser.add_argument("--until")
    parser.add_argument("--snapshot", action="store_true")
    parser.add_argument("--tracing", choices=["off", "noop"], default="off")
    parser.add_argument("--profile")
    parser.add_argument("--stage-times", action="store_true",
                        help="report each timed stage (and each scan page and checkpoint save)")
    parser.add_argument("--timeout", type=float, default=900,
                        help="stop after this many seconds and report how far it got")
    parser.add_argument("--warmup", type=int, default=0,
                        help="embed this many texts before timing (a model's first batch is slow)")
    args = parser.parse_args()

    settings = config.load(args.config)
    ps = settings.pipeline(args.pipeline)
    exporter = CountingExporter() if args.tracing == "noop" else None
    telemetry = Telemetry(settings, span_exporter=exporter)
    telemetry.start()
    runtime = Runtime(settings, telemetry)
    stop = threading.Event()
    if args.start_at:
        cp = Checkpoint(pipeline=ps.name, fingerprint=Mapper(ps).fingerprint,
                        phase="streaming", start_at=_ts(args.start_at))
        runtime.store.save(cp, history_reason="benchmark start position")
    pipeline = runtime.pipeline(ps, stop=stop)
    # Connect to Chroma before the window, as to MongoDB: the pipeline would do it on its
    # first step, and importing chromadb and building its client cost ~1.5 s of CPU here,
    # which the raw upsert it is compared with also spends before its clock starts.
    runtime.chroma  # noqa: B018
    counter = None
    if pipeline.embedder is not None:
        counter = CountingEmbedder(pipeline.embedder)
        pipeline.applier.embedder = counter
    until = _ts(args.until) if args.until else None
    stages: list[tuple[float, str, float]] = []
    if args.stage_times:
        _time_stages(pipeline, stages)
    if counter is not None and args.warmup:
        counter.inner.embed([f"warm-up text {k}" for k in range(args.warmup)])

    def done() -> bool:
        cp = pipeline.checkpoint
        if cp is None:
            return False
        if args.snapshot:
            return cp.phase == "streaming"
        return cp.cluster_time is not None and until is not None and cp.cluster_time >= until

    finished: dict[str, float] = {}
    threads_end: dict[str, float] = {}
    progress: list[tuple[float, int]] = []  # (seconds, documents scanned) while snapshotting

    def watch() -> None:
        deadline = time.monotonic() + args.timeout
        started, last_count = time.monotonic(), -1
        while not stop.is_set():
            now = time.monotonic()
            snap = pipeline.checkpoint.snapshot if args.snapshot and pipeline.checkpoint else None
            # Each time the count moves (within WATCH_S): the ends of the pages, between
            # which a window's boundary is interpolated, however large the pages are.
            if snap is not None and snap.scanned != last_count:
                last_count = snap.scanned
                progress.append((round(now - started, 3), snap.scanned))
            if done():
                finished["wall"] = time.perf_counter()
                finished["cpu"] = cpu_seconds()
                threads_end.update(thread_cpu_seconds())
                stop.set()
                return
            if time.monotonic() > deadline:
                finished["wall"] = time.perf_counter()
                finished["cpu"] = cpu_seconds()
                finished["timed_out"] = 1.0
                threads_end.update(thread_cpu_seconds())
                stop.set()
                return
            time.sleep(WATCH_S)

    watcher = threading.Thread(target=watch, name=WATCHER, daemon=True)
    profilers = _profile_threads(watcher) if args.profile else None
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    threads_start = thread_cpu_seconds()
    watcher.start()
    if profilers is not None:
        profilers[0].enable()
    pipeline.run()
    if profilers is not None:
        profilers[0].disable()
    watcher.join()
    if profilers is not None:
        _dump_profiles(profilers, args.profile)
    if "wall" not in finished:
        print(json.dumps({"error": "the pipeline stopped before it caught up"}))
        return 1
    telemetry.force_flush()
    cp = pipeline.checkpoint
    result = {
        "wall_s": finished["wall"] - wall0,
        # The watcher is this script's, not syncd's: its own CPU is left out.
        "cpu_s": finished["cpu"] - cpu0 - threads_end.get(WATCHER, 0.0),
        "peak_rss_mb": peak_rss_mb(),
        "counts": dict(cp.counts) if cp else {},
        "embedded_texts": counter.texts if counter else 0,
        "embed_calls": counter.calls if counter else 0,
        "spans": exporter.spans if exporter else 0,
        "timed_out": "timed_out" in finished,
        "scanned": cp.snapshot.scanned if cp is not None and cp.snapshot is not None else None,
        "progress": progress,
        "stages": stages,
        # Threads started within the window (the planner) count from zero.
        "thread_cpu_s": {name: round(cpu - threads_start.get(name, 0.0), 3)
                         for name, cpu in threads_end.items()},
    }
    runtime.close()
    telemetry.shutdown()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
