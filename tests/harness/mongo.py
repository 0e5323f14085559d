"""A MongoDB replica set for tests: a real ``mongod`` when there is one, else the stand-in.

Order of preference:

1. ``SYNCD_TEST_MONGODB_URI`` set: use that deployment as is (it cannot be killed).
2. ``mongod`` on PATH: start it as a one-node replica set ``rs0`` in the data directory.
3. The wire-protocol stand-in in ``tests/standin`` (Python 3.13, ``make standin``).

Importable without pytest (the demo and the benchmarks use ``start_mongo`` directly);
the pytest fixtures are defined only when pytest is installed. As a command:

    python -m tests.harness.mongo --data-dir DIR [--port P] [--history-size N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from .ports import free_port
from .process import ServerProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
STANDIN_PYTHON = REPO_ROOT / ".venv-standin" / "bin" / "python"
STANDIN_SERVER = REPO_ROOT / "tests" / "standin" / "server.py"
URI_ENV = "SYNCD_TEST_MONGODB_URI"
READY_TIMEOUT = 60.0


class MongoServerError(RuntimeError):
    pass


class MongoServer(ServerProcess):
    """One MongoDB server process (or an external deployment) owned by a test."""

    error = MongoServerError
    ready_what = "hello as a writable primary"
    poll_interval = 0.1
    port: int

    def __init__(
        self,
        kind: str,
        data_dir: Path | None,
        port: int,
        *,
        history_size: int | None = None,
        host: str = "127.0.0.1",
        external_uri: str | None = None,
    ) -> None:
        self.kind = kind
        self.data_dir = data_dir
        log_path = data_dir.with_name(data_dir.name + ".log") if data_dir else Path(os.devnull)
        super().__init__(log_path, port=port, startup_timeout=READY_TIMEOUT)
        self.name = kind
        self.host = host
        self.history_size = history_size
        self._external_uri = external_uri
        self._initiated = False

    @property
    def uri(self) -> str:
        if self._external_uri is not None:
            return self._external_uri
        # directConnection keeps clients on this address, so a TCP proxy in front still works.
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    @property
    def replica_set_uri(self) -> str:
        """The URI a client uses to discover the replica set from its hello reply."""
        if self._external_uri is not None:
            return self._external_uri
        return f"mongodb://{self.host}:{self.port}/?replicaSet=rs0"

    @property
    def supports_kill(self) -> bool:
        return self.kind != "external"

    def command(self) -> list[str]:
        assert self.data_dir is not None
        if self.kind == "mongod":
            # The oplog is sized in megabytes, not events: a small history means the
            # smallest oplog mongod accepts.
            oplog_mb = "1" if self.history_size is not None else "64"
            return [
                "mongod",
                "--replSet",
                "rs0",
                "--port",
                str(self.port),
                "--bind_ip",
                self.host,
                "--dbpath",
                str(self.data_dir),
                "--oplogSize",
                oplog_mb,
            ]
        if not STANDIN_PYTHON.exists():
            raise MongoServerError(
                f"the MongoDB stand-in's environment is missing ({STANDIN_PYTHON}); "
                "run `make standin` (or set SYNCD_TEST_MONGODB_URI to a real replica set)"
            )
        cmd = [
            str(STANDIN_PYTHON),
            str(STANDIN_SERVER),
            "--port",
            str(self.port),
            "--host",
            self.host,
            "--data-dir",
            str(self.data_dir),
        ]
        if self.history_size is not None:
            cmd += ["--history-size", str(self.history_size)]
        return cmd

    def prepare(self) -> None:
        assert self.data_dir is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._initiated = False

    def start(self) -> Self:
        if self.kind == "external":
            return self
        return super().start()

    def ready(self) -> bool:
        import pymongo
        from pymongo.errors import OperationFailure, PyMongoError

        try:
            with pymongo.MongoClient[dict[str, Any]](
                self.uri, serverSelectionTimeoutMS=500, connectTimeoutMS=500
            ) as client:
                hello = client.admin.command("hello")
                if hello.get("isWritablePrimary"):
                    return True
                if self.kind == "mongod" and not self._initiated and not hello.get("setName"):
                    member = {"_id": 0, "host": f"{self.host}:{self.port}"}
                    try:
                        client.admin.command("replSetInitiate", {"_id": "rs0", "members": [member]})
                    except OperationFailure as exc:
                        if exc.code != 23:  # AlreadyInitialized: a restart
                            raise
                    self._initiated = True
        except PyMongoError:
            pass
        return False

    def kill(self) -> int | None:
        """SIGKILL the server and wait for it to be gone."""
        if self.kind == "external":
            raise MongoServerError("an external MongoDB deployment cannot be killed by tests")
        return super().kill()


def _external(uri: str) -> MongoServer:
    parts = urlsplit(uri)
    host = (parts.hostname or "127.0.0.1") if "," not in parts.netloc else "127.0.0.1"
    port = (parts.port or 27017) if "," not in parts.netloc else 27017
    return MongoServer("external", None, port, host=host, external_uri=uri)


def start_mongo(
    data_dir: Path, *, history_size: int | None = None, port: int | None = None
) -> MongoServer:
    """Start (or attach to) a MongoDB replica set primary; see the module docstring."""
    uri = os.environ.get(URI_ENV)
    if uri:
        return _external(uri)
    kind = "mongod" if shutil.which("mongod") else "standin"
    server = MongoServer(kind, Path(data_dir), port or free_port(), history_size=history_size)
    server.start()
    return server


def unique_db_name(hint: str = "t") -> str:
    return f"{hint}_{uuid.uuid4().hex[:12]}"


try:
    import pytest
except ImportError:  # plain scripts can use start_mongo without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongoServer]:
        """One server for the session; tests isolate themselves with `mongo_db`."""
        server = start_mongo(tmp_path_factory.mktemp("mongo-session") / "data")
        yield server
        if server.kind != "external":
            server.stop()

    @pytest.fixture
    def mongo_uri(mongo_server: MongoServer) -> str:
        if not mongo_server.is_running() and mongo_server.kind != "external":
            mongo_server.start()  # a test may have killed the shared server
        return mongo_server.uri

    @pytest.fixture
    def mongo_client(mongo_uri: str) -> Iterator[Any]:
        import pymongo

        client: Any = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=10_000)
        yield client
        client.close()

    @pytest.fixture
    def mongo_db(mongo_client: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
        """A fresh, uniquely named database, dropped after the test."""
        db = mongo_client[unique_db_name("t")]
        yield db
        mongo_client.drop_database(db.name)

    @pytest.fixture
    def mongo_server_factory(tmp_path: Path) -> Iterator[Callable[..., MongoServer]]:
        """Start isolated servers: `make(history_size=None, port=None) -> MongoServer`."""
        if os.environ.get(URI_ENV):
            pytest.skip(f"{URI_ENV} points at a deployment tests cannot start or kill")
        servers: list[MongoServer] = []

        def make(history_size: int | None = None, port: int | None = None) -> MongoServer:
            server = start_mongo(
                tmp_path / f"mongo{len(servers)}", history_size=history_size, port=port
            )
            servers.append(server)
            return server

        yield make
        for server in servers:
            if server.is_running():
                server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.harness.mongo",
        description="Run a MongoDB replica set for local work.",
    )
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--port", type=int)
    parser.add_argument("--history-size", type=int)
    args = parser.parse_args(argv)
    server = start_mongo(args.data_dir, history_size=args.history_size, port=args.port)
    print(server.uri, flush=True)
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    try:
        while not stopping and (server.kind == "external" or server.is_running()):
            time.sleep(0.2)
    finally:
        if server.kind != "external":
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
