"""The pooled client to Bedrock: header hygiene, SigV4 re-signing, timeouts.

Only headers Bedrock interprets travel upstream (an allow-list), so a client's own
``Authorization``, ``X-Amz-Date``, ``X-Amz-Security-Token``, ``X-Amz-Content-Sha256``
and Sluice's ``x-sluice-*`` headers can never leak. Responses come back with every
header except the hop-by-hop ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar, Final

import aiohttp
from aiohttp import hdrs
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.credentials import CredentialSource
from proxy.errors import BedrockError
from proxy.signing import NOT_SIGNED, SigV4Signer

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
            request_class=_UpstreamRequest,
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
    ) -> aiohttp.ClientResponse:
        """Send one re-signed request; the caller must release the response.

        Raises :class:`BedrockError` (503) when the upstream cannot be reached, so the
        caller answers in Bedrock's shape and boto3 retries it.
        """
        assert self._session is not None, "Upstream.start() was not awaited"
        headers = self._signed_headers(method, path, query, client_headers, body)
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


class _UpstreamRequest(aiohttp.ClientRequest):
    """aiohttp's client request, with the session's skip list turned into a CIMultiDict once.

    ``ClientRequest.update_auto_headers`` sorts the list into a new CIMultiDict and copies the
    request's headers to check them against it, every request; the list is the session's and
    never changes, so this does that once and adds the same defaults (the same headers go on
    the wire: tests/test_passthrough.py::test_upstream_gets_no_header_the_client_did_not_send).
    """

    _skip_source: ClassVar[object] = None
    _skip_made: ClassVar[CIMultiDict[None] | None] = None

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        cls = _UpstreamRequest
        if skip_auto_headers is None or skip_auto_headers is not cls._skip_source:
            super().update_auto_headers(skip_auto_headers)
            cls._skip_source, cls._skip_made = skip_auto_headers, self._skip_auto_headers
            return
        skipped = self._skip_auto_headers = cls._skip_made
        assert skipped is not None
        headers = self.headers
        for name, value in self.DEFAULT_HEADERS.items():
            if name not in headers and name not in skipped:
                headers[name] = value
        if hdrs.USER_AGENT not in headers and hdrs.USER_AGENT not in skipped:
            headers[hdrs.USER_AGENT] = SERVER_SOFTWARE
