"""An HTTP proxy in front of Chroma that refuses request bodies over a size, as a
reverse proxy with a body limit does (nginx's ``client_max_body_size``): HTTP 413."""

from __future__ import annotations

from tests.harness.http_proxy import ForwardingProxy


class BodyLimitProxy(ForwardingProxy):
    """Forward HTTP/1.1 requests on 127.0.0.1:`port` to `target_host`:`target_port`;
    a body over `limit` bytes is answered 413 and not forwarded."""

    def __init__(self, target_host: str, target_port: int, limit: int) -> None:
        self.limit = limit
        self.refused = 0
        super().__init__(target_host, target_port)

    def answer(self, path: str, length: int) -> tuple[int, bytes] | None:
        if length <= self.limit:
            return None
        with self._lock:
            self.refused += 1
        return 413, b"Payload too large"
