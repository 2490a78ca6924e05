"""The one way Sluice runs a Lua script in Redis.

Scripts are files (``scripts/<name>.lua``, see :mod:`.lua`), loaded with ``SCRIPT LOAD``
(on every primary of a cluster) and called by SHA. A ``NOSCRIPT`` reply (restart,
failover, ``SCRIPT FLUSH``) reloads them all and retries once. Every call is bounded by
the runner's timeout and any failure is one :class:`~proxy.backend.BackendUnavailable`.
:meth:`ScriptRunner.run_many` sends one script for many key sets in one round trip.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

import orjson

from proxy.backend import BackendUnavailable
from proxy.backend.client import FAILURES, NoScriptError, Redis, RedisCluster
from proxy.backend.direct import UNBOUNDED_S, DirectCalls
from proxy.backend.lua import load_script

__all__ = ["Arg", "ScriptRunner", "event", "why"]

Arg = bytes | str | int | float

#: How long a call that timed out (:meth:`ScriptRunner.run_past`) still waits for its reply
#: unless the connections' socket timeout says longer: redis-py's default socket timeout.
LATE_BOUND_S: Final = UNBOUNDED_S


def why(exc: BaseException) -> str:
    """An error for a log line or message."""
    # redis-py 8's repr() of server errors hides the message; str() alone hides the type.
    return f"{type(exc).__name__}: {exc}"


def event(log: logging.Logger, level: int, name: str, **fields: object) -> None:
    """One structured log line (a JSON object with stable field names)."""
    if log.isEnabledFor(level):
        log.log(level, orjson.dumps({"event": name, **fields}, default=str).decode())


class ScriptRunner:
    """Runs the named scripts through one client, each call within ``timeout_s``."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        names: Iterable[str],
        timeout_s: float,
        log: logging.Logger,
    ) -> None:
        self._client = client
        self._timeout = timeout_s
        self._log = log
        self._scripts = {name: load_script(name) for name in names}
        self._sha: dict[str, str] = {}
        #: Timed-out calls still waiting for Redis's reply (see :meth:`run_past`): their
        #: tasks, or the replies' futures of calls made with :meth:`send_now`.
        self.late: set[asyncio.Future[Any]] = set()
        # One server: EVALSHA without redis-py's per-command machinery (a cluster routes).
        self._direct = DirectCalls(client) if isinstance(client, Redis) else None
        #: A late reply is waited for as long as one call's socket timeout allows (the
        #: URL's ``socket_timeout``), or :data:`LATE_BOUND_S`.
        if self._direct is not None:
            socket_s = self._direct.timeout
        else:  # a cluster's nodes are made with these
            socket_s = getattr(client, "connection_kwargs", {}).get("socket_timeout")
        self._late_bound = max(timeout_s, socket_s or LATE_BOUND_S)

    async def start(self) -> None:
        """Load every script; a cluster reads its slot map first, so allow at least 2 s."""
        try:
            async with asyncio.timeout(max(self._timeout, 2.0)):
                await self._load()
        except FAILURES as exc:
            raise BackendUnavailable(f"cannot load scripts: {why(exc)}") from exc

    async def aclose(self) -> None:
        """Close the client and the runner's own connections."""
        try:
            if self._direct is not None:
                await self._direct.aclose()
        finally:
            await self._client.aclose()

    def abandon(self) -> None:
        """Stop waiting for late replies (on close: what they granted expires with its TTL)."""
        for task in list(self.late):
            task.cancel()

    async def ping(self) -> bool:
        """True when Redis answers PING within the timeout."""
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._client.ping())
        except FAILURES:
            return False

    async def _load(self) -> None:
        # In a cluster redis-py sends SCRIPT LOAD to every primary.
        for name, text in self._scripts.items():
            self._sha[name] = str(await self._client.script_load(text))

    async def _call(self, name: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """EVALSHA; NOSCRIPT reloads + retries once. Unbounded."""
        if name not in self._sha:  # not started: load on first use (the job queue does)
            await self._load()
        try:
            return await self._evalsha(self._sha[name], keys, args)
        except NoScriptError:
            return await self._reloaded(name, keys, args)

    async def _reloaded(self, name: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """After NOSCRIPT (a restart, a failover, ``SCRIPT FLUSH``): reload, call again."""
        await self._reload(name)
        return await self._evalsha(self._sha[name], keys, args)

    async def _reload(self, name: str) -> None:
        """Load every script again (``name`` was refused with NOSCRIPT)."""
        event(self._log, logging.INFO, "store_script_reload", script=name)
        await self._load()

    def _evalsha(self, sha: str, keys: Sequence[str], args: Sequence[Arg]) -> Awaitable[Any]:
        if self._direct is not None:
            return self._direct.evalsha(sha, keys, args)
        return self._client.evalsha(sha, len(keys), *keys, *args)

    async def run_many(
        self, name: str, calls: Sequence[tuple[Sequence[str], Sequence[Arg]]]
    ) -> list[Any]:
        """Run ``name`` once per ``(keys, args)`` in one round trip, in order; raises
        :class:`BackendUnavailable` on any failure, like :meth:`run`.

        NOSCRIPT ran nothing, so the calls it refused are resent (once) after a reload
        without counting anything twice; a pipeline cannot reload inline.
        """
        try:
            if name not in self._sha:  # Redis was down at start
                async with asyncio.timeout(max(self._timeout, 2.0)):
                    await self._load()
            results = await self._round_trip(name, calls)
            refused = [i for i, res in enumerate(results) if isinstance(res, NoScriptError)]
            if refused:
                event(self._log, logging.INFO, "store_script_reload", script=name)
                async with asyncio.timeout(max(self._timeout, 2.0)):
                    await self._load()
                again = await self._round_trip(name, [calls[i] for i in refused])
                for i, res in zip(refused, again, strict=True):
                    results[i] = res
            for res in results:
                if isinstance(res, BaseException):
                    raise res
        except FAILURES as exc:
            raise BackendUnavailable(f"redis {name} failed: {why(exc)}") from exc
        return results

    async def _round_trip(
        self, name: str, calls: Sequence[tuple[Sequence[str], Sequence[Arg]]]
    ) -> list[Any]:
        sha = self._sha[name]
        async with asyncio.timeout(self._timeout):
            if isinstance(self._client, RedisCluster):
                # redis-py refuses EVALSHA in cluster pipelines; concurrent calls cost the
                # same one round trip of wall time when each call is one slot on one master.
                return list(
                    await asyncio.gather(
                        *(self._client.evalsha(sha, len(k), *k, *a) for k, a in calls),
                        return_exceptions=True,
                    )
                )
            pipe = self._client.pipeline(transaction=False)
            for k, a in calls:
                pipe.evalsha(sha, len(k), *k, *a)
            return list(await pipe.execute(raise_on_error=False))

    @property
    def direct(self) -> bool:
        """Calls can be written without a task (:meth:`send_now`): one Redis server."""
        return self._direct is not None

    def send_now(
        self, name: str, keys: Sequence[str], args: Sequence[Arg]
    ) -> asyncio.Future[Any] | None:
        """``name`` written now, without a task, on a standalone Redis whose connection is
        made and scripts loaded: the future of its reply, read with :meth:`outcome`
        (bounded by the socket timeout only: see :class:`~proxy.backend.batch_call.BatchCall`
        for the rest). None, with nothing sent, otherwise (:meth:`ready` makes it so);
        raises :class:`BackendUnavailable`, with nothing sent, for arguments that cannot be
        sent."""
        direct, sha = self._direct, self._sha.get(name)
        if direct is None or sha is None:
            return None
        try:
            return direct.send_nowait(sha, keys, args)
        except FAILURES as exc:  # (DataError)
            raise BackendUnavailable(f"redis {name} failed: {why(exc)}") from exc

    async def ready(self, name: str, bound: float, reload: bool = False) -> None:
        """The direct connection made and ``name`` loaded (loaded again with ``reload``:
        after NOSCRIPT), within ``bound`` seconds, for :meth:`send_now`; raises
        :class:`BackendUnavailable` (``TimeoutError`` past the bound)."""
        direct = self._direct
        assert direct is not None
        try:
            if bound <= 0:
                raise TimeoutError
            async with asyncio.timeout(bound):
                if reload:
                    await self._reload(name)
                elif name not in self._sha:
                    await self._load()
                await direct.connect(bound)
        except FAILURES as exc:
            raise BackendUnavailable(f"redis {name} failed: {why(exc)}") from exc

    def retire(self, call: asyncio.Future[Any]) -> None:
        """``call`` (from :meth:`send_now`) is unanswered at its caller's deadline: its
        connection takes no new call (it may be dead without a sign)."""
        if self._direct is not None:
            self._direct.retire(call)

    def outcome(self, name: str, reply: asyncio.Future[Any]) -> Any:
        """The result of a :meth:`send_now` call that is done, as :meth:`run` returns it;
        raises :class:`BackendUnavailable` as :meth:`run` does, except ``NoScriptError``
        (nothing ran: the caller sends it again with :meth:`run` or :meth:`run_past`,
        which reload) and ``CancelledError`` (:meth:`abandon`)."""
        try:
            res = reply.result()
            if isinstance(res, Exception):
                raise res  # the script's error, or Redis's, as redis-py raises them
        except NoScriptError:
            raise
        except FAILURES as exc:
            raise BackendUnavailable(f"redis {name} failed: {why(exc)}") from exc
        except Exception as exc:
            raise self._unforeseen(name, exc) from exc
        return res

    def timed_out(self, name: str) -> BackendUnavailable:
        """What the callers of a call unanswered within the timeout are answered with."""
        return BackendUnavailable(f"redis {name} failed: {why(TimeoutError())}")

    async def run(self, name: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run ``name`` within the timeout; raises :class:`BackendUnavailable` on any failure."""
        try:
            return await self._bounded(name, keys, args, self._timeout)
        except FAILURES as exc:
            raise BackendUnavailable(f"redis {name} failed: {why(exc)}") from exc
        except Exception as exc:  # a defect: its callers are answered all the same
            raise self._unforeseen(name, exc) from exc

    def _unforeseen(self, name: str, exc: Exception) -> BackendUnavailable:
        """An error no Redis call should raise, logged with its traceback: callers waiting
        for the call (a batch's requests) get the store's failure, never a hang."""
        self._log.error("redis %s failed unexpectedly", name, exc_info=exc)
        return BackendUnavailable(f"redis {name} failed: {why(exc)}")

    async def _bounded(
        self, name: str, keys: Sequence[str], args: Sequence[Arg], bound: float
    ) -> Any:
        """:meth:`_call` within ``bound`` seconds."""
        direct, sha = self._direct, self._sha.get(name)
        if direct is not None and sha is not None:
            # The usual case: bounded by a timer of the call's own, no asyncio.timeout.
            started = asyncio.get_running_loop().time()
            try:
                return await direct.evalsha(sha, keys, args, bound)
            except NoScriptError:  # (it ran nothing)
                bound -= asyncio.get_running_loop().time() - started
                async with asyncio.timeout(bound):
                    return await self._reloaded(name, keys, args)
        async with asyncio.timeout(bound):
            return await self._call(name, keys, args)

    async def _resent_in_time(
        self, name: str, keys: Sequence[str], args: Sequence[Arg], begun: float
    ) -> Any:
        """After NOSCRIPT, a late call: reloaded and sent again within the timeout counted
        from ``begun``, else not sent (its callers were answered)."""
        assert self._direct is not None
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeout - (loop.time() - begun)):
            await self._reload(name)
        left = self._timeout - (loop.time() - begun)
        if left <= 0:
            raise TimeoutError
        sha = self._sha[name]
        return await self._direct.evalsha(sha, keys, args, connect_s=left, retire_s=left)

    async def run_past(
        self,
        name: str,
        keys: Sequence[str],
        args: Sequence[Arg],
        timed_out: Callable[[BackendUnavailable], None],
    ) -> Any:
        """Run ``name``, not abandoned at the timeout: Redis may still run a script written
        to a stalled server, so past the timeout ``timed_out`` gets the error whoever waits
        is to be answered with, and this goes on waiting for the reply (its grants are then
        given back), for as long as a call's socket timeout. A failure, or no reply by then, raises
        :class:`BackendUnavailable`; :meth:`abandon` cancels the calls that timed out.

        The call runs in the caller's task: no task, shield or second timeout per call.
        """
        task = asyncio.current_task()
        assert task is not None

        def expire() -> None:
            self.late.add(task)
            timed_out(self.timed_out(name))

        loop = asyncio.get_running_loop()
        begun = loop.time()
        timer = loop.call_later(self._timeout, expire)
        try:
            direct, sha = self._direct, self._sha.get(name)
            if direct is not None and sha is not None:
                # Connecting within the timeout (past it the callers were answered: a call
                # not yet written is not sent), then the reply up to the socket timeout.
                # Unanswered at the timeout, its connection takes no new call (it may be
                # dead without a sign: the next batch goes to a new one).
                t = self._timeout
                try:
                    return await direct.evalsha(sha, keys, args, connect_s=t, retire_s=t)
                except NoScriptError:  # (it ran nothing): reloaded and sent again only
                    # while its callers still wait (the rule for connecting too).
                    return await self._resent_in_time(name, keys, args, begun)
            async with asyncio.timeout(self._late_bound):
                return await self._call(name, keys, args)
        except FAILURES as exc:
            raise BackendUnavailable(f"redis {name} failed: {why(exc)}") from exc
        except Exception as exc:
            raise self._unforeseen(name, exc) from exc
        finally:
            timer.cancel()
            self.late.discard(task)
