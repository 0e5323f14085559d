"""Free TCP ports on the loopback interface for servers started by tests."""

from __future__ import annotations

import socket
import threading

_lock = threading.Lock()
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a port nobody is listening on right now.

    The port is found by binding to port 0 and closing the socket again, so another
    process may still take it before the caller binds; ports already returned by this
    process are never returned twice, which removes the common race between servers
    started by the same test run.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        with _lock:
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError(f"no unused free port found on {host} after 100 attempts")
