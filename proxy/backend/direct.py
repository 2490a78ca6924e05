"""EVALSHA on one Redis server without redis-py's per-command machinery.

``Redis.evalsha`` goes through a deprecation wrapper, the pool's lock and health check
(``can_read`` on every checkout), a retry wrapper, observability hooks and per-argument
encoding in Python. Measured at 200 requests/s with quotas on, that machinery was two
thirds of what the quota path cost (bench/README.md, "Where the quota path's time goes").
Here a call packs its arguments in C (hiredis, byte-identical to redis-py's encoder: floats
by ``repr``), takes an idle connection of its own (made from the client pool's own settings:
TLS, password, db, unix sockets), writes, reads the reply and puts the connection back.

What redis-py's pool and retry gave is kept where it is safe: an idle connection the server
closed (a restart, its idle timeout) is dropped with every idle one before the write, and a
write that fails goes once more to a new connection. A call whose write went out is never
sent again (redis-py's retry resent those, after timeouts too): the script may have run. A
call cancelled or failed between its write and its reply drops its connection: a late reply
must never be read as the answer to the next call. A Redis Cluster keeps redis-py's client.
"""

from __future__ import annotations

import asyncio
import contextlib
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
        """The script's reply; raises its error (``NoScriptError`` included) or the
        connection's."""
        try:
            packed = pack_command(("EVALSHA", sha, len(keys), *keys, *args))
        except TypeError as exc:  # e.g. a bool or None: redis-py's encoder raised DataError
            raise DataError(f"cannot send an argument of EVALSHA: {exc}") from exc
        conn = await self._sent(packed)
        try:
            # Bounded by the connection's socket timeout (and the runner's timeout): a
            # timed-out read raises and disconnects, never leaves a reply behind.
            reply = await conn.read_response()
        except ResponseError:
            await self._put_back(conn)  # the script's own error: the connection is fine
            raise
        except BaseException:  # broken, cancelled, or failed mid-call: a reply may still come
            await conn.disconnect(nowait=True)
            raise
        await self._put_back(conn)
        return reply

    async def _sent(self, packed: bytes) -> AbstractConnection:
        """A connection ``packed`` was written to. An idle one the server closed (a
        restart, its idle timeout) is dropped with every idle one before the write; one
        whose write fails is too, and the call goes once more to a new connection. A call
        whose write went out is never sent again: the script may have run."""
        conn = self._idle.pop() if self._idle else None
        if conn is not None and _closed(conn):
            self._idle.append(conn)
            await self._drop_idle()  # a restart closed every one of them
            conn = None
        if conn is not None:
            try:
                await _write(conn, packed)
                return conn
            except (RedisTimeoutError, TimeoutError):
                raise  # Redis is stalled: no second try
            except _BROKEN:
                await self._drop_idle()  # closed under us: the others likely too
        conn = self._new()
        await _write(conn, packed)  # a new connection that fails: Redis is down
        return conn

    def _new(self) -> AbstractConnection:
        conn: AbstractConnection = self._make()  # type: ignore[no-untyped-call]
        return conn

    async def _put_back(self, conn: AbstractConnection) -> None:
        if self._closed or len(self._idle) >= MAX_IDLE:
            await conn.disconnect(nowait=True)
        else:
            self._idle.append(conn)

    async def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    async def aclose(self) -> None:
        """Close the idle connections; one in use closes when its call ends."""
        self._closed = True
        await self._drop_idle()


async def _write(conn: AbstractConnection, packed: bytes) -> None:
    """Send ``packed`` on ``conn``; a connection that fails to take it is dropped."""
    try:
        await conn.send_packed_command(packed, check_health=False)
    except BaseException:
        await conn.disconnect(nowait=True)
        raise


def _closed(conn: AbstractConnection) -> bool:
    """Has the server closed ``conn`` (read by the loop while it was idle)?"""
    reader = getattr(conn, "_reader", None)  # redis-py's asyncio.StreamReader
    return isinstance(reader, asyncio.StreamReader) and (
        reader.at_eof() or reader.exception() is not None
    )
