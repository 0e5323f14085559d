"""The systemd notify protocol, without a dependency on libsystemd.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``: a Unix datagram socket,
either a filesystem path or an abstract name written ``@name``. Each message is
newline-separated ``KEY=VALUE`` assignments (sd_notify(3)). With
``WatchdogSec=`` systemd also sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``)
and kills the service if ``WATCHDOG=1`` does not arrive within that interval.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op. A failure to send
is logged at debug level and ignored: losing a status line must never stop the
daemon, and a missed watchdog ping is exactly what the watchdog is there to judge.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Send readiness, status and watchdog messages to the service manager."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = os.environ if env is None else env
        self._address = _socket_address(self._env.get("NOTIFY_SOCKET", ""))
        self._shown: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening."""
        return self._address is not None

    def ready(self, status: str | None = None) -> None:
        """Startup finished: systemd moves the unit to "active" and starts the watchdog."""
        self._send("READY=1", *_status_lines(status))

    def watchdog(self) -> None:
        """Keep-alive; send at least every :meth:`watchdog_interval` seconds."""
        self._send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> None:
        """Draining has begun, so systemd does not read the silence as a hang."""
        self._send("STOPPING=1", *_status_lines(status))

    def status(self, text: str) -> None:
        """A one-line description shown by ``systemctl status``."""
        self._shown = text
        self._send(*_status_lines(text))

    def keep_status(self, text: str) -> None:
        """Show ``text`` unless it is already shown: called on every supervisor tick."""
        if text != self._shown:
            self.status(text)

    def watchdog_interval(self) -> float | None:
        """How often to ping, in seconds: half of ``WatchdogSec=``; None when off.

        ``$WATCHDOG_PID``, when set, names the process the watchdog is meant for;
        a child that inherited the environment must not ping on its parent's behalf.
        """
        usec = self._env.get("WATCHDOG_USEC", "")
        pid = self._env.get("WATCHDOG_PID", "")
        if pid and pid != str(os.getpid()):
            return None
        try:
            interval = int(usec)
        except ValueError:
            return None
        if interval <= 0:
            return None
        return interval / 1_000_000 / 2

    def _send(self, *lines: str) -> None:
        if self._address is None or not lines:
            return
        message = "\n".join(lines).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(message)
        except OSError as exc:
            log.debug("systemd notify %r failed: %s", lines[0], exc)


def _socket_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        # Linux abstract namespace: a leading NUL byte instead of the '@'.
        return b"\0" + value[1:].encode("utf-8")
    if value.startswith("/"):
        return value
    # vsock:// and other schemes are not needed by a daemon on a host or in a pod.
    log.debug("ignoring NOTIFY_SOCKET=%r: not a Unix socket path", value)
    return None


def _status_lines(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    # One message line per assignment: a newline would start a new KEY=VALUE.
    return ("STATUS=" + " ".join(text.splitlines()),)
