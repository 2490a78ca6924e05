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

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

import msgpack
import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from proxy.backend.client import redis_client
from proxy.metrics import Metrics

__all__ = [
    "CACHE_VARY_HEADERS",
    "CacheUnavailable",
    "CachedResponse",
    "MemoryResponseCache",
    "RedisResponseCache",
    "ResponseCache",
    "cache_key",
    "cache_operation",
    "cacheable",
    "open_cache",
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
_FORMAT: Final = 1
#: What a failed Redis call can raise (cluster setup errors are not RedisError subclasses).
_FAILURES: Final = (RedisError, RedisClusterException, OSError, TimeoutError)
_LOG_EVERY_S: Final = 5.0
#: Keys per MGET: bounds one call's run time on a single-threaded Redis.
_MAX_BATCH: Final = 256


class CacheUnavailable(Exception):
    """The cache store failed or timed out (raised by ``put`` only)."""


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


def _check_put(value: CachedResponse, ttl_s: float) -> None:
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
        _check_put(value, ttl_s)
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


def _encode(value: CachedResponse) -> bytes:
    headers = [[k, v] for k, v in value.headers]
    packed = msgpack.packb([_FORMAT, value.status, headers, value.body, value.stored_at])
    assert isinstance(packed, bytes)
    return packed


def _decode(raw: bytes | str) -> CachedResponse:
    if not isinstance(raw, bytes):
        raise ValueError("the Redis client decodes responses; cache values are binary")
    try:
        fmt, status, headers, body, stored_at = msgpack.unpackb(raw)
        if fmt != _FORMAT or not isinstance(body, bytes):
            raise ValueError(f"format {fmt!r}")
        pairs = tuple((str(k), str(v)) for k, v in headers)
        return CachedResponse(int(status), pairs, body, float(stored_at))
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"unreadable cache entry: {exc}") from None


class RedisResponseCache:
    """Cache in Redis or a Redis Cluster, shared by every Sluice instance using it.

    Lookups are group-committed, as the admission store's admits are: every ``get`` queued
    in one event-loop tick goes out as ONE ``MGET`` (per slot in a cluster), and arrivals
    during that call go out together when it returns. The cache is read exactly when
    Sluice is overloaded (the ``cached`` degrade step), so a burst must cost a round trip,
    not a connection per request (redis-py's default pool refuses past 100). At most
    ``max_puts`` writes are in flight; more wait their turn.

    ``client`` must return bytes (no ``decode_responses``); the cache takes ownership and
    closes it in :meth:`close`. Every Redis call is bounded by ``timeout_s``.
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        metrics: Metrics | None = None,
        timeout_s: float = 0.25,
        max_puts: int = 32,
    ) -> None:
        self._client = client
        self._timeout = timeout_s
        metrics = metrics or Metrics()
        self._get_errors = metrics.store_errors.labels(operation="cache_get")
        self._put_errors = metrics.store_errors.labels(operation="cache_put")
        self._queue: list[tuple[str, asyncio.Future[bytes | None]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._puts = asyncio.Semaphore(max_puts)
        # redis-py 8.1's async cluster client breaks ("'NoneType' object has no attribute
        # 'writelines'") when several commands race its lazy initialisation; do it once.
        self._ready = not isinstance(client, RedisCluster)
        self._init_lock = asyncio.Lock()
        self._last_log = -_LOG_EVERY_S
        self._unlogged = 0

    async def get(self, key: str) -> CachedResponse | None:
        """See :meth:`ResponseCache.get`: a failure or an unreadable entry is a miss."""
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._queue.append((key, future))
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain(), name="sluice-cache-mget")
        raw = await future
        if raw is None:
            return None
        try:
            return _decode(raw)
        except ValueError as exc:
            self._get_failed(key, exc)
            return None

    async def put(self, key: str, value: CachedResponse, ttl_s: float) -> None:
        """See :meth:`ResponseCache.put` (one ``SET ... PX``: an entry is stored whole or not)."""
        _check_put(value, ttl_s)
        raw = _encode(value)
        async with self._puts:
            try:
                async with asyncio.timeout(self._timeout):
                    await self._ensure_ready()
                    await self._client.set(key, raw, px=max(1, round(ttl_s * 1000)))
            except _FAILURES as exc:
                self._put_errors.inc()
                raise CacheUnavailable(f"cache put failed: {_why(exc)}") from exc

    async def close(self) -> None:
        """Answer queued lookups as misses, then close the client's connections."""
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        # A drainer cancelled before it first ran never reaches its ``finally``.
        self._drainer = None
        _as_misses(self._queue)
        self._queue = []
        await self._client.aclose()

    async def _drain(self) -> None:
        batch: list[tuple[str, asyncio.Future[bytes | None]]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
                batch = [(key, fut) for key, fut in batch if not fut.done()]  # left: cancelled
                if batch:
                    await self._lookup(batch)
        finally:
            # Reached on cancellation (close) too: no waiter is ever left hanging.
            self._drainer = None
            _as_misses(batch)
            _as_misses(self._queue)
            self._queue = []

    async def _lookup(self, batch: list[tuple[str, asyncio.Future[bytes | None]]]) -> None:
        keys = [key for key, _ in batch]
        try:
            async with asyncio.timeout(self._timeout):
                await self._ensure_ready()
                if isinstance(self._client, RedisCluster):
                    values = await self._client.mget_nonatomic(keys)
                else:
                    values = await self._client.mget(keys)
        except _FAILURES as exc:
            for key, _ in batch:
                self._get_failed(key, exc)
            values = [None] * len(keys)
        except Exception:
            # Not a store failure but a bug; still a miss for the waiters, never their error.
            self._get_errors.inc(len(batch))
            log.exception("cache lookup failed unexpectedly", extra={"fields": {"keys": len(keys)}})
            values = [None] * len(keys)
        for (_, future), raw in zip(batch, values, strict=True):
            if not future.done():
                future.set_result(raw if isinstance(raw, bytes) or raw is None else None)

    async def _ensure_ready(self) -> None:
        if self._ready:
            return
        async with self._init_lock:
            if not self._ready and isinstance(self._client, RedisCluster):
                await self._client.initialize()
            self._ready = True

    def _get_failed(self, key: str, exc: BaseException) -> None:
        self._get_errors.inc()
        # While Redis is down every request would log the same line: one line per
        # interval, carrying how many were folded into it (the counter has them all).
        now = time.monotonic()
        if now - self._last_log < _LOG_EVERY_S:
            self._unlogged += 1
            return
        fields = {
            "event": "cache_error",
            "operation": "get",
            "key": key,
            "error": _why(exc),
            "suppressed": self._unlogged,
        }
        log.warning("cache get failed; answered as a miss", extra={"fields": fields})
        self._last_log, self._unlogged = now, 0


def _as_misses(waiting: list[tuple[str, asyncio.Future[bytes | None]]]) -> None:
    for _, future in waiting:
        if not future.done():
            future.set_result(None)


def _why(exc: BaseException) -> str:
    # redis-py's repr() of server errors hides the message; str() alone hides the type.
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def open_cache(
    redis_url: str | None,
    *,
    metrics: Metrics | None = None,
    timeout_s: float = 0.25,
    max_entries: int = 10_000,
    max_bytes: int = 64 * 1024 * 1024,
) -> ResponseCache:
    """A :class:`RedisResponseCache` for ``redis_url``, else a :class:`MemoryResponseCache`.

    Nothing connects until the first call, so this may run before the event loop starts.
    """
    if not redis_url:
        return MemoryResponseCache(max_entries=max_entries, max_bytes=max_bytes)
    return RedisResponseCache(
        redis_client(redis_url, timeout_s), metrics=metrics, timeout_s=timeout_s
    )


# --- warming: `sluice cache warm FILE` ---------------------------------------------------
