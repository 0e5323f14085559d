"""Keep credentials out of everything syncd prints, logs, traces or exports."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

# scheme://user:password@host  → scheme://user:***@host (also user-only forms)
_URI_USERINFO = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*)(?::[^@/\s]*)?@"
)
# key=value pairs in query strings or free text whose key names a secret
_SECRET_PAIR = re.compile(
    # The secret word must be the whole key or its last part after '_', '-' or '.', so
    # "api_token=" and "X-Chroma-Token:" are masked but "InvalidResumeToken:" is not.
    r"(?i)(?<![\w.-])(?P<key>(?:[\w.-]*[_.-])?(?:password|passwd|secret|token|api[_-]?key|"
    r"authorization|credentials?))"
    r"(?P<sep>\s*[=:]\s*)(?P<q>[\"']?)(?P<value>(?:Bearer\s+)?[^\s\"'&,;}]+)"
)
_BEARER = re.compile(r"(?i)\bBearer\s+[A-Za-z0-9._~+/=-]+")
_SECRET_KEYS = ("password", "passwd", "secret", "token", "api_key", "apikey", "authorization")

_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret value so that it is masked wherever it appears verbatim."""
    if value and len(value) >= 4:
        _registered.add(value)


def redact_uri(uri: str) -> str:
    return redact_text(uri)


def _mask_userinfo(match: re.Match[str]) -> str:
    user = match["user"]
    return f"{match['scheme']}{user}:{MASK}@" if user else f"{match['scheme']}{MASK}@"


# Every match of _SECRET_PAIR contains one of these (lowercased): checking for them first
# spares the regular expressions on the many strings that cannot match, such as ids.
_PAIR_WORDS = ("pass", "secret", "token", "key", "authorization", "credential")


def redact_text(text: str) -> str:
    if "://" in text:
        text = _URI_USERINFO.sub(_mask_userinfo, text)
    lowered = text.lower()
    if any(word in lowered for word in _PAIR_WORDS):
        text = _SECRET_PAIR.sub(lambda m: f"{m['key']}{m['sep']}{m['q']}{MASK}", text)
    if "bearer" in lowered:
        text = _BEARER.sub(f"Bearer {MASK}", text)
    for secret in _registered:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def is_secret_key(key: str) -> bool:
    lowered = key.lower().replace("-", "_")
    return any(word in lowered for word in _SECRET_KEYS)


def redact_mapping(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with secret-looking keys masked and strings scrubbed."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if is_secret_key(str(key)) and value is not None:
            out[key] = MASK
        elif isinstance(value, Mapping):
            out[key] = redact_mapping(value)
        elif isinstance(value, str):
            out[key] = redact_text(value)
        elif isinstance(value, list):
            out[key] = [
                redact_mapping(v)
                if isinstance(v, Mapping)
                else redact_text(v)
                if isinstance(v, str)
                else v
                for v in value
            ]
        else:
            out[key] = value
    return out


def _redact_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return redact_mapping(value)
    return redact_text(value) if isinstance(value, str) else value
