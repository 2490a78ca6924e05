"""Sluice serving HTTPS: what Bedrock API-key (bearer) clients need, over real sockets.

botocore refuses to send ``AWS_BEARER_TOKEN_BEDROCK`` to a plain-HTTP endpoint
("Bearer authorization requires an HTTPS endpoint"), so these clients can only use
Sluice through ``--tls-cert``/``--tls-key``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from botocore.exceptions import InvalidEndpointConfigurationError, SSLError

from tests.support.processes import (
    ROOT,
    Simulator,
    Sluice,
    TLSFiles,
    bedrock_client,
    free_port,
    metric_value,
)
from tests.support.redis_fixtures import RedisServerProcess

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"


def _messages(text: str) -> list[dict[str, object]]:
    return [{"role": "user", "content": [{"text": text}]}]


@pytest.fixture
def tls_proxy(sim: Simulator, tls_files: TLSFiles, make_sluice: Callable[..., Sluice]) -> Sluice:
    return make_sluice(upstream=sim.url, tls=tls_files)


def test_bearer_client_needs_https_and_passes_through_it(
    tls_proxy: Sluice, tls_files: TLSFiles, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "some-bedrock-api-key")
    plain = bedrock_client(tls_proxy.url.replace("https://", "http://"))
    with pytest.raises(InvalidEndpointConfigurationError):
        plain.converse(modelId=HAIKU, messages=_messages("hi"))

    client = bedrock_client(tls_proxy.url, verify=str(tls_files.ca))
    resp = client.converse(modelId=HAIKU, messages=_messages("hi"))
    assert resp["usage"]["outputTokens"] > 0
    # The API key never went upstream: Sluice re-signed with its own credentials.
    seen = sim.stats()["requests"][-1]["headers"]
    assert "some-bedrock-api-key" not in json.dumps(seen)
    assert seen["authorization"].startswith("AWS4-HMAC-SHA256")


def test_sigv4_streaming_over_https(tls_proxy: Sluice, tls_files: TLSFiles) -> None:
    client = bedrock_client(tls_proxy.url, verify=str(tls_files.ca))
    resp = client.converse_stream(modelId=HAIKU, messages=_messages("stream please"))
    kinds = [next(iter(event)) for event in resp["stream"]]
    assert kinds[0] == "messageStart" and kinds[-1] == "metadata"
    assert metric_value(tls_proxy.metrics(), "sluice_requests_total", status="200") >= 1


def test_untrusted_certificate_is_refused_by_the_client(tls_proxy: Sluice) -> None:
    client = bedrock_client(tls_proxy.url)  # system CAs do not know our throwaway CA
    with pytest.raises(SSLError):
        client.converse(modelId=HAIKU, messages=_messages("hi"))


def test_plain_http_on_the_https_port_does_not_hurt_the_listener(
    tls_proxy: Sluice, tls_files: TLSFiles
) -> None:
    with socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(1024)  # whatever the TLS layer answers (an alert or a close)
    ctx = tls_files.client_context()
    with (
        socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert s.recv(1024).startswith(b"HTTP/1.1 200")
    assert tls_proxy.popen.poll() is None


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--port", str(free_port()), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cert_without_key_is_a_clear_start_up_error(tls_files: TLSFiles) -> None:
    done = _serve("--upstream", "simulator", "--tls-cert", str(tls_files.cert))
    assert done.returncode == 2
    assert "--tls-key (SLUICE_TLS_KEY) is missing" in done.stderr


def test_missing_or_mismatched_files_are_clear_start_up_errors(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    done = _serve("--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(tls_files.key))
    assert done.returncode == 2
    assert "nope.pem" in done.stderr and "no such file" in done.stderr

    other = TLSFiles.create(tmp_path / "other")
    done = _serve("--tls-cert", str(tls_files.cert), "--tls-key", str(other.key))
    assert done.returncode == 2
    assert "not a PEM certificate and its matching key" in done.stderr
    assert "Traceback" not in done.stderr


def test_workers_share_the_https_port(
    sim: Simulator,
    tls_files: TLSFiles,
    make_sluice: Callable[..., Sluice],
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    # A private Redis: the session's one holds other tests' counts for the default policy.
    redis = redis_factory()
    proxy = make_sluice(upstream=sim.url, tls=tls_files, workers=2, redis_url=redis.url)
    for _ in range(12):
        # A fresh connection each time, so the kernel spreads them over both workers.
        client = bedrock_client(proxy.url, verify=str(tls_files.ca))
        resp = client.converse(modelId=HAIKU, messages=_messages("hi"))
        assert resp["usage"]["outputTokens"] > 0
