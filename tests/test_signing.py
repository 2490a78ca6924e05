"""SigV4: the fast signer is byte-identical to botocore; verify() accepts what boto3 really sends.

The capture server is a real aiohttp server on a loopback port, run in its own thread so the
blocking boto3 client can call it from plain synchronous tests.
"""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any
from unittest import mock
from urllib.parse import quote

import boto3
import pytest
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials as BotoCredentials
from botocore.credentials import RefreshableCredentials
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.credentials import (
    CredentialSource,
    NoCredentialsFoundError,
    bearer_token_from_env,
    next_refresh_delay,
    static,
)
from proxy.signing import Credentials, SigV4Signer, canonical_uri
from proxy.upstream import forwarded, returnable
from proxy.verification import VerifyResult, parse_authorization, verify

AKID, SECRET = "AKIDSLUICETEST000001", "s3cr3t/SLUICE+test/key0000000000000000000"
SECRETS = {AKID: SECRET}
MODEL = "us.anthropic.claude-sonnet-4-20250514-v1:0"
ARN = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-haiku-v1:0"
MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. "
    "Consult the service documentation for details."
)


# --------------------------------------------------------------------------------------------
# sign() == botocore, byte for byte


def botocore_sign(
    method: str,
    host: str,
    raw_path: str,
    query: str,
    headers: dict[str, str],
    body: bytes,
    creds: Credentials,
    region: str,
    when: dt.datetime,
) -> AWSRequest:
    """Sign the way upstream re-signing with botocore would (bedrock-wire.md section 5)."""
    url = f"https://{host}{raw_path}" + (f"?{query}" if query else "")
    req = AWSRequest(method, url, headers=headers, data=body)
    bc = BotoCredentials(creds.access_key_id, creds.secret_access_key, creds.session_token)
    # add_auth() overwrites context["timestamp"] from get_current_datetime(), so pin the clock
    # there rather than setting the context (which add_auth would discard).
    with mock.patch("botocore.auth.get_current_datetime", return_value=when):
        SigV4Auth(bc, "bedrock", region).add_auth(req)
    return req


OPERATIONS = [
    "invoke",
    "invoke-with-response-stream",
    "converse",
    "converse-stream",
    "count-tokens",
]
REGIONS = ["us-east-1", "us-west-2", "eu-central-1", "ap-northeast-1"]
SIGNABLE = [
    "Content-Type",
    "Accept",
    "X-Amzn-Bedrock-Accept",
    "X-Amzn-Bedrock-Trace",
    "X-Amzn-Bedrock-GuardrailIdentifier",
    "X-Amzn-Bedrock-GuardrailVersion",
    "X-Amzn-Bedrock-PerformanceConfig-Latency",
    "X-Amzn-Bedrock-Service-Tier",
    "X-Sluice-Workload",
]
NEVER_SIGNED = ["User-Agent", "X-Amzn-Trace-Id", "Expect", "Connection"]

# Printable text without the characters urlsplit strips or splits on; unicode included.
url_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="?#"),
    min_size=1,
    max_size=40,
)
model_ids = st.one_of(
    st.sampled_from([MODEL, ARN, "amazon.nova-pro-v1:0", "global.anthropic.claude-x:0"]),
    url_text,
)


@st.composite
def raw_paths(draw: st.DrawFn) -> str:
    model = draw(model_ids)
    op = draw(st.sampled_from(OPERATIONS))
    style = draw(st.sampled_from(["boto3", "literal-colon", "dots", "raw"]))
    if style == "boto3":  # boto3 encodes ':' and '/' in the label
        return f"/model/{quote(model, safe='-_.~')}/{op}"
    if style == "literal-colon":  # the Anthropic SDK leaves ':' alone
        return f"/model/{quote(model, safe=':-_.~')}/{op}"
    if style == "dots":  # dot segments and empty segments, which botocore normalises away
        segments = st.sampled_from(["..", ".", "", "model", "a%3Ab", "日本", "~x"])
        return "/" + "/".join(draw(st.lists(segments, min_size=1, max_size=6)))
    return "/" + draw(url_text)  # odd paths: '%', non-ASCII, punctuation


header_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from([" ", "\t"]),
    max_size=30,
)


def random_case(name: str, flips: list[bool]) -> str:
    return "".join(
        c.upper() if f else c.lower()
        for c, f in zip(name, flips + [False] * len(name), strict=False)
    )


@st.composite
def header_sets(draw: st.DrawFn) -> dict[str, str]:
    names = draw(st.lists(st.sampled_from(SIGNABLE + NEVER_SIGNED), max_size=8))
    out: dict[str, str] = {}
    for name in names:  # case variants of one name become repeated headers, as on the wire
        out[random_case(name, draw(st.lists(st.booleans(), max_size=40)))] = draw(header_values)
    return out


queries = st.lists(st.tuples(url_text, st.text(max_size=20)), max_size=4).map(
    lambda pairs: "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in pairs)
)
bodies = st.one_of(
    st.binary(max_size=2048),
    st.text(max_size=300).map(str.encode),
    st.sampled_from(["こんにちは、世界！🙂🚀", '{"messages":[{"content":"日本語 👍"}]}']).map(
        str.encode
    ),
)
timestamps = st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2099, 12, 31))
tokens = st.none() | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)
secrets = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60)
hosts = st.sampled_from(
    ["bedrock-runtime.us-east-1.amazonaws.com", "127.0.0.1:8080", "sluice:9000", "[::1]:8443"]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["POST", "GET", "post"]),
    host=hosts,
    raw_path=raw_paths(),
    query=queries,
    headers=header_sets(),
    body=bodies,
    secret=secrets,
    token=tokens,
    region=st.sampled_from(REGIONS),
    when=timestamps.map(lambda t: t.replace(microsecond=0)),
)
def test_sign_is_byte_identical_to_botocore(
    method: str,
    host: str,
    raw_path: str,
    query: str,
    headers: dict[str, str],
    body: bytes,
    secret: str,
    token: str | None,
    region: str,
    when: dt.datetime,
) -> None:
    creds = Credentials("AKIDEXAMPLE", secret, token)
    amz_date = when.strftime("%Y%m%dT%H%M%SZ")
    ours = SigV4Signer("bedrock", region).sign(
        method, host, raw_path, query, headers, body, creds, amz_date
    )
    theirs = botocore_sign(method, host, raw_path, query, headers, body, creds, region, when)
    assert ours["Authorization"] == theirs.headers["Authorization"]
    assert ours["X-Amz-Date"] == theirs.headers["X-Amz-Date"]
    assert ours.get("X-Amz-Security-Token") == theirs.headers.get("X-Amz-Security-Token")
    assert set(ours) <= {"Authorization", "X-Amz-Date", "X-Amz-Security-Token"}


def test_upstream_signs_exactly_the_headers_it_forwards() -> None:
    # A repeated name goes upstream once (its last value), so only that value is signed;
    # sign_items over the pairs forwarded() gives equals sign() over what is sent.
    sent = CIMultiDict(
        [
            ("Accept", "a"),
            ("accept", "b"),
            ("Accept", "c"),
            ("User-Agent", "u"),
            ("X-Amzn-Bedrock-Trace", "ENABLED"),
            ("Authorization", "x"),
            ("Host", "h"),
            ("x-junk", "j"),
        ]
    )
    for headers in (sent, CIMultiDict([("Content-Type", "application/json"), ("Accept", "*/*")])):
        out, signed = forwarded(CIMultiDictProxy(headers))
        signer, creds = SigV4Signer("bedrock", "us-east-1"), Credentials("A", "S", "T")
        args = ("POST", "h", "/model/m/invoke", "")
        ours = signer.sign_items(*args, signed, b"{}", creds, "20261206T000000Z")
        assert ours == signer.sign(*args, out, b"{}", creds, "20261206T000000Z")
    assert out == {"Content-Type": "application/json", "Accept": "*/*"}
    assert forwarded(CIMultiDictProxy(sent))[0] == {
        "Accept": "c",
        "accept": "b",
        "User-Agent": "u",
        "X-Amzn-Bedrock-Trace": "ENABLED",
    }


def test_upstream_answers_lose_only_their_hop_by_hop_headers() -> None:
    got = CIMultiDict(
        [
            ("Content-Type", "application/json"),
            ("Date", "d"),
            ("x-amzn-RequestId", "r"),
            ("Set-Cookie", "a"),
            ("connection", "keep-alive"),
            ("Set-Cookie", "b"),
            ("SERVER", "s"),
            ("Content-Length", "2"),
        ]
    )
    for _ in range(2):  # worked out, then from the cache
        kept = returnable(CIMultiDictProxy(got))
        assert list(kept.items()) == [
            ("Content-Type", "application/json"),
            ("x-amzn-RequestId", "r"),
            ("Set-Cookie", "a"),
            ("Set-Cookie", "b"),
        ]
    assert list(returnable(CIMultiDictProxy(CIMultiDict(a="1"))).items()) == [("a", "1")]


def test_sign_encodes_percent_encoded_model_id_again() -> None:
    path = "/model/us.anthropic.claude-sonnet-4-20250514-v1%3A0/invoke"
    assert canonical_uri(path) == "/model/us.anthropic.claude-sonnet-4-20250514-v1%253A0/invoke"
    assert canonical_uri("/model/a:b/invoke") == "/model/a%3Ab/invoke"


def test_sign_defaults_to_the_current_time() -> None:
    out = SigV4Signer("bedrock", "us-east-1").sign(
        "POST", "h", "/", "", {}, b"", Credentials("A", "S")
    )
    signed_at = calendar.timegm(time.strptime(out["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
    assert abs(signed_at - time.time()) < 5
    assert "X-Amz-Security-Token" not in out


# --------------------------------------------------------------------------------------------
# parse_authorization


def test_parse_authorization_reads_every_part() -> None:
    p = parse_authorization(
        "AWS4-HMAC-SHA256 Credential=AKID/20250102/eu-west-1/bedrock/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, Signature=" + "ab" * 32
    )
    assert p is not None
    assert (p.access_key_id, p.date, p.region, p.service) == (
        "AKID",
        "20250102",
        "eu-west-1",
        "bedrock",
    )
    assert p.signed_header_names == ["content-type", "host", "x-amz-date"]
    assert p.signature == "ab" * 32


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Bearer abc",
        "AWS4-HMAC-SHA256 SignedHeaders=host, Signature=" + "0" * 64,
        "AWS4-HMAC-SHA256 Credential=AKID/20250102/us-east-1/bedrock/aws4_request, "
        "SignedHeaders=host",
        "AWS4-HMAC-SHA256 Credential=AKID/us-east-1/bedrock/aws4_request, "
        "SignedHeaders=host, Signature=" + "0" * 64,
        "AWS4-HMAC-SHA256 Credential=AKID/20250102/us-east-1/bedrock/aws5_request, "
        "SignedHeaders=host, Signature=" + "0" * 64,
        "AWS4-HMAC-SHA256 Credential=AKID/20250102/us-east-1/bedrock/aws4_request, "
        "SignedHeaders=host, Signature=ZZ" + "0" * 62,
    ],
)
def test_parse_authorization_rejects_garbled_values(value: str) -> None:
    assert parse_authorization(value) is None


# --------------------------------------------------------------------------------------------
# verify() against requests made by a real boto3 client


@dataclass(frozen=True)
class Captured:
    method: str
    host: str
    raw_path: str
    query: str
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def amz_epoch(self) -> float:
        return float(calendar.timegm(time.strptime(self.headers["x-amz-date"], "%Y%m%dT%H%M%SZ")))

    def verify(
        self,
        *,
        headers: CIMultiDictProxy[str] | dict[str, str] | None = None,
        secret_for: Callable[[str], str | None] = SECRETS.get,
        now: float | None = None,
    ) -> VerifyResult:
        return verify(
            self.method,
            self.host,
            self.raw_path,
            self.query,
            self.headers if headers is None else headers,
            self.body,
            secret_for,
            now=now,
        )

    def with_header(self, name: str, value: str) -> Captured:
        h = CIMultiDict(self.headers)
        h[name] = value
        return replace(self, headers=CIMultiDictProxy(h))


class CaptureServer:
    """A real aiohttp server on a loopback port that records each request and answers 200 {}."""

    def __init__(self) -> None:
        self.captured: list[Captured] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, request: web.Request) -> web.Response:
        self.captured.append(
            Captured(
                request.method,
                request.host,
                request.raw_path.partition("?")[0],
                request.rel_url.raw_query_string,
                CIMultiDictProxy(CIMultiDict(request.headers)),
                await request.read(),
            )
        )
        return web.json_response({})

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10), "capture server did not start"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def capture_server() -> Iterator[CaptureServer]:
    server = CaptureServer()
    server.start()
    yield server
    server.stop()


def boto3_client(port: int, *, token: str | None = None, akid: str = AKID) -> Any:
    return boto3.client(
        "bedrock-runtime",
        region_name="us-west-2",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id=akid,
        aws_secret_access_key=SECRET,
        aws_session_token=token,
        config=Config(retries={"max_attempts": 1}),
    )


def invoke(server: CaptureServer, model: str = MODEL, **client_kw: Any) -> Captured:
    client = boto3_client(server.port, **client_kw)
    body = json.dumps(
        {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "こんにちは 🙂 — résumé"}],
        },
        ensure_ascii=False,
    ).encode()
    before = len(server.captured)
    client.invoke_model(
        modelId=model,
        body=body,
        contentType="application/json",
        accept="application/json",
        trace="ENABLED",
    )
    assert len(server.captured) == before + 1
    return server.captured[-1]


@pytest.fixture(scope="module")
def boto3_request(capture_server: CaptureServer) -> Captured:
    return invoke(capture_server)


def test_boto3_request_has_the_expected_wire_shape(boto3_request: Captured) -> None:
    auth = parse_authorization(boto3_request.headers["Authorization"])
    assert auth is not None and auth.service == "bedrock" and auth.region == "us-west-2"
    assert boto3_request.raw_path == "/model/us.anthropic.claude-sonnet-4-20250514-v1%3A0/invoke"
    assert "host" in auth.signed_header_names
    assert "x-amz-content-sha256" not in boto3_request.headers


def test_verify_accepts_boto3_request_with_right_secret(boto3_request: Captured) -> None:
    assert boto3_request.verify() == VerifyResult(True, AKID, None, None)


def test_verify_accepts_boto3_converse_with_arn_model(capture_server: CaptureServer) -> None:
    client = boto3_client(capture_server.port)
    client.converse(modelId=ARN, messages=[{"role": "user", "content": [{"text": "日本語"}]}])
    req = capture_server.captured[-1]
    assert "%2F" in req.raw_path
    assert req.verify().ok


def test_verify_accepts_boto3_request_with_session_token(capture_server: CaptureServer) -> None:
    req = invoke(capture_server, token="IQoJb3JpZ2luX2VjE//session+token==")
    auth = parse_authorization(req.headers["Authorization"])
    assert auth is not None and "x-amz-security-token" in auth.signed_header_names
    assert req.verify().ok


def test_verify_accepts_list_async_invokes_query(capture_server: CaptureServer) -> None:
    client = boto3_client(capture_server.port)
    client.list_async_invokes(maxResults=7, nextToken="a/b=c d", sortOrder="Descending")
    req = capture_server.captured[-1]
    assert req.query
    assert req.verify().ok
    assert not replace(req, query=req.query.replace("7", "8")).verify().ok


def test_verify_rejects_wrong_secret(boto3_request: Captured) -> None:
    result = boto3_request.verify(secret_for=lambda akid: "not-the-secret")
    assert result == VerifyResult(False, AKID, "InvalidSignatureException", MISMATCH, 403)


def test_verify_rejects_unknown_key(capture_server: CaptureServer) -> None:
    req = invoke(capture_server, akid="AKIDUNKNOWN000000000")
    result = req.verify()
    assert (result.ok, result.error_type, result.status) == (
        False,
        "UnrecognizedClientException",
        403,
    )
    assert result.message == "The security token included in the request is invalid."


def test_verify_rejects_tampered_body(boto3_request: Captured) -> None:
    result = replace(boto3_request, body=boto3_request.body.replace(b"64", b"65")).verify()
    assert (result.ok, result.error_type, result.message) == (
        False,
        "InvalidSignatureException",
        MISMATCH,
    )


def test_verify_rejects_tampered_signed_header(boto3_request: Captured) -> None:
    result = boto3_request.with_header("X-Amzn-Bedrock-Trace", "DISABLED").verify()
    assert result.error_type == "InvalidSignatureException"


def test_verify_ignores_unsigned_headers(boto3_request: Captured) -> None:
    assert boto3_request.with_header("User-Agent", "something else").verify().ok


def test_verify_rejects_signed_header_that_is_missing(boto3_request: Captured) -> None:
    h = CIMultiDict(boto3_request.headers)
    del h["Content-Type"]
    result = replace(boto3_request, headers=CIMultiDictProxy(h)).verify()
    assert result.error_type == "InvalidSignatureException"


def test_verify_rejects_other_host(boto3_request: Captured) -> None:
    assert not replace(boto3_request, host="127.0.0.1:1").verify().ok


def fmt(epoch: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(epoch))


def test_verify_rejects_expired_signature(boto3_request: Captured) -> None:
    now = boto3_request.amz_epoch + 16 * 60
    result = boto3_request.verify(now=now)
    amz = boto3_request.headers["x-amz-date"]
    assert result.error_type == "InvalidSignatureException"
    assert result.message == (
        f"Signature expired: {amz} is now earlier than {fmt(now - 900)} ({fmt(now)} - 15 min.)"
    )


def test_verify_rejects_signature_from_the_future(boto3_request: Captured) -> None:
    now = boto3_request.amz_epoch - 16 * 60
    result = boto3_request.verify(now=now)
    assert result.error_type == "InvalidSignatureException"
    assert result.message is not None
    assert result.message.startswith("Signature not yet current: ")
    assert result.message.endswith(" + 15 min.)")


def test_verify_accepts_skew_within_window(boto3_request: Captured) -> None:
    assert boto3_request.verify(now=boto3_request.amz_epoch + 14 * 60).ok
    assert boto3_request.verify(now=boto3_request.amz_epoch - 14 * 60).ok


def test_verify_requires_authorization(boto3_request: Captured) -> None:
    h = CIMultiDict(boto3_request.headers)
    del h["Authorization"]
    result = replace(boto3_request, headers=CIMultiDictProxy(h)).verify()
    assert (result.error_type, result.message, result.status) == (
        "MissingAuthenticationTokenException",
        "Missing Authentication Token",
        403,
    )


def test_verify_names_what_a_garbled_authorization_lacks(boto3_request: Captured) -> None:
    result = boto3_request.with_header("Authorization", "AWS4-HMAC-SHA256 Credential=A/B").verify()
    assert (result.error_type, result.status) == ("IncompleteSignatureException", 400)
    assert result.message == (
        "Authorization header requires 'Signature' parameter. "
        "Authorization header requires 'SignedHeaders' parameter."
    )


def test_verify_rejects_scope_date_not_matching_request_date(boto3_request: Captured) -> None:
    auth = boto3_request.headers["Authorization"]
    date = boto3_request.headers["x-amz-date"][:8]
    result = boto3_request.with_header("Authorization", auth.replace(date, "20000101")).verify()
    assert result.error_type == "InvalidSignatureException"
    assert (
        result.message is not None and "Date in Credential scope does not match" in result.message
    )


def test_verify_rejects_wrong_service(boto3_request: Captured) -> None:
    auth = boto3_request.headers["Authorization"].replace("/bedrock/", "/s3/")
    result = boto3_request.with_header("Authorization", auth).verify()
    assert result.error_type == "InvalidSignatureException"
    assert result.message == "Credential should be scoped to correct service: 'bedrock'. "


def test_verify_accepts_plain_dict_headers_in_any_case(boto3_request: Captured) -> None:
    plain = {k.upper(): v for k, v in boto3_request.headers.items()}
    assert boto3_request.verify(headers=plain).ok


def test_verify_accepts_date_header_instead_of_x_amz_date() -> None:
    # SigV4 allows an RFC 1123 Date header in place of X-Amz-Date; botocore then signs Date.
    when = dt.datetime(2025, 6, 1, 12, 0, 0)
    creds = Credentials(AKID, SECRET)
    headers = {"Content-Type": "application/json", "Date": "placeholder"}
    req = botocore_sign(
        "POST", "sluice:8080", "/model/m/invoke", "", headers, b"{}", creds, "us-east-1", when
    )
    assert "X-Amz-Date" not in req.headers
    sent = CIMultiDictProxy(CIMultiDict(dict(req.headers.items())))
    epoch = calendar.timegm(when.timetuple())
    args = ("POST", "sluice:8080", "/model/m/invoke", "", sent, b"{}", SECRETS.get)
    assert verify(*args, now=epoch).ok
    assert verify(*args, now=epoch + 16 * 60).error_type == "InvalidSignatureException"


@settings(max_examples=100, deadline=None)
@given(
    raw_path=raw_paths(),
    query=queries,
    headers=header_sets(),
    body=bodies,
    token=tokens,
    region=st.sampled_from(REGIONS),
)
def test_verify_accepts_what_sign_produces(
    raw_path: str, query: str, headers: dict[str, str], body: bytes, token: str | None, region: str
) -> None:
    creds = Credentials(AKID, SECRET, token)
    added = SigV4Signer("bedrock", region).sign(
        "POST", "sluice:8080", raw_path, query, headers, body, creds
    )
    sent = CIMultiDict(headers)
    sent.extend(added)
    args = ("POST", "sluice:8080", raw_path, query, CIMultiDictProxy(sent), body)
    assert verify(*args, SECRETS.get).ok
    assert not verify(*args[:-1], body + b"!", SECRETS.get).ok


# --------------------------------------------------------------------------------------------
# Upstream credentials


@pytest.fixture
def isolated_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> pytest.MonkeyPatch:
    """No shared config, no IMDS, no container endpoint: only what the test puts in env."""
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


async def test_credential_source_reads_env_credentials(
    isolated_aws_env: pytest.MonkeyPatch,
) -> None:
    isolated_aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIDFROMENV")
    isolated_aws_env.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    isolated_aws_env.setenv("AWS_SESSION_TOKEN", "env-token")
    source = await CredentialSource.create()
    try:
        assert source.current() == Credentials("AKIDFROMENV", "env-secret", "env-token")
    finally:
        await source.close()


async def test_credential_source_without_credentials_raises_clearly(
    isolated_aws_env: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(NoCredentialsFoundError, match="no AWS credentials found"):
        await CredentialSource.create()


def test_static_source_returns_its_credentials() -> None:
    creds = Credentials("A", "S", "T")
    assert static(creds).current() is creds
    assert CredentialSource.static(creds).current() is creds
    assert "S" not in repr(creds).replace("access_key_id", "")


def expiring_in(seconds: float) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat()


class CountingRefresher:
    """A botocore refresh function that blocks like real STS and records where it ran."""

    def __init__(self, lifetime_s: float, fail_first: int = 0) -> None:
        self.calls = 0
        self.lifetime_s = lifetime_s
        self.fail_first = fail_first
        self.threads: set[int] = set()
        self.on_loop_thread = False

    def __call__(self) -> dict[str, str]:
        self.calls += 1
        self.threads.add(threading.get_ident())
        try:
            asyncio.get_running_loop()
            self.on_loop_thread = True
        except RuntimeError:
            pass
        time.sleep(0.3)  # a blocking network call: must not stall the event loop
        if self.calls <= self.fail_first:
            raise RuntimeError("sts unreachable; secret=rotated-secret-0")
        return {
            "access_key": f"AKIDGEN{self.calls}",
            "secret_key": f"rotated-secret-{self.calls}",
            "token": f"token-{self.calls}",
            "expiry_time": expiring_in(self.lifetime_s),
        }


def refreshable(refresher: CountingRefresher, first_expiry_s: float) -> Any:
    return RefreshableCredentials.create_from_metadata(
        metadata={
            "access_key": "AKIDGEN0",
            "secret_key": "rotated-secret-0",
            "token": "token-0",
            "expiry_time": expiring_in(first_expiry_s),
        },
        refresh_using=refresher,
        method="sts-assume-role",
    )


async def wait_for(predicate: Callable[[], bool], within_s: float = 15.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def max_loop_stall(until: Callable[[], bool]) -> float:
    """Tick the event loop until ``until()``; return the longest gap between ticks."""
    worst, last = 0.0, time.monotonic()
    while not until():
        await asyncio.sleep(0.01)
        now = time.monotonic()
        worst, last = max(worst, now - last), now
    return worst


@pytest.mark.slow
async def test_refresh_runs_in_background_off_the_event_loop() -> None:
    # Credentials enter botocore's 15-minute advisory window 0.5 s from now, and every refresh
    # hands out credentials that do the same 0.2 s later: the refresher must keep renewing them.
    refresher = CountingRefresher(lifetime_s=15 * 60 + 0.2)
    source = await CredentialSource.from_botocore(refreshable(refresher, 15 * 60 + 0.5))
    try:
        assert source.current().access_key_id == "AKIDGEN0"
        stall = await asyncio.wait_for(max_loop_stall(lambda: refresher.calls >= 2), 15)
        await wait_for(lambda: source.current().access_key_id == "AKIDGEN2")
        assert source.current() == Credentials("AKIDGEN2", "rotated-secret-2", "token-2")
        assert stall < 0.25, f"event loop stalled {stall:.3f}s during a refresh"
        assert not refresher.on_loop_thread
        assert threading.get_ident() not in refresher.threads
    finally:
        await source.close()
    calls = refresher.calls
    await asyncio.sleep(1.5)
    assert refresher.calls == calls, "refresher kept running after close()"


@pytest.mark.slow
async def test_failed_refresh_keeps_old_credentials_and_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Inside the advisory window botocore swallows refresh errors and returns the old creds.
    refresher = CountingRefresher(lifetime_s=3600, fail_first=2)
    source = await CredentialSource.from_botocore(
        refreshable(refresher, 15 * 60 + 0.2), min_interval_s=0.1
    )
    try:
        with caplog.at_level(logging.WARNING, logger="sluice.credentials"):
            await wait_for(lambda: refresher.calls >= 1)
            assert source.current().access_key_id == "AKIDGEN0"
            await wait_for(lambda: source.current().access_key_id == "AKIDGEN3")
        ours = [r for r in caplog.records if r.name == "sluice.credentials"]
        assert len(ours) >= 2
        for record in ours:
            entry = json.loads(record.getMessage())
            assert entry["event"] == "upstream_credentials_refresh_failed"
            assert entry["attempt"] >= 1
            assert "rotated-secret" not in record.getMessage()
    finally:
        await source.close()


@pytest.mark.parametrize(
    ("to_advisory", "failures", "expected"),
    [
        (None, 0, 300.0),  # never expires: still re-read every few minutes
        (10_000.0, 0, 300.0),
        (99.0, 0, 100.0),  # just inside the advisory window
        (-50.0, 0, 1.0),
        (0.0, 1, 1.0),
        (0.0, 3, 4.0),
        (0.0, 20, 60.0),
    ],
)
def test_next_refresh_delay(to_advisory: float | None, failures: int, expected: float) -> None:
    delay = next_refresh_delay(
        to_advisory, failures, min_interval_s=1.0, max_interval_s=300.0, backoff_max_s=60.0
    )
    assert delay == expected


def test_bearer_token_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_BEARER_TOKEN_BEDROCK", raising=False)
    assert bearer_token_from_env() is None
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "")
    assert bearer_token_from_env() is None
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "bedrock-api-key-abc")
    assert bearer_token_from_env() == "bedrock-api-key-abc"
