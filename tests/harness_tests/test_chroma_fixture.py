"""The Chroma fixtures start real servers that survive SIGKILL with acknowledged writes."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.chroma import ChromaServer, ChromaServerError, unique_collection_name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_acknowledged_write_survives_kill_9_and_restart(
    chroma_server_factory: Callable[..., ChromaServer], chroma_collection_name: str
) -> None:
    server = chroma_server_factory()
    assert server.last_start_seconds is not None
    collection = server.client().create_collection(chroma_collection_name)
    collection.add(ids=["a", "b"], embeddings=[[1.0, 0.0], [0.0, 1.0]], documents=["A", "B"])
    old_pid, old_port = server.pid, server.port
    assert old_pid is not None

    assert server.kill() == -signal.SIGKILL
    assert not _pid_alive(old_pid)
    assert not server.heartbeat_ok()

    server.start()
    assert server.pid != old_pid
    assert server.port == old_port
    got = server.client().get_collection(chroma_collection_name).get(ids=["a", "b"])
    assert sorted(got["ids"]) == ["a", "b"]
    assert sorted(got["documents"]) == ["A", "B"]


def test_restart_after_sigterm_keeps_data_and_queries_work(
    chroma_server_factory: Callable[..., ChromaServer], chroma_collection_name: str
) -> None:
    server = chroma_server_factory()
    server.client().create_collection(chroma_collection_name).add(
        ids=["x"], embeddings=[[0.5, 0.5]], documents=["X"]
    )
    server.restart()
    collection = server.client().get_collection(chroma_collection_name)
    result = collection.query(query_embeddings=[[0.5, 0.5]], n_results=1)
    assert result["ids"] == [["x"]]


def test_session_server_and_http_client(
    chroma_server: ChromaServer, chroma_http_client: Any, chroma_collection_name: str
) -> None:
    assert chroma_server.is_running()
    assert chroma_server.url == f"http://127.0.0.1:{chroma_server.port}"
    collection = chroma_http_client.get_or_create_collection(chroma_collection_name)
    collection.upsert(ids=["1"], embeddings=[[0.1, 0.2, 0.3]], metadatas=[{"k": "v"}])
    assert collection.get(ids=["1"])["metadatas"] == [{"k": "v"}]


def test_persistent_client_is_embedded_and_isolated(
    chroma_persistent_client: Any, chroma_collection_name: str
) -> None:
    collection = chroma_persistent_client.create_collection(chroma_collection_name)
    collection.add(ids=["e"], embeddings=[[1.0, 2.0]], documents=["embedded"])
    assert collection.count() == 1
    assert [c.name for c in chroma_persistent_client.list_collections()] == [chroma_collection_name]


def test_collection_names_are_unique_and_valid(chroma_collection_name: str) -> None:
    names = {unique_collection_name("test_x[param-1]") for _ in range(100)}
    assert len(names) == 100
    for name in [*names, chroma_collection_name, unique_collection_name("..")]:
        assert 3 <= len(name) <= 512
        assert name[0].isalnum() and name[-1].isalnum()
        assert set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def test_start_failure_reports_the_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ChromaServerError, match="exited with code") as failure:
            ChromaServer(tmp_path / "data", port, startup_timeout=30)
    assert str(port) in str(failure.value)
