"""Stop signals that arrive before the daemon can drain.

Importing syncd's dependencies takes a second or so; a SIGTERM in that time (a rollout
that changes its mind, systemd stopping a unit that just started) would otherwise kill
the process by the signal. :func:`catch_early` is the first thing the command line
does: its handlers only note the signal. `syncd run` hands the note to the daemon,
which then exits 0 without taking a lease or starting a pipeline; every other command
gets the default behaviour back with :func:`restore`, which delivers again a signal
that came meanwhile.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

received = threading.Event()
_noted: list[int] = []
_previous: dict[int, object] = {}


def catch_early() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may install handlers (tests call main() elsewhere)
    for signum in STOP_SIGNALS:
        _previous.setdefault(signum, signal.signal(signum, _note))


def _note(signum: int, _frame: FrameType | None) -> None:
    _noted.append(signum)
    received.set()


def restore() -> None:
    """Handle stop signals as before :func:`catch_early`; re-deliver one that came."""
    for signum, handler in _previous.items():
        signal.signal(signum, handler)  # type: ignore[arg-type]
    _previous.clear()
    if _noted:
        os.kill(os.getpid(), _noted[0])
