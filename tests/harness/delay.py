"""An HTTP proxy in front of Chroma that holds some requests back before it forwards
them, as a proxy or load balancer that delivers a request late does: the client gives
up waiting (its timeout), sends the request again, and moves on, and the request it
gave up on still reaches Chroma and is applied, after whatever was written meanwhile."""

from __future__ import annotations

from tests.harness.http_proxy import ForwardingProxy


class DelayProxy(ForwardingProxy):
    """Forward HTTP/1.1 requests on 127.0.0.1:`port` to `target_host`:`target_port`.

    After :meth:`hold`, requests whose path contains its text are held for its seconds
    before they are forwarded (and are forwarded then, whatever happened meanwhile);
    :meth:`release` stops holding new ones. ``held`` counts the requests held,
    ``landed`` those of them forwarded and answered by Chroma since.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._rule: tuple[str, float] | None = None
        self.held = 0
        self.landed = 0
        super().__init__(target_host, target_port)

    def hold(self, path_part: str, seconds: float) -> None:
        with self._lock:
            self._rule = (path_part, seconds)

    def release(self) -> None:
        """Forward new requests at once; those held already are forwarded when due."""
        with self._lock:
            self._rule = None

    def delay(self, path: str) -> float:
        with self._lock:
            if self._rule is None or self._rule[0] not in path:
                return 0.0
            self.held += 1
            return self._rule[1]

    def landed_late(self) -> None:
        with self._lock:
            self.landed += 1
