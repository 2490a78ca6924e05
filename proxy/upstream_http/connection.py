"""One upstream connection: llhttp's callbacks feed the answer of the request in flight."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import TYPE_CHECKING, Final, cast

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.upstream_http.reply import UpstreamReply

if TYPE_CHECKING:
    from proxy.upstream_http.pool import UpstreamPool

#: An answer's head, or any stretch of it with no header or body piece ending (a trailer),
#: may not pass this: aiohttp's limit is 8 KiB a line, Bedrock's heads are under 2 KiB.
MAX_HEAD_BYTES: Final = 64 * 1024

_NO_INFO: Final = aiohttp.RequestInfo(URL(), "", CIMultiDictProxy(CIMultiDict()), URL())


def bad_answer(why: str) -> aiohttp.ClientResponseError:
    """The error of an answer Sluice cannot read (a 503 upstream failure to its caller)."""
    return aiohttp.ClientResponseError(_NO_INFO, (), message=f"bad answer from upstream: {why}")


class Connection(asyncio.Protocol):
    """One kept-alive connection; :meth:`send` one request, then the answer feeds a reply."""

    __slots__ = (
        "_aborted",
        "_framed",
        "_head",
        "_head_size",
        "_paused",
        "_raw",
        "_reply_ref",
        "_unparsed",
        "got_bytes",
        "idle_since",
        "loop",
        "parser",
        "pool",
        "read_timeout_s",
        "transport",
        "usable",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # As lenient as aiohttp's own response parser (a bare LF, spaces after a chunk size).
        self.parser.set_dangerous_leniencies(
            lenient_headers=True,
            lenient_optional_cr_before_lf=True,
            lenient_spaces_after_chunk_size=True,
        )
        self.read_timeout_s: float | None = None
        self.idle_since = 0.0
        self.usable = True
        self.got_bytes = False  # anything at all came back for the request in flight
        # The reply is held weakly: one its caller dropped unreleased closes the connection
        # instead of keeping it busy (and maybe paused) for ever.
        self._reply_ref: weakref.ref[UpstreamReply] | None = None
        self._head: asyncio.Future[UpstreamReply] | None = None
        self._raw: list[tuple[str, str]] = []
        self._head_size = 0
        self._unparsed = 0  # bytes fed since a header, body piece or answer last ended
        self._paused = False
        self._framed = False  # the answer says where it ends (else: at the close)
        self._aborted = False  # closed by Sluice, never an answer's end

    @property
    def reply(self) -> UpstreamReply | None:
        """The answer being read, if its caller still holds it."""
        ref = self._reply_ref
        return None if ref is None else ref()

    def _dropped(self, ref: weakref.ref[UpstreamReply]) -> None:
        # The collector may run in any thread (botocore's, a to_thread): hand over to the
        # loop's, which alone may touch the transport and the pool.
        with contextlib.suppress(RuntimeError):  # the loop is closed: so is the socket
            self.loop.call_soon_threadsafe(self._orphaned, ref)

    def _orphaned(self, ref: weakref.ref[UpstreamReply]) -> None:
        if ref is self._reply_ref:  # (not an answer since ended, or a later request's)
            self._reply_ref = None
            self.abort()

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, only alike)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self._unparsed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(bad_answer("an upgrade (101) answer, which Sluice never asks for"))
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__ or exc  # a callback's own error, wrapped by httptools
            self._fail(bad_answer(f"{cause}"))
            return
        if self._unparsed > MAX_HEAD_BYTES:
            # llhttp joins a header's pieces itself and calls back only at its end, so a
            # head (or trailer) still arriving is bounded here, on the bytes.
            self._fail(bad_answer(f"a head or trailer over {MAX_HEAD_BYTES} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        self.pool.forget(self)
        reply = self.reply
        if reply is not None and exc is None and not self._framed and not self._aborted:
            # No Content-Length, not chunked: the upstream's close is the answer's end.
            self._reply_ref = None
            reply.finish(None)
            return
        if exc is not None:
            error: aiohttp.ClientError = aiohttp.ClientOSError(
                getattr(exc, "errno", None) or 0, str(exc)
            )
        elif self._head is not None:
            error = aiohttp.ServerDisconnectedError()
        else:
            error = aiohttp.ClientPayloadError("the upstream closed before the answer ended")
        self._fail(error)

    # --- llhttp callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._head is None and self.reply is None:
            raise ValueError("an answer nobody asked for")
        self._raw = []
        self._head_size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        # A head that arrived whole in one read is bounded here.
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD_BYTES:
            raise ValueError(f"its head is over {MAX_HEAD_BYTES} bytes")
        self._unparsed = 0
        self._raw.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        self._unparsed = 0
        status = self.parser.get_status_code()
        head = self._head
        if status < 200 or head is None:
            return  # 100 Continue and friends (the answer follows), or a trailer's end
        self._head = None
        if head.done():
            # Its request was cancelled or timed out in the same loop turn: nobody reads
            # this answer, so the connection cannot be reused after it.
            self.abort()
            return
        headers = CIMultiDict(self._raw)
        self._raw = []
        codings = headers.getall("transfer-encoding", ())  # (one header or several lines)
        chunked = any("chunked" in coding.lower() for coding in codings)
        self._framed = chunked or "content-length" in headers
        reply = UpstreamReply(self, status, headers)
        self._reply_ref = weakref.ref(reply, self._dropped)
        head.set_result(reply)

    def on_body(self, body: bytes) -> None:
        self._unparsed = 0
        reply = self.reply
        if reply is not None:
            reply.feed(body)

    def on_message_complete(self) -> None:
        self._unparsed = 0
        if self._reply_ref is None:
            return  # the end of an interim (1xx) answer, or of one nobody reads
        reply, self._reply_ref = self.reply, None
        keep = self.parser.should_keep_alive() and self.usable and reply is not None
        if reply is not None:
            reply.finish(None)
        self.resume()  # the whole answer is in the reply's buffer: the next one reads again
        if keep:
            self.pool.put_back(self)
        else:
            self.abort()

    # --- used by the pool and the reply ----------------------------------------------

    def send(
        self, head: bytes, body: bytes, read_timeout_s: float | None
    ) -> asyncio.Future[UpstreamReply]:
        """Write one request; the future is its answer once the status and headers are in."""
        assert self.transport is not None
        self.read_timeout_s = read_timeout_s
        self._unparsed = 0
        self.got_bytes = False
        fut = self._head = asyncio.get_running_loop().create_future()
        if body:
            self.transport.writelines((head, body))
        else:
            self.transport.write(head)
        return fut

    def awaits(self, fut: asyncio.Future[UpstreamReply]) -> bool:
        """Whether ``fut`` is still waiting for this connection's answer."""
        return self._head is fut

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        """Close at once (a reset): whatever is in flight on it fails."""
        self.usable = False
        self._aborted = True
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, error: BaseException) -> None:
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(error)
        reply, self._reply_ref = self.reply, None
        if reply is not None:
            reply.finish(error)
        self.abort()
