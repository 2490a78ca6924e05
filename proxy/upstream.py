"""The pooled client to Bedrock: header hygiene, SigV4 re-signing, timeouts.

Only headers Bedrock interprets travel upstream (an allow-list), so a client's own
``Authorization``, ``X-Amz-Date``, ``X-Amz-Security-Token``, ``X-Amz-Content-Sha256``
and Sluice's ``x-sluice-*`` headers can never leak. Responses come back with every
header except the hop-by-hop ones.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import Final

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.credentials import CredentialSource
from proxy.errors import BedrockError
from proxy.signing import NOT_SIGNED, SigV4Signer
from proxy.upstream_http import UpstreamConnectError, UpstreamPool, UpstreamReply

_FORWARD_EXACT: Final = frozenset({"content-type", "accept", "accept-encoding", "user-agent"})
_FORWARD_PREFIX: Final = "x-amzn-bedrock-"
_DROP_RESPONSE: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "server",
        "date",
        "proxy-connection",
        "upgrade",
        "trailer",
        "te",
    }
)


#: Idle upstream connections are closed after this; memory they held is free only then.
KEEPALIVE_S: Final = 30.0


def bedrock_url(region: str) -> str:
    """Bedrock runtime's public endpoint for a region."""
    return f"https://bedrock-runtime.{region}.amazonaws.com"


#: Each request header name seen (as sent) → its lower-case form when it goes upstream, ""
#: when it does not; and whether it is signed. Clients send the same few names every call,
#: so each is lower-cased and checked once; bounded (:data:`_NAMES_MAX`) against junk names.
_names: dict[str, tuple[str, bool]] = {}
_NAMES_MAX: Final = 1024


def _forward_name(name: str) -> tuple[str, bool]:
    lower = name.lower()
    forward = lower in _FORWARD_EXACT or lower.startswith(_FORWARD_PREFIX)
    entry = (lower, lower not in NOT_SIGNED) if forward else ("", False)
    if len(_names) < _NAMES_MAX:
        _names[name] = entry
    return entry


def forwarded(headers: Mapping[str, str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The request headers Bedrock needs, and nothing that identifies the client to it; with
    those of them SigV4 signs as ``(lowercase name, value)`` (:meth:`SigV4Signer.sign_items`)."""
    out: dict[str, str] = {}
    signed: list[tuple[str, str]] = []
    names, kept = _names, 0
    for name, value in headers.items():
        lower, signs = names.get(name) or _forward_name(name)
        if lower:
            out[name] = value
            kept += 1
            if signs:
                signed.append((lower, value))
    if kept != len(out):  # a name sent twice: only its last value goes, so only that is signed
        signed = [(n.lower(), v) for n, v in out.items() if n.lower() not in NOT_SIGNED]
    return out, signed


def returnable(
    headers: CIMultiDictProxy[str], into: CIMultiDict[str] | None = None
) -> CIMultiDict[str]:
    """Upstream response headers minus the hop-by-hop ones (added to ``into`` if given)."""
    # A copy and ten deletions run in C: cheaper than a Python loop over every header.
    out = CIMultiDict(headers)
    for name in _DROP_RESPONSE:
        out.popall(name, None)
    if into is None:
        return out
    into.extend(out)  # a streaming answer keeps one copy: its own (the temporary goes)
    return into


class Upstream:
    """The pooled keep-alive connections to the upstream (Bedrock or the simulator)."""

    def __init__(
        self,
        base_url: str,
        region: str,
        *,
        credentials: CredentialSource | None,
        bearer_token: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 300.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if credentials is None and bearer_token is None:
            raise ValueError("upstream needs SigV4 credentials or a Bedrock API key")
        self.base_url = base_url.rstrip("/")
        url = URL(self.base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"upstream URL must be http(s)://host[:port], got {base_url!r}")
        # Sign exactly the Host value aiohttp will send: the port only when non-default.
        self.host = url.host if url.is_default_port() else f"{url.host}:{url.port}"
        self.region = region
        self._credentials = credentials
        self._bearer = f"Bearer {bearer_token}" if bearer_token else None
        self._signer = SigV4Signer("bedrock", region)
        self._read_timeout_s = read_timeout_s
        self._pool = UpstreamPool(
            self.base_url,
            connect_timeout_s=connect_timeout_s,
            keepalive_s=KEEPALIVE_S,
            ssl_context=ssl_context,
        )

    @property
    def pool(self) -> UpstreamPool:
        """The connections (for their counts)."""
        return self._pool

    async def close(self) -> None:
        """Close the pool."""
        await self._pool.close()

    def expire_idle(self) -> None:
        """Close pooled connections idle for :data:`KEEPALIVE_S` or longer, now (the pool's
        own check runs every half period)."""
        self._pool.expire_idle()

    async def probe(self) -> bool:
        """True when the upstream answers HTTP at all (any status): it is reachable."""
        try:
            async with asyncio.timeout(2):
                reply = await self._pool.request("GET", "/", {"Host": self.host}, b"", 2.0)
                try:
                    await reply.read()
                finally:
                    reply.release()
            return True
        except (aiohttp.ClientError, TimeoutError):
            return False

    def _signed_headers(
        self, method: str, path: str, query: str, client_headers: Mapping[str, str], body: bytes
    ) -> dict[str, str]:
        headers, signed = forwarded(client_headers)
        if self._bearer is not None:
            headers["Authorization"] = self._bearer
            return headers
        assert self._credentials is not None
        headers.update(
            self._signer.sign_items(
                method, self.host, path, query, signed, body, self._credentials.current()
            )
        )
        return headers

    async def send(
        self,
        method: str,
        path: str,
        query: str,
        client_headers: Mapping[str, str],
        body: bytes,
        *,
        read_timeout_s: float | None = None,
    ) -> UpstreamReply:
        """Send one re-signed request; the caller must release the response.

        Raises :class:`BedrockError` (503) when the upstream cannot be reached, so the
        caller answers in Bedrock's shape and boto3 retries it.
        """
        headers = self._signed_headers(method, path, query, client_headers, body)
        headers["Host"] = self.host
        target = path + ("?" + query if query else "")
        timeout = self._read_timeout_s if read_timeout_s is None else read_timeout_s
        try:
            return await self._pool.request(method, target, headers, body, timeout)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._failure(exc) from None

    def _failure(self, exc: aiohttp.ClientError | TimeoutError) -> BedrockError:
        """The Bedrock-shaped error for a request that got no answer (one mapping, here)."""
        if isinstance(exc, UpstreamConnectError):
            reason = exc.reason
            return BedrockError(
                "ServiceUnavailableException",
                f"Sluice could not reach the upstream {self.base_url}: {reason}",
                status=503,
            )
        if isinstance(exc, TimeoutError):
            return BedrockError(
                "ModelTimeoutException",
                f"the upstream {self.base_url} did not answer within the read timeout",
                status=408,
            )
        return BedrockError(
            "ServiceUnavailableException",
            f"the upstream {self.base_url} failed: {type(exc).__name__}: {exc}",
            status=503,
        )
