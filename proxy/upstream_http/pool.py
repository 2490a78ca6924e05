"""The upstream connections: reuse, connect, idle expiry."""

from __future__ import annotations

import asyncio
import errno
import ssl
import time
from collections.abc import Mapping

import aiohappyeyeballs
import aiohttp
from yarl import URL

from proxy.upstream_http.connection import Connection
from proxy.upstream_http.reply import UpstreamConnectError, UpstreamReply, expire
from proxy.upstream_http.resolve import Resolver

#: A new connection's second address is tried this long after its first (RFC 8305's 250 ms,
#: as aiohttp did), so one dead address of several costs a connection 0.25 s, not a failure.
HAPPY_EYEBALLS_DELAY_S = 0.25


class UpstreamPool:
    """Keep-alive connections to one origin (``http(s)://host[:port]``), the newest reused
    first so a quiet period lets the oldest idle out."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float,
        keepalive_s: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        url = URL(base_url)
        assert url.host is not None and url.port is not None
        self.host, self.port = url.host, url.port
        self._ssl = (ssl_context or ssl.create_default_context()) if url.scheme == "https" else None
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._resolver = Resolver(url.host, url.port)
        # Insertion-ordered: popitem() takes the newest; removal is O(1) when thousands of
        # held streams' connections idle out or are closed by the upstream together.
        self._idle: dict[Connection, None] = {}
        self._busy: set[Connection] = set()
        self._closed = False
        self._reaper: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> int:
        """Connections pooled and waiting for a request."""
        return len(self._idle)

    @property
    def open(self) -> int:
        """Connections open: pooled, or carrying a request."""
        return len(self._idle) + len(self._busy)

    async def request(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        read_timeout_s: float | None,
    ) -> UpstreamReply:
        """Send one request (``target``: the path and query as they go on the wire) and
        return its answer once the status and headers are in."""
        lines = [f"{method} {target} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        text = "\r\n".join(lines) + "\r\n\r\n"
        breaks = len(lines) + 1  # one CR LF a line and the blank line: any more is injected
        if text.count("\n") != breaks or text.count("\r") != breaks:
            raise ValueError("a request header name or value holds a line break")
        head = text.encode("utf-8", "surrogateescape")
        conn = self._pooled()
        if conn is not None and method == "GET":
            try:
                return await self._exchange(conn, head, body, read_timeout_s)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                if conn.got_bytes:
                    raise
                # A kept-alive connection the upstream closed (or reset) as the request
                # went out: a GET is safe to send again, on a new connection (as aiohttp).
                conn = None
        return await self._exchange(conn or await self._connect(), head, body, read_timeout_s)

    async def _exchange(
        self, conn: Connection, head: bytes, body: bytes, read_timeout_s: float | None
    ) -> UpstreamReply:
        timer = None
        fut: asyncio.Future[UpstreamReply] | None = None
        try:
            if self._closed:
                raise aiohttp.ClientConnectionError("the upstream pool is closed")
            self._busy.add(conn)
            fut = conn.send(head, body, read_timeout_s)
            if read_timeout_s is not None:
                timer = asyncio.get_running_loop().call_later(read_timeout_s, expire, fut)
            return await fut
        except BaseException:
            if fut is not None and fut.done() and not fut.cancelled() and not fut.exception():
                # Answered in the loop turn this task was cancelled in: the reply owns the
                # connection now (maybe pooled again, maybe already someone else's).
                fut.result().close()
            elif fut is None or conn.awaits(fut):
                conn.abort()  # cancelled or timed out mid-request: the connection is spoilt
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _pooled(self) -> Connection | None:
        idle, now = self._idle, time.monotonic()
        while idle:
            conn, _ = idle.popitem()
            transport = conn.transport
            fresh = now - conn.idle_since < self._keepalive_s
            if conn.usable and fresh and transport is not None and not transport.is_closing():
                return conn
            conn.abort()
        return None

    async def _connect(self) -> Connection:
        if self._closed:
            raise aiohttp.ClientConnectionError("the upstream pool is closed")
        loop = asyncio.get_running_loop()
        address = f"{self.host}:{self.port}"
        infos = None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                infos = await self._resolver.addresses()
                if self._closed:
                    raise aiohttp.ClientConnectionError("the upstream pool is closed")
                try:
                    sock = await aiohappyeyeballs.start_connection(
                        infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY_S, interleave=1
                    )
                except OSError:
                    self._resolver.failed()  # every address failed: look up again next time
                    raise
                _, conn = await loop.create_connection(
                    lambda: Connection(self),
                    sock=sock,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
        except TimeoutError:
            # Unreachable, not slow: a 503 the caller may retry, never a model timeout.
            within = f"within {self._connect_timeout_s} s"
            if infos is None:
                why = TimeoutError(errno.ETIMEDOUT, f"no DNS answer for {self.host} {within}")
            else:
                self._resolver.failed()  # its addresses may have moved: look up again
                why = TimeoutError(errno.ETIMEDOUT, f"no connection {within}")
            raise UpstreamConnectError(address, why) from None
        except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS (SSLError)
            raise UpstreamConnectError(address, exc) from None
        if self._closed:  # closed while this one connected: it never carries a request
            conn.abort()
            raise aiohttp.ClientConnectionError("the upstream pool is closed")
        return conn

    def put_back(self, conn: Connection) -> None:
        self._busy.discard(conn)
        if self._closed:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        self._idle[conn] = None
        if self._reaper is None:
            loop = asyncio.get_running_loop()
            self._reaper = loop.call_later(self._keepalive_s / 2, self._reap)

    def _reap(self) -> None:
        # Every half keep-alive period while any connection idles: none outlives it by more.
        self._reaper = None
        self.expire_idle()
        if self._idle and not self._closed:
            loop = asyncio.get_running_loop()
            self._reaper = loop.call_later(self._keepalive_s / 2, self._reap)

    def forget(self, conn: Connection) -> None:
        self._busy.discard(conn)
        self._idle.pop(conn, None)

    def expire_idle(self) -> None:
        """Close pooled connections idle for the keep-alive period or longer."""
        cutoff = time.monotonic() - self._keepalive_s
        for conn in [c for c in self._idle if c.idle_since <= cutoff]:
            conn.abort()

    async def close(self) -> None:
        """Close every connection; answers still streaming end with a connection error."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for conn in [*self._idle, *self._busy]:
            conn.abort()
        for _ in range(3):  # connection_lost runs a turn or two later (TLS: two)
            await asyncio.sleep(0)
