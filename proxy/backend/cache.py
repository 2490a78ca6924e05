"""The response cache in Redis or a Redis Cluster (see :mod:`proxy.pipeline.cache`).

The cache's keys, values and the in-process twin live with the pipeline stage that uses
them; this is the Redis side: group-committed ``MGET`` lookups and bounded writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

import msgpack

from proxy.backend.client import FAILURES, Redis, RedisCluster, redis_client
from proxy.metrics import Metrics
from proxy.pipeline.cache import (
    CachedResponse,
    CacheUnavailable,
    MemoryResponseCache,
    ResponseCache,
    check_put,
)
from proxy.tasks import stop_tasks

log = logging.getLogger("sluice.cache")
#: Longest the first call waits for a cluster client to learn the slot map.
_INIT_TIMEOUT_S = 2.0

_FORMAT: Final = 1
_FAILURES: Final = FAILURES
_LOG_EVERY_S: Final = 5.0
#: Keys per MGET: bounds one call's run time on a single-threaded Redis.
_MAX_BATCH: Final = 256


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
        self._init: asyncio.Task[Any] | None = None
        self._abandoned: set[asyncio.Task[Any]] = set()
        self._last_log = -_LOG_EVERY_S
        self._unlogged = 0

    async def get(self, key: str) -> CachedResponse | None:
        """See :meth:`ResponseCache.get`: a failure or an unreadable entry is a miss."""
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._queue.append((key, future))
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain(), name="sluice-cache-mget")
        # Bounded here too, whatever the drainer's Redis calls do: a lookup on the request
        # path is a miss after one initialisation and one lookup's time, never a hang.
        try:
            done, _ = await asyncio.wait({future}, timeout=self._timeout + _INIT_TIMEOUT_S)
        finally:
            if not future.done():
                future.cancel()  # the drainer skips it: no MGET for a lookup nobody awaits
        if not done:
            self._get_failed(key, TimeoutError("cache lookup did not finish in time"))
            return None
        raw = future.result()
        if raw is None:
            return None
        try:
            return _decode(raw)
        except ValueError as exc:
            self._get_failed(key, exc)
            return None

    async def put(self, key: str, value: CachedResponse, ttl_s: float) -> None:
        """See :meth:`ResponseCache.put` (one ``SET ... PX``: an entry is stored whole or not)."""
        check_put(value, ttl_s)
        raw = _encode(value)
        async with self._puts:
            try:
                await self._ensure_ready()
                # No caller waits on a put (it runs after the answer, or in `cache warm`):
                # bounded like a connect, not like a lookup. The lookup's 0.25 s lost the
                # first put of a warm run on a loaded machine (a new connection's set-up).
                async with asyncio.timeout(max(self._timeout, _INIT_TIMEOUT_S)):
                    await self._client.set(key, raw, px=max(1, round(ttl_s * 1000)))
            except _FAILURES as exc:
                self._put_errors.inc()
                raise CacheUnavailable(f"cache put failed: {_why(exc)}") from exc

    async def close(self) -> None:
        """Answer queued lookups as misses, then close the client's connections."""
        if self._drainer is not None:
            await stop_tasks([self._drainer], "cache drainer")
        attempts = [t for t in (self._init, *self._abandoned) if t is not None]
        if attempts:
            await stop_tasks(attempts, "cache cluster initialisation")
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
            await self._ensure_ready()
            async with asyncio.timeout(self._timeout):
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
        # A cluster client reads the slot map and connects to every master first: bounded
        # like a connect, not like one lookup (0.25 s lost it on a loaded machine, and every
        # lookup then started it again). One attempt at a time, shared by every caller, each
        # waiting for it at most the bound. The bound does not rely on cancellation: redis-py
        # 8.2 once swallowed the cancel of asyncio.timeout inside initialize() (a lookup took
        # 7.3 s), so an attempt past the bound is abandoned (cancelled, not awaited) instead.
        if self._ready:
            return
        attempt = self._init
        if attempt is None or attempt.done():
            attempt = self._init = asyncio.create_task(
                self._client.initialize(), name="sluice-cache-init"
            )
            attempt.add_done_callback(_retrieved)
        bound = max(self._timeout, _INIT_TIMEOUT_S)
        done, _ = await asyncio.wait({attempt}, timeout=bound)
        if not done:
            if self._init is attempt:
                self._init = None
                self._abandoned.add(attempt)  # stopped in close() if the cancel is swallowed
                attempt.add_done_callback(self._abandoned.discard)
                attempt.cancel()
            raise TimeoutError(f"cluster initialisation took over {bound:g} s")
        if attempt.cancelled():  # another caller gave it up: a timeout here, not our cancel
            raise TimeoutError(f"cluster initialisation took over {bound:g} s")
        attempt.result()  # its failure is this call's failure; the next call tries again
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


def _retrieved(task: asyncio.Task[Any]) -> None:
    """Read an abandoned attempt's failure (it is the next attempt's to report), so asyncio
    does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()
