"""The effective configuration and where each value came from, for `syncd config show`.

Loads exactly as :func:`syncd.config.load` does (defaults < file < environment <
command line) and then names, for every setting, the layer that decided it: the
default, the file, an environment variable, or a command-line flag. Secrets are shown
as ``***``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from syncd import config
from syncd.config import Settings
from syncd.redact import redact_text

SECRET = "***"
FLAGS = config.FLAGS


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str  # "chroma.host", "pipelines[0].mapping.text"
    value: Any  # JSON-able, secrets redacted
    source: str  # default | file | environment | flag
    detail: str | None = None  # the file, variable or flag

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def effective(
    path: Path | str | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Settings, Path, list[Entry]]:
    """The settings, the config file they read (it may not exist), and one entry per leaf."""
    env = os.environ if env is None else env
    settings = config.load(path, env=env, overrides=overrides)
    config_path = config.config_path_of(path, env)
    file_data = config._read_toml(config_path) if config_path.exists() else {}
    names = [
        str(p.get("name", "")) for p in file_data.get("pipelines") or [] if isinstance(p, dict)
    ]
    from_env = {
        _canonical(key, names): name
        for name, value in env.items()
        for key in config._env_layer({name: value})
    }
    flags = {_canonical(k, names): k for k, v in (overrides or {}).items() if v is not None}
    entries = {}
    for key, value in _leaves(settings, ""):
        source, detail = _source(key, file_data, from_env, flags, str(config_path))
        entries[key] = Entry(key, _shown(key, value, settings), source, detail)
    for entry in _derived(settings, env):
        if entry.key == "mongodb.uri" or entries[entry.key].source == "default":
            entries[entry.key] = entry
    return settings, config_path, list(entries.values())


def _leaves(model: BaseModel, prefix: str) -> Iterator[tuple[str, Any]]:
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from _leaves(value, key + ".")
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            for i, item in enumerate(value):
                yield from _leaves(item, f"{key}[{i}].")
        else:
            yield key, value


def _canonical(dotted: str, pipeline_names: list[str]) -> str:
    """``pipelines.articles.batch_size`` or ``pipelines.0.batch_size`` as
    ``pipelines[0].batch_size``."""
    head, _, rest = dotted.partition(".")
    if head != "pipelines" or not rest:
        return dotted
    part, _, tail = rest.partition(".")
    index = next(
        (i for i, n in enumerate(pipeline_names) if n.lower() == part.lower()),
        int(part) if part.isdigit() else None,
    )
    return f"pipelines[{index if index is not None else part}].{tail}"


def _source(
    key: str,
    file_data: Mapping[str, Any],
    from_env: Mapping[str, str],
    flags: Mapping[str, str],
    path: str,
) -> tuple[str, str | None]:
    for layer, found in (("flag", flags), ("environment", from_env)):
        for dotted, detail in found.items():
            if dotted == key or dotted.startswith(key + "."):
                return layer, FLAGS.get(detail, detail) if layer == "flag" else detail
    partner = config.SECRET_PAIRS.get(key)
    for layer, found in (("flag", flags), ("environment", from_env)):
        if partner is not None and partner in found:  # the file's value was replaced
            return layer, FLAGS.get(found[partner], found[partner])
    if _in_file(file_data, key):
        return "file", path
    return "default", None


def _in_file(data: Mapping[str, Any], key: str) -> bool:
    node: Any = data
    for part in key.replace("[", ".").replace("]", "").split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            return False
    return True


def _shown(key: str, value: Any, settings: Settings) -> Any:
    if key == "mongodb.uri":
        return settings.mongodb.redacted_uri()
    return _redacted(value)


def _redacted(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return SECRET if value.get_secret_value() else ""
    if isinstance(value, Mapping):
        return {str(k): _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact_text(str(value))


def _derived(settings: Settings, env: Mapping[str, str]) -> list[Entry]:
    """Values read from a file or variable that another setting names."""
    out = []
    if settings.mongodb.uri_file:
        uri = _shown("mongodb.uri", None, settings)
        out.append(Entry("mongodb.uri", uri, "file", settings.mongodb.uri_file))
    if settings.chroma.token_file:
        out.append(Entry("chroma.token", SECRET, "file", settings.chroma.token_file))
    for i, ps in enumerate(settings.pipelines):
        variable = ps.embedder.api_key_env
        if ps.embedder.api_key is not None and env.get(variable):
            out.append(Entry(f"pipelines[{i}].embedder.api_key", SECRET, "environment", variable))
    # Unset in syncd's own settings, the OpenTelemetry variables decide (the exporter reads
    # them), so they are shown where syncd's settings would be.
    if settings.telemetry.traces is None and env.get("OTEL_TRACES_EXPORTER", "").strip():
        exporters = ",".join(config.env_trace_exporters(env))
        out.append(Entry("telemetry.traces", exporters, "environment", "OTEL_TRACES_EXPORTER"))
    given = config.otlp_endpoints(settings.telemetry.otlp_endpoint, env)
    if settings.telemetry.otlp_endpoint is None and given:
        variable, value = given[0]
        out.append(Entry("telemetry.otlp_endpoint", redact_text(value), "environment", variable))
    return out
