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
import functools
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
#: A call's bound when the URL sets no socket timeout (what the runner's late bound is then).
UNBOUNDED_S: Final = 5.0


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
            except UnicodeDecodeError as exc:  # (decode_responses) a reply's, or a push's:
                # which one is not known, so no later reply can be matched to its call.
                self.fail(DataError(f"cannot decode what Redis sent: {exc}"))
                return
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

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Write one call; its reply completes the future returned."""
        if self.broken is not None or self.transport.is_closing():
            raise RedisConnectionError(_LOST)  # (closed as it was made): nothing written
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        try:
            self.transport.write(packed)
        except RuntimeError as exc:  # (uvloop: a transport closed under us)
            self.fail(RedisConnectionError(f"{_LOST} ({exc})"))
            raise RedisConnectionError(f"{_LOST} ({exc})") from exc
        return future

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


def _packed(sha: str, keys: Sequence[Any], args: Sequence[Any]) -> bytes:
    try:
        packed: bytes = pack_command(("EVALSHA", sha, len(keys), *keys, *args))
    except (TypeError, ValueError) as exc:  # a bool or None (redis-py's encoder raised
        # DataError too), text that is no UTF-8 (a lone surrogate: UnicodeEncodeError)
        raise DataError(f"cannot send an argument of EVALSHA: {exc}") from exc
    return packed


def _stop_timer(timer: asyncio.TimerHandle, future: asyncio.Future[Any]) -> None:
    """A :meth:`DirectCalls.send_nowait` call ended: its socket timer goes only with a
    reply (given up on or cancelled, a reply that never comes must still drop the
    connection, as in :meth:`DirectCalls.evalsha`)."""
    if not future.cancelled() and future.exception() is None:
        timer.cancel()


def _retire_unanswered(pipe: _Pipe, future: asyncio.Future[Any]) -> None:
    """No reply by the caller's soft bound: new calls go to a new connection (this one may
    be dead without a sign), while this call keeps waiting for its reply."""
    if not future.done():
        pipe.retire()


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
        #: How long a call's reply, or a connection's handshake, may take before the
        #: connection is judged stalled and dropped.
        self._expire_s: float = probe.socket_timeout or UNBOUNDED_S
        self._pipe: _Pipe | None = None
        #: The connection being made; every caller that needs one waits for this one.
        self._connecting: asyncio.Task[_Pipe] | None = None
        self._closed = False

    @property
    def timeout(self) -> float | None:
        """The socket timeout that bounds one call (None: unbounded)."""
        return self._timeout

    async def evalsha(
        self,
        sha: str,
        keys: Sequence[Any],
        args: Sequence[Any],
        give_up_s: float | None = None,
        connect_s: float | None = None,
        retire_s: float | None = None,
    ) -> Any:
        """The script's reply; raises its error (``NoScriptError`` included) or the
        connection's, always one of redis-py's errors or ``TimeoutError``.

        ``give_up_s`` bounds the call, connecting included: ``TimeoutError`` if no reply
        came by then (like a cancellation, at the cost of a timer instead of
        ``asyncio.timeout``'s machinery); new calls then go to a new connection. Without it
        the reply is waited for up to the socket timeout after the write, and connecting up
        to ``connect_s`` (default: the socket timeout), and ``retire_s`` after the call
        started with no reply its connection takes no new call. A call whose bound ran out
        while connecting is not written."""
        packed = _packed(sha, keys, args)
        loop = asyncio.get_running_loop()
        pipe = self._pipe
        if pipe is None or not pipe.usable():
            started = loop.time()
            bound = give_up_s if give_up_s is not None else connect_s
            pipe = await self._connected(self._expire_s if bound is None else bound)
            took = loop.time() - started
            if give_up_s is not None:
                give_up_s -= took
                if give_up_s <= 0:
                    raise TimeoutError  # nothing written: nothing can have run
            if retire_s is not None:
                retire_s = max(0.0, retire_s - took)
        future = pipe.send(packed)
        timer = loop.call_later(self._expire_s, pipe.expire, future)
        limit = self._limit(loop, pipe, future, give_up_s, retire_s)
        try:
            reply = await future  # cancelled: the future is too, and its reply dropped
        except BaseException:
            # Given up on or cancelled: the socket timer stays, so a reply that never
            # comes still drops the connection (:meth:`_Pipe.expire`).
            if limit is not None:
                limit.cancel()
            raise
        timer.cancel()
        if limit is not None:
            limit.cancel()
        if isinstance(reply, Exception):
            raise reply  # the script's error, or Redis's (LOADING, ...), as redis-py raises
        return reply

    def send_nowait(
        self, sha: str, keys: Sequence[Any], args: Sequence[Any]
    ) -> asyncio.Future[Any] | None:
        """:meth:`evalsha` without a coroutine, for a connection already made: the call is
        written now and the future returned completes with its reply (a Redis error reply
        is its result, as an exception object) or fails as :meth:`evalsha` would raise.
        Bounded by the socket timeout only: the caller answers its own deadline and then
        retires the connection (:meth:`retire`). None, with nothing written, when the
        connection must be made first (:meth:`connect`); raises ``DataError`` (nothing
        written) for arguments that cannot be sent.
        """
        pipe = self._pipe
        if pipe is None or not pipe.usable():
            return None
        packed = _packed(sha, keys, args)
        try:
            future = pipe.send(packed)
        except RedisConnectionError:  # (closed as it was made): nothing written
            return None
        timer = asyncio.get_running_loop().call_later(self._expire_s, pipe.expire, future)
        future.add_done_callback(functools.partial(_stop_timer, timer))
        return future

    async def connect(self, bound: float) -> None:
        """A usable connection, made (within ``bound`` seconds) if there is none."""
        pipe = self._pipe
        if pipe is None or not pipe.usable():
            await self._connected(bound)

    def retire(self, future: asyncio.Future[Any]) -> None:
        """``future``'s call (from :meth:`send_nowait`) is unanswered at its caller's
        bound: its connection, if it is the current one, takes no new call."""
        pipe = self._pipe
        if pipe is not None and not future.done() and future in pipe.waiting:
            pipe.retire()

    def _limit(
        self,
        loop: asyncio.AbstractEventLoop,
        pipe: _Pipe,
        future: asyncio.Future[Any],
        give_up_s: float | None,
        retire_s: float | None,
    ) -> asyncio.TimerHandle | None:
        """The timer of a call's own bound, if it ends before the socket timeout."""
        if give_up_s is not None:
            if give_up_s < self._expire_s:
                return loop.call_later(give_up_s, _give_up, pipe, future)
        elif retire_s is not None and retire_s < self._expire_s:
            return loop.call_later(retire_s, _retire_unanswered, pipe, future)
        return None

    async def _connected(self, bound: float) -> _Pipe:
        """A new connection replacing the current one, waited for up to ``bound``. One is
        made at a time, for every caller that needs it: a failure is everyone's at once."""
        task = self._connecting
        if task is None or task.done():
            old = self._pipe
            if old is not None and not old.retired:
                old.fail(RedisConnectionError(_LOST))  # (the server closed it: a restart)
            task = self._connecting = asyncio.get_running_loop().create_task(self._take_over())
            task.add_done_callback(_retrieve)
        async with asyncio.timeout(bound):
            return await asyncio.shield(task)

    async def _take_over(self) -> _Pipe:
        """Connect and do the handshake with redis-py, then read the connection ourselves."""
        conn: AbstractConnection = self._make()  # type: ignore[no-untyped-call]
        try:
            # (A handshake with no socket timeout must not hang every later call.)
            async with asyncio.timeout(self._expire_s * 2):
                await conn.connect()  # type: ignore[no-untyped-call]
            writer, stream = conn._writer, conn._reader  # (redis-py keeps them private)
            assert writer is not None and stream is not None
            transport = writer.transport
            if stream.at_eof() or stream.exception() is not None or transport.is_closing():
                # Closed with the handshake's last reply (a restart, CLIENT KILL): redis-py's
                # stream saw it and kept the transport half-open; our protocol never would.
                raise RedisConnectionError(f"{_LOST} (during the handshake)")
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            raise
        encoder = conn.encoder
        decoding = (
            {"encoding": encoder.encoding, "errors": encoder.encoding_errors}
            if encoder.decode_responses
            else {}
        )
        reader = hiredis.Reader(
            protocolError=InvalidResponse,
            replyError=BaseParser.parse_error,
            notEnoughData=_PARTIAL,
            **decoding,
        )
        # (The handshake's replies were all read: Redis sends nothing unasked on it.)
        pipe = _Pipe(transport, reader, writer)  # type: ignore[arg-type]
        transport.set_protocol(pipe)
        # The connection object no longer owns the socket (its finalizer would close it).
        conn._writer = conn._reader = None
        if self._closed:  # made after aclose(): closes after its calls, or in any case
            pipe.retired = True  # once its callers have had the time to use it
            asyncio.get_running_loop().call_later(self._expire_s, pipe.retire)
        self._pipe = pipe
        return pipe

    async def aclose(self) -> None:
        """Close the connection; with calls still waited for, once their replies are in."""
        self._closed = True
        pipe = self._pipe
        if pipe is None:
            return
        if all(future.done() for future in pipe.waiting):  # (given up on, or cancelled)
            pipe.fail(RedisConnectionError("closed"))
        else:
            pipe.retire()


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A connect every waiter gave up on: its error is not "never retrieved"."""
    if not task.cancelled():
        task.exception()
