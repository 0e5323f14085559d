"""The notify protocol over real Unix datagram sockets, as systemd would receive it."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.notify import SystemdNotifier


@pytest.fixture
def short_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # sun_path holds ~107 bytes; pytest's tmp paths can be longer than that.
    path = Path("/tmp") / f"syncd-notify-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


@pytest.fixture
def listener(short_tmp: Path) -> Iterator[tuple[socket.socket, str]]:
    address = short_tmp / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(address))
    sock.settimeout(2)
    yield sock, str(address)
    sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, str]]:
    name = f"syncd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    yield sock, "@" + name
    sock.close()


def test_ready_sends_ready_and_status(listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})

    notifier.ready("2 pipelines streaming")

    assert sock.recv(4096) == b"READY=1\nSTATUS=2 pipelines streaming"


def test_each_message_kind(listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})

    notifier.ready()
    notifier.watchdog()
    notifier.status("catching up: orders")
    notifier.stopping()

    received = [sock.recv(4096) for _ in range(4)]
    assert received == [b"READY=1", b"WATCHDOG=1", b"STATUS=catching up: orders", b"STOPPING=1"]


def test_status_newlines_cannot_inject_assignments(listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    SystemdNotifier({"NOTIFY_SOCKET": address}).status("halted\nREADY=1")

    assert sock.recv(4096) == b"STATUS=halted READY=1"


def test_abstract_namespace_socket(abstract_listener: tuple[socket.socket, str]) -> None:
    sock, address = abstract_listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})

    notifier.ready()
    notifier.watchdog()

    assert sock.recv(4096) == b"READY=1"
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_reads_process_environment_by_default(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = listener
    monkeypatch.setenv("NOTIFY_SOCKET", address)

    SystemdNotifier().stopping("draining")

    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining"


def test_no_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SystemdNotifier()

    assert not notifier.enabled
    notifier.ready("x")
    notifier.watchdog()
    notifier.stopping()
    notifier.status("y")


def test_send_failure_is_logged_not_raised(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(short_tmp / "nobody-listens.sock")})

    with caplog.at_level(logging.DEBUG, logger="syncd.notify"):
        notifier.ready()
        notifier.watchdog()

    assert notifier.enabled
    assert any("READY=1" in r.getMessage() for r in caplog.records)


def test_non_unix_socket_value_is_ignored() -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"})

    assert not notifier.enabled
    notifier.ready()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_sec(
    env: dict[str, str], expected: float | None
) -> None:
    assert SystemdNotifier(env).watchdog_interval() == expected


def test_keep_status_sends_only_what_changed(listener):
    sock, address = listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
    notifier.keep_status("articles streaming, lag 0s")
    notifier.keep_status("articles streaming, lag 0s")
    notifier.keep_status("articles retrying, lag 12s: TransientError: Chroma unreachable")
    assert sock.recv(4096) == b"STATUS=articles streaming, lag 0s"
    assert sock.recv(4096) == (
        b"STATUS=articles retrying, lag 12s: TransientError: Chroma unreachable"
    )
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(4096)
