"""The redactor, judged on a table of inputs: what must be masked, and what must stay."""

from __future__ import annotations

import json

import pytest

from syncd.redact import MASK, is_secret_name, redact_mapping, redact_text

# (input, secret values that must be gone, text that must survive)
MASKED = [
    # an HTTP URL's query parameters that carry a credential
    (
        "https://otlp.example.com:4318/v1/traces?key=Abc123Secret&region=eu",
        ["Abc123Secret"],
        ["key=***", "region=eu"],
    ),
    ("http://h/x?sig=Zz9SiGnAtUrE&se=2026", ["Zz9SiGnAtUrE"], ["se=2026"]),
    # a secret pair after prose naming a resume token
    ("resume token: 8265A1B2, token=Tok3nSecret", ["Tok3nSecret"], ["resume token: 8265A1B2"]),
    # MongoDB URI options whose name is secret, in any case style, encoded or not
    (
        "mongodb://db:27017/?tls=true&tlsCertificateKeyFilePassword=Pw0rd-TLS&replicaSet=rs0",
        ["Pw0rd-TLS"],
        ["tlsCertificateKeyFilePassword=***", "replicaSet=rs0"],
    ),
    (
        "mongodb://db/?authMechanism=MONGODB-AWS&authMechanismProperties="
        "AWS_SESSION_TOKEN:FwoGZXIvYXdz,SERVICE_NAME:mongodb",
        ["FwoGZXIvYXdz"],
        ["AWS_SESSION_TOKEN:***", "SERVICE_NAME:mongodb"],
    ),
    (
        "mongodb://db/?authMechanismProperties=AWS_SESSION_TOKEN%3AFwoGZXIvYXdz%2CSERVICE_NAME"
        "%3Amongodb&w=majority",
        ["FwoGZXIvYXdz"],
        ["w=majority"],
    ),
    ("mongodb://db/?ssl_key_password=abcd1234", ["abcd1234"], ["ssl_key_password=***"]),
    ("mongodb://db/?SSLPEMKEYPASSWORD=abcd1234", ["abcd1234"], []),
    ("mongodb://db/?sslPEMKeyPassword=abcd1234&x=1", ["abcd1234"], ["x=1"]),
    ("mongodb://app:s3cr3t@db/?authSource=admin", ["s3cr3t"], ["app:***@db", "authSource=admin"]),
    ("mongodb://app:p@ss@db/app", ["p@ss", "ss@db"], ["app:***@db"]),
    ("https://user:pw-1234@chroma.example:8000/api", ["pw-1234"], ["user:***@chroma.example"]),
    # quoted JSON keys, as a document's content reads in a span attribute
    ('{"password": "hunter2 with spaces", "n": 1}', ["hunter2"], ['"password": "***"', '"n": 1']),
    ('{"api_key": "sk-live-0123"}', ["sk-live-0123"], ['"api_key": "***"']),
    ('{"secret": "s3cr3t-val"}', ["s3cr3t-val"], []),
    ('{"token": "tok-0123456"}', ["tok-0123456"], []),
    ('{"apiKey":"k-98765"}', ["k-98765"], []),
    ('{"client_secret": "cs-98765", "refresh_token": "rt-98765"}', ["cs-98765", "rt-98765"], []),
    ("{'passwd': 'pw-98765'}", ["pw-98765"], []),
    ('{"note": "set password=\\"inner-9876\\" now"}', ["inner-9876"], ["now"]),
    # headers and configuration lines
    ("Authorization: Basic dXNlcjpwYXNzd29yZA==", ["dXNlcjpwYXNzd29yZA=="], ["Authorization: ***"]),
    ("authorization=Bearer eyJhbGciOi.abc", ["eyJhbGciOi"], []),
    ("Proxy-Authorization: Digest abcdef123", ["abcdef123"], []),
    ("X-Api-Key: xk-01234", ["xk-01234"], []),
    ("X-Chroma-Token: t0k-0123", ["t0k-0123"], []),
    ("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG", ["wJalrXUtnFEMI"], []),
    ("AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI", ["wJalrXUtnFEMI"], []),
    ("privateKey=MIIEvQIBADANBgkq", ["MIIEvQIBADANBgkq"], []),
    ("private_key: 'MIIEvQIBADANBgkq'", ["MIIEvQIBADANBgkq"], []),
    ("PASSWORD=x1y2z3 and Api-Key: abc987", ["x1y2z3", "abc987"], ["and"]),
    ("db.password = hunter22", ["hunter22"], []),
    ("Cookie: session=abcdef0123", ["abcdef0123"], []),
    ("passphrase: open sesame", ["open"], []),
    (
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\nafter",
        ["MIIEpAIBAAKCAQEA"],
        ["after"],
    ),
    ("a bearer Bearer abc.def-123 token", ["abc.def-123"], []),
]

# Names that look a little like secrets but are not; redaction must leave them readable.
KEPT = [
    "InvalidResumeToken: the token is not a resume token of this stream",
    "resume_token=8265A1B2C3000000072B",
    "postBatchResumeToken: {'_data': '8265A1B2'}",
    "start_token: 8265A1B2",
    "tokenType: highWaterMark",
    "token_count=512",
    "documentKey: {'_id': 42}",
    "key=i:42",
    "shard_key: region",
    "authSource=admin",
    "authMechanism=SCRAM-SHA-256",
    "tlsCertificateKeyFile=/etc/ssl/client.pem",
    "api_key_env=OPENAI_API_KEY",
    "mongodb://127.0.0.1:27017/?replicaSet=rs0&directConnection=true",
    "2026-11-26T00:21:30.123Z i:42 oid:65a1b2c3d4e5f60718293a4b",
    "not a resume token: '1700000000' is not a hex digit",
    "the stored checkpoint cannot be read: token is not a resume token (8200): too short",
    "a start token: 8265A1B2",
]


@pytest.mark.parametrize(("text", "gone", "kept"), MASKED, ids=[m[0][:40] for m in MASKED])
def test_secrets_are_masked(text: str, gone: list[str], kept: list[str]) -> None:
    out = redact_text(text)
    assert MASK in out, out
    for secret in gone:
        assert secret not in out, out
    for part in kept:
        assert part in out, out


@pytest.mark.parametrize("text", KEPT)
def test_look_alikes_are_left_alone(text: str) -> None:
    assert redact_text(text) == text


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("password", True),
        ("tlsCertificateKeyFilePassword", True),
        ("TLS_CERTIFICATE_KEY_FILE_PASSWORD", True),
        ("tls-certificate-key-file-password", True),
        ("AWS_SESSION_TOKEN", True),
        ("awsSessionToken", True),
        ("X-Api-Key", True),
        ("APIKey", True),
        ("apikey", True),
        ("privateKey", True),
        ("aws_secret_access_key", True),
        ("Authorization", True),
        ("client_secret", True),
        ("resumeToken", False),
        ("start_token", False),
        ("tokenType", False),
        ("token_file", False),
        ("documentKey", False),
        ("key", False),
        ("tlsCertificateKeyFile", False),
        ("authSource", False),
    ],
)
def test_secret_names_in_any_case_style(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_mappings_are_masked_at_any_depth() -> None:
    data = {
        "body": "text",
        "creds": {"apiKey": "k-0123456", "list": [{"password": "p-0123456"}, ["token=t-0123456"]]},
        "resume_token": "8265A1B2",
    }
    out = redact_mapping(data)
    text = json.dumps(out)
    for secret in ("k-0123456", "p-0123456", "t-0123456"):
        assert secret not in text
    assert out["resume_token"] == "8265A1B2" and out["body"] == "text"
