"""The pooled client to Bedrock: header hygiene, SigV4 re-signing, timeouts.

Only headers Bedrock interprets travel upstream (an allow-list), so a client's own
``Authorization``, ``X-Amz-Date``, ``X-Amz-Security-Token``, ``X-Amz-Content-Sha256``
and Sluice's ``x-sluice-*`` headers can never leak. Responses come back with every
header except the hop-by-hop ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.credentials import CredentialSource
from proxy.errors import BedrockError
from proxy.signing import SigV4Signer

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


def forwardable(headers: Mapping[str, str]) -> dict[str, str]:
    """The request headers Bedrock needs, and nothing that identifies the client to it."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower in _FORWARD_EXACT or lower.startswith(_FORWARD_PREFIX):
            out[name] = value
    return out


def returnable(
    headers: CIMultiDictProxy[str], into: CIMultiDict[str] | None = None
) -> CIMultiDict[str]:
    """Upstream response headers minus the hop-by-hop ones (added to ``into`` if given)."""
    out: CIMultiDict[str] = CIMultiDict() if into is None else into
    for name, value in headers.items():
        if name.lower() not in _DROP_RESPONSE:
            out.add(name, value)
    return out


class Upstream:
    """One pooled, keep-alive client session to the upstream (Bedrock or the simulator)."""

    def __init__(
        self,
        base_url: str,
        region: str,
        *,
        credentials: CredentialSource | None,
        bearer_token: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 300.0,
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
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the connection pool."""
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

    async def close(self) -> None:
        """Close the pool."""
        if self._session is not None:
            await self._session.close()

    def expire_idle(self) -> None:
        """Close pooled connections idle for longer than :data:`KEEPALIVE_S` now.

        aiohttp checks the pool only once per keep-alive period, so a burst's idle
        connections (and their buffers) could linger up to twice that; this runs the
        same check at once (a private aiohttp method: skipped if a version lacks it).
        """
        connector = self._session.connector if self._session is not None else None
        cleanup = getattr(connector, "_cleanup", None)
        if callable(cleanup):
            cleanup()

    async def probe(self) -> bool:
        """True when the upstream answers HTTP at all (any status): it is reachable."""
        assert self._session is not None
        try:
            async with self._session.get(
                self.base_url + "/", timeout=aiohttp.ClientTimeout(total=2)
            ) as response:
                await response.read()
                return True
        except (aiohttp.ClientError, TimeoutError):
            return False

    def _signed_headers(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> dict[str, str]:
        if self._bearer is not None:
            headers["Authorization"] = self._bearer
            return headers
        assert self._credentials is not None
        headers.update(
            self._signer.sign(
                method, self.host, path, query, headers, body, self._credentials.current()
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
    ) -> aiohttp.ClientResponse:
        """Send one re-signed request; the caller must release the response.

        Raises :class:`BedrockError` (503) when the upstream cannot be reached, so the
        caller answers in Bedrock's shape and boto3 retries it.
        """
        assert self._session is not None, "Upstream.start() was not awaited"
        headers = self._signed_headers(method, path, query, forwardable(client_headers), body)
        headers["Host"] = self.host
        target = self.base_url + path + ("?" + query if query else "")
        timeout = (
            aiohttp.ClientTimeout(
                total=None, connect=self._timeout.connect, sock_read=read_timeout_s
            )
            if read_timeout_s is not None
            else None
        )
        try:
            return await self._session.request(
                method,
                URL(target, encoded=True),
                data=body if body else None,
                headers=headers,
                timeout=timeout or self._timeout,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._failure(exc) from None

    def _failure(self, exc: aiohttp.ClientError | TimeoutError) -> BedrockError:
        """The Bedrock-shaped error for a request that got no answer (one mapping, here)."""
        if isinstance(exc, aiohttp.ClientConnectorError):
            reason = exc.os_error.strerror or str(exc)
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
