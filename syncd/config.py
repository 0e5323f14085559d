"""Typed, validated settings.

One precedence order, defined in :func:`load`: defaults < TOML file < ``SYNCD_*``
environment < command line. Everything is validated once, at start; a mistake
becomes one :class:`~syncd.errors.ConfigError` naming the key. Nothing here runs at
import time.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pymongo.uri_parser import parse_uri

try:  # the URI's syntax and options alone, without the DNS lookup of mongodb+srv://
    from pymongo.uri_parser_shared import _validate_uri as _uri_syntax
except ImportError:  # pragma: no cover - pymongo before 4.13 has no separate parser
    _uri_syntax = parse_uri  # type: ignore[assignment]

from syncd.errors import ConfigError
from syncd.identity import CHROMA_RESERVED_PREFIX, RESERVED_PREFIX, is_reserved
from syncd.redact import redact_text, register_secret
from syncd.utf8 import is_text

DEFAULT_CONFIG_PATH = Path("syncd.toml")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# Longest duration any setting accepts: a year. Longer waits are mistakes, and past
# threading.TIMEOUT_MAX (about 292 years) Python cannot wait at all.
_MAX_S = 366 * 86400.0
Seconds = Annotated[float, Field(ge=0, le=_MAX_S)]
PositiveSeconds = Annotated[float, Field(gt=0, le=_MAX_S)]
# MongoDB's rules for names: https://www.mongodb.com/docs/manual/reference/limits/
_DB_NAME_FORBIDDEN = set('/\\. "$\x00')
# Chroma's own rule for collection names (rust/types/src/validators.rs): 3-512 of
# [a-zA-Z0-9._-], alphanumeric at both ends, no "..", and not an IP address.
# Embedding requests in flight per pipeline: the default for a remote API, and the most.
DEFAULT_REMOTE_EMBED_CONCURRENCY = 8
MAX_EMBED_CONCURRENCY = 256
_CHROMA_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]$")


class _Model(BaseModel):
    # No inf or nan: every number here is a count, a size or a duration.
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """``port = true`` is a mistake, not port 1 (pydantic would take a bool for 1)."""
        numeric = info.field_name and cls.model_fields[info.field_name].annotation in (int, float)
        if isinstance(value, bool) and numeric:
            raise ValueError("expected a number, not true or false")
        return value


def _read_secret_file(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    if not path.strip():
        raise ValueError(f"{what} is empty: name a file, or leave the key out")
    try:
        text = Path(path).read_text(encoding="utf-8-sig").strip()  # a BOM is no part of it
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not UTF-8 text") from None
    if not text:
        # An empty file must not quietly mean "use the default": say so.
        raise ValueError(f"{what} {path} is empty")
    return text


def mongo_database_name(value: str, what: str) -> str:
    bad = sorted(_DB_NAME_FORBIDDEN & set(value))
    if not value or bad or len(value.encode()) >= 64:
        raise ValueError(
            f"{what} {value!r} is not a MongoDB database name "
            '(1 to 63 bytes, without / \\ . space " $ or NUL)'
        )
    return value


def mongo_collection_name(value: str, what: str) -> str:
    if (
        not value
        or "$" in value
        or "\x00" in value
        or ".." in value
        or value.startswith(("system.", "."))
        or value.endswith(".")
    ):
        raise ValueError(
            f"{what} {value!r} is not a MongoDB collection name (not empty, no '$', NUL or "
            "'..', not starting with 'system.', not starting or ending with '.')"
        )
    return value


def _host_problem(host: str) -> str | None:
    """What makes a URI's host name one no resolver can look up (None: nothing).

    A name that does not resolve may be one that does later (a service not yet
    created), so only names that can never resolve are refused here.
    """
    if host.endswith(".sock") or ":" in host:
        return None  # a Unix socket path, or an IPv6 literal pymongo already checked
    if not host:
        return "empty host name"
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or any(not label or len(label) > 63 for label in labels):
        return f"host name {host!r} has an empty or over-long label"
    try:
        host.encode("idna")
    except UnicodeError:
        return f"host name {host!r} is not a valid internationalized name"
    return None


class MongoSettings(_Model):
    uri: SecretStr = SecretStr("mongodb://127.0.0.1:27017/?directConnection=true")
    uri_file: str | None = None
    server_selection_timeout_ms: Annotated[int, Field(ge=100, le=int(_MAX_S * 1000))] = 10_000

    @model_validator(mode="after")
    def _check_uri(self) -> MongoSettings:
        if self.uri_file is not None and "uri" in self.model_fields_set:
            raise ValueError("uri and uri_file are both set: keep one")
        from_file = _read_secret_file(self.uri_file, "mongodb.uri_file")
        if from_file:
            object.__setattr__(self, "uri", SecretStr(from_file))
        uri = self.uri.get_secret_value()
        try:
            # A mongodb+srv:// host is looked up in DNS when the client starts, where a
            # failed lookup is an outage to ride out; here it would be a config error
            # that keeps the service down after a DNS hiccup at boot.
            parsed = _uri_syntax(uri)
        except Exception as exc:  # noqa: BLE001 - pymongo raises several types for bad URIs
            raise ValueError(f"not a valid MongoDB URI ({redact_text(str(exc))})") from None
        if parsed.get("password"):
            register_secret(parsed["password"])
        for host, _port in parsed.get("nodelist") or ():
            problem = _host_problem(host)
            if problem:
                raise ValueError(f"not a valid MongoDB URI ({problem})")
        return self

    def redacted_uri(self) -> str:
        return redact_text(self.uri.get_secret_value())


# RFC 9110: a header name is a token; a value is visible ASCII with inner spaces or tabs
# (the HTTP client sends text as ASCII, so other characters cannot be sent either).
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[\x21-\x7e]+(?: +[\x21-\x7e]+)*")
_NOT_A_HEADER_VALUE = (
    " holds a character an HTTP header cannot carry (a line break, a control character "
    "or a non-ASCII character): the value is not shown; set it again without them"
)


class ChromaSettings(_Model):
    mode: Literal["embedded", "http"] = "embedded"
    path: str = "./syncd-data/chroma"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    ssl: bool = False
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    token: SecretStr | None = None
    token_file: str | None = None
    tenant: str = "default_tenant"
    database: str = "default_database"
    timeout_s: PositiveSeconds = 30.0

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]", value):
            raise ValueError("expected a host name or an IP address ([::1] for IPv6), no port")
        return value

    @field_validator("tenant", "database")
    @classmethod
    def _chroma_name(cls, value: str) -> str:
        if len(value) < 3 or not value.isprintable() or value.strip() != value:
            raise ValueError("Chroma wants at least 3 printable characters, without spaces around")
        return value

    @model_validator(mode="after")
    def _load_token(self) -> ChromaSettings:
        if self.token_file is not None and self.token is not None:
            raise ValueError("token and token_file are both set: keep one")
        if self.token is not None and not self.token.get_secret_value().strip():
            raise ValueError(
                "token is empty: set the Chroma server's token, or leave it out for a "
                "server without authentication"
            )
        from_file = _read_secret_file(self.token_file, "chroma.token_file")
        if from_file:
            object.__setattr__(self, "token", SecretStr(from_file))
        elif self.token is not None:
            # As a file's token is: a variable set from a file or a heredoc keeps its
            # line break, which no HTTP header can carry.
            object.__setattr__(self, "token", SecretStr(self.token.get_secret_value().strip()))
        if self.token:
            register_secret(self.token.get_secret_value())
        headers = {
            name: SecretStr(v.get_secret_value().strip()) for name, v in self.headers.items()
        }
        object.__setattr__(self, "headers", headers)
        for value in self.headers.values():
            register_secret(value.get_secret_value())
        # Checked here, naming the key and never the value: the HTTP client's own error
        # quotes the value (a secret) and stops with the exit code of an outage.
        if self.token and not _HEADER_VALUE.fullmatch(self.token.get_secret_value()):
            what = f"the token in token_file {self.token_file}" if from_file else "token"
            raise ValueError(f"{what}{_NOT_A_HEADER_VALUE}")
        seen: dict[str, str] = {}
        for name in self.headers:  # HTTP header names are not case-sensitive
            if name.lower() in seen:
                raise ValueError(f"headers: {seen[name.lower()]!r} and {name!r} are one header")
            seen[name.lower()] = name
        for name, value in self.headers.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(
                    f"headers: {name!r} is not an HTTP header name (letters, digits and "
                    "!#$%&'*+-.^_`|~, no spaces)"
                )
            if not value.get_secret_value():
                raise ValueError(f"headers.{name} is empty: set a value, or leave it out")
            if not _HEADER_VALUE.fullmatch(value.get_secret_value()):
                raise ValueError(f"headers.{name}{_NOT_A_HEADER_VALUE}")
        header = next((k for k in self.headers if k.lower() == "authorization"), None)
        if self.token and header is not None:
            raise ValueError(
                f"chroma.token (or token_file) and chroma.headers.{header} both set the "
                "Authorization header: keep one"
            )
        return self


def _path_value(value: str) -> str:
    if not value.strip() or "\x00" in value:
        raise ValueError("expected a file system path")
    return value


class CheckpointSettings(_Model):
    store: Literal["mongodb", "file"] = "mongodb"
    database: str = "syncd"
    collection: str = "checkpoints"
    path: str = "./syncd-data/checkpoints"
    history: Annotated[int, Field(ge=1, le=10_000)] = 50

    @field_validator("database")
    @classmethod
    def _database_name(cls, value: str) -> str:
        return mongo_database_name(value, "database")

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, value: str) -> str:
        return mongo_collection_name(value, "collection")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _path_value(value)


class LeaseSettings(_Model):
    enabled: bool = True
    ttl_s: Annotated[float, Field(ge=1, le=_MAX_S)] = 15.0
    renew_every_s: PositiveSeconds = 5.0

    @model_validator(mode="after")
    def _renew_before_expiry(self) -> LeaseSettings:
        if self.renew_every_s >= self.ttl_s:
            raise ValueError("lease.renew_every_s must be shorter than lease.ttl_s")
        return self


ENDPOINT_EXPECTED = (
    "not an endpoint: expected http://HOST:PORT/v1/traces (OTLP/HTTP), "
    "http://HOST:PORT or HOST:PORT (OTLP/gRPC)"
)
# The variables the OpenTelemetry exporters read an endpoint from when otlp_endpoint is unset.
TraceExporter = Literal["none", "console", "otlp", "otlp_http", "otlp_grpc"]
TRACE_EXPORTERS: tuple[str, ...] = get_args(TraceExporter)


def env_trace_exporters(env: Mapping[str, str]) -> list[str]:
    """The exporters ``OTEL_TRACES_EXPORTER`` names (default none), as the SDK reads them."""
    raw = env.get("OTEL_TRACES_EXPORTER", "none")
    return [kind.strip().lower() for kind in raw.split(",") if kind.strip()]


OTEL_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def otlp_kind(kind: str, env: Mapping[str, str]) -> str:
    """``otlp`` as the protocol the OTEL_* variables choose (HTTP unless they say gRPC)."""
    if kind != "otlp":
        return kind
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    return "otlp_grpc" if protocol.strip().lower() == "grpc" else "otlp_http"


def trace_exporters(telemetry: TelemetrySettings, env: Mapping[str, str]) -> list[str]:
    """The exporters in effect: ``telemetry.traces``, else ``OTEL_TRACES_EXPORTER``'s."""
    return [telemetry.traces] if telemetry.traces else env_trace_exporters(env)


def otlp_endpoints(endpoint: str | None, env: Mapping[str, str]) -> list[tuple[str, str]]:
    """The OTLP endpoints given, each with where it was given, the one in effect first:
    ``telemetry.otlp_endpoint``, then the OTEL_* variables the exporters read."""
    named = [("telemetry.otlp_endpoint", endpoint or "")]
    named += [(variable, env.get(variable, "").strip()) for variable in OTEL_ENDPOINT_VARIABLES]
    return [(where, value) for where, value in named if value]


def _endpoint_mistake(settings: Settings, env: Mapping[str, str]) -> ConfigError | None:
    """HOST:PORT is how OTLP/gRPC is written; the OTLP/HTTP exporter needs a URL. gRPC
    takes no user:password in its endpoint: it would be sent as the host name, and the
    exporter's own messages would show it."""
    from urllib.parse import urlsplit

    given = otlp_endpoints(settings.telemetry.otlp_endpoint, env)
    for _where, value in given:  # masked in every output, whatever else is decided
        password = urlsplit(value).password if "@" in value else None
        if password:
            register_secret(password)
    if not given:
        return None
    where, endpoint = given[0]
    kinds = [otlp_kind(kind, env) for kind in trace_exporters(settings.telemetry, env)]
    if "otlp_http" in kinds and not re.match(r"(?i)https?://", endpoint):
        return ConfigError(
            f"{where}: OTLP/HTTP needs a URL, such as http://HOST:4318/v1/traces "
            "(HOST:PORT is how OTLP/gRPC is written)"
        )
    if "otlp_grpc" in kinds and "@" in endpoint.split("?", 1)[0]:
        return ConfigError(
            f"{where}: OTLP/gRPC takes no user:password in the endpoint (it would be sent "
            "as the host name): give credentials in OTEL_EXPORTER_OTLP_HEADERS"
        )
    return None


def is_endpoint(value: str) -> bool:
    """An OTLP endpoint: an http(s) URL with a host, or HOST:PORT as gRPC takes it (an IPv6
    host in brackets: ``[::1]:4317``)."""
    from urllib.parse import urlsplit

    if re.search(r"\s", value):
        return False
    try:
        url = urlsplit(value)
        if url.scheme.lower() in ("http", "https") and url.hostname and url.port != 0:
            return True
    except ValueError:  # a port that is no number, or out of range
        return False
    match = re.fullmatch(r"(?:\[[0-9A-Fa-f:.]+\]|[^:/\s\[\]]+):(\d{1,5})", value)
    return bool(match and 0 < int(match[1]) <= 65535)


class TelemetrySettings(_Model):
    listen: str = "127.0.0.1:9464"  # /metrics, /healthz, /readyz; "" disables
    traces: TraceExporter | None = None
    otlp_endpoint: str | None = None
    event_sample_ratio: Annotated[float, Field(ge=0, le=1)] = 1.0
    record_content: bool = False
    traceparent_field: str = "traceparent"
    span_log_path: str = "./syncd-data/spans.jsonl"
    span_log_max_bytes: Annotated[int, Field(ge=0, le=2**62)] = 5_000_000
    verify_sample_every_s: Seconds = 0.0
    verify_sample_size: Annotated[int, Field(ge=1, le=1_000_000)] = 100
    # /healthz turns 503 when a running pipeline loop has not heartbeated for this long.
    heartbeat_timeout_s: PositiveSeconds = 60.0
    # A repeated identical retry error is logged at most once per interval, with a count.
    retry_log_interval_s: Seconds = 30.0

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        match = re.fullmatch(r"[^:\s]+:(\d{1,5})", value)
        if value and not (match and int(match[1]) <= 65535):
            raise ValueError(
                "expected HOST:PORT with a port from 0 to 65535, e.g. 127.0.0.1:9464, "
                "or an empty string"
            )
        return value

    @field_validator("otlp_endpoint")
    @classmethod
    def _otlp_endpoint(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not is_endpoint(value):
            raise ValueError(ENDPOINT_EXPECTED)  # not repeated: it may hold credentials
        return value

    @field_validator("span_log_path")
    @classmethod
    def _span_log_path(cls, value: str) -> str:
        return _path_value(value) if value else value


class LogSettings(_Model):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"
    # Long operations (snapshot, verify, repair, dlq retry) log their progress this often
    # when stderr is not a terminal; 0 logs every step.
    progress_every_s: Seconds = 10.0


class MappingSettings(_Model):
    text: str | None = None  # a field path: "body" or "content.text"
    text_template: str | None = None  # "{title}\n\n{body}"
    metadata: list[str] = Field(default_factory=list)  # dot paths; empty = none
    rename: dict[str, str] = Field(default_factory=dict)  # dot path -> metadata key
    chunk_size: Annotated[int, Field(ge=0)] = 0  # characters; 0 = no chunking
    chunk_overlap: Annotated[int, Field(ge=0)] = 0
    max_document_bytes: Annotated[int, Field(ge=1)] = 16 * 1024 * 1024
    max_text_chars: Annotated[int, Field(ge=1)] = 1_000_000

    @field_validator("text", "text_template")
    @classmethod
    def _not_empty(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value == "":
            raise ValueError(
                'may not be empty; name the field whose value is the text, such as "body"'
                if info.field_name == "text"
                else 'may not be empty; write the text\'s template, such as "{title}\\n\\n{body}"'
            )
        return value

    @field_validator("text_template")
    @classmethod
    def _valid_template(cls, value: str | None) -> str | None:
        if value:
            from syncd.mapping import compile_template

            try:
                compile_template(value)
            except ConfigError as exc:
                raise ValueError(exc.describe().removeprefix("mapping.text_template: ")) from None
        return value

    @model_validator(mode="after")
    def _one_text_source(self) -> MappingSettings:
        if bool(self.text) == bool(self.text_template):
            raise ValueError("set exactly one of mapping.text and mapping.text_template")
        if self.chunk_size and self.chunk_overlap >= self.chunk_size:
            raise ValueError("mapping.chunk_overlap must be smaller than mapping.chunk_size")
        for key in self.rename.values():
            if is_reserved(key):
                prefix = (
                    RESERVED_PREFIX if key.startswith(RESERVED_PREFIX) else CHROMA_RESERVED_PREFIX
                )
                raise ValueError(f"metadata key {key!r} uses the reserved prefix {prefix!r}")
        named: dict[str, str] = {}  # metadata key -> the field it comes from
        for path in dict.fromkeys(self.metadata):
            key = self.rename.get(path, path)
            if is_reserved(key):
                raise ValueError(
                    f"metadata field {path!r} would become the reserved key {key!r}; "
                    "add a mapping.rename entry for it"
                )
            if named.setdefault(key, path) != path:
                raise ValueError(
                    f"mapping: {named[key]!r} and {path!r} would both be stored as metadata "
                    f"key {key!r}; rename one of them"
                )
        return self


class EmbedderSettings(_Model):
    kind: Literal["field", "sentence_transformers", "openai", "hashing"] = "hashing"
    field: str | None = None  # kind = field: dot path of the vector
    model: str | None = None  # sentence_transformers: path or package; openai: model name
    base_url: str | None = None  # openai: https://host/v1
    api_key: SecretStr | None = None
    api_key_env: str = "OPENAI_API_KEY"
    dimensions: Annotated[int, Field(ge=1, le=65_536)] = 384
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 64
    timeout_s: PositiveSeconds = 30.0
    # Embedding requests in flight at once, each of up to batch_size texts. None: sized
    # by kind (see _default_concurrency).
    embed_concurrency: Annotated[int, Field(ge=1, le=MAX_EMBED_CONCURRENCY)] | None = None

    @field_validator("embed_concurrency", mode="before")
    @classmethod
    def _concurrency_is_a_count(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a whole number of requests, not true/false")
        return value

    @model_validator(mode="after")
    def _kind_requirements(self) -> EmbedderSettings:
        if self.kind == "field" and not self.field:
            raise ValueError('embedder.field is required when embedder.kind = "field"')
        self._check_concurrency()
        from_env = False
        if self.kind == "openai":
            if not self.base_url or not self.model:
                raise ValueError('embedder.base_url and embedder.model are required for "openai"')
            if not re.match(r"^https?://", self.base_url):
                raise ValueError("embedder.base_url must start with http:// or https://")
            from_env = self.api_key is None
            if from_env:
                key = os.environ.get(self.api_key_env)
                if key:
                    object.__setattr__(self, "api_key", SecretStr(key))
        if self.api_key is not None:
            object.__setattr__(self, "api_key", SecretStr(self.api_key.get_secret_value().strip()))
        if self.api_key:
            register_secret(self.api_key.get_secret_value())
            if not _HEADER_VALUE.fullmatch(self.api_key.get_secret_value()):
                what = f"the API key in ${self.api_key_env}" if from_env else "embedder.api_key"
                raise ValueError(f"{what}{_NOT_A_HEADER_VALUE}")
        return self

    def _check_concurrency(self) -> None:
        if self.embed_concurrency is None:
            object.__setattr__(self, "embed_concurrency", _default_concurrency(self.kind))
        elif self.embed_concurrency > 1 and self.kind != "openai":
            raise ValueError(
                f"embedder.embed_concurrency = {self.embed_concurrency} needs "
                f'embedder.kind = "openai": a {self.kind!r} embedder computes in this '
                "process, where more requests at once do not help; remove the setting"
            )


def _default_concurrency(kind: str) -> int:
    """A remote API answers many requests at once (its latency, not our CPU, bounds a
    request); a local model already uses every core for one."""
    return DEFAULT_REMOTE_EMBED_CONCURRENCY if kind == "openai" else 1


class PipelineSettings(_Model):
    name: str
    database: str
    collection: str | None = None
    collections: list[str] | None = None  # database-level stream filtered to these
    filter: dict[str, Any] = Field(default_factory=dict)  # MongoDB query on the document
    chroma_collection: str | None = None  # default: the pipeline name
    distance: Literal["cosine", "l2", "ip"] = "cosine"
    full_document: Literal["updateLookup", "whenAvailable", "required"] = "updateLookup"
    snapshot: Literal["initial", "never"] = "initial"
    # Documents a snapshot reads and writes at once. None: sized by the vector's size
    # (syncd.snapshot.page_size).
    snapshot_batch_size: Annotated[int, Field(ge=1, le=100_000)] | None = None
    on_history_lost: Literal["fail", "resnapshot"] = "fail"
    on_sink_lost: Literal["fail", "resnapshot"] = "fail"
    # What `syncd run` does when the checkpoint's mapping is not the configured one:
    # refuse to start the pipeline, or build the new mapping's collection beside the
    # live one and switch to it (see syncd.rebuild).
    on_mapping_change: Literal["refuse", "rebuild"] = "refuse"
    on_drop: Literal["purge", "halt"] = "purge"
    on_rename: Literal["halt", "purge"] = "halt"
    on_drop_database: Literal["halt", "purge"] = "halt"
    on_error: Literal["halt", "dead_letter"] = "halt"
    # How often a halted pipeline looks at the document it halted on again (0: never;
    # only `syncd resume` continues it then).
    halt_recheck_s: Seconds = 60.0
    consistency: Literal["eventual", "strong"] = "eventual"
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 500
    batch_max_wait_ms: Annotated[int, Field(ge=0, le=600_000)] = 200
    idle_checkpoint_interval_s: Annotated[float, Field(ge=0.1, le=_MAX_S)] = 10.0
    retry_deadline_s: Seconds = 0.0  # 0 = retry forever
    retry_max_backoff_s: PositiveSeconds = 30.0
    dead_letter_collection: str = "dead_letters"
    mapping: MappingSettings
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings)

    @field_validator("filter")
    @classmethod
    def _valid_filter(cls, value: dict[str, Any]) -> dict[str, Any]:
        from syncd.matcher import compile_filter

        try:
            compile_filter(value)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        return value

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"{value!r} is not a pipeline name: use 1 to 63 letters, digits, '_', '-' "
                "and '.', starting with a letter or digit"
            )
        return value

    @field_validator("database")
    @classmethod
    def _database_name(cls, value: str) -> str:
        return mongo_database_name(value, "database")

    @field_validator("collection", "dead_letter_collection")
    @classmethod
    def _collection_name(cls, value: str | None) -> str | None:
        return value if value is None else mongo_collection_name(value, "collection")

    @field_validator("collections")
    @classmethod
    def _collection_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            mongo_collection_name(name, "collection")
        twice = sorted({name for name in value or [] if (value or []).count(name) > 1})
        if twice:
            raise ValueError(f"{', '.join(map(repr, twice))} listed more than once")
        return value

    @model_validator(mode="after")
    def _one_namespace(self) -> PipelineSettings:
        if bool(self.collection) == bool(self.collections):
            raise ValueError("set exactly one of collection and collections")
        if self.embedder.kind == "field" and self.mapping.chunk_size:
            raise ValueError("chunking cannot be combined with a vector stored in the document")
        return self

    @property
    def chroma_collection_name(self) -> str:
        return self.chroma_collection or self.name

    @property
    def namespace(self) -> str:
        return f"{self.database}.{self.collection or '{' + ','.join(self.collections or []) + '}'}"

    @property
    def source_collections(self) -> list[str]:
        return [self.collection] if self.collection else list(self.collections or [])


class Settings(_Model):
    mongodb: MongoSettings = Field(default_factory=MongoSettings)
    chroma: ChromaSettings = Field(default_factory=ChromaSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    lease: LeaseSettings = Field(default_factory=LeaseSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    log: LogSettings = Field(default_factory=LogSettings)
    shutdown_timeout_s: Seconds = 25.0
    pipelines: list[PipelineSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_pipelines(self) -> Settings:
        names = [p.name for p in self.pipelines]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pipeline names must be unique; repeated: {', '.join(dupes)}")
        for index, pipeline in enumerate(self.pipelines):
            _check_chroma_name(pipeline, index)
        targets = [p.chroma_collection_name for p in self.pipelines]
        clash = sorted({n for n in targets if targets.count(n) > 1})
        if clash:
            raise ValueError(f"two pipelines write the same Chroma collection: {', '.join(clash)}")
        if (
            self.checkpoint.store == "file"
            and self.lease.enabled
            and "enabled" in self.lease.model_fields_set
        ):  # leases live beside MongoDB checkpoints: with files, every process would run alone
            raise ValueError(
                'lease.enabled = true needs checkpoint.store = "mongodb": leases are kept in '
                "MongoDB beside the checkpoints; the file store runs without them (one process "
                "per pipeline, no standby)"
            )
        return self

    def pipeline(self, name: str) -> PipelineSettings:
        for pipeline in self.pipelines:
            if pipeline.name == name:
                return pipeline
        known = ", ".join(p.name for p in self.pipelines) or "none configured"
        raise ConfigError(f"no pipeline named {name!r} (known: {known})")


def _check_chroma_name(pipeline: PipelineSettings, index: int) -> None:
    """Chroma refuses some names; say so now, not as a failed write after the start."""
    name = pipeline.chroma_collection_name
    problem = None
    if not _CHROMA_NAME.match(name):
        problem = (
            "3-512 characters from letters, digits, '.', '_' and '-', "
            "starting and ending with a letter or digit"
        )
    elif ".." in name:
        problem = "no two consecutive periods"
    elif _is_ip_address(name):
        problem = "not an IP address"
    if problem is None:
        return
    if pipeline.chroma_collection:
        raise ValueError(
            f"pipelines[{index}].chroma_collection: {name!r} is not a valid Chroma collection "
            f"name ({problem})"
        )
    raise ValueError(
        f"pipelines[{index}].name: {name!r} is also the Chroma collection's name, and Chroma "
        f"needs {problem}; rename the pipeline or set chroma_collection"
    )


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# --- loading -----------------------------------------------------------------

# Environment variables that are not SYNCD_<SECTION>__<KEY> but that operators expect.
_ENV_ALIASES = {
    "SYNCD_MONGODB_URI": ("mongodb", "uri"),
    "SYNCD_CHROMA_TOKEN": ("chroma", "token"),
    "SYNCD_LOG_FORMAT": ("log", "format"),
    "SYNCD_LOG_LEVEL": ("log", "level"),
}
_ENV_IGNORED = {"SYNCD_CONFIG"}
# Variables of this repository's tooling (tests, image build), not settings.
_ENV_OWN_USE = {
    "SYNCD_UPDATE_SCREENSHOTS",
    "SYNCD_EXTRAS",
    "SYNCD_REBUILD_CRASH_SEED",
    "SYNCD_REBUILD_CRASH_RUNS",
}
# A secret given inline or read from a file: one replaces the other across layers.
SECRET_PAIRS = {
    "mongodb.uri": "mongodb.uri_file",
    "mongodb.uri_file": "mongodb.uri",
    "chroma.token": "chroma.token_file",
    "chroma.token_file": "chroma.token",
}
# Settings the command line sets, by the flag that sets them.
FLAGS = {"log.format": "--log-format", "log.level": "--log-level", "telemetry.listen": "--listen"}


def load(
    path: Path | str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    require_file: bool | None = None,
) -> Settings:
    """Build :class:`Settings` from defaults < file < environment < ``overrides``.

    ``overrides`` uses dotted keys (``{"log.format": "json"}``), as the CLI produces.
    A missing file is an error when it was named explicitly.
    """
    env = os.environ if env is None else env
    explicit = path is not None or bool(env.get("SYNCD_CONFIG"))  # "" is unset
    config_path = config_path_of(path, env)
    data: dict[str, Any] = {}
    if config_path.exists():
        data = _read_toml(config_path)
        _check_file_types(data, str(config_path))
    elif explicit if require_file is None else require_file:
        where = "" if explicit else f" in {Path.cwd()}"
        raise ConfigError(
            f"config file {config_path} not found{where}",
            hint="point at one with --config PATH or SYNCD_CONFIG=PATH, or create "
            f"{DEFAULT_CONFIG_PATH} here (see README)",
        )
    layer = _env_layer(env)
    # A secret set by a later layer replaces the file's, however the file wrote it
    # (mongodb.uri_file in the file, SYNCD_MONGODB_URI in the environment: the variable).
    later = set(layer) | {key for key, value in (overrides or {}).items() if value is not None}
    for key in later:
        partner = SECRET_PAIRS.get(key)
        if partner is not None and partner not in later:
            _pop_dotted(data, partner)
    # A bad value is named where it was set: the variable, or the flag, not the file.
    flags: dict[str, str] = {}
    for key, (name, value) in sorted(layer.items(), key=lambda item: item[1][0]):
        try:
            where = _set_dotted(data, key, _env_value(key, name, value))
        except ConfigError as exc:
            if exc.message.startswith(f"{name}:"):
                raise
            raise ConfigError(f"{name}: {exc.message}") from None
        if where in flags:  # a pipeline by position and by name
            raise ConfigError(f"{flags[where]} and {name} both set {where}; keep one")
        flags[where] = name
    for key, value in (overrides or {}).items():
        if value is not None:
            flags[_set_dotted(data, key, value)] = FLAGS.get(key, key)
    flags |= _embedding_keys_from(env, data)
    for variable in OTEL_ENDPOINT_VARIABLES:  # read by the exporter when otlp_endpoint is unset
        endpoint = env.get(variable)
        if endpoint and not is_endpoint(endpoint):
            raise ConfigError(f"{variable}: {ENDPOINT_EXPECTED}")
    settings = validate(data, source=str(config_path), flags=flags)
    mistake = _endpoint_mistake(settings, env)
    if mistake is not None:
        raise mistake
    if settings.telemetry.traces is None:  # the exporters come from OTEL_TRACES_EXPORTER
        unknown = [k for k in env_trace_exporters(env) if k not in TRACE_EXPORTERS]
        if unknown:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER: unknown trace exporter {unknown[0]!r}",
                hint=f"use {', '.join(TRACE_EXPORTERS[:-1])} or {TRACE_EXPORTERS[-1]}",
            )
    return settings


def config_path_of(path: Path | str | None, env: Mapping[str, str] | None = None) -> Path:
    """The config file :func:`load` reads: ``path``, else ``$SYNCD_CONFIG``, else the
    default ``./syncd.toml``."""
    env = os.environ if env is None else env
    return Path(path or env.get("SYNCD_CONFIG") or DEFAULT_CONFIG_PATH)


def _embedding_keys_from(env: Mapping[str, str], data: dict[str, Any]) -> dict[str, str]:
    """Fill each embedder's API key from the variable it names (``api_key_env``); returns
    the variable by the key's location, so that a mistake in it is blamed on it."""
    named: dict[str, str] = {}
    for index, pipeline in enumerate(data.get("pipelines") or []):
        embedder = pipeline.get("embedder") if isinstance(pipeline, dict) else None
        if not isinstance(embedder, dict) or embedder.get("api_key"):
            continue
        variable = str(embedder.get("api_key_env", "OPENAI_API_KEY"))
        key = env.get(variable)
        if key:
            embedder["api_key"] = key
            named[f"pipelines[{index}].embedder.api_key"] = variable
    return named


def validate(
    data: Mapping[str, Any], *, source: str = "config", flags: Mapping[str, str] | None = None
) -> Settings:
    """``flags``: the dotted keys the command line set, by the flag that set them; a bad
    value there is the flag's mistake, not the file's."""
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, source, flags or {})) from None
    except ConfigError:
        raise


def _check_file_types(data: dict[str, Any], source: str) -> None:
    """TOML has types: ``port = "8000"`` or ``ssl = "true"`` is text where a number or a
    boolean belongs. Variables are text and are converted; a file's values are taken as
    typed, so such a value is a mistake (most likely quotes where none belong)."""
    try:
        Settings.model_validate(data, strict=True)
    except ValidationError as exc:
        wrong = [
            {**error, "msg": error["msg"] + ", not text: write it without quotes"}
            for error in exc.errors()
            if error["type"] in _STRICT_TYPES and isinstance(error.get("input"), str)
        ]
        if wrong:
            raise ConfigError(_describe_validation_error(wrong, source, {})) from None


# What the strict pass over the file refuses: text where a number or a boolean belongs.
_STRICT_TYPES = frozenset({"int_type", "float_type", "bool_type"})


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        # A UTF-8 byte order mark, as some Windows editors write it, is no TOML statement.
        return tomllib.loads(path.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}); TOML files are UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None


def _env_layer(env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """The settings the environment sets: dotted key -> (variable, value)."""
    layer: dict[str, tuple[str, str]] = {}
    for name, value in env.items():
        if not name.startswith("SYNCD_") or name in _ENV_IGNORED or name.startswith("SYNCD_TEST_"):
            continue
        if not is_text(value):  # bytes the locale could not decode (surrogate escapes)
            raise ConfigError(f"${name} is not UTF-8 text; set it to UTF-8 text")
        if name in _ENV_ALIASES:
            dotted = ".".join(_ENV_ALIASES[name])
        elif "__" in name:
            section, _, key = name[len("SYNCD_") :].lower().partition("__")
            dotted = f"{section}.{key.replace('__', '.')}"
        else:
            continue
        if dotted in layer:  # SYNCD_MONGODB_URI and SYNCD_MONGODB__URI: which one is meant?
            first, second = sorted((layer[dotted][0], name))
            raise ConfigError(f"{first} and {second} both set {dotted}; keep one")
        layer[dotted] = (name, value)
    return layer


def unknown_variables(env: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``SYNCD_*`` variables that set nothing (no ``__`` and not a known name: a typo such
    as ``SYNCD_MONGO_URI``), each with the known name it most resembles, if any."""
    import difflib

    known = [*_ENV_ALIASES, *_ENV_IGNORED]
    out: list[tuple[str, str | None]] = []
    for name in sorted(env):
        if (
            not name.startswith("SYNCD_")
            or "__" in name
            or name in known
            or name.startswith("SYNCD_TEST_")
            or name in _ENV_OWN_USE
        ):
            continue
        near = _table_form(name) or difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        out.append((name, near[0] if near else None))
    return out


def _table_form(name: str) -> list[str]:
    """``SYNCD_CHROMA__HOST`` for ``SYNCD_CHROMA_HOST``: the variable with one or two of its
    ``_`` doubled that names a setting, if one does."""
    import itertools

    rest = name[len("SYNCD_") :].lower()
    gaps = [i for i, char in enumerate(rest) if char == "_"]
    for count in (1, 2):
        for chosen in itertools.combinations(gaps, count):
            dotted = "".join("." if i in chosen else char for i, char in enumerate(rest))
            if _names_a_setting(dotted):
                return ["SYNCD_" + dotted.upper().replace(".", "__")]
    return []


def _names_a_setting(dotted: str) -> bool:
    """Whether ``chroma.host`` or ``pipelines.0.batch_size`` is a setting (or a table)."""
    return _setting_type(dotted) is not None


def _env_value(key: str, name: str, value: str) -> Any:
    """A variable's value for ``key``: as written, or parsed as JSON where the setting
    holds a list or a table (``["title", "tags"]``, ``{"author.name": "author"}``)."""
    kind = _container_kind(key)
    if kind is None:
        return value
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if not isinstance(parsed, kind):  # the value is not repeated: it may be a secret
        what = "a list" if kind is list else "a table"
        example = _JSON_EXAMPLES.get(key.rsplit(".", 1)[-1]) or (
            '["a", "b"]' if kind is list else '{"key": "value"}'
        )
        raise ConfigError(f"{name}: {key} takes {what}: write it as JSON, e.g. {name}='{example}'")
    return parsed


_JSON_EXAMPLES = {
    "metadata": '["title", "author.name"]',
    "collections": '["articles", "notes"]',
    "rename": '{"author.name": "author"}',
    "headers": '{"X-Request-Source": "syncd"}',
    "filter": '{"status": "published"}',
}


def _unwrapped(annotation: Any) -> Any:
    """``annotation`` without Annotated[...] and an Optional's None."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            rest = [a for a in get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation  # a real choice of types: taken as written
            annotation = rest[0]
        else:
            return annotation


def _container_kind(dotted: str) -> type[list[Any]] | type[dict[str, Any]] | None:
    """``list`` or ``dict`` when the dotted key names a setting holding one (a list of
    names, a table such as ``mapping.rename``, or a whole section), else None."""
    annotation = _setting_type(dotted)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return dict
    origin = get_origin(annotation)
    return list if origin is list else dict if origin is dict else None


def _setting_type(dotted: str) -> Any:
    """The type of the setting a dotted key names (a pipeline by its name or position:
    ``pipelines.0.batch_size``), or None when it names none."""
    model: type[BaseModel] = Settings
    parts = dotted.split(".")
    index = 0
    while index < len(parts):
        field = model.model_fields.get(parts[index])
        if field is None:
            return None
        annotation = _unwrapped(field.annotation)
        if index == len(parts) - 1:
            return annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model, index = annotation, index + 1
        elif get_origin(annotation) is list:
            item = _unwrapped(get_args(annotation)[0])
            if not (isinstance(item, type) and issubclass(item, BaseModel)):
                return None
            if index + 2 >= len(parts):  # a pipeline's name with no setting after it
                return None
            model, index = item, index + 2  # past the item's name or position
        else:
            return None
    return None


def _pop_dotted(data: dict[str, Any], dotted: str) -> None:
    """Remove ``a.b`` from nested tables, if there."""
    section, _, leaf = dotted.partition(".")
    table = data.get(section)
    if isinstance(table, dict):
        table.pop(leaf, None)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> str:
    """Set ``a.b.c`` in nested tables; a list (``pipelines``) is indexed by position or name.

    Returns where the value went, spelled as a validation error's location spells it
    (``pipelines[0].batch_size`` for ``pipelines.articles.batch_size``)."""
    *parents, leaf = dotted.split(".")
    node: Any = data
    where = ""
    for part in parents:
        if isinstance(node, list):
            index = _list_index(node, part, dotted)
            node, where = node[index], f"{where}[{index}]"
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, dict | list):
            raise ConfigError(f"cannot set {dotted}: {part} is not a table")
        node, where = child, f"{where}.{part}" if where else part
    if not isinstance(node, dict):
        raise ConfigError(f"cannot set {dotted}: not a table")
    node[leaf] = value
    return f"{where}.{leaf}" if where else leaf


def _list_index(items: list[Any], part: str, dotted: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for index, item in enumerate(items):
        if isinstance(item, dict) and str(item.get("name", "")).lower() == part.lower():
            return index
    names = [str(item.get("name")) for item in items if isinstance(item, dict)]
    known = (
        f"(it has {', '.join(names)}, by name or position 0 to {len(items) - 1})"
        if names
        else "(it has none)"
    )
    raise ConfigError(f"cannot set {dotted}: no pipeline {part!r} in the config file {known}")


_ERRORS_SHOWN = 20  # a file with more mistakes than that shows the first ones and a count


def _describe_validation_error(
    exc: ValidationError | list[Any], source: str, flags: Mapping[str, str]
) -> str:
    """Every mistake, each on a line of its own (the first as the error itself, the others
    after it as ``also ...``), so that one run shows all there is to fix."""
    lines: list[str] = []
    for error in exc.errors() if isinstance(exc, ValidationError) else exc:
        line = _describe_one(error, source, flags)
        if line not in lines:
            lines.append(line)
    shown = lines[:_ERRORS_SHOWN]
    text = shown[0] + "".join(f"\n  also {line}" for line in shown[1:])
    if len(lines) > len(shown):
        text += f"\n  (and {len(lines) - len(shown)} more)"
    return redact_text(text)


def _describe_one(error: Any, source: str, flags: Mapping[str, str]) -> str:
    location = _location(error["loc"])
    inside = [key for key in flags if location and key.startswith(f"{location}.")]
    outside = [key for key in flags if location.startswith(f"{key}.")]  # a table's entry
    if location in flags:
        source, location = flags[location], ""
    elif outside:
        source, location = flags[outside[0]], location.removeprefix(f"{outside[0]}.")
    elif inside:  # a check of the whole table (mongodb's URI): the values set there
        # "SYNCD_CHROMA_TOKEN (chroma): ...": after "TOKEN: " a word would read as the secret.
        *others, last = sorted({flags[key] for key in inside})
        names = f"{', '.join(others)} and {last}" if others else last
        source, location = f"{names} ({location})", ""
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
        key = error["loc"][0] if len(error["loc"]) == 1 else None
        if isinstance(key, str) and key in PipelineSettings.model_fields:
            table = isinstance(error.get("input"), dict)
            message += f" at the top level: {key} is a pipeline's setting: " + (
                f"write the table as [pipelines.{key}], after its [[pipelines]] line"
                if table
                else "put it after a [[pipelines]] line"
            )
        elif error["loc"] and isinstance(error["loc"][-1], str):
            homes = _homes(error["loc"][-1])
            if homes:
                message += f" here: it is a setting of {' or '.join(homes)}"
    elif error["type"] == "missing":
        message = "required key is missing"
    elif error["type"] == "list_type" and error["loc"] == ("pipelines",):
        message = (
            "is one table, not a list of them: write each pipeline under a [[pipelines]] "
            "line (two brackets)"
            if isinstance(error.get("input"), dict)
            else "expected a list of [[pipelines]] tables"
        )
    where = f"{location}: " if location else ""
    return f"{source}: {where}{message}"


def _homes(key: str) -> list[str]:
    """The tables a setting named ``key`` belongs in, as written in the file."""
    tables: list[tuple[str, type[BaseModel]]] = [("the top level", Settings)]
    for name, field in Settings.model_fields.items():
        annotation = _unwrapped(field.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            tables.append((f"[{name}]", annotation))
    tables.append(("[[pipelines]]", PipelineSettings))
    for name, field in PipelineSettings.model_fields.items():
        annotation = _unwrapped(field.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            tables.append((f"[pipelines.{name}]", annotation))
    return [where for where, model in tables if key in model.model_fields]


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "literal[")):
            out += f".{part}" if out else str(part)
    return out
