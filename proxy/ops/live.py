"""The request handler in force, rebuilt around each new policy.

Requests reach the handler through :attr:`LiveProxy.proxy`, read once per request, so a
request is decided wholly under one policy. Calls in flight finish on the handler they
started on (their leases live in the shared gate and settle normally); only what the
policy derives at start-up is rebuilt: the handler, and the adaptive controllers when
their part of the policy changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from proxy.control.controller import Adaptivity
from proxy.pipeline import Pipeline, Tap
from proxy.policy import CompiledPolicy

log = logging.getLogger("sluice.policy")

ProxyFactory = Callable[[CompiledPolicy, Adaptivity | None], Pipeline]
AdaptivityFactory = Callable[[CompiledPolicy], Adaptivity | None]


def adaptive_part(policy: CompiledPolicy) -> Any:
    """What the adaptive controllers are built from: when equal, they carry on unchanged."""
    pol = policy.policy
    return (
        {n: (p.adaptive, p.breaker, p.concurrency) for n, p in pol.models.items()},
        {n: w.pause for n, w in pol.workloads.items()},
        {n: c.target_p99_ms for n, c in pol.priorities.items()},
        pol.server.adaptivity,
    )


class LiveProxy:
    """Holds the Proxy (and Adaptivity) serving now; :meth:`follow` is a reload hook."""

    def __init__(
        self,
        policy: CompiledPolicy,
        make_proxy: ProxyFactory,
        make_adaptivity: AdaptivityFactory,
        registry: CollectorRegistry,
    ) -> None:
        self._make_proxy = make_proxy
        self._make_adaptivity = make_adaptivity
        self._registry = registry
        self._policy = policy
        self.adaptivity = make_adaptivity(policy)
        self.proxy = make_proxy(policy, self.adaptivity)
        self._retired: set[asyncio.Task[None]] = set()
        self._tap: Tap | None = None

    @property
    def tap(self) -> Tap | None:
        """Sees each finished request (the fleet view's latencies); every handler calls it."""
        return self._tap

    @tap.setter
    def tap(self, tap: Tap | None) -> None:
        self._tap = self.proxy.tap = tap

    async def start(self) -> None:
        """Start the background controllers, if the policy has any."""
        if self.adaptivity is not None:
            await self.adaptivity.start()

    async def follow(self, new: CompiledPolicy) -> None:
        """Serve ``new`` from the next request on."""
        old_proxy, old_adaptivity = self.proxy, self.adaptivity
        rebuild = adaptive_part(new) != adaptive_part(self._policy)
        adaptivity = old_adaptivity
        if rebuild:
            if old_adaptivity is not None:
                self._unregister(old_adaptivity)
            try:
                adaptivity = self._make_adaptivity(new)
            except Exception:
                # Serve the new policy anyway: without its controllers rather than not at all.
                log.exception(
                    "adaptive controllers not rebuilt", extra={"fields": {"event": "bug"}}
                )
                adaptivity = None
        # No await from here to the swap: the next request sees the new handler.
        self.proxy = self._make_proxy(new, adaptivity)
        self.proxy.tap = self._tap
        self.adaptivity, self._policy = adaptivity, new
        if rebuild and old_adaptivity is not None:
            await old_adaptivity.close()
        if rebuild and adaptivity is not None:
            await adaptivity.start()
        # The old handler may still serve calls in flight; close it (flush, cache writes)
        # in the background rather than wait for them here.
        task = asyncio.create_task(old_proxy.close())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    def _unregister(self, adaptivity: Adaptivity) -> None:
        # The next controllers register the same metric names in the same registry.
        for value in vars(adaptivity.metrics).values():
            if isinstance(value, MetricWrapperBase):
                self._registry.unregister(value)

    async def close(self) -> None:
        """Stop the controllers and close every handler."""
        if self.adaptivity is not None:
            await self.adaptivity.close()
        await asyncio.gather(*self._retired, return_exceptions=True)
        await self.proxy.close()


LIVE = web.AppKey("live", LiveProxy)
