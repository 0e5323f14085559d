"""Connectivity checks behind `syncd check`.

Each check does what the daemon will do first, once: reach MongoDB and Chroma, open each
pipeline's change stream, embed one probe input and hold its size against the config and
the existing collection, write to the checkpoint store and the span log, and send the
trace exporter an empty export. Every failure is reported; none stops the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from syncd import chroma_install, switching
from syncd.autorebuild import needs_rebuild
from syncd.checkpoint import FileCheckpointStore
from syncd.checkpointing import refused_mapping
from syncd.config import PipelineSettings, Settings
from syncd.errors import (
    ConfigError,
    ExitCode,
    SyncdError,
    TransientError,
    from_os_error,
    from_sink,
)
from syncd.mapping import Mapper
from syncd.runtime import Runtime
from syncd.sink import check_matches

PROBE_TEXT = "syncd check: one probe input"

Result = tuple[str, BaseException | None]


def run_checks(settings: Settings) -> Iterator[Result]:
    runtime = Runtime(settings)
    try:
        yield from _checks(runtime)
    finally:
        runtime.close()


def _checks(runtime: Runtime) -> Iterator[Result]:
    settings = runtime.settings
    mongo_line = f"MongoDB {settings.mongodb.redacted_uri()}"
    try:
        runtime.mongo.admin.command("ping")
        yield mongo_line, None
    except Exception as exc:  # noqa: BLE001 - reported, not raised: check lists every failure
        yield mongo_line, _translate(exc)
    yield from _chroma_check(runtime)
    for ps in settings.pipelines:
        yield from _pipeline_checks(runtime, ps)
    yield from _store_checks(runtime)
    yield from _span_log_checks(settings)
    yield from _exporter_checks(settings)


def _pipeline_checks(runtime: Runtime, ps: PipelineSettings) -> Iterator[Result]:
    line = f"pipeline {ps.name}: change stream on {ps.namespace}"
    try:
        runtime.source(ps).current_token()
        yield line, None
    except Exception as exc:  # noqa: BLE001
        yield line, _translate(exc)
    line = f"pipeline {ps.name}: embedder {ps.embedder.kind}"
    try:
        size = _probe_embedder(runtime, ps)
        yield line + (f", {size}-dimensional vectors" if size else ""), None
    except Exception as exc:  # noqa: BLE001
        yield line, _translate(exc)
        size = None
    refusal = refused_mapping(runtime.store, ps, Mapper(ps).fingerprint)
    if refusal is not None:  # no line otherwise: the checkpoint store has its own
        yield f"pipeline {ps.name}: mapping", refusal
    line = f"pipeline {ps.name}: Chroma collection {ps.chroma_collection_name}"
    if not _chroma_created(runtime):
        yield f"{line} (not there yet: the first run creates it)", None
        return
    try:
        rebuilding = _will_rebuild(runtime, ps)
    except ConfigError as exc:  # `syncd run` would refuse to rebuild: the same refusal
        yield line, exc
        return
    try:
        state = _compare_collection(runtime, ps, None if rebuilding else size, rebuilding)
        if rebuilding:
            state += (
                '; the mapping changed and on_mapping_change = "rebuild": `syncd run` will '
                "rebuild the pipeline beside the live collection, then switch"
            )
        yield f"{line} ({state})", None
    except Exception as exc:  # noqa: BLE001
        yield line, from_sink(exc)


def _will_rebuild(runtime: Runtime, ps: PipelineSettings) -> bool:
    """Whether `syncd run` rebuilds the pipeline beside its collection before it streams:
    the new collection is made for this mapping's vectors, so the live one's distance and
    vector size are no reason to refuse. Raises the ConfigError `syncd run` stops with
    when it may not rebuild (the previous collection of the last rebuild is still kept)."""
    if ps.on_mapping_change != "rebuild":
        return False
    try:
        needed = needs_rebuild(runtime.store, ps.name, Mapper(ps).fingerprint)
        record = switching.load_record(runtime.store, ps.name) if needed else {}
    except SyncdError:
        return False  # the checkpoint store's own check reports why it cannot be read
    refusal = switching.kept_previous(record, ps.name)
    if refusal is not None:
        raise refusal
    return needed


def _chroma_created(runtime: Runtime) -> bool:
    """False for an embedded Chroma whose directory does not exist: opening a client
    would create it, and a check changes nothing."""
    chroma = runtime.settings.chroma
    return chroma.mode != "embedded" or Path(chroma.path).exists()


def _chroma_check(runtime: Runtime) -> Iterator[Result]:
    chroma = runtime.settings.chroma
    if chroma.mode == "embedded":
        line = f"Chroma embedded at {chroma.path}"
    else:
        line = f"Chroma http{'s' if chroma.ssl else ''}://{chroma.host}:{chroma.port}"
    if not _chroma_created(runtime):
        try:
            chroma_install.check(chroma.mode)
            yield f"{line} (not created yet: `syncd run` creates it)", None
        except SyncdError as exc:
            yield line, exc
        return
    try:
        runtime.chroma.heartbeat()
        yield line, None
    except SyncdError as exc:
        yield line, exc
    except Exception as exc:  # noqa: BLE001 - reported, not raised: check lists every failure
        yield line, from_sink(exc)


def _probe_embedder(runtime: Runtime, ps: PipelineSettings) -> int | None:
    """Embed one input; return the vectors' size (None: vectors come from the documents)."""
    embedder = runtime.embedder(ps)
    if embedder is None:
        return None
    (vector,) = embedder.embed([PROBE_TEXT])
    size = len(vector)
    explicit = ps.embedder.kind != "openai" or "dimensions" in ps.embedder.model_fields_set
    if explicit and size != ps.embedder.dimensions:
        raise ConfigError(
            f"the embedder made {size}-dimensional vectors, but embedder.dimensions = "
            f"{ps.embedder.dimensions}",
            hint=f"set embedder.dimensions = {size}",
            pipeline=ps.name,
        )
    return size


def _compare_collection(
    runtime: Runtime, ps: PipelineSettings, size: int | None, rebuilding: bool = False
) -> str:
    """Hold an existing collection against the pipeline: its distance and vector size
    (``rebuilding``: only describe them; a rebuild makes a collection for this mapping)."""
    from chromadb.errors import NotFoundError

    name = ps.chroma_collection_name
    try:
        collection = runtime.chroma.get_collection(name, embedding_function=None)
    except NotFoundError:
        return "not there yet: the first run creates it"
    if size is None and ps.embedder.kind == "field" and not rebuilding:
        size = ps.embedder.dimensions  # the documents' vectors must have this size
    space, stored = check_matches(
        collection,
        distance=None if rebuilding else ps.distance,
        dimensions=size,
        pipeline=ps.name,
    )
    held = f", {stored}-dimensional vectors" if stored is not None else ", empty"
    return f"exists, distance {space or ps.distance}{held}"


def _store_checks(runtime: Runtime) -> Iterator[Result]:
    settings = runtime.settings
    where = (
        f"file, {settings.checkpoint.path}"
        if settings.checkpoint.store == "file"
        else f"mongodb, {settings.checkpoint.database}.{settings.checkpoint.collection}"
    )
    line = f"checkpoint store ({where})"
    try:
        store = runtime.store
        store.list()
        if isinstance(store, FileCheckpointStore):
            store.check_writable()
        yield line, None
    except Exception as exc:  # noqa: BLE001
        yield line, _translate(exc)


def _span_log_checks(settings: Settings) -> Iterator[Result]:
    """The span log `syncd explain` reads: the daemon only warns when it cannot write it."""
    path = settings.telemetry.span_log_path
    if not path or not settings.telemetry.span_log_max_bytes:
        return
    line = f"span log {path}"
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with Path(path).open("a", encoding="utf-8"):
            pass
        yield line, None
    except OSError as exc:
        yield line, from_os_error(exc, setting="telemetry.span_log_path")


def _exporter_checks(settings: Settings) -> Iterator[Result]:
    from syncd.tracing import probe_exporters

    try:
        for line, problem in probe_exporters(settings.telemetry):
            error = None
            if problem is not None:
                error = TransientError(
                    f"the receiver did not take an empty export: {problem}",
                    hint="check telemetry.otlp_endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT) and "
                    "that the receiver runs",
                )
                error.exit_code = ExitCode.DRIFT_OR_FAILURE
            yield line, error
    except SyncdError as exc:
        yield "trace exporter", exc


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, SyncdError):
        return exc
    from pymongo.errors import PyMongoError

    from syncd.errors import from_mongo

    if isinstance(exc, PyMongoError):
        return from_mongo(exc)
    return exc
