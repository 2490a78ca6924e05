"""Hostile and careless HTTP requests as bytes (tests/test_hostile.py, bench/fuzz.py).

:func:`generate` draws one request from a seeded ``random.Random``: good calls, absurd
output caps, deep JSON, undecodable header bytes, every HTTP-parser rejection, forged
credentials, garbage, slow and half-closed clients. Every body carries
:data:`PROMPT_CANARY` and every credential :data:`SECRET_CANARY`, so a log line that
quotes a request is found by a substring search. :mod:`tests.support.hostile` plays them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"
PROMPT_CANARY = "PROMPTCANARY"
SECRET_CANARY = "SECRETCANARY"
#: Access key a workload of the fuzz policy owns (its secret is in FUZZ_SECRET_ENV).
FUZZ_KEY_ID = "AKIDHOSTILECHAT"
FUZZ_SECRET_ENV = "SLUICE_FUZZ_SECRET"


def fuzz_policy(timeout_s: float = 1.0, max_connections: int = 2000) -> dict[str, object]:
    """A policy with one pool declaring its output ceiling and one that does not."""
    return {
        "server": {
            "connections": {
                "header_timeout_seconds": timeout_s,
                "body_timeout_seconds": timeout_s,
                "keepalive_timeout_seconds": timeout_s * 2,
                "max_connections": max_connections,
                "max_unauthenticated_requests": 1000,
            },
            "retry": {"max_retries": 0},
        },
        "identity": {"header_mode": True, "default_workload": "anon"},
        "models": {
            "haiku": {
                "ids": [HAIKU],
                "requests_per_minute": 1_000_000,
                "tokens_per_minute": 100_000_000,
                "concurrency": 500,
                "max_output_tokens": 4096,
            },
            "sonnet": {
                "ids": [SONNET],
                "requests_per_minute": 1_000_000,
                "tokens_per_minute": 6_000_000,
                "concurrency": 500,
            },
        },
        "priorities": {"P0": {"share": 1.0}, "P2": {"share": 0.6}},
        "workloads": {
            "anon": {"priority": "P2"},
            "chat": {
                "priority": "P0",
                "access_keys": [{"access_key_id": FUZZ_KEY_ID, "secret": {"env": FUZZ_SECRET_ENV}}],
            },
        },
    }


@dataclass(frozen=True, slots=True)
class Case:
    """One request as bytes; ``slow`` ones are incomplete and end by a server timeout."""

    kind: str
    data: bytes
    half_close: bool = False
    slow: bool = False


def _json(doc: object) -> bytes:
    return json.dumps(doc).encode()


def converse_body(rng: random.Random, max_tokens: object = None) -> bytes:
    doc: dict[str, object] = {
        "messages": [{"role": "user", "content": [{"text": f"{PROMPT_CANARY} {rng.random()}"}]}]
    }
    if max_tokens is not None:
        doc["inferenceConfig"] = {"maxTokens": max_tokens}
    return _json(doc)


def invoke_body(rng: random.Random, max_tokens: object = 64) -> bytes:
    return _json(
        {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"{PROMPT_CANARY} {rng.random()}"}],
        }
    )


def request(
    method: str,
    path: str,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    *,
    raw_headers: bytes = b"",
    length: bool = True,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: sluice"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n").encode() + raw_headers + b"\r\n" + body


def _path(model: str = HAIKU, op: str = "converse") -> str:
    return f"/model/{model}/{op}"


def _model(rng: random.Random) -> str:
    return rng.choice((HAIKU, SONNET))


def _good(rng: random.Random) -> Case:
    if rng.random() < 0.5:
        return Case("good", request("POST", _path(_model(rng)), converse_body(rng, 32)))
    return Case("good", request("POST", _path(_model(rng), "invoke"), invoke_body(rng)))


def _huge_output(rng: random.Random) -> Case:
    cap = rng.choice((2**62, 2**31, 10**9, 200_000))
    if rng.random() < 0.5:
        return Case("huge_output", request("POST", _path(_model(rng)), converse_body(rng, cap)))
    return Case("huge_output", request("POST", _path(_model(rng), "invoke"), invoke_body(rng, cap)))


def _deep_json(rng: random.Random) -> Case:
    depth = rng.choice((600, 990, 1000, 1023, 1100, 5000))
    nest = b"[" * depth + b"]" * depth
    body = b'{"messages":[{"role":"user","content":[{"text":"' + PROMPT_CANARY.encode()
    body += b'"}]}],"x":' + nest + b"}"
    return Case("deep_json", request("POST", _path(_model(rng)), body))


_BAD_BODIES: tuple[Callable[[random.Random], bytes], ...] = (
    lambda r: converse_body(r)[:-3],
    lambda r: converse_body(r).replace(b"PROMPT", b"\xff\xfePROMPT"),
    lambda r: converse_body(r, r.choice(("x", -1, 0, 1.5, True, [], {}))),
    lambda r: _json([PROMPT_CANARY]),
    lambda r: b"",
    lambda r: b'{"messages": 1e400, "p": "' + PROMPT_CANARY.encode() + b'"}',
    lambda r: b'{"messages": NaN, "p": "' + PROMPT_CANARY.encode() + b'"}',
    lambda r: _json({"messages": [{"role": "user", "content": PROMPT_CANARY * 50}]}),
    lambda r: _json({"messages": [{"role": 7, "content": [{"text": {"a": PROMPT_CANARY}}]}]}),
)


def _bad_body(rng: random.Random) -> Case:
    body = rng.choice(_BAD_BODIES)(rng)
    op = rng.choice(("converse", "invoke", "converse-stream", "invoke-with-response-stream"))
    return Case("bad_body", request("POST", _path(_model(rng), op), body))


def _bad_header_bytes(rng: random.Random) -> Case:
    name = rng.choice(
        (
            "x-sluice-workload",
            "x-sluice-priority",
            "X-Amzn-Bedrock-Trace",
            "x-custom",
            "Content-Type",
            "X-Amzn-Bedrock-GuardrailIdentifier",
        )
    )
    value = rng.choice(
        (b"\xff\xfe", b"caf\xe9", b"ok\xc3", b"\xed\xa0\x80" + SECRET_CANARY.encode())
    )
    raw = name.encode() + b": " + value + b"\r\n"
    return Case(
        "bad_header_bytes", request("POST", _path(), converse_body(rng, 16), raw_headers=raw)
    )


def _parser_error(rng: random.Random) -> Case:
    body = converse_body(rng, 16)
    # One malformed request per entry; each one a different rejection of aiohttp's parser.
    makers: tuple[Callable[[], bytes], ...] = (
        lambda: request("POST", _path(), body, raw_headers=b"Content-Length: 3\r\n"),
        lambda: request("GET", "/healthz", headers=[("X-Long", "a" * rng.randint(8200, 20000))]),
        lambda: request("GET", "/" + "a" * rng.randint(8200, 20000)),
        lambda: b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n",
        lambda: rng.choice(
            (b"GET / HTTP/9.9\r\n\r\n", b"GET / HTTP/1.1.1\r\n\r\n", b"GET /\r\n\r\n")
        ),
        lambda: request(
            "GET",
            "/healthz",
            raw_headers=b"".join(b"X-%d: y\r\n" % i for i in range(rng.choice((129, 500, 10_000)))),
        ),
        lambda: request("POST", _path(), body, raw_headers=b"X-Ctl: a\x01\x7fb" + b"\r\n"),
        lambda: request(
            "POST",
            _path(),
            b"zz\r\n" + body + b"\r\n0\r\n\r\n",
            [("Transfer-Encoding", "chunked")],
            length=False,
        ),
        lambda: request("POST", _path(), body, raw_headers=b"Transfer-Encoding: chunked\r\n"),
        lambda: request("POST", _path(), body, length=False, raw_headers=b"Content-Length: -5\r\n"),
        lambda: request("POST", _path(), body, length=False, raw_headers=b"Content-Length: 1x\r\n"),
        lambda: request("POST", _path(), body, raw_headers=b"Bad Name: v\r\n"),
    )
    return Case("parser_error", makers[rng.randrange(len(makers))]())


def _odd_path(rng: random.Random) -> Case:
    method = rng.choice(("GET", "PUT", "DELETE", "OPTIONS", "PATCH", "POST"))
    path = rng.choice(
        (
            "/",
            "/model",
            "/model//converse",
            "/model/%ff%fe/converse",
            "/model/a%00b/invoke",
            "/model/" + "x" * 2000 + "/converse",
            f"/model/{HAIKU}/converse?x=%ff&y",
            "/../../etc/passwd",
            "/model/arn:aws:bedrock:us-east-1:1:foo/invoke",
            "*",
        )
    )
    return Case("odd_path", request(method, path, converse_body(rng, 8)))


def _forged_auth(rng: random.Random) -> Case:
    choice = rng.randrange(4)
    if choice == 0:
        auth = (
            f"AWS4-HMAC-SHA256 Credential={FUZZ_KEY_ID}/20260101/us-east-1/bedrock/aws4_request, "
            f"SignedHeaders=host;x-amz-date, Signature={SECRET_CANARY}{'ab' * 24}"
        )
        extra = [("X-Amz-Date", "20260101T000000Z")]
    elif choice == 1:
        auth, extra = f"Bearer {SECRET_CANARY}-{rng.random()}", []
    elif choice == 2:
        auth, extra = f"AWS4-HMAC-SHA256 {SECRET_CANARY}", []
    else:
        auth = f"AWS4-HMAC-SHA256 Credential=AKIDUNKNOWN/{SECRET_CANARY}, Signature=00"
        extra = []
    headers = [("Authorization", auth), *extra]
    return Case("forged_auth", request("POST", _path(_model(rng)), converse_body(rng, 16), headers))


def _garbage(rng: random.Random) -> Case:
    junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
    return Case("garbage", junk + b"\r\n\r\n")


def _too_large(rng: random.Random) -> Case:
    head = request("POST", _path(), b"", length=False, raw_headers=b"Content-Length: 52428800\r\n")
    return Case("too_large", head)


def _chunked_ok(rng: random.Random) -> Case:
    body = converse_body(rng, 16)
    cut = rng.randint(1, len(body) - 1)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:cut], body[cut:]))
    data = request(
        "POST", _path(), chunks + b"0\r\n\r\n", [("Transfer-Encoding", "chunked")], length=False
    )
    return Case("chunked", data)


def _half_close(rng: random.Random) -> Case:
    return Case("half_close", request("POST", _path(), converse_body(rng, 16)), half_close=True)


def _slow(rng: random.Random) -> Case:
    body = converse_body(rng, 16)
    choice = rng.randrange(4)
    if choice == 0:
        data = request("POST", _path(), body)[: rng.randint(1, 40)]  # partial head
    elif choice == 1:
        data = request("POST", _path(), body)[:-10]  # partial body
    elif choice == 2:
        data = request(
            "POST",
            _path(),
            b"ffffffffffffffff\r\n" + body[:20],
            [("Transfer-Encoding", "chunked")],
            length=False,
        )
    else:
        data = b""  # connects and says nothing: the idle timeout closes it
    return Case("slow", data, slow=True)


_KINDS: tuple[tuple[Callable[[random.Random], Case], int], ...] = (
    (_good, 16),
    (_huge_output, 6),
    (_deep_json, 3),
    (_bad_body, 10),
    (_bad_header_bytes, 6),
    (_parser_error, 18),
    (_odd_path, 8),
    (_forged_auth, 8),
    (_garbage, 5),
    (_too_large, 2),
    (_chunked_ok, 3),
    (_half_close, 3),
    (_slow, 2),
)
_GENS = [g for g, _ in _KINDS]
_WEIGHTS = [w for _, w in _KINDS]


def generate(rng: random.Random, *, slow: bool = True) -> Case:
    """One hostile or careless request (``slow=False`` leaves out the ones that time out)."""
    while True:
        case = rng.choices(_GENS, _WEIGHTS)[0](rng)
        if slow or not case.slow:
            return case
