"""A real Chroma server process for network and crash tests, and pytest fixtures around it.

`ChromaServer` runs `chroma run` (shipped in the chromadb wheel) on 127.0.0.1 with its
output in a log file, and can be stopped, killed with SIGKILL and restarted on the same
port and data directory. It needs no pytest, so benchmarks can use it too:

    with ChromaServer(Path("/tmp/chroma-data")) as server:
        client = server.client()

Telemetry is off everywhere: these machines have no internet.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.harness.ports import free_port

_ENV = {"ANONYMIZED_TELEMETRY": "False", "CHROMA_TELEMETRY": "False", "NO_COLOR": "1"}
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")  # for clients made in this process


# Servers run in their own session, so a Ctrl-C does not reach them; kill any left running
# when the interpreter exits, lest they hold ports and CPU after a test run ends badly.
_live_servers: weakref.WeakSet[ChromaServer] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_live_servers):
        server.kill()


def chroma_settings() -> Any:
    """Client settings for tests: telemetry off (no internet), nothing else changed.

    chromadb refuses a second embedded client on the same path with different settings,
    so these stay as close to the defaults as syncd's own are.
    """
    from chromadb.config import Settings

    return Settings(anonymized_telemetry=False)


def chroma_executable() -> Path:
    return Path(sys.executable).parent / "chroma"


class ChromaServerError(RuntimeError):
    """The Chroma server did not start or stop as expected; the message has its log tail."""


class ChromaServer:
    """A `chroma run --path PATH --port PORT --host 127.0.0.1` process.

    The constructor starts the server and waits for its heartbeat unless `start=False`;
    `start()` is a no-op while it runs. `restart()` reuses the port and the data
    directory, so clients configured with `url` reconnect to the same data.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        path: Path,
        port: int | None = None,
        *,
        log_path: Path | None = None,
        start: bool = True,
        startup_timeout: float = 60.0,
    ) -> None:
        self.path = Path(path)
        self.port = port or free_port()
        self.log_path = log_path or self.path.with_name(f"{self.path.name}.chroma-{self.port}.log")
        self.startup_timeout = startup_timeout
        self.last_start_seconds: float | None = None
        """How long the most recent `start()` took until the heartbeat answered."""
        self._process: subprocess.Popen[bytes] | None = None
        self._clients: list[Any] = []
        if start:
            self.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self) -> Any:
        """A `chromadb.HttpClient` for this server (typed `Any`: chromadb is untyped).

        Each client holds a connection pool until closed; `close_clients()` closes every
        client made here, and the fixtures and `with ChromaServer(...)` call it.
        """
        import chromadb

        client = chromadb.HttpClient(host=self.host, port=self.port, settings=chroma_settings())
        self._clients.append(client)
        return client

    def close_clients(self) -> None:
        while self._clients:
            close_client(self._clients.pop())

    def start(self) -> ChromaServer:
        # Imported here: importing a sibling pytest plugin at module level would stop
        # pytest from rewriting its asserts, and it warns about that (an error here).
        from tests.harness.daemon import die_with_parent

        if self.is_running():
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        command = [
            str(chroma_executable()),
            "run",
            "--path",
            str(self.path),
            "--port",
            str(self.port),
            "--host",
            self.host,
        ]
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"\n--- {' '.join(command)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                die_with_parent(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **_ENV},
                start_new_session=True,  # a Ctrl-C on the test run does not reach it first
            )
        _live_servers.add(self)
        self._wait_for_heartbeat()
        self.last_start_seconds = time.monotonic() - started
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if still running after `timeout`; return the exit code."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def kill(self) -> int | None:
        """SIGKILL the server, as a crash would, and reap it; return the exit code."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.kill()
        return process.wait()

    def restart(self, *, kill: bool = False) -> ChromaServer:
        """Stop (or SIGKILL with `kill=True`) and start again on the same port and path."""
        if kill:
            self.kill()
        else:
            self.stop()
        self._process = None
        return self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", self.log())  # the server colours its output
        return "\n".join(text.splitlines()[-lines:])

    def heartbeat_ok(self) -> bool:
        """True when the server answers `GET /api/v2/heartbeat` within a second."""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/heartbeat", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _wait_for_heartbeat(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while not self.heartbeat_ok():
            code = self._process.poll()
            if code is not None:
                raise ChromaServerError(
                    f"chroma server on port {self.port} (data {self.path}) exited with code "
                    f"{code} before answering its heartbeat; log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise ChromaServerError(
                    f"chroma server on port {self.port} (data {self.path}) did not answer "
                    f"{self.url}/api/v2/heartbeat within {self.startup_timeout}s; killed it. "
                    f"Log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def __enter__(self) -> ChromaServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close_clients()
        self.stop()

    def __repr__(self) -> str:
        return f"ChromaServer({self.url}, path={self.path}, pid={self.pid})"


def close_client(client: Any) -> None:
    """Close a chromadb client and, for HTTP clients, the connection pools behind it.

    chromadb 1.x's `close()` releases its System but leaves each HTTP client's httpx
    session (and the one of its internal admin client) open until garbage collection,
    which then warns about unclosed sockets.
    """
    client.close()
    for owner in (client, getattr(client, "_admin_client", None)):
        session = getattr(getattr(owner, "_server", None), "_session", None)
        if session is not None:
            session.close()


def unique_collection_name(hint: str = "t") -> str:
    """A valid Chroma collection name (3-512 of [a-zA-Z0-9._-], alnum at both ends)."""
    stem = re.sub(r"[^a-zA-Z0-9._-]+", "-", hint).strip("._-")[:40] or "t"
    return f"{stem}-{uuid.uuid4().hex[:10]}"


try:
    import pytest
except ImportError:  # plain scripts (benchmarks) can use ChromaServer without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaServer]:
        """One Chroma server shared by the whole session; use unique collection names."""
        server = ChromaServer(tmp_path_factory.mktemp("chroma-session") / "data")
        yield server
        server.close_clients()
        server.stop()

    @pytest.fixture
    def chroma_server_factory(tmp_path: Path) -> Iterator[Callable[..., ChromaServer]]:
        """Start isolated servers, free to kill: `make(path=None, port=None) -> ChromaServer`."""
        servers: list[ChromaServer] = []

        def make(path: Path | None = None, port: int | None = None) -> ChromaServer:
            data = path or tmp_path / f"chroma-{len(servers)}"
            server = ChromaServer(data, port, start=False)
            servers.append(server)
            return server.start()

        yield make
        for server in servers:
            server.close_clients()
            server.kill()

    @pytest.fixture
    def chroma_http_client(chroma_server: ChromaServer) -> Iterator[Any]:
        """An HttpClient to the session server."""
        import chromadb

        client = chromadb.HttpClient(
            host=chroma_server.host, port=chroma_server.port, settings=chroma_settings()
        )
        yield client
        close_client(client)

    @pytest.fixture
    def chroma_persistent_client(tmp_path: Path) -> Iterator[Any]:
        """An embedded `chromadb.PersistentClient` on a fresh directory."""
        from syncd import chroma_install

        # As syncd loads it: the test environment holds chromadb-client beside chromadb.
        chromadb = chroma_install.load("embedded")
        client = chromadb.PersistentClient(
            path=str(tmp_path / "chroma-embedded"), settings=chroma_settings()
        )
        yield client
        close_client(client)  # releases the SQLite files, which the cache would otherwise hold

    @pytest.fixture
    def chroma_collection_name(request: pytest.FixtureRequest) -> str:
        """A collection name no other test uses, derived from the test's name."""
        return unique_collection_name(request.node.name)
