"""A real Chroma server process for network and crash tests, and pytest fixtures around it.

`ChromaServer` runs `chroma run` (shipped in the chromadb wheel) on 127.0.0.1 with its
output in a log file, and can be stopped, killed with SIGKILL and restarted on the same
port and data directory. It needs no pytest, so benchmarks can use it too:

    with ChromaServer(Path("/tmp/chroma-data")) as server:
        client = server.client()

Telemetry is off everywhere: these machines have no internet.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.harness.ports import free_port
from tests.harness.process import ServerProcess

_ENV = {"ANONYMIZED_TELEMETRY": "False", "CHROMA_TELEMETRY": "False", "NO_COLOR": "1"}
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")  # for clients made in this process


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


class ChromaServer(ServerProcess):
    """A `chroma run --path PATH --port PORT --host 127.0.0.1` process.

    The constructor starts the server and waits for its heartbeat unless `start=False`;
    `start()` is a no-op while it runs. `restart()` reuses the port and the data
    directory, so clients configured with `url` reconnect to the same data.
    """

    name = "chroma server"
    error = ChromaServerError
    ready_what = "its heartbeat"
    stop_timeout = 10.0
    log_header = True
    port: int

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
        port = port or free_port()
        super().__init__(
            log_path or self.path.with_name(f"{self.path.name}.chroma-{port}.log"),
            port=port,
            startup_timeout=startup_timeout,
        )
        self._clients: list[Any] = []
        if start:
            self.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            str(chroma_executable()),
            "run",
            "--path",
            str(self.path),
            "--port",
            str(self.port),
            "--host",
            self.host,
        ]

    def environment(self) -> dict[str, str]:
        return {**os.environ, **_ENV}

    def prepare(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"chroma server on port {self.port} (data {self.path})"

    def ready(self) -> bool:
        return self.heartbeat_ok()

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

    def heartbeat_ok(self) -> bool:
        """True when the server answers `GET /api/v2/heartbeat` within a second."""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/heartbeat", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

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
