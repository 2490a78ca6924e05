"""Workload identity over real sockets: SigV4 keys, bearer keys, header mode."""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from yarl import URL

from tests.support.processes import Simulator, Sluice, TLSFiles, bedrock_client

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
PATH = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke"
BODY = json.dumps(
    {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 20,
        "messages": [{"role": "user", "content": "hi"}],
    }
).encode()
CHAT_KEY, CHAT_SECRET = "AKIASLUICECHAT", "chat-secret-value"
BATCH_TOKEN = "sluice-batch-api-key"

POLICY: dict[str, Any] = {
    "identity": {"header_mode": True},
    "models": {"haiku": {"ids": [HAIKU]}},
    "priorities": {"P0": {"share": 1.0}, "P2": {"share": 0.6}, "batch": {"share": 0.4}},
    "workloads": {
        "chat": {
            "priority": "P0",
            "access_keys": [{"access_key_id": CHAT_KEY, "secret": {"env": "CHAT_SECRET"}}],
        },
        "batch": {"priority": "batch", "api_keys": [{"env": "BATCH_TOKEN"}]},
        "browse": {"priority": "P2"},
    },
}


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Any:
    p = Sluice(
        tmp_path_factory.mktemp("id"),
        upstream=simulator.url,
        policy=POLICY,
        env={"CHAT_SECRET": CHAT_SECRET, "BATCH_TOKEN": BATCH_TOKEN},
    )
    yield p
    p.stop()


def workload_of(resp: dict[str, Any]) -> str:
    return str(resp["ResponseMetadata"]["HTTPHeaders"]["x-sluice-workload"])


def test_sigv4_key_identifies_its_workload(proxy: Sluice) -> None:
    client = bedrock_client(proxy.url, key_id=CHAT_KEY, secret=CHAT_SECRET)
    resp = client.invoke_model(modelId=HAIKU, body=BODY)
    assert workload_of(resp) == "chat"
    assert resp["ResponseMetadata"]["HTTPHeaders"]["x-sluice-priority"] == "P0"


def test_wrong_secret_is_refused_with_bedrocks_signature_error(proxy: Sluice) -> None:
    client = bedrock_client(proxy.url, key_id=CHAT_KEY, secret="not-the-secret")
    with pytest.raises(ClientError) as err:
        client.invoke_model(modelId=HAIKU, body=BODY)
    assert err.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_unknown_key_without_default_workload_is_unrecognized(proxy: Sluice) -> None:
    client = bedrock_client(proxy.url, key_id="AKIANOBODY", secret="x")
    with pytest.raises(ClientError) as err:
        client.invoke_model(modelId=HAIKU, body=BODY)
    assert err.value.response["Error"]["Code"] == "UnrecognizedClientException"
    assert "security token" in err.value.response["Error"]["Message"]


def _signed(url: str, body: bytes, when: datetime.datetime | None = None) -> dict[str, str]:
    host = url.removeprefix("http://")
    req = AWSRequest("POST", url + PATH, data=body, headers={"Content-Type": "application/json"})
    req.headers["Host"] = host
    signer = SigV4Auth(Credentials(CHAT_KEY, CHAT_SECRET), "bedrock", "us-east-1")
    if when is not None:
        req.context["timestamp"] = when.strftime("%Y%m%dT%H%M%SZ")
        signer._modify_request_before_signing(req)
        signature = signer.signature(signer.string_to_sign(req, signer.canonical_request(req)), req)
        scope = f"{when:%Y%m%d}/us-east-1/bedrock/aws4_request"
        req.headers["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={CHAT_KEY}/{scope}, "
            f"SignedHeaders={signer.signed_headers(signer.headers_to_sign(req))}, "
            f"Signature={signature}"
        )
    else:
        signer.add_auth(req)
    return dict(req.headers.items())


async def _send(url: str, headers: dict[str, str], body: bytes) -> tuple[int, str, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.post(url + PATH, data=body, headers=headers) as r:
        return r.status, r.headers["x-amzn-ErrorType"].split(":")[0], await r.json()


async def test_expired_signature_is_refused(proxy: Sluice) -> None:
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=16)
    status, kind, doc = await _send(proxy.url, _signed(proxy.url, BODY, old), BODY)
    assert (status, kind) == (403, "InvalidSignatureException")
    assert "Signature expired" in doc["message"]


async def test_body_changed_after_signing_is_refused(proxy: Sluice) -> None:
    headers = _signed(proxy.url, BODY)
    tampered = BODY.replace(b"hi", b"yo")
    status, kind, _ = await _send(proxy.url, headers, tampered)
    assert (status, kind) == (403, "InvalidSignatureException")


def _signed_stating(url: str, body: bytes, content_sha256: str) -> dict[str, str]:
    """botocore's SigV4 of a request carrying (and so signing) ``x-amz-content-sha256``:
    botocore then signs that value as the payload hash, as AWS services read it."""
    headers = {"Content-Type": "application/json", "X-Amz-Content-SHA256": content_sha256}
    req = AWSRequest("POST", url + PATH, data=body, headers=headers)
    SigV4Auth(Credentials(CHAT_KEY, CHAT_SECRET), "bedrock", "us-east-1").add_auth(req)
    assert "x-amz-content-sha256" in req.headers["Authorization"]  # it is a signed header
    return dict(req.headers.items())


async def _send_as_signed(
    url: str, headers: dict[str, str], body: bytes
) -> tuple[int, str, dict[str, Any]]:
    """The status, workload (or error type) and JSON of a call sent with the path as signed
    (encoded=True: yarl would otherwise send the model id's '%3A' as ':')."""
    target = URL(url + PATH, encoded=True)
    async with aiohttp.ClientSession() as s, s.post(target, data=body, headers=headers) as r:
        kind = r.headers.get("x-sluice-workload") or r.headers["x-amzn-ErrorType"].split(":")[0]
        return r.status, kind, await r.json()


async def test_unsigned_payload_is_refused_naming_the_header(proxy: Sluice) -> None:
    # Correctly signed, but the signature would not cover the body: anyone who saw the
    # request could send another prompt under this identity. Refused, saying why.
    headers = _signed_stating(proxy.url, BODY, "UNSIGNED-PAYLOAD")
    status, kind, doc = await _send_as_signed(proxy.url, headers, BODY)
    assert (status, kind) == (403, "InvalidSignatureException")
    assert "x-amz-content-sha256: UNSIGNED-PAYLOAD is not accepted" in doc["message"]


async def test_a_stated_payload_hash_must_be_the_bodys(proxy: Sluice) -> None:
    digest = hashlib.sha256(BODY).hexdigest()
    headers = _signed_stating(proxy.url, BODY, digest)
    assert (await _send_as_signed(proxy.url, headers, BODY))[:2] == (200, "chat")
    # Signed with the hash it states, but another body: the signature alone would pass.
    tampered = BODY.replace(b"hi", b"yo")
    status, kind, doc = await _send_as_signed(proxy.url, headers, tampered)
    assert (status, kind) == (403, "InvalidSignatureException")
    assert "'x-amz-content-sha256' header does not match" in doc["message"]
    # A value that is not a hash (SigV4 streaming, chunked) is named.
    headers = _signed_stating(proxy.url, BODY, "STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    status, kind, doc = await _send_as_signed(proxy.url, headers, BODY)
    assert (status, kind) == (403, "InvalidSignatureException")
    assert "x-amz-content-sha256 must be the hex SHA-256" in doc["message"]
    assert "'STREAMING-AWS4-HMAC-SHA256-PAYLOAD' is not supported" in doc["message"]


def test_bearer_api_key_identifies_its_workload(
    simulator: Simulator,
    tls_files: TLSFiles,
    make_sluice: Callable[..., Sluice],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # botocore sends a Bedrock API key only over HTTPS, so this needs Sluice's TLS listener.
    proxy = make_sluice(
        upstream=simulator.url,
        policy=POLICY,
        env={"CHAT_SECRET": CHAT_SECRET, "BATCH_TOKEN": BATCH_TOKEN},
        tls=tls_files,
    )
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", BATCH_TOKEN)
    resp = bedrock_client(proxy.url, verify=str(tls_files.ca)).invoke_model(
        modelId=HAIKU, body=BODY
    )
    assert workload_of(resp) == "batch"


def _with_headers(client: Any, **headers: str) -> Any:
    def add(request: Any, **_: Any) -> None:
        for name, value in headers.items():
            request.headers[name.replace("_", "-")] = value

    client.meta.events.register("before-sign.bedrock-runtime.*", add)
    return client


def test_header_mode_names_the_workload_and_may_lower_priority(proxy: Sluice) -> None:
    client = _with_headers(
        bedrock_client(proxy.url), x_sluice_workload="browse", x_sluice_priority="batch"
    )
    resp = client.invoke_model(modelId=HAIKU, body=BODY)
    assert workload_of(resp) == "browse"
    assert resp["ResponseMetadata"]["HTTPHeaders"]["x-sluice-priority"] == "batch"


def test_priority_header_cannot_raise_the_class(proxy: Sluice) -> None:
    client = _with_headers(
        bedrock_client(proxy.url), x_sluice_workload="browse", x_sluice_priority="P0"
    )
    with pytest.raises(ClientError) as err:
        client.invoke_model(modelId=HAIKU, body=BODY)
    assert err.value.response["Error"]["Code"] == "ValidationException"
    assert "may only lower" in err.value.response["Error"]["Message"]


def test_unknown_workload_header_is_refused(proxy: Sluice) -> None:
    client = _with_headers(bedrock_client(proxy.url), x_sluice_workload="nobody")
    with pytest.raises(ClientError) as err:
        client.invoke_model(modelId=HAIKU, body=BODY)
    assert err.value.response["Error"]["Code"] == "AccessDeniedException"
    assert "'nobody'" in err.value.response["Error"]["Message"]


def test_header_mode_off_ignores_the_header(
    simulator: Simulator, make_sluice: Callable[..., Sluice]
) -> None:
    policy = {**POLICY, "identity": {"header_mode": False}}
    p = make_sluice(
        upstream=simulator.url,
        policy=policy,
        env={"CHAT_SECRET": CHAT_SECRET, "BATCH_TOKEN": BATCH_TOKEN},
    )
    client = _with_headers(bedrock_client(p.url), x_sluice_workload="browse")
    with pytest.raises(ClientError) as err:
        client.invoke_model(modelId=HAIKU, body=BODY)
    assert err.value.response["Error"]["Code"] == "UnrecognizedClientException"


def test_missing_secret_stops_start_up_with_a_clear_error(
    simulator: Simulator, make_sluice: Callable[..., Sluice]
) -> None:
    with pytest.raises(RuntimeError) as err:
        make_sluice(upstream=simulator.url, policy=POLICY)
    assert "environment variable CHAT_SECRET is not set" in str(err.value)
