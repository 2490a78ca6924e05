"""EVALSHA on one Redis server without redis-py's per-command machinery.

``Redis.evalsha`` goes through a deprecation wrapper, the pool's lock and health check
(``can_read`` on every checkout), a retry wrapper, observability hooks and per-argument
encoding in Python. Measured at 200 requests/s with quotas on, that machinery was two
thirds of what the quota path cost (bench/README.md, "Where the quota path's time goes").
Here a call packs its arguments in C (hiredis, byte-identical to redis-py's encoder: floats
by ``repr``), takes an idle connection of its own (made from the client pool's own settings:
TLS, password, db, unix sockets), writes, reads the reply and puts the connection back.

What redis-py's retry and pool gave is kept: a connection that fails (a server restarted
since it was last used, or its idle timeout closed it) is dropped with every idle one, and
the call is sent once more on a new connection -- but never after a timeout, when the
script may have run (redis-py's retry resent those too). A call cancelled or failed between
its write and its reply drops its connection: a late reply must never be read as the
answer to the next call. A Redis Cluster keeps redis-py's client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from hiredis import pack_command
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: Idle connections kept: more calls than this at once (many pools) open and close the
#: extra connections around their calls.
MAX_IDLE: Final = 64
_BROKEN: Final = (RedisConnectionError, RedisTimeoutError, OSError)


class DirectCalls:
    """EVALSHA on connections of its own, made with ``client``'s pool settings."""

    def __init__(self, client: Redis) -> None:
        self._make = client.connection_pool.make_connection
        self._idle: list[AbstractConnection] = []
        self._closed = False

    async def evalsha(self, sha: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """The script's reply; raises its error (``NoScriptError`` included) or, after one
        retry on a new connection, the connection's."""
        try:
            packed = pack_command(("EVALSHA", sha, len(keys), *keys, *args))
        except TypeError as exc:  # a bool or None: redis-py's encoder raised DataError
            raise DataError(f"cannot send an argument of EVALSHA: {exc}") from exc
        conn = self._idle.pop() if self._idle else self._new()
        try:
            return await self._call(conn, packed)
        except (RedisTimeoutError, TimeoutError):
            raise  # no reply in time: the script may have run, so it is never sent twice
        except _BROKEN:
            # Closed (a restart, the server's idle timeout): the idle ones most likely too.
            await self._drop_idle()
        return await self._call(self._new(), packed)

    def _new(self) -> AbstractConnection:
        conn: AbstractConnection = self._make()  # type: ignore[no-untyped-call]
        return conn

    async def _call(self, conn: AbstractConnection, packed: bytes) -> Any:
        """One write and its reply on ``conn``, put back after it (dropped on failure)."""
        try:
            # Bounded by the connection's socket timeout (and the runner's timeout): a
            # timed-out read raises and disconnects, never leaves a reply behind.
            await conn.send_packed_command(packed, check_health=False)
            reply = await conn.read_response()
        except ResponseError:
            await self._put_back(conn)  # the script's own error: the connection is fine
            raise
        except BaseException:  # broken, cancelled, or failed mid-call: a reply may still come
            await conn.disconnect(nowait=True)
            raise
        await self._put_back(conn)
        return reply

    async def _put_back(self, conn: AbstractConnection) -> None:
        # should_reconnect: the server announced a move (maintenance notifications).
        moved = getattr(conn, "should_reconnect", lambda: False)()
        if self._closed or moved or len(self._idle) >= MAX_IDLE:
            await conn.disconnect(nowait=True)
        else:
            self._idle.append(conn)

    async def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect(nowait=True)

    async def aclose(self) -> None:
        """Close the idle connections; one in use closes when its call ends."""
        self._closed = True
        await self._drop_idle()
