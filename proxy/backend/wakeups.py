"""Fleet-wide wake-ups: one pub/sub connection per instance, for the pools it has waiters on.

The scripts PUBLISH ``sluice:{pool}:released`` when capacity may have come back while
someone in the fleet waits (never otherwise, so an idle fleet sends nothing). Classic
PUBLISH is broadcast to every node of a Redis Cluster, so a plain connection to any one
node (the seed of the cluster URL at first) hears every pool, whatever its slot. On a
cluster a lost connection is re-made to the next node the cluster's client knows: the seed
may be a node that died for good (its replica took over elsewhere).

A channel is subscribed the first time a pool gets a waiter here and kept: subscribing
costs a round trip, and the confirmation must arrive before the waiter's first attempt,
or a release published in between would be missed. Pub/sub is at-most-once: when the
connection fails, every waiter is woken (it re-checks) and the connection is re-made;
waiters also keep a jittered safety timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import orjson

from proxy.admission.model import plan_keys
from proxy.backend.client import node_client, node_url
from proxy.tasks import stop_tasks

log = logging.getLogger("proxy.admission")

_BACKOFF_S = 0.5


def _event(level: int, event: str, **fields: object) -> None:
    if log.isEnabledFor(level):
        log.log(level, orjson.dumps({"event": event, **fields}, default=str).decode())


class WakeListener:
    """Calls ``wake(pool)`` for every release message; ``wake_all()`` after a lost connection.

    ``on_error()`` is called once per failure (counted by the owner).
    """

    def __init__(
        self,
        url: str,
        wake: Callable[[str], None],
        wake_all: Callable[[], None],
        on_error: Callable[[], None],
        *,
        timeout_s: float,
        nodes: Callable[[], list[str]] | None = None,
    ) -> None:
        """``nodes``: on a cluster, the ``host:port`` of every node its client knows now."""
        self._url = url
        self._nodes = nodes
        self._node = 0  # the last of ``nodes()`` connected to
        self._client = node_client(url, timeout_s)
        self._pubsub: Any = None
        self._wake = wake
        self._wake_all = wake_all
        self._on_error = on_error
        self._timeout = max(timeout_s, 1.0)
        self._pools: dict[str, str] = {}  # channel -> pool
        self._confirmed: dict[str, asyncio.Future[None]] = {}  # channel -> subscribe reply
        self._task: asyncio.Task[None] | None = None

    async def subscribe(self, pool: str) -> None:
        """Return once ``pool``'s channel is subscribed (at once after the first time).

        Never raises: without a subscription the waiters still have their timers.
        """
        channel = plan_keys(pool, "").channel
        fut = self._confirmed.get(channel)
        if fut is None:
            fut = self._confirmed[channel] = asyncio.get_running_loop().create_future()
            self._pools[channel] = pool
            try:
                async with asyncio.timeout(self._timeout):
                    if self._pubsub is None:
                        self._pubsub = self._client.pubsub()
                    await self._pubsub.subscribe(channel)
            except Exception as exc:
                self._failed("subscribe", exc)
                if not fut.done():
                    fut.set_result(None)  # the listener re-subscribes on reconnect
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._listen())
        if not fut.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timeout):
                    await asyncio.shield(fut)

    async def _listen(self) -> None:
        while True:
            try:
                msg = await self._pubsub.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed("listen", exc)
                self._wake_all()
                await asyncio.sleep(_BACKOFF_S)
                await self._next_node()
                await self._resubscribe()
                continue
            if msg is None:
                continue
            channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else ""
            if msg["type"] == "message":
                pool = self._pools.get(channel)
                if pool is not None:
                    self._wake(pool)
            elif msg["type"] == "subscribe":
                fut = self._confirmed.get(channel)
                if fut is not None and not fut.done():
                    fut.set_result(None)
                else:  # re-subscribed after a reconnect: anything may have been missed
                    pool = self._pools.get(channel)
                    if pool is not None:
                        self._wake(pool)

    async def _next_node(self) -> None:
        """On a cluster: a new connection to the next node known (redis-py would re-make
        the same one, to a node that may be gone for good)."""
        if self._nodes is None:
            return
        try:
            names = self._nodes()
        except Exception:  # the cluster's client not ready: keep the node we have
            return
        if not names:
            return
        self._node = (self._node + 1) % len(names)
        old, pubsub = self._client, self._pubsub
        self._client = node_client(node_url(self._url, names[self._node]), self._timeout)
        self._pubsub = self._client.pubsub()
        with contextlib.suppress(Exception):
            await pubsub.aclose()
        with contextlib.suppress(Exception):
            await old.aclose()

    async def _resubscribe(self) -> None:
        # redis-py re-subscribes by itself on reconnect; this covers a subscribe that
        # failed before the connection was ever made (harmless if already subscribed).
        try:
            async with asyncio.timeout(self._timeout):
                await self._pubsub.subscribe(*self._pools)
        except Exception as exc:
            self._failed("subscribe", exc)

    def _failed(self, op: str, exc: BaseException) -> None:
        self._on_error()
        _event(logging.WARNING, "store_error", operation=f"wakeup_{op}", error=repr(exc))

    async def close(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            await stop_tasks([self._task], "wake-up listener")
            self._task = None
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        await self._client.aclose()
