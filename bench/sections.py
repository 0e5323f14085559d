"""The measurements, in the order `make bench` runs them. Each takes a Context and returns
a JSON-friendly dict; the sections live in modules by what they measure."""

from __future__ import annotations

from context import Context, Sizes
from daemon_runs import lag, memory
from embedding import embedding_savings, real_model, remote_embedder
from rebuild import rebuild
from snapshot import snapshot
from throughput import alternatives, sink_limit, tracing

SECTIONS = [
    ("alternatives", alternatives),
    ("embedding_savings", embedding_savings),
    ("remote_embedder", remote_embedder),
    ("tracing", tracing),
    ("real_model", real_model),
    ("sink_limit", sink_limit),
    ("lag", lag),
    ("snapshot", snapshot),
    ("rebuild", rebuild),
    ("memory", memory),
]

__all__ = ["SECTIONS", "Context", "Sizes"]
