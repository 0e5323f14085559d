"""An HTTP/1.1 proxy in front of a server (Chroma) that the tests' faulty proxies build
on: :class:`ForwardingProxy` forwards every request; a subclass answers some itself
(:meth:`ForwardingProxy.answer`) or holds them back (:meth:`ForwardingProxy.delay`)."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import threading
import time
from typing import Any

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})


class ForwardingProxy:
    """Forward HTTP/1.1 requests on 127.0.0.1:`port` to `target_host`:`target_port`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                answered = proxy.answer(self.path, length)
                if answered is not None:
                    # A client that hung up first was refused all the same.
                    with contextlib.suppress(OSError):
                        self._answer(answered[0], [("Content-Type", "text/html")], answered[1])
                    return
                delay = proxy.delay(self.path)
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
                        proxy.landed_late()
                    kept = [(k, v) for k, v in reply.getheaders() if k.lower() not in _HOP_BY_HOP]
                    self._answer(reply.status, kept, data)
                except OSError:
                    pass  # the client gave up (on a held request: it was applied all the same)
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

    def answer(self, path: str, length: int) -> tuple[int, bytes] | None:
        """The status and body to answer a request with instead of forwarding it."""
        return None

    def delay(self, path: str) -> float:
        """Seconds to hold a request before it is forwarded."""
        return 0.0

    def landed_late(self) -> None:
        """A request held back was forwarded and answered."""

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
