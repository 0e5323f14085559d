"""A local OpenAI-compatible `/v1/embeddings` server that counts what it embeds.

It answers with the hashing embedder's vectors, so results are deterministic and
tests can compute the expected embeddings themselves. `refuse` (a predicate on one
input, or None) makes it answer 400 to any request holding an input it matches, as
APIs do for an input they will not embed; `refuse = lambda _: True` is an API that
refuses everything. `delay_s` makes it answer each request that long after it arrived,
as a remote embedding service does; `max_in_flight` is the most requests it had at once, each
counted from its arrival (a held one too).
`hold(n)` lets n more requests through and holds the ones after them unanswered until
`release()`, to keep a client at a known point.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from syncd.embedder import HashingEmbedder


class _Server(ThreadingHTTPServer):
    # Many clients' requests at once: the default backlog of 5 drops connection attempts
    # beyond it, and each dropped one waits a second for its retransmission.
    request_queue_size = 128


class EmbeddingAPI:
    def __init__(self, dimensions: int = 32, api_key: str = "sk-test-key-123456") -> None:
        self.dimensions = dimensions
        self.api_key = api_key
        self.inputs: list[str] = []
        self.requests = 0
        self.refused = 0
        self.refuse: Callable[[str], bool] | None = None
        self.delay_s = 0.0
        # Answers 200 that are not answers, while set: "html" (a proxy's page), "short"
        # (one vector fewer than inputs).
        self.garble: str | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._waiting = 0
        self._passes: int | None = None  # requests let through before holding; None: all
        self._opened = threading.Condition(self._lock)
        self._embedder = HashingEmbedder(dimensions)
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as API servers do
            # The headers and the body go out in two writes: with Nagle's algorithm the
            # body waits for the client's delayed ACK of the headers (~40 ms a request),
            # which API servers do not add.
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                api._handle(self)

            def log_message(self, *args: Any) -> None:
                """Quiet."""

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> EmbeddingAPI:
        self._thread.start()
        return self

    def vector(self, text: str) -> list[float]:
        """What this API answers for `text` (without counting it as a request)."""
        return [float(x) for x in self._embedder.embed([text])[0]]

    def hold(self, passes: int = 0) -> None:
        with self._lock:
            self._passes = passes

    def release(self) -> None:
        with self._lock:
            self._passes = None
            self._opened.notify_all()

    def held(self) -> int:
        """How many requests wait for `release()`."""
        with self._lock:
            return self._waiting

    def close(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            # In flight from its arrival: a request held for release() is one the client
            # has sent and waits for, as much as one being answered.
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._waiting += 1
            while self._passes is not None and self._passes <= 0:
                self._opened.wait()
            self._waiting -= 1
            if self._passes is not None:
                self._passes -= 1
        arrived = time.monotonic()
        try:
            status, payload = self._answer(handler)
            # The answer is computed while the request waits: it goes out delay_s after
            # the request arrived, not delay_s plus this process's own work.
            time.sleep(max(0.0, self.delay_s - (time.monotonic() - arrived)))
        finally:
            # Before the answer goes out: the client may send its next request at once.
            with self._lock:
                self.in_flight -= 1
        self._send(handler, status, payload)

    def _answer(self, handler: BaseHTTPRequestHandler) -> tuple[int, Any]:
        length = int(handler.headers.get("content-length", 0))
        body = json.loads(handler.rfile.read(length))
        if handler.headers.get("authorization") != f"Bearer {self.api_key}":
            return 401, {"error": {"message": "bad key"}}
        texts = body["input"]
        if self.garble == "html":
            return 200, "<html><body>502 upstream maintenance</body></html>"
        refuse = self.refuse
        if refuse is not None and any(refuse(text) for text in texts):
            with self._lock:
                self.refused += 1
            message = "'input' is invalid for this model"
            return 400, {"error": {"message": message, "type": "invalid_request"}}
        with self._lock:
            self.requests += 1
            self.inputs.extend(texts)
        vectors = self._embedder.embed(texts)
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        if self.garble == "short":
            data = data[:-1]
        return 200, {"object": "list", "data": data, "model": body.get("model")}

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
        html = isinstance(payload, str)
        raw = payload.encode() if html else json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("content-type", "text/html" if html else "application/json")
        handler.send_header("content-length", str(len(raw)))
        handler.end_headers()
        handler.wfile.write(raw)


@contextmanager
def embedding_api(dimensions: int = 32, *, delay_s: float = 0.0) -> Iterator[EmbeddingAPI]:
    api = EmbeddingAPI(dimensions)
    api.delay_s = delay_s
    api.start()
    try:
        yield api
    finally:
        api.close()
