"""EVALSHA on one Redis server without redis-py's per-command machinery.

``Redis.evalsha`` goes through a deprecation wrapper, the pool's lock and health check
(``can_read`` on every checkout), a retry wrapper, observability hooks and per-argument
encoding in Python. Measured at 200 requests/s with quotas on, that machinery was two
thirds of what the quota path cost (bench/README.md, "Where the quota path's time goes").
Here a call packs its arguments in C (hiredis, byte-identical to redis-py's encoder: floats
by ``repr``), takes an idle connection of its own (made from the client pool's own settings:
TLS, password, db, unix sockets), writes, reads the reply and puts the connection back.

What redis-py's retry gave is kept: a connection that fails (a server restarted since it
was last used) is dropped and the call is sent once more on a new one. A call cancelled
or failed between its write and its reply drops its connection: a late reply must never
be read as the answer to the next call. A Redis Cluster keeps redis-py's client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from hiredis import pack_command
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: Idle connections kept: calls are batched per pool and tick, so few run at once.
MAX_IDLE: Final = 8
_BROKEN: Final = (RedisConnectionError, RedisTimeoutError, OSError)


class DirectCalls:
    """EVALSHA on connections of its own, made with ``client``'s pool settings."""

    def __init__(self, client: Redis) -> None:
        self._make = client.connection_pool.make_connection
        self._idle: list[AbstractConnection] = []
        self._closed = False
        self._read_timeout: float | None = None

    def _new(self) -> AbstractConnection:
        conn: AbstractConnection = self._make()  # type: ignore[no-untyped-call]
        # Replies stay bounded by the pool's socket timeout (a stalled server's late reply
        # ends); the write of one small command is not: bounding it costs a task per call
        # (asyncio.wait_for) and the kernel's buffer takes it at once.
        self._read_timeout, conn.socket_timeout = conn.socket_timeout, None
        return conn

    async def evalsha(self, sha: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """The script's reply; raises its error (``NoScriptError`` included) or, after one
        retry on a new connection, the connection's."""
        packed = pack_command(("EVALSHA", sha, len(keys), *keys, *args))
        for attempt in (1, 2):
            conn = self._idle.pop() if self._idle else self._new()
            try:
                await conn.send_packed_command(packed, check_health=False)
                reply = await conn.read_response(timeout=self._read_timeout)
            except ResponseError:
                await self._put_back(conn)  # the script's own error: the connection is fine
                raise
            except _BROKEN:
                await conn.disconnect(nowait=True)
                if attempt == 2:
                    raise
                continue
            except BaseException:  # cancelled or failed mid-call: its reply may still come
                await conn.disconnect(nowait=True)
                raise
            await self._put_back(conn)
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    async def _put_back(self, conn: AbstractConnection) -> None:
        if self._closed or len(self._idle) >= MAX_IDLE:
            await conn.disconnect(nowait=True)
        else:
            self._idle.append(conn)

    async def aclose(self) -> None:
        """Close the idle connections; one in use closes when its call ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect()
