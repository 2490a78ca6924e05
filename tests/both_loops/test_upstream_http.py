"""The upstream connection pool against raw sockets: every framing, split anywhere; reuse only
of connections whose answer ended cleanly; timeouts, cancellation, a torn or hostile answer."""

from __future__ import annotations

import asyncio
import gc
import itertools
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import BedrockError
from proxy.upstream import Upstream
from proxy.upstream_http import UpstreamConnectError, UpstreamPool
from proxy.upstream_http.connection import MAX_HEAD_BYTES, Connection
from proxy.upstream_http.reply import HIGH_WATER
from tests.support.processes import TLSFiles
from tests.support.sockets import dead_address

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]
ServePool = Callable[[Script], Awaitable[tuple["RawServer", UpstreamPool]]]


@dataclass
class RawServer:
    """A TCP server that reads each request and lets ``script`` write the answer's bytes."""

    script: Script
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed: int = 0
    server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                await self.script(reader, writer, request)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed += 1
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Script], Awaitable[RawServer]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> RawServer:
        raw = RawServer(script)
        raw.server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        servers.append(raw.server)
        return raw

    yield start
    for s in servers:
        s.close()


#: A chunked answer's head and first piece, then nothing (the upstream holds the connection).
HELLO_THEN_NOTHING = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"


def _pool(url: str, **kw: float) -> UpstreamPool:
    return UpstreamPool(
        url,
        connect_timeout_s=kw.get("connect", 2.0),
        keepalive_s=kw.get("keepalive", 30.0),
    )


def _answers(*answers: bytes, hold: bool = False) -> Script:
    """A script answering each request with the next of ``answers`` (the last one again
    once they run out); with ``hold``, then waiting until the client hangs up."""
    left = list(answers)

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> None:
        w.write(left.pop(0) if len(left) > 1 else left[0])
        if hold:
            await r.read()

    return script


def _reset(w: asyncio.StreamWriter) -> None:
    """Close with a reset (RST), not a FIN: linger on, zero seconds."""
    sock = w.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()


async def _until(done: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Wait (in 20 ms steps, at most ``timeout_s``) for ``done``; the caller asserts it."""
    for _ in range(int(timeout_s / 0.02)):
        if done():
            return
        await asyncio.sleep(0.02)


@pytest.fixture
async def serve_pool(
    serve: Callable[[Script], Awaitable[RawServer]],
) -> AsyncIterator[ServePool]:
    """A scripted server and a pool to it (closed after the test)."""
    pools: list[UpstreamPool] = []

    async def start(script: Script) -> tuple[RawServer, UpstreamPool]:
        raw = await serve(script)
        pools.append(_pool(raw.url))
        return raw, pools[-1]

    yield start
    for pool in pools:
        await pool.close()


def _answer(body: bytes, *, framing: str = "length", extra: str = "") -> bytes:
    if framing == "length":
        return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body
    if framing == "chunked":
        out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + extra.encode() + b"\r\n"
        for i in range(0, len(body), 7):
            piece = body[i : i + 7]
            out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        return out + b"0\r\n\r\n"
    return f"HTTP/1.1 200 OK\r\nConnection: close\r\n{extra}\r\n".encode() + body  # to close


def _writes(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


HEADERS = {"Host": "h", "Content-Type": "application/json"}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.binary(max_size=3000),
    framing=st.sampled_from(["length", "chunked", "close"]),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
    interim=st.booleans(),
    name=st.text(alphabet="abcdefghij-", min_size=1, max_size=12),
    value=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
)
async def test_any_answer_split_anywhere_arrives_whole(
    serve_pool: ServePool,
    body: bytes,
    framing: str,
    cuts: list[int],
    interim: bool,
    name: str,
    value: str,
) -> None:
    value = value.strip()
    data = _answer(body, framing=framing, extra=f"x-{name}: {value}\r\n")
    if interim:
        data = b"HTTP/1.1 100 Continue\r\n\r\n" + data

    async def script(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> None:
        for piece in _writes(data, cuts):
            w.write(piece)
            await w.drain()
            await asyncio.sleep(0)
        if framing == "close":
            w.close()

    raw, pool = await serve_pool(script)
    try:
        for _ in range(2):  # the second reuses the connection unless the answer ran to close
            reply = await pool.request("POST", "/model/m%3A0/invoke", HEADERS, b"{}", 5.0)
            assert reply.status == 200
            assert reply.headers[f"x-{name}"] == value
            assert await reply.read() == body
            assert await reply.read() == body  # again, as aiohttp's response does
            reply.release()
        assert raw.connections == (2 if framing == "close" else 1)
        assert raw.requests[0].startswith(b"POST /model/m%3A0/invoke HTTP/1.1\r\n")
    finally:
        await pool.close()


async def test_the_request_carries_exactly_the_given_headers(
    serve_pool: ServePool,
) -> None:
    raw, pool = await serve_pool(_answers(_answer(b"ok")))
    reply = await pool.request("POST", "/a?b=c", {"Host": "x:1", "X-Amz-Date": "d"}, b"hey", 5.0)
    await reply.read()
    reply = await pool.request("GET", "/", {"Host": "x:1"}, b"", 5.0)
    await reply.read()
    await pool.close()
    assert raw.requests == [
        b"POST /a?b=c HTTP/1.1\r\nHost: x:1\r\nX-Amz-Date: d\r\nContent-Length: 3\r\n\r\nhey",
        b"GET / HTTP/1.1\r\nHost: x:1\r\n\r\n",
    ]


@pytest.mark.parametrize("bad", ["a\r\nInjected: 1", "a\nInjected: 1", "a\rb"])
async def test_a_line_break_in_a_header_is_refused_before_anything_is_sent(
    serve_pool: ServePool, bad: str
) -> None:
    raw, pool = await serve_pool(_answers(_answer(b"ok")))
    for headers in ({"Host": "h", "X-A": bad}, {"Host": "h", bad: "v"}):
        with pytest.raises(ValueError, match="line break"):
            await pool.request("POST", "/", headers, b"", 5.0)
    await pool.close()
    assert raw.requests == []


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_an_answer_torn_mid_body_fails_and_its_connection_is_not_reused(
    serve_pool: ServePool, framing: str
) -> None:
    calls = 0

    async def script(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> None:
        nonlocal calls
        calls += 1
        data = _answer(b"x" * 500, framing=framing)
        if calls == 1:
            w.write(data[:-100])
            await w.drain()
            w.transport.abort()
        else:
            w.write(data)

    raw, pool = await serve_pool(script)
    reply = await pool.request("POST", "/", HEADERS, b"", 5.0)
    with pytest.raises(aiohttp.ClientPayloadError):
        await reply.read()
    reply.release()
    reply = await pool.request("POST", "/", HEADERS, b"", 5.0)
    assert await reply.read() == b"x" * 500
    await pool.close()
    assert raw.connections == 2


async def test_a_close_before_the_answer_is_a_disconnect_and_a_503_upstream(
    serve_pool: ServePool,
) -> None:
    async def script(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> None:
        w.transport.abort()

    raw, pool = await serve_pool(script)
    with pytest.raises(aiohttp.ClientError):
        await pool.request("POST", "/", HEADERS, b"", 5.0)
    assert pool.open == 0
    await pool.close()
    upstream = Upstream(raw.url, "us-east-1", credentials=None, bearer_token="k")
    with pytest.raises(BedrockError) as got:
        await upstream.send("POST", "/model/m/invoke", "", {}, b"{}")
    assert got.value.status == 503
    assert got.value.error_type == "ServiceUnavailableException"
    await upstream.close()


async def test_an_unreachable_upstream_is_a_connect_error_naming_why() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    pool = _pool(f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamConnectError) as got:
        await pool.request("POST", "/", HEADERS, b"", 5.0)
    assert got.value.reason == "Connection refused"
    assert str(got.value) == f"cannot connect to 127.0.0.1:{port}: Connection refused"


@pytest.mark.parametrize("where", ["head", "body"])
async def test_a_silent_upstream_times_out_and_loses_its_connection(
    serve_pool: ServePool, where: str
) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> None:
        if where == "body":
            w.write(_answer(b"x" * 100)[:-50])
        await r.read()  # until Sluice hangs up

    raw, pool = await serve_pool(script)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        reply = await pool.request("POST", "/", HEADERS, b"", 0.3)
        await reply.read()
    assert 0.25 < loop.time() - started < 2.0
    await _until(lambda: raw.closed == 1)
    assert raw.closed == 1  # the server saw the connection end
    assert pool.open == 0


async def test_a_cancelled_reader_drops_the_connection(
    serve_pool: ServePool,
) -> None:
    raw, pool = await serve_pool(_answers(HELLO_THEN_NOTHING, hold=True))
    reply = await pool.request("POST", "/", HEADERS, b"", 5.0)

    async def consume() -> None:
        async for _ in reply.content.iter_any():
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _until(lambda: raw.closed == 1)
    assert raw.closed == 1
    assert pool.open == 0


async def test_a_connection_the_upstream_closed_while_idle_is_not_reused(
    serve_pool: ServePool,
) -> None:
    async def script(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> None:
        w.write(_answer(b"ok"))
        await w.drain()
        w.close()  # keep-alive promised, then closed while the pool holds it

    raw, pool = await serve_pool(script)
    for _ in range(3):
        reply = await pool.request("POST", "/", HEADERS, b"", 5.0)
        assert await reply.read() == b"ok"
        await asyncio.sleep(0.05)
    assert raw.connections == 3


async def test_bytes_nobody_asked_for_drop_the_idle_connection(
    serve_pool: ServePool,
) -> None:
    raw, pool = await serve_pool(
        _answers(_answer(b"ok") + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    )
    reply = await pool.request("POST", "/", HEADERS, b"", 5.0)
    assert await reply.read() == b"ok"
    await asyncio.sleep(0.05)
    assert pool.idle == 0
    reply = await pool.request("POST", "/", HEADERS, b"", 5.0)
    assert await reply.read() == b"ok"
    assert raw.connections == 2


async def test_an_oversized_or_garbled_head_is_refused(
    serve_pool: ServePool,
) -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"SMTP ready\r\n\r\n",
    ]

    _raw, pool = await serve_pool(_answers(answers.pop(0)))
    for _ in range(3):
        with pytest.raises(aiohttp.ClientResponseError):
            await pool.request("POST", "/", HEADERS, b"", 5.0)
        assert pool.open == 0


async def test_a_slow_reader_bounds_what_waits_in_memory(
    serve_pool: ServePool,
) -> None:
    size = 8 * 1024 * 1024

    async def script(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> None:
        w.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        for i in range(size // 65536):
            w.write(bytes([i % 256]) * 65536)
            await w.drain()

    raw, pool = await serve_pool(script)
    reply = await pool.request("POST", "/", HEADERS, b"", 10.0)
    got, most = 0, 0
    async for chunk in reply.content.iter_any():
        most = max(most, len(chunk))
        got += len(chunk)
        await asyncio.sleep(0.002)  # slower than the socket
    assert got == size
    # Reading stops above the high-water mark: at most that plus one socket read waits.
    assert most <= HIGH_WATER + 256 * 1024
    reply = await pool.request("POST", "/", HEADERS, b"", 10.0)  # reused, reading again
    assert len(await reply.read()) == size
    assert raw.connections == 1


async def test_idle_connections_close_after_the_keepalive(
    serve: Callable[[Script], Awaitable[RawServer]],
) -> None:
    script = _answers(_answer(b"ok"))

    raw = await serve(script)
    pool = _pool(raw.url, keepalive=0.3)
    replies = await asyncio.gather(
        *(pool.request("POST", "/", HEADERS, b"", 5.0) for _ in range(4))
    )
    for reply in replies:
        await reply.read()
    assert pool.idle == 4
    await asyncio.sleep(0.8)  # nothing runs meanwhile: the pool's own timer closes them
    assert pool.idle == 0
    await _until(lambda: raw.closed == 4)
    assert raw.closed == 4
    await pool.close()


async def test_https_with_the_servers_ca(tls_files: TLSFiles) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(_answer(b"secure"))
        await w.drain()

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tls_files.cert, tls_files.key)
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    trusted = ssl.create_default_context(cafile=str(tls_files.ca))
    pool = UpstreamPool(
        f"https://localhost:{port}", connect_timeout_s=2, keepalive_s=30, ssl_context=trusted
    )
    reply = await pool.request("GET", "/", {"Host": "localhost"}, b"", 5.0)
    assert await reply.read() == b"secure"
    await pool.close()
    untrusting = UpstreamPool(f"https://localhost:{port}", connect_timeout_s=2, keepalive_s=30)
    with pytest.raises(UpstreamConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await untrusting.request("GET", "/", {"Host": "localhost"}, b"", 5.0)
    server.close()


async def test_a_request_cancelled_as_its_answer_lands_spares_the_next_user_of_its_connection(
    serve_pool: ServePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def script(_r: asyncio.StreamReader, w: asyncio.StreamWriter, req: bytes) -> None:
        await asyncio.sleep(0.05 if req.startswith(b"POST /a") else 0.2)
        w.write(_answer(b"ok"))

    _raw, pool = await serve_pool(script)
    go = asyncio.get_running_loop().create_future()

    async def second() -> bytes:
        await go
        # (a POST: a GET whose connection dies under it would be sent again, hiding it)
        reply = await pool.request("POST", "/b", {"Host": "x"}, b"", 5.0)
        return await reply.read()

    first = asyncio.create_task(pool.request("POST", "/a", {"Host": "x"}, b"", 5.0))
    other = asyncio.create_task(second())
    feed = Connection.data_received

    def answer_then_cancel(conn: Connection, data: bytes) -> None:
        # In one loop turn: another request is ready to run, the first one's whole answer
        # arrives (its connection goes back to the pool), and the first one is cancelled
        # (its caller hung up).
        if not go.done():
            go.set_result(None)
        feed(conn, data)
        if not first.done():
            first.cancel()

    monkeypatch.setattr(Connection, "data_received", answer_then_cancel)
    got = await asyncio.gather(first, other, return_exceptions=True)
    assert isinstance(got[0], asyncio.CancelledError)
    assert got[1] == b"ok"


async def test_an_answer_read_again_after_a_timeout_is_still_a_timeout(
    serve_pool: ServePool,
) -> None:
    _raw, pool = await serve_pool(_answers(_answer(b"x" * 100)[:-50], hold=True))
    reply = await pool.request("POST", "/", HEADERS, b"", 0.2)
    for _ in range(2):  # the retry path drains it, then the forwarder reads it as the answer
        with pytest.raises(TimeoutError):
            await reply.read()
        await asyncio.sleep(0.05)  # the dropped connection's close lands in between


async def test_one_endless_header_line_is_refused_long_before_the_read_timeout(
    serve_pool: ServePool,
) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        for _ in range(200):  # 12.8 MB of one header value, never ending
            w.write(b"a" * 65536)
            await w.drain()

    _raw, pool = await serve_pool(script)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(aiohttp.ClientResponseError, match=f"over {MAX_HEAD_BYTES} bytes"):
        await pool.request("POST", "/", HEADERS, b"", 10.0)
    assert loop.time() - started < 5.0
    assert pool.open == 0


async def test_an_upgrade_answer_is_a_bad_answer_not_a_crash(
    serve_pool: ServePool,
) -> None:
    script = _answers(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    )

    _raw, pool = await serve_pool(script)
    with pytest.raises(aiohttp.ClientResponseError, match="upgrade"):
        await pool.request("POST", "/", HEADERS, b"", 5.0)
    assert pool.open == 0


async def test_leaving_an_iteration_early_keeps_the_rest_readable(
    serve_pool: ServePool,
) -> None:
    async def script(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
        await w.drain()
        await asyncio.sleep(0.1)
        w.write(b"def")

    _raw, pool = await serve_pool(script)
    reply = await pool.request("POST", "/", HEADERS, b"", 5.0)
    async for chunk in reply.content.iter_any():
        assert chunk == b"abc"
        break
    await asyncio.sleep(0)  # the abandoned generator's aclose() runs
    assert await reply.read() == b"def"


async def test_closing_the_pool_mid_answer_is_an_error_even_when_the_close_would_end_it(
    serve_pool: ServePool,
) -> None:
    _raw, pool = await serve_pool(
        _answers(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial", hold=True)
    )
    reply = await pool.request("POST", "/", HEADERS, b"", 5.0)
    await asyncio.sleep(0.05)
    await pool.close()
    with pytest.raises(aiohttp.ClientError):
        await reply.read()  # never b"partial" passed off as the whole answer


@pytest.mark.parametrize("close", ["fin", "rst"])
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_get_on_a_connection_closed_under_it_is_sent_again_a_post_is_not(
    serve_pool: ServePool, method: str, close: str
) -> None:
    served: dict[int, int] = {}

    async def script(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> None:
        n = served[id(w)] = served.get(id(w), 0) + 1
        if n == 2:  # the kept-alive connection's second request: closed, no answer
            if close == "rst":
                _reset(w)
            w.transport.abort()
            return
        w.write(_answer(b"ok"))

    raw, pool = await serve_pool(script)
    reply = await pool.request(method, "/", HEADERS, b"", 5.0)
    assert await reply.read() == b"ok"
    if method == "GET":
        reply = await pool.request(method, "/", HEADERS, b"", 5.0)
        assert await reply.read() == b"ok"
        assert raw.connections == 2
    else:  # it may have run: never sent twice
        with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
            await pool.request(method, "/", HEADERS, b"", 5.0)
        assert len(raw.requests) == 2


async def test_a_burst_of_new_connections_looks_the_host_up_once(
    serve: Callable[[Script], Awaitable[RawServer]], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def script(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> None:
        await asyncio.sleep(0.05)
        w.write(_answer(b"ok"))

    raw = await serve(script)
    loop = asyncio.get_running_loop()
    lookups: list[str] = []
    lookup = loop.getaddrinfo

    async def counted(host: Any, *args: Any, **kw: Any) -> Any:
        lookups.append(host)
        return await lookup(host, *args, **kw)

    monkeypatch.setattr(loop, "getaddrinfo", counted)
    pool = _pool(raw.url.replace("127.0.0.1", "localhost"))
    replies = await asyncio.gather(
        *(pool.request("POST", "/", HEADERS, b"", 5.0) for _ in range(20))
    )
    assert [await r.read() for r in replies] == [b"ok"] * 20
    assert raw.connections == 20
    # (uvloop also "looks up" each numeric address it connects to: no resolver involved)
    assert [host for host in lookups if not host[0].isdigit() and ":" not in host] == ["localhost"]
    await pool.close()


async def test_a_reply_dropped_unreleased_closes_its_connection(
    serve_pool: ServePool,
) -> None:
    raw, pool = await serve_pool(
        _answers(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", hold=True)
    )
    reply = await pool.request("POST", "/", HEADERS, b"", 5.0)
    assert pool.open == 1
    del reply  # a caller's bug: neither released nor closed
    gc.collect()
    await _until(lambda: raw.closed == 1)
    assert raw.closed == 1
    assert pool.open == 0
    await pool.close()


def _resolving(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch, answer: Callable[[], Any]
) -> list[str]:
    """Have ``upstream.test`` resolve to ``answer()`` (awaited if a coroutine); returns the
    list of lookups made."""
    lookups: list[str] = []
    lookup = loop.getaddrinfo

    async def patched(host: Any, *args: Any, **kw: Any) -> Any:
        if host != "upstream.test":
            return await lookup(host, *args, **kw)
        lookups.append(host)
        got = answer()
        return await got if asyncio.iscoroutine(got) else got

    monkeypatch.setattr(loop, "getaddrinfo", patched)
    return lookups


def _info(address: tuple[str, int]) -> Any:
    return (socket.AF_INET, socket.SOCK_STREAM, 6, "", address)


@pytest.fixture(name="dead_address")
def _dead_address() -> Iterator[tuple[str, int]]:
    with dead_address() as address:
        yield address


async def test_a_dead_address_costs_a_connection_its_happy_eyeballs_delay_not_a_failure(
    serve_pool: ServePool, monkeypatch: pytest.MonkeyPatch, dead_address: tuple[str, int]
) -> None:
    raw, _ = await serve_pool(_answers(_answer(b"ok")))
    port = raw.port
    loop = asyncio.get_running_loop()
    # The dead address first, then the live one.
    _resolving(loop, monkeypatch, lambda: [_info(dead_address), _info(("127.0.0.1", port))])
    pool = _pool(f"http://upstream.test:{port}", connect=3)
    try:
        started = loop.time()
        first = await pool.request("POST", "/", HEADERS, b"", 5.0)
        assert await first.read() == b"ok"
        assert loop.time() - started < 2.0  # not the 3 s connect timeout
        # Two at once: one reuses the first connection, and the new one starts at the
        # other address, so neither waits the Happy Eyeballs delay.
        started = loop.time()
        replies = await asyncio.gather(
            *(pool.request("POST", "/", HEADERS, b"", 5.0) for _ in range(2))
        )
        assert loop.time() - started < 0.2
        assert [await r.read() for r in replies] == [b"ok", b"ok"]
        assert raw.connections == 2
    finally:
        await pool.close()


async def test_closing_the_pool_while_a_request_connects_sends_nothing(
    serve: Callable[[Script], Awaitable[RawServer]], monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _answers(_answer(b"ok"))

    raw = await serve(script)
    loop = asyncio.get_running_loop()
    lookup = loop.getaddrinfo

    async def slow(host: Any, *args: Any, **kw: Any) -> Any:
        await asyncio.sleep(0.2)
        return await lookup(host, *args, **kw)

    monkeypatch.setattr(loop, "getaddrinfo", slow)
    pool = _pool(raw.url)
    request = asyncio.create_task(pool.request("POST", "/", HEADERS, b"", 5.0))
    await asyncio.sleep(0.05)
    await pool.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        await request
    await asyncio.sleep(0.1)
    assert raw.requests == []


async def test_an_endless_trailer_is_refused_long_before_the_read_timeout(
    serve_pool: ServePool,
) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: ")
        for _ in range(200):
            w.write(b"t" * 65536)
            await w.drain()

    _raw, pool = await serve_pool(script)
    reply = await pool.request("POST", "/", HEADERS, b"", 10.0)
    started = loop_time = asyncio.get_running_loop().time
    begun = started()
    with pytest.raises(aiohttp.ClientResponseError, match="trailer"):
        await reply.read()
    assert loop_time() - begun < 5.0


async def test_bare_lf_line_ends_are_read_as_aiohttp_read_them(
    serve_pool: ServePool,
) -> None:
    _raw, pool = await serve_pool(_answers(b"HTTP/1.1 200 OK\nContent-Length: 2\nX-A: b\n\nok"))
    reply = await pool.request("POST", "/", HEADERS, b"", 5.0)
    assert (reply.headers["X-A"], await reply.read()) == ("b", b"ok")


async def test_an_unframed_answer_cut_by_a_reset_is_an_error(
    serve_pool: ServePool,
) -> None:
    async def script(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial")
        await w.drain()
        await asyncio.sleep(0.05)
        _reset(w)

    _raw, pool = await serve_pool(script)
    reply = await pool.request("POST", "/", HEADERS, b"", 5.0)
    with pytest.raises(aiohttp.ClientError):
        await reply.read()  # a reset is no answer's end


async def test_a_connect_timeout_names_itself_and_looks_the_host_up_again(
    serve_pool: ServePool, monkeypatch: pytest.MonkeyPatch, dead_address: tuple[str, int]
) -> None:
    raw, _ = await serve_pool(_answers(_answer(b"ok")))
    live = ("127.0.0.1", raw.port)
    where = [dead_address]  # the host's one address: dead, then moved
    lookups = _resolving(asyncio.get_running_loop(), monkeypatch, lambda: [_info(where[0])])
    pool = _pool(f"http://upstream.test:{live[1]}", connect=0.5)
    try:
        with pytest.raises(UpstreamConnectError) as got:
            await pool.request("POST", "/", HEADERS, b"", 5.0)
        assert got.value.reason == "no connection within 0.5 s"
        where[0] = live  # the address moved: the next connection asks again at once
        reply = await pool.request("POST", "/", HEADERS, b"", 5.0)
        assert await reply.read() == b"ok"
        assert len(lookups) == 2
    finally:
        await pool.close()


async def test_a_slow_dns_refresh_holds_no_connection_up(
    serve_pool: ServePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.upstream_http import resolve

    raw, _ = await serve_pool(_answers(_answer(b"ok")))
    live = ("127.0.0.1", raw.port)
    slow = [False]

    async def answer() -> list[Any]:
        if slow[0]:
            await asyncio.sleep(3.0)  # a resolver that stopped answering
        return [_info(live)]

    lookups = _resolving(asyncio.get_running_loop(), monkeypatch, answer)
    monkeypatch.setattr(resolve, "DNS_TTL_S", 0.1)
    pool = _pool(f"http://upstream.test:{live[1]}", connect=1.0)
    try:
        first = await pool.request("POST", "/", HEADERS, b"", 5.0)
        await asyncio.sleep(0.2)  # the answer expired; the next lookup hangs
        slow[0] = True
        second = await asyncio.gather(
            *(pool.request("POST", "/", HEADERS, b"", 5.0) for _ in range(2))
        )  # one reuses the first connection, one connects: on the addresses known
        assert [await r.read() for r in (first, *second)] == [b"ok"] * 3
        assert len(lookups) == 2
    finally:
        await pool.close()


async def test_a_reply_collected_in_another_thread_still_closes_its_connection(
    serve_pool: ServePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, pool = await serve_pool(
        _answers(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", hold=True)
    )
    threads: list[int] = []  # where the transport was touched: the loop's thread only
    abort = Connection.abort

    def recorded(conn: Connection) -> None:
        threads.append(threading.get_ident())
        abort(conn)

    monkeypatch.setattr(Connection, "abort", recorded)
    reply = await pool.request("POST", "/", HEADERS, b"", 5.0)
    gc.collect()
    gc.disable()  # so only the worker thread's collection can free the cycle below
    try:
        cycle: list[Any] = [reply]
        cycle.append(cycle)
        del reply, cycle
        await asyncio.to_thread(gc.collect)  # botocore's or sqlite's thread, in production
    finally:
        gc.enable()
    await _until(lambda: raw.closed == 1)
    assert raw.closed == 1
    assert pool.open == 0
    assert threads and set(threads) == {threading.get_ident()}


async def test_chunked_named_on_a_second_transfer_encoding_line_still_frames_the_answer(
    serve_pool: ServePool,
) -> None:
    async def script(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> None:
        w.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n"
        )
        await w.drain()
        await asyncio.sleep(0.05)
        w.close()  # a clean close before the last chunk: torn, not the answer's end

    _, pool = await serve_pool(script)
    reply = await pool.request("POST", "/", HEADERS, b"", 5.0)
    with pytest.raises(aiohttp.ClientPayloadError):
        await reply.read()


async def test_take_and_wait_hand_over_each_piece_and_keep_no_timer_between_waits(
    serve_pool: ServePool,
) -> None:
    """The relay of a held stream reads with take()/wait(): each piece as it comes, the
    end as None, and no read-timeout timer or waiter kept once a wait is over."""
    pieces = asyncio.Queue[bytes]()

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while (piece := await pieces.get()) != b"":
            w.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        w.write(b"0\r\n\r\n")
        await r.read()

    _raw, pool = await serve_pool(script)
    reply = await pool.request("POST", "/", HEADERS, b"", 5.0)
    got: list[bytes] = []
    for piece in (b"one", b"two", b""):
        assert reply.take() == b""  # nothing yet: wait
        waiting = reply.wait()
        assert reply._timer is not None  # armed while it waits
        await pieces.put(piece)
        await asyncio.wait_for(waiting, 2.0)
        assert reply._timer is None and reply._waiter is None  # disarmed by the data
        chunk = reply.take()
        if chunk is None:
            break
        got.append(chunk)
    assert got == [b"one", b"two"]
    assert reply.take() is None  # and stays at the end


async def test_a_wait_given_up_on_leaves_no_timer_behind(serve_pool: ServePool) -> None:
    """Waiting again while a wait is pending is the same wait; a wait given up on (as
    wait_for does) has its timer cancelled by the next one: one timer, never two."""
    script = _answers(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", hold=True)
    _raw, pool = await serve_pool(script)
    reply = await pool.request("POST", "/", HEADERS, b"", 5.0)
    first = reply.wait()
    first_timer = reply._timer
    assert first_timer is not None
    assert reply.wait() is first and reply._timer is first_timer
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(first, 0.05)  # cancels the future, not the reply's timer
    second = reply.wait()
    assert second is not first and first_timer.cancelled()
    assert reply._timer is not None and not reply._timer.cancelled()
    reply.close()
    assert second.done() and reply._timer is None


async def test_a_stalled_take_and_wait_times_out_and_reads_as_a_timeout_after(
    serve_pool: ServePool,
) -> None:
    raw, pool = await serve_pool(_answers(HELLO_THEN_NOTHING, hold=True))
    reply = await pool.request("POST", "/", HEADERS, b"", 0.3)
    await _until(lambda: reply._buffered > 0)
    assert reply.take() == b"hello"
    assert reply.take() == b""
    with pytest.raises(TimeoutError) as stalled:
        await reply.wait()
    reply.abandon(stalled.value)
    await _until(lambda: raw.closed == 1)
    assert raw.closed == 1 and pool.open == 0  # the upstream sees the call dropped
    with pytest.raises(TimeoutError) as again:  # the same error again, never a 503
        reply.take()
    assert again.value is stalled.value
    reply.abandon(TimeoutError("ignored"))  # abandoning twice changes nothing
    with pytest.raises(TimeoutError) as third:
        reply.take()
    assert third.value is stalled.value
