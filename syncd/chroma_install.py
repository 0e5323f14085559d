"""Which Chroma package provides the ``chromadb`` module here, and what it can do.

``pip install syncd`` brings ``chromadb-client``, Chroma's HTTP-only client (a few MB);
``pip install 'syncd[embedded]'`` adds ``chromadb``, the same module plus the in-process
engine (``chromadb_rust_bindings``, with onnxruntime, the Kubernetes client and more:
several hundred MB). Both packages install the ``chromadb`` module. ``chromadb-client``
adds one file, ``chromadb/is_thin_client.py``, which ``chromadb`` neither ships nor
removes, so with both installed ``chromadb`` refuses to run in process
(chroma-core/chroma#5289). At the same version the two packages' other files are
identical, so when the engine is installed and the versions agree syncd sets that
marker aside for an embedded client; when they disagree it says how to align them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from types import ModuleType

from syncd.errors import ConfigError

EMBEDDED_EXTRA = "syncd[embedded]"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def has_engine() -> bool:
    """True when in-process Chroma (the full ``chromadb`` package) is installed."""
    return _version("chromadb") is not None and (
        importlib.util.find_spec("chromadb_rust_bindings") is not None
    )


def check(mode: str) -> None:
    """Raise :class:`ConfigError` when the installed packages cannot serve ``mode``."""
    full, thin = _version("chromadb"), _version("chromadb-client")
    if full is None and thin is None:
        raise ConfigError(
            "no Chroma client is installed (neither chromadb-client nor chromadb)",
            hint="reinstall syncd: pip install syncd",
        )
    if full is not None and thin is not None and full != thin:
        raise ConfigError(
            f"chromadb {full} and chromadb-client {thin} are both installed at different "
            "versions; they share the chromadb module, so it is a mix of the two",
            hint=f"install matching versions: pip install 'chromadb-client=={full}'",
        )
    if mode == "embedded" and not has_engine():
        raise ConfigError(
            'chroma.mode = "embedded" needs in-process Chroma, which this installation '
            "does not have (it talks to a Chroma server over HTTP only)",
            hint=f"pip install '{EMBEDDED_EXTRA}', or run a Chroma server and set "
            'chroma.mode = "http"',
        )


def load(mode: str) -> ModuleType:
    """The ``chromadb`` module, able to serve ``mode`` (see the module docstring)."""
    check(mode)
    import chromadb
    import chromadb.config

    if mode == "embedded" and getattr(chromadb.config, "is_thin_client", False):
        # Only reached with the engine installed at chromadb-client's own version: the
        # marker is chromadb-client's, not true of this installation.
        chromadb.config.is_thin_client = False
    return chromadb
