"""The admission store's factory: :class:`RedisStore` for a URL, else :class:`EmbeddedStore`.

Key layout: :mod:`proxy.backend.keys`.
"""

from __future__ import annotations

from proxy.admission.protocol import Store, StoreUnavailable
from proxy.admission.waiting import WaitMetrics
from proxy.backend import BackendUnavailable
from proxy.backend.embedded import EmbeddedStore
from proxy.backend.redis_store import RedisStore
from proxy.metrics import Metrics

__all__ = [
    "BackendUnavailable",
    "EmbeddedStore",
    "RedisStore",
    "Store",
    "StoreUnavailable",
    "open_store",
]


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
