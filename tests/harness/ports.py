"""Free TCP ports on the loopback interface for servers started by tests."""

from __future__ import annotations

import os
import socket
import threading

_lock = threading.Lock()
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a port nobody is listening on right now.

    The port is found by binding to port 0 and closing the socket again, so another
    process may still take it before the caller binds; ports already returned by this
    process are never returned twice, which removes the common race between servers
    started by the same test run. Under pytest-xdist each worker takes only its share
    of the ports, so two workers never hand out the same one.
    """
    share, of = _worker_share()
    for _ in range(100 * of):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if (port >> 1) % of != share:  # Linux binds port 0 to odd ports: split on the rest
            continue
        with _lock:
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError(f"no unused free port found on {host} after {100 * of} attempts")


def _worker_share() -> tuple[int, int]:
    """(this worker's number, number of workers) under pytest-xdist, else (0, 1)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (worker.startswith("gw") and worker[2:].isdigit() and count.isdigit()):
        return 0, 1
    return int(worker[2:]) % max(int(count), 1), max(int(count), 1)
