"""A TCP forwarder that sits between syncd and a server so tests can inject network faults.

`TcpProxy` listens on 127.0.0.1 and forwards every accepted connection to one target.
It runs an asyncio loop in a single background thread, so hundreds of connections
(pymongo keeps a pool and a monitor per server) cost no extra threads, and `close()`
leaves nothing running behind it.

Faults:

- `cut()` resets every open connection on both sides at once (the peer sees a reset
  or EOF on its next read), as when a server dies or a NAT forgets a flow;
- `refuse(True)` accepts new connections and resets them immediately, so connects
  fail while the port stays ours (another process cannot take it meanwhile);
- `set_latency(s)` delays every forwarded chunk in both directions by `s` seconds;
- `hold(pattern)` keeps each request a client sends whose bytes contain `pattern` (and
  whatever that client sends after it) from the target until `release()`, as when one
  kind of request is stuck on its way: `hold(b"/upsert")` before Chroma keeps a write
  from arriving while the reads around it go through; `held` counts the requests held;
- `heal()` undoes `refuse`, `set_latency` and `hold`; connections already cut stay cut
  (a request held on a connection cut meanwhile is dropped, never sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, TypeVar

_T = TypeVar("_T")
_CHUNK = 64 * 1024
_HOLD_MAX = 1024  # the longest pattern `hold` takes
# SO_LINGER with a zero timeout makes close() send RST instead of FIN and drop unsent data.
_LINGER_RESET = struct.pack("ii", 1, 0)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a TCP reset, dropping anything still buffered."""
    transport = writer.transport
    if transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class _Connection:
    """One client connection and its upstream twin; resetting one resets both."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream

    def reset(self) -> None:
        _reset(self.client)
        _reset(self.upstream)


class TcpProxy:
    """Forward 127.0.0.1:`port` to `target_host`:`target_port`, with injectable faults."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_port: int | None = None,
        *,
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = listen_host
        self.accepted = 0
        """Connections accepted since start, including refused ones."""
        self.refused = 0
        """Connections reset on arrival because `refuse(True)` was in effect."""
        self.upstream_failures = 0
        """Connections reset because the target could not be reached."""
        self._latency = 0.0
        self._refusing = False
        self._hold: bytes | None = None
        self._released: asyncio.Event | None = None  # set when held requests may go on
        self.held = 0
        """Requests held by `hold()` now, not yet released."""
        self._closing = False
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"tcp-proxy->{target_port}", daemon=True
        )
        self._thread.start()
        try:
            self._server = self._call(self._listen(listen_port or 0))
        except BaseException:
            self._stop_loop()
            raise
        self.port: int = self._server.sockets[0].getsockname()[1]

    # -- public API (called from any thread) -------------------------------------------

    @property
    def address(self) -> str:
        """`host:port` to hand to clients instead of the target's address."""
        return f"{self.host}:{self.port}"

    @property
    def active(self) -> int:
        """Connections currently being forwarded."""
        return len(self._connections)

    @property
    def latency(self) -> float:
        return self._latency

    def cut(self) -> int:
        """Reset every open connection on both sides; return how many were cut."""
        return self._call(self._cut())

    def refuse(self, on: bool = True) -> None:
        """Reset new connections on arrival (`on=True`) or forward them again (`False`)."""
        self._refusing = on

    def set_latency(self, seconds: float) -> None:
        """Delay each forwarded chunk, in both directions, by `seconds`."""
        if seconds < 0:
            raise ValueError(f"latency must be >= 0 seconds, got {seconds}")
        self._latency = seconds

    def hold(self, pattern: bytes) -> None:
        """Hold, until `release()`, each request a client sends that contains `pattern`."""
        if not 0 < len(pattern) <= _HOLD_MAX:
            raise ValueError(f"hold needs a pattern of 1 to {_HOLD_MAX} bytes")
        self._call(self._set_hold(pattern))

    def release(self) -> None:
        """Forward the held requests (those on connections still open) and hold no more."""
        if self._hold is not None or self._released is not None:
            self._call(self._set_hold(None))

    def heal(self) -> None:
        """Accept connections again, forward without delay and hold nothing."""
        self._refusing = False
        self._latency = 0.0
        self.release()

    def wait_for_connections(self, count: int, timeout: float = 10.0) -> None:
        """Block until at least `count` connections have been accepted in total."""
        deadline = time.monotonic() + timeout
        while self.accepted < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"proxy {self.address} -> {self.target_host}:{self.target_port} accepted "
                    f"{self.accepted} connections within {timeout}s, expected {count}"
                )
            time.sleep(0.01)

    def close(self) -> None:
        """Stop listening, reset all connections and stop the loop thread. Idempotent."""
        if self._loop.is_closed():
            return
        if self._loop.is_running():
            self._call(self._shutdown())
        self._stop_loop()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"TcpProxy({self.address} -> {self.target_host}:{self.target_port}, "
            f"active={self.active}, accepted={self.accepted}, refusing={self._refusing}, "
            f"latency={self._latency})"
        )

    # -- loop side ---------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float = 10.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _listen(self, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._handle, self.host, port, reuse_address=True)

    async def _set_hold(self, pattern: bytes | None) -> None:
        if self._released is not None:
            self._released.set()
        self._hold = pattern
        self._released = asyncio.Event() if pattern is not None else None

    def _holds(self, last: bytes, data: bytes) -> bool:
        """Whether `data` is held: the pattern ends in it (and may start in `last`, the end
        of the chunk before, which went on already)."""
        pattern = self._hold
        return pattern is not None and pattern in last[len(last) - len(pattern) + 1 :] + data

    async def _wait_released(self) -> None:
        released = self._released
        if released is None:
            return
        self.held += 1
        try:
            await released.wait()
        finally:
            self.held -= 1

    async def _cut(self) -> int:
        connections = list(self._connections)
        for connection in connections:
            connection.reset()
        return len(connections)

    async def _shutdown(self) -> None:
        self._closing = True
        self._server.close()
        # Let handlers for connections accepted just before close() start, so each one
        # sees `_closing` and resets its socket instead of leaking it unstarted.
        for _ in range(3):
            await asyncio.sleep(0)
        await self._cut()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._forward(reader, writer)
        except asyncio.CancelledError:
            # Only close() cancels handlers. Ending normally keeps asyncio's stream
            # callback from logging the cancellation as an error.
            pass
        finally:
            _reset(writer)
            self._handlers.discard(task)

    async def _forward(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        self.accepted += 1
        if self._closing or self._refusing:
            self.refused += 1
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            self.upstream_failures += 1
            return
        connection = _Connection(client_writer, upstream_writer)
        self._connections.add(connection)
        try:
            await asyncio.gather(
                self._pipe(client_reader, upstream_writer, connection, to_target=True),
                self._pipe(upstream_reader, client_writer, connection),
            )
        finally:
            self._connections.discard(connection)
            connection.reset()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        connection: _Connection,
        *,
        to_target: bool = False,
    ) -> None:
        """Copy one direction; pass EOF on as a half-close, a failure as a reset of both."""
        last = b""  # the end of the chunk before: a pattern may straddle two reads
        try:
            while data := await reader.read(_CHUNK):
                if to_target:
                    if self._holds(last, data):
                        await self._wait_released()
                    last = data[-_HOLD_MAX:]
                if self._latency > 0:
                    await asyncio.sleep(self._latency)
                if writer.is_closing():
                    return
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()
        except OSError:
            connection.reset()


try:
    import pytest
except ImportError:  # plain scripts (benchmarks) can use TcpProxy without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def tcp_proxy_factory() -> Iterator[Callable[..., TcpProxy]]:
        """Make `TcpProxy(target_host, target_port, listen_port=None)`; all closed at teardown."""
        proxies: list[TcpProxy] = []

        def make(target_host: str, target_port: int, listen_port: int | None = None) -> TcpProxy:
            proxy = TcpProxy(target_host, target_port, listen_port)
            proxies.append(proxy)
            return proxy

        yield make
        for proxy in proxies:
            proxy.close()
