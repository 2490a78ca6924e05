"""EVALSHA on one Redis server without redis-py's per-command machinery.

``Redis.evalsha`` goes through a deprecation wrapper, the pool's lock and health check
(``can_read`` on every checkout), a retry wrapper, observability hooks and per-argument
encoding in Python. Measured at 200 requests/s with quotas on, that machinery was two
thirds of what the quota path cost (bench/README.md, "Where the quota path's time goes").
Here a call packs its arguments in C (hiredis, byte-identical to redis-py's encoder: floats
by ``repr``), takes an idle connection of its own (made from the client pool's own settings:
TLS, password, db, unix sockets), writes, reads the reply and puts the connection back.

Its connections carry no socket timeout of their own: with one, redis-py wraps every write
in ``asyncio.wait_for``, a task and two extra loop iterations per call before the bytes
leave (about as much CPU as the rest of the call at 200 requests/s). One
``asyncio.timeout`` of the pool's socket timeout bounds the write and the read together.

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
import select
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
#: ``select.poll`` (not on Windows): how an idle connection's socket is checked.
_POLL: Final = getattr(select, "poll", None)


class DirectCalls:
    """EVALSHA on connections of its own, made with ``client``'s pool settings."""

    def __init__(self, client: Redis) -> None:
        self._make = client.connection_pool.make_connection
        #: The socket timeout the pool's connections are made with (redis-py 8: 5 s unless
        #: the URL says otherwise): one call's bound. A connection object is not connected
        #: until used: making one to read it costs no socket.
        probe: AbstractConnection = self._make()  # type: ignore[no-untyped-call]
        self._timeout: float | None = probe.socket_timeout
        self._idle: list[AbstractConnection] = []
        self._closed = False

    @property
    def timeout(self) -> float | None:
        """The socket timeout that bounds one call (None: unbounded)."""
        return self._timeout

    async def evalsha(self, sha: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """The script's reply; raises its error (``NoScriptError`` included) or the
        connection's."""
        try:
            packed = pack_command(("EVALSHA", sha, len(keys), *keys, *args))
        except TypeError as exc:  # e.g. a bool or None: redis-py's encoder raised DataError
            raise DataError(f"cannot send an argument of EVALSHA: {exc}") from exc
        if self._timeout is None:
            return await self._call(packed)
        try:
            async with asyncio.timeout(self._timeout):
                return await self._call(packed)
        except TimeoutError as exc:
            # What redis-py raises when its socket timeout expires; the call dropped its
            # connection on the way out (cancelled), so no reply is left behind.
            raise RedisTimeoutError("Timeout reading from or writing to Redis") from exc

    async def _call(self, packed: bytes) -> Any:
        conn = await self._sent(packed)
        try:
            # A cancelled read (the bound above, the runner's) disconnects: it never
            # leaves a reply behind for the next call.
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
        conn.socket_timeout = None  # bounded by evalsha's one timeout (see the module doc)
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
    """Has the server closed ``conn`` while it was idle, or sent on it unasked?

    The loop may not have read the server's close yet: a write follows a reply without a
    turn of the loop in between, so nothing has read the socket since. An idle connection
    with anything to read (its close, or a reply nobody asked for) is not used: a zero
    timeout poll of its socket says so without reading it.
    """
    reader = getattr(conn, "_reader", None)  # redis-py's asyncio.StreamReader
    if isinstance(reader, asyncio.StreamReader) and (
        reader.at_eof() or reader.exception() is not None
    ):
        return True
    writer = getattr(conn, "_writer", None)
    sock = writer.get_extra_info("socket") if isinstance(writer, asyncio.StreamWriter) else None
    if sock is None:
        return False
    fd = sock.fileno()
    if fd < 0:  # closed under us
        return True
    if _POLL is None:  # (Windows) a closed connection fails its write, which is retried
        return False
    try:
        poll = _POLL()  # not select(): no limit on the descriptor's number
        poll.register(fd, select.POLLIN)
        return bool(poll.poll(0))
    except (OSError, ValueError):
        return True
