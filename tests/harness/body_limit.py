"""An HTTP proxy in front of Chroma that refuses request bodies over a size, as a
reverse proxy with a body limit does (nginx's ``client_max_body_size``): HTTP 413."""

from __future__ import annotations

import http.client
import http.server
import threading
from typing import Any

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})


class BodyLimitProxy:
    """Forward HTTP/1.1 requests on 127.0.0.1:`port` to `target_host`:`target_port`;
    a body over `limit` bytes is answered 413 and not forwarded."""

    def __init__(self, target_host: str, target_port: int, limit: int) -> None:
        self.limit = limit
        self.refused = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if length > proxy.limit:
                    proxy.refused += 1
                    self._answer(413, [("Content-Type", "text/html")], b"Payload too large")
                    return
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
                    kept = [(k, v) for k, v in reply.getheaders() if k.lower() not in _HOP_BY_HOP]
                    self._answer(reply.status, kept, data)
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

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
