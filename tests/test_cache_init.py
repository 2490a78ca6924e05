"""A cache lookup stays bounded while a cluster cannot be initialised.

``_ensure_ready`` enters the init lock before its timeout, so the time spent waiting for
the lock is unbounded: with puts queued on the lock against an unresponsive cluster, each
one spends the full 2 s init timeout in turn and a lookup on the request path (the
``cached`` degrade step) waits behind all of them. Before the change the whole of
``_ensure_ready`` ran inside the 0.25 s per-call timeout.
"""

from __future__ import annotations

import asyncio
import time

from redis.asyncio.cluster import RedisCluster

from proxy.backend.cache import RedisResponseCache
from proxy.pipeline.cache import CachedResponse, CacheUnavailable


async def test_lookup_is_bounded_while_the_cluster_does_not_answer() -> None:
    held: list[asyncio.StreamWriter] = []

    async def black_hole(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accept, never answer (a partitioned node)

    server = await asyncio.start_server(black_hole, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cache = RedisResponseCache(RedisCluster(host="127.0.0.1", port=port), timeout_s=0.25)
    value = CachedResponse(200, (("content-type", "application/json"),), b"{}", time.time())
    try:
        puts = [asyncio.create_task(cache.put(f"k{i}", value, 60.0)) for i in range(3)]
        await asyncio.sleep(0.05)  # the puts hold and queue on the init lock
        started = time.monotonic()
        assert await cache.get("k") is None  # a miss, as it must be...
        took = time.monotonic() - started
        await asyncio.gather(*puts, return_exceptions=True)
        # ...within one init attempt, not behind every queued put's attempt (~8 s here).
        assert took < 3.0, f"lookup took {took:.1f} s"
    finally:
        for w in held:
            w.close()
        server.close()
        await asyncio.wait_for(cache.close(), 10)


class _SwallowsCancel(RedisCluster):
    """The real client, with the fault seen once on redis-py 8.2: a cancel inside
    ``initialize()`` swallowed, the attempt going on for seconds more."""

    async def initialize(self, *args: object, **kwargs: object) -> RedisCluster:
        try:
            return await super().initialize()
        except asyncio.CancelledError:
            await asyncio.sleep(6)
            raise


async def test_lookup_is_bounded_when_the_cluster_client_swallows_a_cancel() -> None:
    server = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cache = RedisResponseCache(_SwallowsCancel(host="127.0.0.1", port=port), timeout_s=0.25)
    try:
        for _ in range(2):  # the second lookup starts a new attempt, bounded again
            started = time.monotonic()
            assert await cache.get("k") is None
            took = time.monotonic() - started
            assert took < 3.0, f"lookup took {took:.1f} s"
    finally:
        server.close()
        await asyncio.wait_for(cache.close(), 10)


async def test_an_initialisation_given_up_by_one_caller_is_a_timeout_for_the_others() -> None:
    # The first put gives the shared attempt up at its bound and cancels it; a put that
    # joined it later must get the cache's failure, not a CancelledError nobody sent it.
    server = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cache = RedisResponseCache(RedisCluster(host="127.0.0.1", port=port), timeout_s=0.25)
    value = CachedResponse(200, (("content-type", "application/json"),), b"{}", time.time())
    try:
        first = asyncio.create_task(cache.put("a", value, 60.0))
        await asyncio.sleep(1.0)
        second = asyncio.create_task(cache.put("b", value, 60.0))
        results = await asyncio.gather(first, second, return_exceptions=True)
        assert all(isinstance(r, CacheUnavailable) for r in results), results
    finally:
        server.close()
        await asyncio.wait_for(cache.close(), 10)
