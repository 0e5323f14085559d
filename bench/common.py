"""Servers, configs and measurement helpers shared by the benchmark sections."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.helpers import write_config  # noqa: E402
from tests.harness.chroma import ChromaServer, close_client  # noqa: E402
from tests.harness.mongo import MongoServer, start_mongo  # noqa: E402

PYTHON = sys.executable
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Servers:
    mongo: MongoServer
    chroma: ChromaServer
    workdir: Path
    _clients: list[Any] = field(default_factory=list)

    def mongo_client(self) -> Any:
        import pymongo

        client: Any = pymongo.MongoClient(self.mongo.uri, serverSelectionTimeoutMS=10_000)
        self._clients.append(client)
        return client

    def chroma_client(self) -> Any:
        return self.chroma.client()

    def config(self, name: str, pipelines: list[dict[str, Any]],
               extra: Mapping[str, Any] | None = None) -> Path:
        path = self.workdir / f"{name}.toml"
        return write_config(
            path,
            mongo_uri=self.mongo.uri,
            chroma={"mode": "http", "host": self.chroma.host, "port": self.chroma.port},
            pipelines=pipelines,
            checkpoint_db="syncd_bench",
            extra=extra,
        )

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self.chroma.close_clients()
        self.chroma.stop()
        if self.mongo.kind != "external":
            self.mongo.stop()


def start_servers(workdir: Path, *, history_size: int) -> Servers:
    workdir.mkdir(parents=True, exist_ok=True)
    mongo = start_mongo(workdir / "mongo", history_size=history_size)
    try:
        chroma = ChromaServer(workdir / "chroma")
    except BaseException:
        mongo.stop()
        raise
    return Servers(mongo, chroma, workdir)


_FRESH = itertools.count(1)


@contextlib.contextmanager
def fresh_chroma(servers: Servers, label: str) -> Iterator[Servers]:
    """``servers`` with a new, empty Chroma server in place of theirs, removed afterwards.

    Chroma's cost per record grows with everything the server has held, so a contender
    that runs on a server others have filled is slower than one that runs first: each
    contender of a ratio gets one of these.
    """
    path = servers.workdir / f"chroma-{label}-{next(_FRESH)}"
    chroma = ChromaServer(path)
    try:
        yield Servers(servers.mongo, chroma, servers.workdir)
    finally:
        chroma.close_clients()
        chroma.stop()
        shutil.rmtree(path, ignore_errors=True)


def load_average() -> float:
    """The 1-minute load average: how much other work shared the cores just now."""
    return round(os.getloadavg()[0], 2)


def alternate(contenders: list[Any], runs: int) -> Iterator[tuple[int, Any]]:
    """(run, contender) in the order A B, B A, A B, ...: run k reverses run k-1's order, so
    neither contender always runs first (A/B/B/A for two runs)."""
    for k in range(runs):
        for contender in contenders if k % 2 == 0 else contenders[::-1]:
            yield k, contender


def ts_arg(ts: Any) -> str:
    return f"{ts.time}.{ts.inc}"


def drain(config: Path, pipeline: str, *, start_at: Any = None, until: Any = None,
          snapshot: bool = False, tracing: str = "off", profile: Path | None = None,
          timeout: float = 900, warmup: int = 0, stage_times: bool = False,
          root: Path = ROOT) -> dict[str, Any]:
    """Run bench/drain.py in a fresh process; its JSON result. ``root``: the source tree
    whose drain.py and syncd run (another commit's, for a baseline)."""
    cmd = [PYTHON, str(root / "bench" / "drain.py"), "--config", str(config),
           "--pipeline", pipeline, "--tracing", tracing, "--timeout", str(timeout)]
    if start_at is not None:
        cmd += ["--start-at", ts_arg(start_at)]
    if until is not None:
        cmd += ["--until", ts_arg(until)]
    if snapshot:
        cmd.append("--snapshot")
    if warmup:
        cmd += ["--warmup", str(warmup)]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    if stage_times:
        cmd.append("--stage-times")
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 120,
                          check=False, cwd=config.parent, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"drain failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def repeat(times: int, fn: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
    return [fn(k) for k in range(times)]


def drop_collection(chroma: Any, name: str) -> None:
    with contextlib.suppress(Exception):  # it may not exist
        chroma.delete_collection(name)


__all__ = ["BENCH_PYTHON", "ROOT", "Servers", "alternate", "close_client", "drain",
           "drop_collection", "fresh_chroma", "load_average", "log", "median", "repeat",
           "start_servers", "ts_arg"]
