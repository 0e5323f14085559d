"""A Chroma HTTP client whose every request gives up after ``chroma.timeout_s``.

chromadb's HTTP client sends its requests with no timeout at all (``httpx.Client(
timeout=None)``, and no setting changes it), so a Chroma server that accepts
connections but never answers (hung, stopped, overloaded) would hold syncd forever: no
error, no retry, ``/readyz`` still ready. The client's session gets the timeout as soon
as it exists. The constructor's own request (the tenant check) runs before that, so
the constructor runs on a thread of its own and is given up after the same time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx

from syncd.errors import SinkUnavailableError


def with_timeout(build: Callable[[], Any], timeout_s: float, *, where: str) -> Any:
    """``build()`` (which creates a chromadb HTTP client), with ``timeout_s`` on every
    request it and the client it returns make; ``SinkUnavailableError`` past it."""
    done: dict[str, Any] = {}

    def construct() -> None:
        try:
            done["client"] = build()
        except Exception as exc:  # noqa: BLE001 - raised again in the caller's thread
            done["error"] = exc

    thread = threading.Thread(target=construct, name="chroma-connect", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise SinkUnavailableError(
            f"Chroma at {where} did not answer within chroma.timeout_s ({timeout_s:g} s)",
            hint="check that the Chroma server is running and not overloaded, then run the "
            "command again; a running syncd retries by itself",
        )
    if "error" in done:
        raise done["error"]
    client = done["client"]
    client._server._session.timeout = httpx.Timeout(timeout_s)
    return client
