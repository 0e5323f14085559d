"""TcpProxy forwards bytes and injects the faults the integration tests rely on."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness.chroma import ChromaServer, chroma_settings, close_client
from tests.harness.proxy import TcpProxy


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except ConnectionError:
            pass  # the proxy resets connections on purpose


class _EchoServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = False  # server_close() joins handler threads: nothing leaks


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    server = _EchoServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="echo-server"
    )
    thread.start()
    host, port = server.server_address[:2]
    yield str(host), port
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


ProxyFactory = Callable[..., TcpProxy]


def _connect(proxy: TcpProxy) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=5)


def _roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def _is_dead(sock: socket.socket) -> bool:
    """True when the peer has closed or reset the connection."""
    try:
        sock.sendall(b"ping")
        return sock.recv(16) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def _connection_fails(proxy: TcpProxy) -> bool:
    """True when a new connection is refused, reset during connect, or dies at once."""
    try:
        sock = _connect(proxy)
    except ConnectionError:
        return True
    with sock:
        return _is_dead(sock)


def test_forwards_bytes_both_ways(
    tcp_proxy_factory: ProxyFactory, echo_server: tuple[str, int]
) -> None:
    proxy = tcp_proxy_factory(*echo_server)
    payload = bytes(range(256)) * 1024  # larger than one chunk, so ordering matters
    with _connect(proxy) as sock:
        assert _roundtrip(sock, payload) == payload
    assert proxy.accepted == 1
    assert proxy.address == f"127.0.0.1:{proxy.port}"


def test_many_concurrent_connections(
    tcp_proxy_factory: ProxyFactory, echo_server: tuple[str, int]
) -> None:
    proxy = tcp_proxy_factory(*echo_server)
    socks = [_connect(proxy) for _ in range(50)]
    try:
        for i, sock in enumerate(socks):
            assert _roundtrip(sock, f"conn-{i}".encode()) == f"conn-{i}".encode()
        assert proxy.active == 50
    finally:
        for sock in socks:
            sock.close()
    assert proxy.accepted == 50


def test_cut_breaks_open_connections(
    tcp_proxy_factory: ProxyFactory, echo_server: tuple[str, int]
) -> None:
    proxy = tcp_proxy_factory(*echo_server)
    with _connect(proxy) as first, _connect(proxy) as second:
        assert _roundtrip(first, b"hello") == b"hello"
        assert _roundtrip(second, b"hello") == b"hello"
        assert proxy.cut() == 2
        assert _is_dead(first)
        assert _is_dead(second)
    # The proxy still forwards new connections after a cut.
    with _connect(proxy) as third:
        assert _roundtrip(third, b"again") == b"again"


def test_refuse_fails_new_connections_then_heal(
    tcp_proxy_factory: ProxyFactory, echo_server: tuple[str, int]
) -> None:
    proxy = tcp_proxy_factory(*echo_server)
    with _connect(proxy) as before:
        assert _roundtrip(before, b"x") == b"x"
        proxy.refuse(True)
        assert _connection_fails(proxy)
        assert proxy.refused == 1
        # Refusing only affects new connections.
        assert _roundtrip(before, b"still") == b"still"
    proxy.heal()
    with _connect(proxy) as after:
        assert _roundtrip(after, b"back") == b"back"


def test_latency_delays_each_chunk_and_heal_removes_it(
    tcp_proxy_factory: ProxyFactory, echo_server: tuple[str, int]
) -> None:
    proxy = tcp_proxy_factory(*echo_server)
    proxy.set_latency(0.2)
    with _connect(proxy) as sock:
        started = time.monotonic()
        assert _roundtrip(sock, b"slow") == b"slow"
        # One chunk each way through the proxy: at least twice the latency.
        assert time.monotonic() - started >= 0.4
        proxy.heal()
        started = time.monotonic()
        assert _roundtrip(sock, b"fast") == b"fast"
        assert time.monotonic() - started < 0.2


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_hold_keeps_matching_requests_back_until_release(
    tcp_proxy_factory: ProxyFactory, echo_server: tuple[str, int]
) -> None:
    proxy = tcp_proxy_factory(*echo_server)
    proxy.hold(b"/upsert")
    with _connect(proxy) as stuck, _connect(proxy) as other:
        stuck.sendall(b"POST /api/upsert HTTP/1.1")
        _wait_for(lambda: proxy.held == 1)
        stuck.sendall(b" and what follows it")
        assert _roundtrip(other, b"POST /api/get HTTP/1.1") == b"POST /api/get HTTP/1.1"
        stuck.settimeout(0.3)
        with pytest.raises(TimeoutError):
            stuck.recv(16)  # nothing reached the echo server
        proxy.release()
        stuck.settimeout(5)
        expected = b"POST /api/upsert HTTP/1.1 and what follows it"
        received = b""
        while len(received) < len(expected):
            received += stuck.recv(65536)
        assert received == expected
        assert proxy.held == 0
        assert _roundtrip(stuck, b"/upsert again") == b"/upsert again"  # no longer held


def test_hold_matches_a_pattern_split_between_two_reads(
    tcp_proxy_factory: ProxyFactory, echo_server: tuple[str, int]
) -> None:
    proxy = tcp_proxy_factory(*echo_server)
    proxy.hold(b"/upsert")
    with _connect(proxy) as sock:
        assert _roundtrip(sock, b"POST /up") == b"POST /up"
        sock.sendall(b"sert HTTP/1.1")
        _wait_for(lambda: proxy.held == 1)
        assert proxy.cut() == 1
        proxy.heal()
        assert _is_dead(sock)
    _wait_for(lambda: proxy.held == 0)


def test_unreachable_target_resets_the_client(tcp_proxy_factory: ProxyFactory) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        dead_port = placeholder.getsockname()[1]  # bound but not listening: refuses
        proxy = tcp_proxy_factory("127.0.0.1", dead_port)
        assert _connection_fails(proxy)
        assert proxy.upstream_failures == 1


def test_close_leaves_no_thread_and_frees_the_port(echo_server: tuple[str, int]) -> None:
    proxy = TcpProxy(*echo_server)
    sock = _connect(proxy)
    assert _roundtrip(sock, b"x") == b"x"
    proxy.close()
    proxy.close()  # idempotent
    try:
        assert _is_dead(sock)
    finally:
        sock.close()
    # Only the proxy's threads: the echo server's handler may still be finishing.
    assert not [t for t in threading.enumerate() if t.name.startswith("tcp-proxy")]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()


def test_listen_port_is_honoured(echo_server: tuple[str, int]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with TcpProxy(*echo_server, listen_port=port) as proxy:
        assert proxy.port == port
        with _connect(proxy) as sock:
            assert _roundtrip(sock, b"x") == b"x"


def test_real_client_fails_through_a_cut_and_recovers_after_heal(
    tcp_proxy_factory: ProxyFactory, chroma_server: ChromaServer, chroma_collection_name: str
) -> None:
    import chromadb
    import httpx

    proxy = tcp_proxy_factory(chroma_server.host, chroma_server.port)
    # Any, as ChromaServer.client() gives: chromadb's own annotations refuse plain lists.
    client: Any = chromadb.HttpClient(host=proxy.host, port=proxy.port, settings=chroma_settings())
    try:
        collection = client.create_collection(chroma_collection_name)
        collection.add(ids=["a"], embeddings=[[1.0, 0.0]])
        proxy.refuse(True)
        assert proxy.cut() >= 1
        with pytest.raises(httpx.TransportError):  # reset or EOF, whichever it reads first
            collection.count()
        proxy.heal()
        assert collection.count() == 1  # the client reconnects on its own
    finally:
        close_client(client)
