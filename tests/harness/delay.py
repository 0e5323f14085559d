"""An HTTP proxy in front of Chroma that holds some requests back before it forwards
them, as a proxy or load balancer that delivers a request late does: the client gives
up waiting (its timeout), sends the request again, and moves on, and the request it
gave up on still reaches Chroma and is applied, after whatever was written meanwhile."""

from __future__ import annotations

import http.client
import http.server
import threading
import time
from typing import Any

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})


class DelayProxy:
    """Forward HTTP/1.1 requests on 127.0.0.1:`port` to `target_host`:`target_port`.

    After :meth:`hold`, requests whose path contains its text are held for its seconds
    before they are forwarded (and are forwarded then, whatever happened meanwhile);
    :meth:`release` stops holding new ones. ``held`` counts the requests held,
    ``landed`` those of them forwarded and answered by Chroma since.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._rule: tuple[str, float] | None = None
        self._lock = threading.Lock()
        self.held = 0
        self.landed = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                delay = proxy._delay_for(self.path)
                if delay:
                    time.sleep(delay)
                upstream = http.client.HTTPConnection(target_host, target_port, timeout=300)
                try:
                    headers = {
                        k: v
                        for k, v in self.headers.items()
                        if k.lower() not in ("host", *_HOP_BY_HOP)
                    }
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    reply = upstream.getresponse()
                    data = reply.read()
                    if delay:
                        with proxy._lock:
                            proxy.landed += 1
                    kept = [(k, v) for k, v in reply.getheaders() if k.lower() not in _HOP_BY_HOP]
                    self._answer(reply.status, kept, data)
                except OSError:
                    pass  # the client gave up on a held request: it was applied all the same
                finally:
                    upstream.close()

            def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def hold(self, path_part: str, seconds: float) -> None:
        with self._lock:
            self._rule = (path_part, seconds)

    def release(self) -> None:
        """Forward new requests at once; those held already are forwarded when due."""
        with self._lock:
            self._rule = None

    def _delay_for(self, path: str) -> float:
        with self._lock:
            if self._rule is None or self._rule[0] not in path:
                return 0.0
            self.held += 1
            return self._rule[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
