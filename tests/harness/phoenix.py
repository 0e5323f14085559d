"""A real OTLP receiver for trace tests and for looking at traces: Arize Phoenix.

Phoenix (PyPI ``arize-phoenix``) is heavy and pins its own dependencies, so it lives in
its own virtual environment, ``.venv-phoenix``, and runs as a separate process
(``phoenix serve``). It takes OTLP over HTTP at ``/v1/traces`` (and gRPC on its own
port) and returns what it stored from ``GET /v1/projects/default/spans``.

    python -m tests.harness.phoenix --install   # create .venv-phoenix (make does this)
    python -m tests.harness.phoenix             # `make viewer`: serve on 127.0.0.1:6006

`PhoenixServer` needs no pytest; the ``phoenix_server`` fixture (session scope) starts
one server for the whole run on free ports with its data in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.harness.ports import free_port
from tests.harness.process import ServerProcess

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv-phoenix"
# The spans REST API and its response shape were checked against this release.
REQUIREMENT = "arize-phoenix==20.26.1"
_MARKER = VENV / ".installed"
_ENV = {
    "PHOENIX_TELEMETRY_ENABLED": "false",  # no usage reporting: these machines are offline
    "PHOENIX_HOST": "127.0.0.1",
    "NO_COLOR": "1",
}


class PhoenixError(RuntimeError):
    """Phoenix could not be installed, or did not start; the message says why."""


def phoenix_executable() -> Path:
    return VENV / "bin" / "phoenix"


def is_installed() -> bool:
    try:
        return _MARKER.read_text().strip() == REQUIREMENT and phoenix_executable().exists()
    except FileNotFoundError:
        return False


def install(python: str | None = None, *, quiet: bool = True) -> float:
    """Create ``.venv-phoenix`` with Phoenix in it unless it is there; return seconds spent."""
    if is_installed():
        return 0.0
    started = time.monotonic()
    base = python or sys.executable
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", *(["--quiet"] if quiet else [])]
    steps = [
        [base, "-m", "venv", "--clear", str(VENV)],
        [*pip, "--upgrade", "pip"],
        [*pip, REQUIREMENT],
    ]
    for command in steps:
        result = subprocess.run(command, capture_output=quiet, text=True, check=False)
        if result.returncode != 0:
            tail = "\n".join(((result.stdout or "") + (result.stderr or "")).splitlines()[-30:])
            raise PhoenixError(f"`{' '.join(command)}` failed ({result.returncode}):\n{tail}")
    _MARKER.write_text(REQUIREMENT + "\n")
    return time.monotonic() - started


class PhoenixServer(ServerProcess):
    """A ``phoenix serve`` process on 127.0.0.1 with its data in ``working_dir``."""

    name = "phoenix serve"
    error = PhoenixError
    poll_interval = 0.25
    stop_timeout = 15.0
    port: int

    def __init__(
        self,
        working_dir: Path,
        port: int | None = None,
        grpc_port: int | None = None,
        *,
        start: bool = True,
        startup_timeout: float = 180.0,
    ) -> None:
        self.working_dir = Path(working_dir)
        super().__init__(
            self.working_dir.with_name(f"{self.working_dir.name}.phoenix.log"),
            port=port or free_port(),
            startup_timeout=startup_timeout,
        )
        self.grpc_port = grpc_port or free_port()
        self.ready_what = f"{self.url}/healthz"
        if start:
            self.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def otlp_http_endpoint(self) -> str:
        """The full OTLP/HTTP traces URL."""
        return f"{self.url}/v1/traces"

    @property
    def otlp_grpc_endpoint(self) -> str:
        return f"http://{self.host}:{self.grpc_port}"

    def command(self) -> list[str]:
        if not phoenix_executable().exists():
            raise PhoenixError(f"{phoenix_executable()} is missing: run `make {VENV.name}`")
        return [str(phoenix_executable()), "serve"]

    def prepare(self) -> None:
        self.working_dir.mkdir(parents=True, exist_ok=True)

    def environment(self) -> dict[str, str]:
        env = {
            **os.environ,
            **_ENV,
            "PHOENIX_PORT": str(self.port),
            "PHOENIX_GRPC_PORT": str(self.grpc_port),
            "PHOENIX_WORKING_DIR": str(self.working_dir),
        }
        for name in ("PHOENIX_SQL_DATABASE_URL", "PHOENIX_COLLECTOR_ENDPOINT"):
            env.pop(name, None)  # a developer's own settings must not redirect the tests
        return env

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def get_json(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        url = f"{self.url}{path}" + (f"?{query}" if query else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)

    def spans(self, project: str = "default", **filters: Any) -> list[dict[str, Any]]:
        """Every stored span of ``project`` (following the cursor), oldest first.

        ``filters`` are the API's query parameters, e.g. ``trace_id=[...]``.
        """
        found: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 1000, "sort": "id", "order": "asc", **filters}
        while True:
            page = self.get_json(f"/v1/projects/{project}/spans", **params)
            found.extend(page["data"])
            if not page.get("next_cursor"):
                return found
            params["cursor"] = page["next_cursor"]

    def wait_for_spans(
        self,
        predicate: Callable[[list[dict[str, Any]]], bool],
        timeout: float = 30.0,
        **filters: Any,
    ) -> list[dict[str, Any]]:
        """Poll until ``predicate(spans)`` holds; Phoenix ingests asynchronously."""
        deadline = time.monotonic() + timeout
        spans: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                spans = self.spans(**filters)
            except urllib.error.HTTPError as exc:
                if exc.code != 404:  # the default project appears with the first span
                    raise
            if predicate(spans):
                return spans
            time.sleep(0.25)
        names = sorted({span["name"] for span in spans})
        raise AssertionError(f"Phoenix had {len(spans)} matching spans after {timeout}s: {names}")

    def __repr__(self) -> str:
        return f"PhoenixServer({self.url}, grpc={self.grpc_port}, dir={self.working_dir})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.harness.phoenix",
        description="Run Arize Phoenix locally to look at syncd's traces.",
    )
    parser.add_argument("--install", action="store_true", help=f"only create {VENV.name}")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PHOENIX_PORT", "6006")))
    parser.add_argument(
        "--grpc-port", type=int, default=int(os.environ.get("PHOENIX_GRPC_PORT", "4317"))
    )
    parser.add_argument(
        "--working-dir", type=Path, default=REPO / "syncd-data" / "phoenix", help="trace storage"
    )
    args = parser.parse_args(argv)
    if not is_installed():
        print(f"installing {REQUIREMENT} into {VENV} (a few minutes) ...", flush=True)
        print(f"installed in {install():.0f}s", flush=True)
    if args.install:
        return 0
    server = PhoenixServer(args.working_dir, args.port, args.grpc_port, start=False)
    # Phoenix runs in its own session, so a SIGTERM to us must stop it explicitly.
    signal.signal(signal.SIGTERM, lambda *_: _raise_keyboard_interrupt())
    print(f"starting Phoenix (log {server.log_path}) ...", flush=True)
    try:
        server.start()
        print(
            f"Phoenix is up at {server.url} (started in {server.last_start_seconds:.0f}s).\n"
            "Send syncd's traces to it with:\n"
            f"  export OTEL_TRACES_EXPORTER=otlp OTEL_EXPORTER_OTLP_ENDPOINT={server.url}\n"
            'or telemetry.traces = "otlp_http" and '
            f'telemetry.otlp_endpoint = "{server.otlp_http_endpoint}" in syncd.toml.\n'
            f"Ctrl-C stops it; traces are kept in {args.working_dir}",
            flush=True,
        )
        while server.is_running():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


try:
    import pytest
except ImportError:  # `make viewer` and scripts need no pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def phoenix_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PhoenixServer]:
        """One Phoenix for the session: ``.url`` and ``.otlp_http_endpoint``.

        Skips only when ``.venv-phoenix`` cannot be created (no package registry);
        a Phoenix that is installed but does not start is an error.
        """
        try:
            install()
        except (PhoenixError, OSError) as exc:
            pytest.skip(f"Phoenix is not available: creating {VENV} failed: {exc}")
        server = PhoenixServer(tmp_path_factory.mktemp("phoenix") / "data")
        yield server
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
