"""One :class:`Backend` per process: Redis for a URL, else embedded (in-process twins).

It is built once (``proxy/app.py``) and handed to admission (:attr:`Backend.store`), the
response cache (:attr:`Backend.cache`) and, through :attr:`Backend.url`, the fleet-wide
control loops, hot reload and the fleet board. Key layout: :mod:`proxy.backend.keys`.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.admission.protocol import Store, StoreUnavailable
from proxy.admission.waiting import WaitMetrics
from proxy.backend import BackendUnavailable
from proxy.backend.ahead import Ahead
from proxy.backend.cache import open_cache
from proxy.backend.embedded import EmbeddedStore
from proxy.backend.redis_store import RedisStore
from proxy.metrics import Metrics
from proxy.pipeline.cache import ResponseCache

__all__ = [
    "Backend",
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
    grants_ahead: int = 0,
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
        ahead=Ahead(grants_ahead) if grants_ahead > 0 else None,
    )


@dataclass(frozen=True, slots=True)
class Backend:
    """Where this process keeps shared state: the admission store and the response cache."""

    #: ``redis://…`` / ``redis+cluster://…``, or None for embedded (one process).
    url: str | None
    store: Store
    cache: ResponseCache

    @classmethod
    def open(
        cls, url: str | None, metrics: Metrics, timeout_s: float, grants_ahead: int = 0
    ) -> Backend:
        """Build (nothing connects yet: :meth:`start` inside the event loop)."""
        store = open_store(
            url,
            metrics=metrics,
            timeout_s=timeout_s,
            wait_metrics=WaitMetrics(metrics.registry),
            grants_ahead=grants_ahead,
        )
        return cls(url, store, open_cache(url, metrics=metrics, timeout_s=timeout_s))

    @property
    def kind(self) -> str:
        """``redis`` or ``embedded``, for logs."""
        return "redis" if self.url else "embedded"

    async def start(self) -> None:
        """Load the scripts and start the lease heartbeat (raises BackendUnavailable)."""
        await self.store.start()

    async def close(self) -> None:
        """Apply queued settles and close every connection."""
        await self.cache.close()
        await self.store.close()
