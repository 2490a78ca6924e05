"""The response cache: opt-in, exact-match, per workload, shared through Redis or in-process.

Only successful (200) non-streamed InvokeModel and Converse answers are stored. A streaming
request looks up the same entry as its non-streamed twin (the request bodies are the same
schema) and is answered through :func:`proxy.pipeline.template.as_stream`.

Keys (one hash tag per workload, so ``SCAN``/``UNLINK`` of one workload's entries stays on
one Redis Cluster shard)::

    sluice:{cache:<workload>}:<sha256 hex of pool, operation, varying headers, canonical body>

A key never contains prompt text. Values are msgpack ``[1, status, [[name, value], ...],
body, stored_at]``; the leading 1 is the format version.

Failure contract: ``get`` never raises for a store failure — it counts
``sluice_store_errors{operation="cache_get"}``, logs (rate-limited) and reports a miss.
``put`` counts ``cache_put`` and raises :class:`CacheUnavailable`; its caller decides (the
request path logs it with the request id, ``warm`` stops and reports).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

import orjson

from proxy.backend import BackendUnavailable

__all__ = [
    "CACHE_VARY_HEADERS",
    "CacheUnavailable",
    "CachedResponse",
    "MemoryResponseCache",
    "ResponseCache",
    "cache_key",
    "cache_operation",
    "cacheable",
]

log = logging.getLogger("sluice.cache")

#: Request operation → the operation whose answers it may be served from.
_CACHE_OPERATION: Final[Mapping[str, str]] = {
    "InvokeModel": "InvokeModel",
    "InvokeModelWithResponseStream": "InvokeModel",
    "Converse": "Converse",
    "ConverseStream": "Converse",
}
#: Request headers that change the answer for the same body, so they are part of the key.
CACHE_VARY_HEADERS: Final = frozenset(
    {
        "x-amzn-bedrock-guardrailidentifier",
        "x-amzn-bedrock-guardrailversion",
        "x-amzn-bedrock-trace",
    }
)
#: Response headers worth replaying; request ids, dates and lengths are per response.
_KEPT_HEADERS: Final = frozenset(
    {
        "content-type",
        "x-amzn-bedrock-content-type",
        "x-amzn-bedrock-invocation-latency",
        "x-amzn-bedrock-input-token-count",
        "x-amzn-bedrock-output-token-count",
        "x-amzn-bedrock-cache-read-input-token-count",
        "x-amzn-bedrock-cache-write-input-token-count",
        "x-amzn-bedrock-performanceconfig-latency",
        "x-amzn-bedrock-service-tier",
    }
)
_KEY_VERSION: Final = b"sluice-cache-v1"


#: The cache store failed or timed out (raised by ``put`` only).
CacheUnavailable = BackendUnavailable


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A stored answer: what to send back, and when (wall clock, seconds) it was stored."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float

    @property
    def size(self) -> int:
        """Approximate bytes held (body and headers), for the memory cache's bound."""
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers)


def cache_operation(operation: str) -> str | None:
    """The non-streamed operation whose answers serve ``operation``; ``None``: not cacheable."""
    return _CACHE_OPERATION.get(operation)


def cache_key(
    workload: str,
    pool: str,
    operation: str,
    body: bytes,
    *,
    headers: Mapping[str, str] | None = None,
) -> str:
    """The cache key of a request: same JSON meaning → same key, whatever its layout.

    The body is canonicalised (parsed, keys sorted at every level, re-serialised), so
    whitespace and key order do not matter; a body that is not JSON is hashed as it is.
    Streaming operations share their non-streamed twin's keys. ``headers`` (the request's)
    contribute only :data:`CACHE_VARY_HEADERS`. ``workload`` must be a policy name (no
    braces). Raises ``ValueError`` for an operation that is never cached.
    """
    op = _CACHE_OPERATION.get(operation)
    if op is None:
        raise ValueError(f"{operation} answers are never cached")
    try:
        canonical = orjson.dumps(orjson.loads(body), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONDecodeError:
        canonical = b"raw:" + body  # prefixed: raw bytes never equal a canonical form
    digest = hashlib.sha256(_KEY_VERSION)
    for part in (pool.encode(), op.encode(), *_vary(headers)):
        # Length-prefixed, so no two different part lists hash the same bytes.
        digest.update(len(part).to_bytes(4, "big") + part)
    digest.update(canonical)
    return f"sluice:{{cache:{workload}}}:{digest.hexdigest()}"


def _vary(headers: Mapping[str, str] | None) -> list[bytes]:
    if not headers:
        return []
    found = [
        f"{name.lower()}={value}".encode()
        for name, value in headers.items()
        if name.lower() in CACHE_VARY_HEADERS
    ]
    return sorted(found)


def cacheable(
    status: int,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    body: bytes,
    *,
    now: float | None = None,
) -> CachedResponse | None:
    """The :class:`CachedResponse` to store for an upstream answer, or ``None`` if not 200.

    Keeps only headers worth replaying (content type, token counts, latency, tier) and
    drops per-response ones (request id, date, length).
    """
    if status != 200:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    kept = tuple((k, v) for k, v in pairs if k.lower() in _KEPT_HEADERS)
    return CachedResponse(200, kept, bytes(body), time.time() if now is None else now)


@runtime_checkable
class ResponseCache(Protocol):
    """Where cached answers live: Redis (shared by every instance) or this process."""

    async def get(self, key: str) -> CachedResponse | None:
        """The live entry under ``key``, or ``None`` (absent, expired, or the store failed)."""

    async def put(self, key: str, value: CachedResponse, ttl_s: float) -> None:
        """Store ``value`` (status 200 only) for ``ttl_s`` seconds; ``CacheUnavailable`` if not."""

    async def close(self) -> None:
        """Release connections; the cache is not used afterwards."""


def check_put(value: CachedResponse, ttl_s: float) -> None:
    # Programming errors, not store failures: they would poison the cache if allowed.
    if value.status != 200:
        raise ValueError(f"only 200 answers are cached, not {value.status}")
    if not ttl_s > 0:
        raise ValueError(f"cache TTL must be positive, not {ttl_s}")


class MemoryResponseCache:
    """In-process cache: LRU bounded by entries and bytes, each entry with its own TTL."""

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: OrderedDict[str, tuple[float, CachedResponse]] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Bytes held by live and not-yet-evicted entries."""
        return self._bytes

    async def get(self, key: str) -> CachedResponse | None:
        """See :meth:`ResponseCache.get`; an expired entry is dropped on the way."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, value = entry
        if self._clock() >= expires_at:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def put(self, key: str, value: CachedResponse, ttl_s: float) -> None:
        """See :meth:`ResponseCache.put`; an entry larger than the whole bound is skipped."""
        check_put(value, ttl_s)
        if value.size > self._max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock() + ttl_s, value)
        self._bytes += value.size
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))  # least recently used first

    async def close(self) -> None:
        """Forget everything."""
        self._entries.clear()
        self._bytes = 0

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self._bytes -= value.size


# --- warming: `sluice cache warm FILE` ---------------------------------------------------
