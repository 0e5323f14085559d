"""Keep credentials out of everything syncd prints, logs, traces or exports.

One rule decides whether a name stands for a secret (:func:`is_secret_name`), in any
case style: ``password``, ``tlsCertificateKeyFilePassword``, ``AWS_SESSION_TOKEN``,
``X-Api-Key``, ``privateKey``. :func:`redact_text` applies it to ``name=value`` and
``name: value`` pairs (quoted JSON keys too), to the options of URIs (percent-encoded
or not), and masks URI passwords, bearer tokens, PEM private keys and every secret
registered from the configuration.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

MASK = "***"

# Names are judged in one case style: lowercase letters and digits only, so that
# tlsCertificateKeyFilePassword, TLSCERTIFICATEKEYFILEPASSWORD and
# tls_certificate_key_file_password are one name (MongoDB URI options ignore case).
_NOT_NAME_CHARS = re.compile(r"[^a-z0-9]")
# Parts that make any name secret wherever they stand in it.
_SECRET_PARTS = ("password", "passwd", "passphrase", "secret", "credential")
# Endings that make a name secret: what the name is (its head noun). A bare "key" or a
# "documentKey" is not key material; an "apiKey" or a "privateKey" is.
_SECRET_ENDINGS = tuple(
    ["token", "tokens", "pwd", "authorization", "auth", "bearer", "cookie"]
    + [
        f"{kind}key{plural}"
        for kind in (
            "api",
            "private",
            "secret",
            "access",
            "signing",
            "encryption",
            "master",
            "account",
            "shared",
            "client",
            "session",
            "storage",
            "subscription",
        )
        for plural in ("", "s")
    ]
)
# "...Token" after these is a change-stream position, which operators need to see.
_POSITION_ENDINGS = ("resumetoken", "starttoken")
# Query parameters that carry a credential in an HTTP URL (an API key, a signed URL's
# signature), though the name alone would not say so elsewhere.
_QUERY_SECRETS = frozenset({"key", "sig", "signature", "code", "x-amz-signature"})
# The same in prose, "a resume token: ...", just before a pair's name.
_POSITION_PHRASE = re.compile(r"(?i)\b(?:resume|start)[ \t_-]+\Z")

# A candidate pair: a name, maybe its closing quote (JSON), then '=' or ':'.
_PAIR = re.compile(
    r"(?<![\w.-])(?P<key>[A-Za-z_][\w.-]*)(?P<kq>\\?[\"'])?(?P<sep>[ \t]*[=:][ \t]*)"
)
_QUOTE = re.compile(r"\\?[\"']")
_SCHEME_WORD = re.compile(
    r"(?i)(?:bearer|basic|digest|token|negotiate|apikey|aws4-hmac-sha256)[ \t]+(?=\S)"
)
# A bare value; one that opens a structure ({, [) is left to structural redaction.
_BARE_VALUE = re.compile(r"[^\s\"'&,;}{\[\]\\][^\s\"'&,;}\\]*")
_URI = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>]+")
# scheme://user:password@host → scheme://user:***@host; the password runs to the last
# '@' of the authority, so an unencoded '@' in it does not leak its tail.
_USERINFO = re.compile(r"^(?P<scheme>[^:]+://)(?P<user>[^:@/?#]*)(?::[^/?#]*)?@")
_BEARER = re.compile(r"(?i)\bBearer(?:\s+Bearer\b)*\s+[A-Za-z0-9._~+/=-]+")
_PEM_KEY = re.compile(
    r"-----BEGIN (?P<kind>[A-Z0-9 ]*PRIVATE KEY)-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL,
)

# Every pair redact_text masks has one of these in its lowercased text: checking for them
# first spares the regular expressions on the many strings that cannot match, such as ids.
_PAIR_WORDS = (
    "pass",
    "pwd",
    "secret",
    "token",
    "key",
    "auth",
    "credential",
    "bearer",
    "cookie",
)

_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret value so that it is masked wherever it appears verbatim."""
    if value and len(value) >= 4:
        _registered.add(value)


@functools.lru_cache(maxsize=4096)
def is_secret_name(name: str) -> bool:
    """Whether a key, option, header or field name stands for a secret, in any case style."""
    joined = _NOT_NAME_CHARS.sub("", name.lower())
    if any(part in joined for part in _SECRET_PARTS):
        return True
    return joined.endswith(_SECRET_ENDINGS) and not joined.endswith(_POSITION_ENDINGS)


def is_secret_key(key: str) -> bool:
    """Kept for callers that think of dictionary keys; same rule as :func:`is_secret_name`."""
    return is_secret_name(key)


def redact_uri(uri: str) -> str:
    return redact_text(uri)


def redact_text(text: str) -> str:
    lowered = text.lower()
    if "://" in text:
        text = _URI.sub(_redact_uri_match, text)
    if any(word in lowered for word in _PAIR_WORDS):
        text = _redact_pairs(text)
    if "bearer" in lowered:
        text = _BEARER.sub(f"Bearer {MASK}", text)
    if "private key" in lowered:
        text = _PEM_KEY.sub(lambda m: f"-----BEGIN {m['kind']}-----{MASK}", text)
    for secret in _registered:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_every_pattern(text: str) -> str:
    """:func:`redact_text` without its shortcuts: every pattern on every string (for tests)."""
    text = _URI.sub(_redact_uri_match, text)
    text = _redact_pairs(text)
    text = _BEARER.sub(f"Bearer {MASK}", text)
    text = _PEM_KEY.sub(lambda m: f"-----BEGIN {m['kind']}-----{MASK}", text)
    for secret in _registered:
        text = text.replace(secret, MASK)
    return text


def _redact_uri_match(match: re.Match[str]) -> str:
    uri = _USERINFO.sub(_mask_userinfo, match.group(0))
    base, question, query = uri.partition("?")
    if not question:
        return uri
    # Options may be percent-encoded (AWS_SESSION_TOKEN%3A...): judge them decoded.
    return f"{base}?{_redact_pairs(unquote(query), also=_QUERY_SECRETS)}"


def _mask_userinfo(match: re.Match[str]) -> str:
    user = match["user"]
    return f"{match['scheme']}{user}:{MASK}@" if user else f"{match['scheme']}{MASK}@"


def _redact_pairs(text: str, *, also: frozenset[str] = frozenset()) -> str:
    """``text`` with the value of every secret-named pair masked; ``also``: more names
    (lowercase) that are secret here."""
    out: list[str] = []
    done = 0
    for match in _PAIR.finditer(text):
        name = match["key"]
        if match.start() < done or not (is_secret_name(name) or name.lower() in also):
            continue
        if _POSITION_PHRASE.search(text, 0, match.start()):  # "resume token: ..." in prose
            continue
        start, end = _value_span(text, match.end())
        if end == start:
            continue
        out.append(text[done:start])
        out.append(MASK)
        done = end
    out.append(text[done:])
    return "".join(out)


def _value_span(text: str, start: int) -> tuple[int, int]:
    """Where the value after a separator starts and ends; its quotes stay outside."""
    opening = _QUOTE.match(text, start)
    if opening is not None:
        close = text.find(opening.group(0), opening.end())
        if close == -1:
            newline = text.find("\n", opening.end())
            close = len(text) if newline == -1 else newline
        return opening.end(), close
    # An auth scheme ("Basic", "Bearer") is masked with its credentials.
    scheme = _SCHEME_WORD.match(text, start)
    value = _BARE_VALUE.match(text, scheme.end() if scheme else start)
    return start, value.end() if value else start


def redact_mapping(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with secret-named keys masked and every string scrubbed."""
    return {
        key: MASK if is_secret_name(str(key)) and value is not None else redact_value(value)
        for key, value in data.items()
    }


def redact_value(value: Any) -> Any:
    """``value`` with secrets masked, at any depth of mappings and lists."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return redact_mapping(value)
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value
