"""EVALSHA on one Redis server without redis-py's per-command machinery.

``Redis.evalsha`` goes through a deprecation wrapper, the pool's lock and health check
(``can_read`` on every checkout), a retry wrapper, observability hooks and per-argument
encoding in Python, then a stream reader and four parser layers for the reply. Measured at
200 requests/s with quotas on, that machinery was two thirds of what the quota path cost
(bench/README.md, "Where the quota path's time goes").

Here a call packs its arguments in C (hiredis, byte-identical to redis-py's encoder: floats
by ``repr``) and writes them on one connection whose replies are read by a protocol of
its own (:class:`_Pipe`): the loop hands each read to hiredis, and each reply completes the
oldest call still waiting, in the order they were written (Redis answers one connection in
order). Concurrent calls share the connection, pipelined; a call costs a future, a write
and a timer. The connection is made, and its handshake done (TLS, AUTH, db, client name,
protocol), by redis-py with the client pool's own settings, then taken over.

What redis-py's pool and retry gave is kept where it is safe:

* a connection the server closed (a restart, its idle timeout) is replaced before the write:
  the loop may not have read the close yet (a write can follow a reply without a turn of
  the loop), so an idle connection's socket is polled first;
* a call whose write went out is never sent again (redis-py's retry resent those, after
  timeouts too): the script may have run, so a connection lost before the reply fails it;
* a call cancelled before its reply (the caller gave up) keeps its place: its reply, when it
  comes, is read and dropped, never taken as the answer to a later call;
* no reply within the pool's socket timeout: Redis or the path to it is stalled, the call
  raises redis-py's ``TimeoutError`` and the connection is dropped with every call on it
  (the next call makes a new one).

A Redis Cluster keeps redis-py's client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import select
from collections.abc import Sequence
from typing import Any, Final

import hiredis
from hiredis import pack_command
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, InvalidResponse
from redis.exceptions import TimeoutError as RedisTimeoutError

#: ``select.poll`` (not on Windows): how an idle connection's socket is checked.
_POLL: Final = getattr(select, "poll", None)
#: What hiredis returns while a reply is incomplete (a reply can be any other value).
_PARTIAL: Final = object()
#: RESP3 pushes answer no call (hiredis >= 3.2 has the type).
_PUSH: Final = getattr(hiredis, "PushNotification", None)
_LOST: Final = "Connection closed by server."


class _Pipe(asyncio.Protocol):
    """One connection's replies, each to the oldest call still waiting for one."""

    def __init__(self, transport: asyncio.Transport, reader: hiredis.Reader, owner: object) -> None:
        self.transport = transport
        #: redis-py's stream writer, kept alive: when collected it closes the transport.
        self._owner = owner
        self.reader = reader
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        #: Why the connection is unusable (set once; every waiting call fails with it).
        self.broken: BaseException | None = None
        #: Takes no new call (one was given up on); closes once no call waits on it.
        self.retired = False

    def data_received(self, data: bytes) -> None:
        reader, waiting = self.reader, self.waiting
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except UnicodeDecodeError as exc:  # (decode_responses) this reply's, read past
                if waiting and not (future := waiting.popleft()).done():
                    future.set_exception(exc)
                continue
            except Exception as exc:  # not RESP (InvalidResponse): nothing after it is sure
                self.fail(RedisConnectionError(f"Protocol error from Redis: {exc}"))
                return
            if reply is _PARTIAL:
                break
            if _PUSH is not None and isinstance(reply, _PUSH):
                continue
            if not waiting:  # a reply nobody asked for: the stream is out of step
                self.fail(RedisConnectionError("Redis sent a reply no call asked for"))
                return
            future = waiting.popleft()
            if not future.done():  # (done: its caller gave up; the reply is dropped)
                future.set_result(reply)
        if self.retired and not waiting:
            self.fail(RedisConnectionError("closed"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(_LOST if exc is None else f"{_LOST} ({exc})"))

    def fail(self, error: BaseException) -> None:
        """Make the connection unusable: close it and fail every call waiting on it."""
        if self.broken is None:
            self.broken = error
        self.transport.close()
        waiting, self.waiting = self.waiting, collections.deque()
        for future in waiting:
            if not future.done():  # (one instance each: a raise adds to its traceback)
                future.set_exception(type(error)(*error.args))

    def retire(self) -> None:
        """Take no new call; close once the calls on it have their replies (or at their
        socket timeout, :meth:`expire`)."""
        self.retired = True
        if not self.waiting:
            self.fail(RedisConnectionError("closed"))

    def expire(self, future: asyncio.Future[Any]) -> None:
        """``future``'s socket timeout: if its reply has not come (whether or not its caller
        still waits), Redis or the path to it is stalled: the connection goes, and every
        call on it times out. Every call has the same timeout and replies come in order, so
        a call still unanswered at its timeout is the oldest one waiting."""
        if self.waiting and self.waiting[0] is future:
            self.fail(RedisTimeoutError("Timeout reading from or writing to Redis"))

    def usable(self) -> bool:
        """Open for a new call: not failed nor retired, and, when idle, nothing to read on
        its socket (the server's close, or bytes nobody asked for) the loop has not read."""
        if self.broken is not None or self.retired or self.transport.is_closing():
            return False
        if self.waiting or _POLL is None:  # (Windows: a lost connection fails its call)
            return True
        sock = self.transport.get_extra_info("socket")
        fd = -1 if sock is None else sock.fileno()
        if fd < 0:
            return sock is None  # (no socket object: nothing to poll)
        try:
            poll = _POLL()  # not select(): no limit on the descriptor's number
            poll.register(fd, select.POLLIN)
            return not poll.poll(0)
        except (OSError, ValueError):
            return False


def _give_up(pipe: _Pipe, future: asyncio.Future[Any]) -> None:
    """A caller's own bound passed: it gets ``TimeoutError``, and new calls go to a new
    connection (this one may be dead without a sign: a half-open socket, a black hole)
    while the calls already on it keep their chance of a reply."""
    if not future.done():
        future.set_exception(TimeoutError())
        pipe.retire()


class DirectCalls:
    """EVALSHA on a connection of its own, made with ``client``'s pool settings."""

    def __init__(self, client: Redis) -> None:
        self._make = client.connection_pool.make_connection
        #: The socket timeout the pool's connections are made with (redis-py 8: 5 s unless
        #: the URL says otherwise): one call's bound. A connection object is not connected
        #: until used: making one to read it costs no socket.
        probe: AbstractConnection = self._make()  # type: ignore[no-untyped-call]
        self._timeout: float | None = probe.socket_timeout
        self._pipe: _Pipe | None = None
        #: The connection being made; every caller that needs one waits for this one.
        self._connecting: asyncio.Task[_Pipe] | None = None
        self._closed = False

    @property
    def timeout(self) -> float | None:
        """The socket timeout that bounds one call (None: unbounded)."""
        return self._timeout

    async def evalsha(
        self, sha: str, keys: Sequence[Any], args: Sequence[Any], give_up_s: float | None = None
    ) -> Any:
        """The script's reply; raises its error (``NoScriptError`` included) or the
        connection's. ``give_up_s`` bounds the call, connecting included: ``TimeoutError``
        if no reply came by then (like a cancellation, at the cost of a timer instead of
        ``asyncio.timeout``'s machinery); new calls then go to a new connection."""
        try:
            packed = pack_command(("EVALSHA", sha, len(keys), *keys, *args))
        except TypeError as exc:  # e.g. a bool or None: redis-py's encoder raised DataError
            raise DataError(f"cannot send an argument of EVALSHA: {exc}") from exc
        loop = asyncio.get_running_loop()
        timeout = self._timeout
        pipe = self._pipe
        if pipe is None or not pipe.usable():
            started = loop.time()
            pipe = await self._connected(give_up_s if give_up_s is not None else timeout)
            if give_up_s is not None:
                give_up_s = max(0.0, give_up_s - (loop.time() - started))
        future: asyncio.Future[Any] = loop.create_future()
        pipe.waiting.append(future)
        pipe.transport.write(packed)
        timer = None if timeout is None else loop.call_later(timeout, pipe.expire, future)
        limit = None
        if give_up_s is not None and (timeout is None or give_up_s < timeout):
            limit = loop.call_later(give_up_s, _give_up, pipe, future)
        try:
            reply = await future  # cancelled: the future is too, and its reply dropped
        except BaseException:
            # Given up on or cancelled: the socket timer stays, so a reply that never
            # comes still drops the connection (:meth:`_Pipe.expire`).
            if limit is not None:
                limit.cancel()
            raise
        if timer is not None:
            timer.cancel()
        if limit is not None:
            limit.cancel()
        if isinstance(reply, Exception):
            raise reply  # the script's error, or Redis's (LOADING, ...), as redis-py raises
        return reply

    async def _connected(self, bound: float | None) -> _Pipe:
        """A new connection replacing the current one, waited for up to ``bound``. One is
        made at a time, for every caller that needs it: a failure is everyone's at once."""
        task = self._connecting
        if task is None or task.done():
            old = self._pipe
            if old is not None and not old.retired:
                old.fail(RedisConnectionError(_LOST))  # (the server closed it: a restart)
            task = self._connecting = asyncio.get_running_loop().create_task(self._take_over())
            task.add_done_callback(_retrieve)
        if bound is None:
            return await asyncio.shield(task)
        async with asyncio.timeout(bound):
            return await asyncio.shield(task)

    async def _take_over(self) -> _Pipe:
        """Connect and do the handshake with redis-py, then read the connection ourselves."""
        conn: AbstractConnection = self._make()  # type: ignore[no-untyped-call]
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            raise
        writer = conn._writer  # (redis-py keeps its streams private)
        assert writer is not None
        transport = writer.transport
        encoder = conn.encoder
        if encoder.decode_responses:
            reader = hiredis.Reader(
                protocolError=InvalidResponse,
                replyError=BaseParser.parse_error,
                notEnoughData=_PARTIAL,
                encoding=encoder.encoding,
                errors=encoder.encoding_errors,
            )
        else:
            reader = hiredis.Reader(
                protocolError=InvalidResponse,
                replyError=BaseParser.parse_error,
                notEnoughData=_PARTIAL,
            )
        # (The handshake's replies were all read: Redis sends nothing unasked on it.)
        pipe = _Pipe(transport, reader, writer)  # type: ignore[arg-type]
        transport.set_protocol(pipe)
        # The connection object no longer owns the socket (its finalizer would close it).
        conn._writer = conn._reader = None
        pipe.retired = self._closed  # made after aclose(): closes after its calls
        self._pipe = pipe
        return pipe

    async def aclose(self) -> None:
        """Close the connection; with calls in flight, once their replies are in."""
        self._closed = True
        if self._pipe is not None:
            self._pipe.retire()


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A connect every waiter gave up on: its error is not "never retrieved"."""
    if not task.cancelled():
        task.exception()
