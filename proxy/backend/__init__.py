"""The admission store: protocol, the Redis and embedded implementations, and the factory.

Key layout (every key of a pool carries the pool as Redis Cluster hash tag, so one
decision touches one slot and pools spread across shards)::

    sluice:{<pool>}:pool              hash  r, t = pool rpm/tpm bucket TAT (ms); lim = dynamic limit
    sluice:{<pool>}:leases            zset  lease id -> expiry ms (pool in-flight)
    sluice:{<pool>}:stats             hash  16-slot ring of per-second n / throttled / latency sum
    sluice:{<pool>}:w:<workload>          hash  r, t = workload rpm/tpm bucket TAT (ms)
    sluice:{<pool>}:w:<workload>:leases   zset  lease id -> expiry ms (workload in-flight)

A service tier with its own quota (``models.<pool>.tiers.<tier>``) is a scope of its own,
``<pool>:tier:<tier>``, with the same keys under ``sluice:{<pool>}:tier:<tier>`` (its hash
is that key itself, e.g. ``sluice:{sonnet}:tier:flex``; leases ``…:tier:flex:leases``):
the pool's hash tag, so the same admit script decides it, apart from the pool's own quota.

Bucket keys expire when their bucket would be full again, lease zsets when their last
lease would have expired; only the pool hash (it holds the dynamic limit) persists.
"""

from __future__ import annotations

from proxy.admission.protocol import Store, StoreUnavailable
from proxy.admission.waiting import WaitMetrics
from proxy.backend.embedded import EmbeddedStore
from proxy.backend.redis_store import RedisStore
from proxy.metrics import Metrics

__all__ = ["EmbeddedStore", "RedisStore", "Store", "StoreUnavailable", "open_store"]


def open_store(
    url: str | None,
    *,
    metrics: Metrics | None = None,
    instance_id: str | None = None,
    timeout_s: float = 0.25,
    wait_metrics: WaitMetrics | None = None,
) -> Store:
    """A :class:`RedisStore` for ``url`` (``redis://…`` or ``redis+cluster://…``), else embedded.

    The store still has to be started (``await store.start()``) inside the event loop.
    """
    if not url:
        return EmbeddedStore(wait_metrics=wait_metrics)
    return RedisStore(
        url,
        metrics=metrics,
        instance_id=instance_id,
        timeout_s=timeout_s,
        wait_metrics=wait_metrics,
    )
