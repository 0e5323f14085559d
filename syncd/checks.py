"""Connectivity checks behind `syncd check`."""

from __future__ import annotations

from collections.abc import Iterator

from syncd.config import Settings
from syncd.errors import SyncdError, from_sink
from syncd.runtime import Runtime


def run_checks(settings: Settings) -> Iterator[tuple[str, BaseException | None]]:
    runtime = Runtime(settings)
    try:
        yield from _checks(runtime)
    finally:
        runtime.close()


def _checks(runtime: Runtime) -> Iterator[tuple[str, BaseException | None]]:
    settings = runtime.settings
    mongo_line = f"MongoDB {settings.mongodb.redacted_uri()}"
    try:
        src = runtime.source(settings.pipelines[0]) if settings.pipelines else None
        runtime.mongo.admin.command("ping")
        yield mongo_line, None
    except Exception as exc:  # noqa: BLE001 - reported, not raised: check lists every failure
        yield mongo_line, _translate(exc)
        src = None
    chroma_line = (
        f"Chroma embedded at {settings.chroma.path}"
        if settings.chroma.mode == "embedded"
        else f"Chroma http{'s' if settings.chroma.ssl else ''}://{settings.chroma.host}:{settings.chroma.port}"
    )
    try:
        runtime.chroma.heartbeat()
        yield chroma_line, None
    except Exception as exc:  # noqa: BLE001
        yield chroma_line, from_sink(exc)
    for ps in settings.pipelines:
        line = f"pipeline {ps.name}: change stream on {ps.namespace}"
        try:
            src = runtime.source(ps)
            src.current_token()
            yield line, None
        except Exception as exc:  # noqa: BLE001
            yield line, _translate(exc)
        line = f"pipeline {ps.name}: embedder {ps.embedder.kind}"
        try:
            runtime.embedder(ps)
            yield line, None
        except Exception as exc:  # noqa: BLE001
            yield line, exc
    del src
    line = f"checkpoint store ({settings.checkpoint.store})"
    try:
        runtime.store.list()
        yield line, None
    except Exception as exc:  # noqa: BLE001
        yield line, _translate(exc)


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, SyncdError):
        return exc
    from pymongo.errors import PyMongoError

    from syncd.errors import from_mongo

    if isinstance(exc, PyMongoError):
        return from_mongo(exc)
    return exc
