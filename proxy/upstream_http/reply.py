"""One upstream answer: status and headers, then the body whole or as it arrives."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.lean import NO_CONTEXT

if TYPE_CHECKING:
    from proxy.upstream_http.connection import Connection

#: Stop reading from the upstream while this much of an answer waits for its reader.
HIGH_WATER: Final = 256 * 1024

_EMPTY: Final[CIMultiDictProxy[str]] = CIMultiDictProxy(CIMultiDict())


class UpstreamConnectError(aiohttp.ClientConnectionError):
    """The upstream could not be connected to; ``os_error`` says why."""

    def __init__(self, address: str, os_error: OSError) -> None:
        self.os_error = os_error
        super().__init__(f"cannot connect to {address}: {self.reason}")

    @property
    def reason(self) -> str:
        """Why, in words: "Connection refused", "Name or service not known", a TLS
        verification failure (asyncio's own text for a refusal names only the address)."""
        err = self.os_error
        if isinstance(err, ssl.SSLError | socket.gaierror | TimeoutError):
            return err.strerror or str(err)
        if not err.errno or err.errno < 0:
            return err.strerror or str(err)
        return os.strerror(err.errno)


class UpstreamReply:
    """One answer: status and headers, then the body whole (:meth:`read`) or as it comes
    (:meth:`take` and :meth:`wait`; :meth:`iter_any`, also as ``content.iter_any()`` like
    aiohttp's response).

    The caller releases it (:meth:`release`) or closes it; one dropped without either is
    noticed by its connection (it holds the reply weakly), which then closes."""

    __slots__ = (
        "__weakref__",
        "_body",
        "_buffered",
        "_chunks",
        "_conn",
        "_done",
        "_error",
        "_timeout_s",
        "_timer",
        "_waiter",
        "headers",
        "status",
    )

    def __init__(self, conn: Connection, status: int, headers: CIMultiDict[str]) -> None:
        self.status = status
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(headers)
        self._conn: Connection | None = conn
        self._timeout_s = conn.read_timeout_s
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._body: bytes | None = None

    @property
    def content(self) -> UpstreamReply:
        """aiohttp's spelling: ``reply.content.iter_any()``."""
        return self

    def forget_headers(self) -> None:
        """Drop the headers (a held stream has passed them on and never reads them again)."""
        self.headers = _EMPTY

    # --- fed by the connection -------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def finish(self, error: BaseException | None) -> None:
        """The answer ended (``error`` None) or failed; the first word is the last."""
        if self._done:
            return
        self._done = True
        self._error = error
        self._conn = None
        self._wake()

    def _wake(self) -> None:
        waiter, timer = self._waiter, self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # --- read by the caller ----------------------------------------------------------

    def take(self) -> bytes | None:
        """What arrived since the last take, joined (``b""``: nothing yet, :meth:`wait`);
        None at the end, or the answer's error raised. The relay of a held stream reads with
        this and :meth:`wait` in its own frame: no generator, coroutine or timer context of
        the reply's per stream (issue 12: the bytes each held stream costs)."""
        chunks = self._take()
        if chunks:
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if not self._done:
            return b""
        if self._error is not None:
            # (the traceback dropped: a re-read would grow it, holding the frames' parts)
            raise self._error.with_traceback(None)
        return None

    def wait(self) -> asyncio.Future[None]:
        """Done when more arrives or the answer ends; fails with TimeoutError after the read
        timeout (aiohttp's ``sock_read``). Call it only after :meth:`take` gave ``b""``; a
        caller whose wait fails or is cancelled calls :meth:`abandon`."""
        conn = self._conn
        assert conn is not None and not self._done
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            return waiter  # one wait at a time: the same one again
        if self._timer is not None:  # the last wait's, given up on (wait_for, a cancel)
            self._timer.cancel()
        waiter = self._waiter = conn.loop.create_future()
        if self._timeout_s is not None:
            # No context copy per timer (uvloop makes one otherwise): expire reads none.
            self._timer = conn.loop.call_later(self._timeout_s, expire, waiter, context=NO_CONTEXT)
        return waiter

    def _take(self) -> list[bytes]:
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        if self._conn is not None:
            self._conn.resume()
        return chunks

    async def read(self) -> bytes:
        """The whole body; again the same bytes (or the same error) if called again."""
        if self._body is not None:
            return self._body
        parts: list[bytes] = []
        try:
            while True:
                parts += self._take()
                if self._done:
                    break
                await self.wait()
        except BaseException as exc:
            self.abandon(exc)
            raise
        if self._error is not None:
            raise self._error.with_traceback(None)
        self._body = parts[0] if len(parts) == 1 else b"".join(parts)
        return self._body

    async def iter_any(self) -> AsyncIterator[bytes]:
        """Each piece of the body as it arrives (several joined when they came together)."""
        try:
            while (chunk := self.take()) is not None:
                if chunk:
                    yield chunk
                else:
                    await self.wait()
        except GeneratorExit:
            raise  # the caller stopped iterating: the rest stays readable until release()
        except BaseException as exc:
            self.abandon(exc)
            raise

    def abandon(self, exc: BaseException) -> None:
        """A read failed or was cancelled: drop the connection, and have a later read raise
        the same error (a timed-out answer read again is still a timeout, never a 503).
        After the answer's end (its own error raised by take(), say) it changes nothing."""
        self.close(exc if isinstance(exc, aiohttp.ClientError | TimeoutError) else None)

    def release(self) -> None:
        """Done with the answer: its connection is pooled again if the answer was read to
        its end (that happens by itself at the end), else closed."""
        if not self._done:
            self.close()

    def close(self, error: BaseException | None = None) -> None:
        """Drop the connection (an unfinished answer: the upstream sees the call cancelled)."""
        conn = self._conn
        self.finish(error or aiohttp.ClientConnectionError("the answer was abandoned"))
        if conn is not None and conn.reply is self:
            conn.abort()


def expire(waiter: asyncio.Future[Any]) -> None:
    """A read timeout's timer: the wait ends in ``TimeoutError``."""
    if not waiter.done():
        waiter.set_exception(TimeoutError("the upstream sent nothing within the read timeout"))
