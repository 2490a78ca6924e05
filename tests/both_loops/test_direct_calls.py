"""EVALSHA without redis-py's per-command machinery (``proxy/backend/direct.py``), on a real
redis-server: the same bytes on the wire as redis-py, a restarted server and a cancelled
call handled as redis-py's client handles them, no reply read as another call's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.backend.direct import DirectCalls
from tests.support.redis_fixtures import RedisServerProcess
from tests.support.relays import SilentRelay

ECHO = "return {KEYS[1], ARGV[1], ARGV[2]}"
# Busy for a while (no sleep in Lua): the reply comes well after the caller gave up.
SLOW = "local i = 0 while i < tonumber(ARGV[1]) do i = i + 1 end return 'slow'"
FAIL = "return redis.error_reply('boom')"
# Busy for ARGV[1] ms by Redis's own clock, however fast this machine is.
BUSY_MS = (
    "local function ms() local t = redis.call('TIME') return t[1] * 1000 + t[2] / 1000 end"
    " local stop = ms() + tonumber(ARGV[1]) while ms() < stop do end return 1"
)

Arg = bytes | str | int | float
ARGS = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
)


@pytest.fixture
async def client(redis_server: RedisServerProcess) -> AsyncIterator[Redis]:
    c = Redis.from_url(redis_server.url)
    yield c
    await c.aclose()


def _clients(c: Redis) -> Callable[[], Any]:
    async def count() -> int:
        return len(await c.client_list())

    return count


async def _until_clients(
    count: Callable[[], Any], expected: int, polls: int = 100, *, at_most: bool = False
) -> None:
    """Wait until Redis lists ``expected`` clients (``at_most``: no more): it drops a client
    when it reads the close, which under load can take a moment."""

    def met(n: int) -> bool:
        return n <= expected if at_most else n == expected

    for _ in range(polls):
        if met(await count()):
            return
        await asyncio.sleep(0.02)
    assert met(await count())


@settings(max_examples=300, deadline=None)
@given(keys=st.lists(st.text(max_size=20), max_size=4), args=st.lists(ARGS, max_size=8))
def test_arguments_are_packed_as_redis_py_packs_them(keys: list[str], args: list[Arg]) -> None:
    from hiredis import pack_command

    redis_py = Redis().connection_pool.make_connection()  # type: ignore[no-untyped-call]
    theirs = b"".join(redis_py.pack_command("EVALSHA", "f" * 40, len(keys), *keys, *args))
    assert pack_command(("EVALSHA", "f" * 40, len(keys), *keys, *args)) == theirs


async def test_replies_round_trip_and_connections_are_reused(client: Redis) -> None:
    sha = await client.script_load(ECHO)
    direct = DirectCalls(client)
    count = _clients(client)
    before = await count()
    for value in ("é", 2**62, 0.1, b"\x00\xff"):
        reply = await direct.evalsha(sha, ["k"], [value, "x"])
        expected = value if isinstance(value, bytes) else str(value).encode()
        assert reply == [b"k", expected, b"x"]
    assert await count() == before + 1  # one connection of its own, reused
    await direct.aclose()
    assert await count() == before


async def test_a_script_error_is_raised_and_keeps_the_connection(client: Redis) -> None:
    direct = DirectCalls(client)
    count = _clients(client)
    before = await count()
    with pytest.raises(ResponseError, match="boom"):
        await direct.evalsha(await client.script_load(FAIL), [], [])
    with pytest.raises(NoScriptError):
        await direct.evalsha("0" * 40, [], [])
    assert await direct.evalsha(await client.script_load(ECHO), ["k"], [1, 2]) == [b"k", b"1", b"2"]
    assert await count() == before + 1
    await direct.aclose()


async def test_a_call_cancelled_before_its_reply_leaves_no_reply_for_the_next(
    client: Redis,
) -> None:
    """The cancelled call keeps its place on the connection: its late reply ('slow') is read
    and dropped, never taken as the answer to the next call."""
    slow, echo = await client.script_load(SLOW), await client.script_load(ECHO)
    direct = DirectCalls(client)
    task = asyncio.create_task(direct.evalsha(slow, [], [3_000_000]))
    await asyncio.sleep(0.01)  # written; Redis is busy running it
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await direct.evalsha(echo, ["k"], ["a", "b"]) == [b"k", b"a", b"b"]
    await direct.aclose()


@contextlib.asynccontextmanager
async def _direct_on(url: str) -> AsyncIterator[tuple[Redis, DirectCalls]]:
    """A client of ``url`` and direct calls on it; both closed afterwards."""
    client = Redis.from_url(url)
    direct = DirectCalls(client)
    try:
        yield client, direct
    finally:
        await direct.aclose()
        await client.aclose()


async def _idle_connections(direct: DirectCalls, client: Redis, n: int) -> str:
    """``n`` calls at once, then none: ``direct``'s connection is idle; the echo's sha."""
    sha: str = await client.script_load(ECHO)
    await asyncio.gather(*(direct.evalsha(sha, ["k"], [i, 0]) for i in range(n)))
    return sha


async def test_a_restarted_server_is_reached_on_a_new_connection(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    """A connection to a server that restarted since is dropped, and the call sent on a new
    one (what redis-py's pool and one retry did): the restarted
    server answers, here NOSCRIPT (its scripts are gone; the runner reloads on it), and no
    call fails on a dead connection."""
    server = redis_factory()
    async with _direct_on(server.url) as (client, direct):
        sha = await _idle_connections(direct, client, 4)
        await asyncio.to_thread(server.restart)
        with pytest.raises(NoScriptError):
            await direct.evalsha(sha, ["k"], [1, 2])
        assert await client.script_load(ECHO) == sha
        for i in range(4):
            assert await direct.evalsha(sha, ["k"], [i, 4]) == [b"k", str(i).encode(), b"4"]


async def test_connections_the_server_closed_when_idle_are_replaced(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    server = redis_factory("--timeout", "1")  # Redis closes connections idle for 1 s
    async with _direct_on(server.url) as (client, direct):
        sha = await _idle_connections(direct, client, 4)
        await asyncio.sleep(2.5)
        for i in range(4):
            assert await direct.evalsha(sha, ["k"], [i, 5]) == [b"k", str(i).encode(), b"5"]


async def test_a_reply_that_times_out_is_never_sent_again_nor_read_by_the_next_call(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    """No reply within the socket timeout: the call raises and its connection is dropped
    (Redis, or the path to it, is stalled), so the late reply cannot shift every later reply
    by one (it did when the read was given an explicit timeout: redis-py then returns None
    and keeps the connection)."""
    server = redis_factory()
    admin = Redis.from_url(server.url)
    try:
        async with _direct_on(server.url + "?socket_timeout=0.3") as (client, direct):
            # Busy for ARGV[1] ms by Redis's own clock, however fast this machine is (a loop
            # of fixed length finished inside the timeout on a fast one).
            busy = (
                "local function ms() local t = redis.call('TIME')"
                " return t[1] * 1000 + t[2] / 1000 end"
                " local stop = ms() + tonumber(ARGV[1]) while ms() < stop do end"
            )
            incr = await client.script_load(busy + " return redis.call('INCR', KEYS[1])")
            echo = await client.script_load(ECHO)
            with pytest.raises(RedisTimeoutError):
                await direct.evalsha(incr, ["n"], [700])  # 0.7 s of work: no reply in time
            await asyncio.sleep(1.5)  # it has run (once) and its reply arrived, for nobody
            assert await direct.evalsha(echo, ["k"], ["b", "c"]) == [b"k", b"b", b"c"]
            assert await admin.get("n") == b"1"
    finally:
        await admin.aclose()


async def test_an_argument_redis_cannot_take_is_a_redis_error(client: Redis) -> None:
    direct = DirectCalls(client)
    with pytest.raises(DataError):
        await direct.evalsha("0" * 40, [], [True])
    await direct.aclose()


async def _evalsha_calls(c: Redis) -> int:
    stats = await c.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_concurrent_calls_share_one_connection_each_reply_to_its_own_call(
    client: Redis,
) -> None:
    """Many calls at once are pipelined on one connection; each gets its own reply (the
    calls' arguments differ, so a reply read by the wrong call shows), in any mix with
    script errors and calls cancelled after their write, before their reply."""
    echo, fail = await client.script_load(ECHO), await client.script_load(FAIL)
    slow = await client.script_load(SLOW)
    direct = DirectCalls(client)
    count = _clients(client)
    before = await count()
    assert await direct.evalsha(echo, ["k"], [0, 0]) == [b"k", b"0", b"0"]  # connected
    sent = await _evalsha_calls(client)

    def call(i: int) -> Any:
        if i % 60 == 30:
            return direct.evalsha(slow, [], [20_000])  # cancelled below
        return direct.evalsha(fail if i % 7 == 3 else echo, ["k"], [i, -i])

    tasks = [asyncio.ensure_future(call(i)) for i in range(300)]
    await asyncio.sleep(0)  # every one written, in order
    for i in range(30, 300, 60):
        tasks[i].cancel()
    replies = await asyncio.gather(*tasks, return_exceptions=True)
    for i, reply in enumerate(replies):
        if i % 60 == 30:
            assert isinstance(reply, asyncio.CancelledError), i
        elif i % 7 == 3:
            assert isinstance(reply, ResponseError) and "boom" in str(reply)
        else:
            assert reply == [b"k", str(i).encode(), str(-i).encode()], i
    assert await direct.evalsha(echo, ["k"], ["after", 1]) == [b"k", b"after", b"1"]
    assert await _evalsha_calls(client) == sent + 301  # the cancelled ones were written
    assert await count() == before + 1
    await direct.aclose()
    await _until_clients(count, before)


async def test_close_waits_for_the_calls_in_flight(client: Redis) -> None:
    """``aclose`` with calls in flight: they get their replies, then the connection closes."""
    slow = await client.script_load(SLOW)
    direct = DirectCalls(client)
    count = _clients(client)
    before = await count()
    calls = asyncio.gather(*(direct.evalsha(slow, [], [200_000]) for _ in range(3)))
    await asyncio.sleep(0.01)
    await direct.aclose()
    assert await calls == [b"slow"] * 3
    await _until_clients(count, before)


async def test_a_call_whose_write_went_out_is_never_sent_again(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    """A connection lost after Redis ran the script but before its reply came back (a
    proxy in between cuts it): the call fails, it is not resent -- the counter the
    script increments is 1, not 2 (redis-py's one retry made it 2)."""
    server = redis_factory()

    async def relay_then_cut(
        client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            while data := await client_r.read(65536):
                redis_w.write(data)
                await redis_w.drain()
                reply = await redis_r.read(65536)
                if b"EVALSHA" in data:
                    break  # ran at Redis; the reply is dropped with the connection
                client_w.write(reply)
                await client_w.drain()
        finally:
            client_w.transport.abort()
            redis_w.close()

    proxy = await asyncio.start_server(relay_then_cut, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    admin = Redis.from_url(server.url)
    try:
        async with _direct_on(f"redis://127.0.0.1:{port}/0?protocol=2") as (_, direct):
            sha = await admin.script_load("return redis.call('INCR', KEYS[1])")
            with pytest.raises(RedisConnectionError):
                await direct.evalsha(sha, ["n"], [])
            assert await admin.get("n") == b"1"
    finally:
        proxy.close()
        await admin.aclose()


async def test_a_close_the_loop_has_not_read_yet_is_seen_before_the_write(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    """A call writes right after the previous reply, with no turn of the loop between: a
    server that closed meanwhile (here restarted without the loop running) is noticed on
    the socket itself, and the call goes to a new connection instead of failing."""
    server = redis_factory()
    async with _direct_on(server.url) as (client, direct):
        sha = await _idle_connections(direct, client, 1)
        server.restart()  # blocking: the loop does not run until the call below
        with pytest.raises(NoScriptError):  # answered by the restarted server
            await direct.evalsha(sha, ["k"], [1, 2])


async def test_idle_connections_on_high_descriptors_are_reused(client: Redis) -> None:
    """The idle check polls the socket: a descriptor above select()'s 1,024 must work too
    (an instance holding thousands of streams)."""
    import resource
    import socket

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1300:
        if hard != resource.RLIM_INFINITY and hard < 1300:
            pytest.skip(f"needs 1,300 descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1300, hard))
    padding = [socket.socket() for _ in range(1100)]
    try:
        sha = await client.script_load(ECHO)
        direct = DirectCalls(client)
        before = (await client.info("stats"))["total_connections_received"]
        for i in range(5):
            assert await direct.evalsha(sha, ["k"], [i, 0]) == [b"k", str(i).encode(), b"0"]
        made = (await client.info("stats"))["total_connections_received"] - before
        assert made == 1  # one connection, reused: never judged closed
        await direct.aclose()
    finally:
        for s in padding:
            s.close()
        if soft < 1300:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _tls_files(where: Any) -> tuple[str, str] | None:
    """A self-signed certificate and key for 127.0.0.1 (None: no openssl here)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        return None
    cert, key = str(where / "cert.pem"), str(where / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
         "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize("transport", ["tls", "unix"])
async def test_tls_and_unix_socket_connections_are_taken_over_too(
    redis_factory: Callable[..., RedisServerProcess], tmp_path: Any, transport: str
) -> None:
    """The connection is made (and its TLS or socket set up) by redis-py, then read by
    Sluice's own protocol: replies, pipelining, a script error and a restart work the same
    over TLS and a unix socket as over TCP."""
    from tests.support.redis_fixtures import free_port

    if transport == "tls":
        files = _tls_files(tmp_path)
        if files is None:
            pytest.skip("needs openssl for a certificate")
        cert, key = files
        port = free_port()
        server = redis_factory(
            "--tls-port", str(port), "--tls-cert-file", cert, "--tls-key-file", key,
            "--tls-ca-cert-file", cert, "--tls-auth-clients", "no",
        )  # fmt: skip
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}&ssl_cert_reqs=required"
    else:
        path = tmp_path / "redis.sock"
        server = redis_factory("--unixsocket", str(path), "--unixsocketperm", "700")
        url = f"unix://{path}"
    async with _direct_on(url) as (client, direct):
        if transport == "tls":
            assert client.connection_pool.connection_kwargs.get("ssl_ca_certs") == cert
        echo, fail = await client.script_load(ECHO), await client.script_load(FAIL)
        replies = await asyncio.gather(
            *(direct.evalsha(echo, ["k"], [i, "é"]) for i in range(50)),
            direct.evalsha(fail, [], []),
            return_exceptions=True,
        )
        assert replies[:50] == [[b"k", str(i).encode(), "é".encode()] for i in range(50)]
        assert isinstance(replies[50], ResponseError)
        await asyncio.to_thread(server.restart)
        with pytest.raises(NoScriptError):  # the restarted server answered, on a new one
            await direct.evalsha(echo, ["k"], [1, 2])


async def test_a_call_given_up_on_keeps_the_connection_and_drops_its_late_reply(
    client: Redis,
) -> None:
    """``give_up_s`` (the store's timeout): the caller gets ``TimeoutError`` on time, the
    connection stays, and the reply that comes later is read and dropped."""
    slow, echo = await client.script_load(SLOW), await client.script_load(ECHO)
    direct = DirectCalls(client)
    count = _clients(client)
    assert await direct.evalsha(echo, ["k"], [0, 0]) == [b"k", b"0", b"0"]
    before = await count()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await direct.evalsha(slow, [], [3_000_000], give_up_s=0.05)
    assert loop.time() - started < 0.5
    for i in range(3):  # pipelined behind the slow script's reply, each gets its own
        assert await direct.evalsha(echo, ["k"], [i, 1]) == [b"k", str(i).encode(), b"1"]
    assert await count() == before
    await direct.aclose()


async def test_a_stalled_connection_is_dropped_at_the_socket_timeout_even_if_nobody_waits(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    """Every caller gave up early (the store timeout), then nothing came for the whole socket
    timeout: the connection is dropped, so the next call, once Redis is back, goes on a new
    one instead of queueing behind replies that may never come."""
    import signal

    server = redis_factory()
    admin = Redis.from_url(server.url)
    try:
        async with _direct_on(server.url + "?socket_timeout=0.4") as (client, direct):
            echo = await client.script_load(ECHO)
            assert await direct.evalsha(echo, ["k"], [0, 0]) == [b"k", b"0", b"0"]
            made = (await admin.info("stats"))["total_connections_received"]
            server.proc.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(TimeoutError):
                    await direct.evalsha(echo, ["k"], [1, 1], give_up_s=0.05)
                pipe = direct._pipe
                assert pipe is not None and pipe.broken is None  # only given up on
                await asyncio.sleep(0.6)
                assert isinstance(pipe.broken, RedisTimeoutError)  # dropped at 0.4 s
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert await direct.evalsha(echo, ["k"], [2, 2]) == [b"k", b"2", b"2"]
            made_after = (await admin.info("stats"))["total_connections_received"]
            assert made_after == made + 1  # a new connection (admin reuses its own)
    finally:
        await admin.aclose()


async def test_callers_wait_for_one_new_connection_each_within_its_own_bound(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    """Redis stalled past the socket timeout (the connection dropped), then calls keep
    coming: each gives up within its own bound, connecting included, and they share one
    attempt to connect instead of queueing one attempt each behind a lock."""
    import signal

    server = redis_factory()
    async with _direct_on(server.url + "?socket_timeout=0.4") as (client, direct):
        echo = await client.script_load(ECHO)
        assert await direct.evalsha(echo, ["k"], [0, 0]) == [b"k", b"0", b"0"]
        server.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError):
                await direct.evalsha(echo, ["k"], [1, 1], give_up_s=0.05)
            await asyncio.sleep(0.5)  # dropped at its socket timeout
            loop = asyncio.get_running_loop()

            async def timed() -> float:
                started = loop.time()
                with pytest.raises((TimeoutError, RedisTimeoutError, RedisConnectionError)):
                    await direct.evalsha(echo, ["k"], [2, 2], give_up_s=0.2)
                return loop.time() - started

            took = await asyncio.gather(*(timed() for _ in range(4)))
            assert max(took) < 0.5, took  # not 0.2 s (or a whole connect) per caller
        finally:
            server.proc.send_signal(signal.SIGCONT)
        for _ in range(50):  # the shared attempt may still be failing: then a new one
            with contextlib.suppress(TimeoutError, RedisTimeoutError, RedisConnectionError):
                assert await direct.evalsha(echo, ["k"], [3, 3], give_up_s=1) == [b"k", b"3", b"3"]
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("no call succeeded after Redis came back")


async def test_after_a_caller_gives_up_new_calls_go_to_a_new_connection(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    """A connection that goes silent without a sign (a half-open socket, a black hole)
    keeps nothing waiting on it: once a call on it is given up on, the next call is sent on
    a new connection and answered, instead of every call failing until the socket timeout."""
    server = redis_factory()
    relay = SilentRelay(server.port)
    proxy, port = await relay.start()
    try:
        async with _direct_on(f"redis://127.0.0.1:{port}/0?socket_timeout=5") as (
            _,
            direct,
        ):
            admin = Redis.from_url(server.url)
            echo = await admin.script_load(ECHO)
            await admin.aclose()
            assert await direct.evalsha(echo, ["k"], [0, 0]) == [b"k", b"0", b"0"]
            with pytest.raises(TimeoutError):
                await direct.evalsha(echo, ["k"], [1, 1], give_up_s=0.1)
            assert await direct.evalsha(echo, ["k"], [2, 2], give_up_s=1) == [b"k", b"2", b"2"]
            assert len(relay.after) == 1  # one new connection
    finally:
        proxy.close()


async def test_a_reply_that_does_not_decode_fails_the_connection_not_another_call(
    redis_server: RedisServerProcess,
) -> None:
    """With ``decode_responses``, bytes that are not UTF-8 (a reply's, or a push's: hiredis
    does not say which) fail the calls on the connection with a redis error; none is given
    another call's reply, and the next call goes to a new connection."""
    async with _direct_on(redis_server.url + "?decode_responses=true") as (client, direct):
        raw = await client.script_load("return ARGV[1]")
        values = [b"ok-0", b"\xff\xfe", b"ok-2"]
        calls = [direct.evalsha(raw, [], [value]) for value in values]
        replies = await asyncio.gather(*calls, return_exceptions=True)
        assert replies[0] == "ok-0"
        assert isinstance(replies[1], DataError)  # (redis-py raises UnicodeDecodeError)
        assert replies[2] == "ok-2" or isinstance(replies[2], DataError)
        assert await direct.evalsha(raw, [], ["again"]) == "again"


async def test_a_call_after_close_does_not_leave_its_connection_open(client: Redis) -> None:
    """A call made after ``aclose`` (a late heartbeat) gets its connection closed after its
    reply, also when its caller gave up on it first."""
    slow = await client.script_load(SLOW)
    direct = DirectCalls(client)
    count = _clients(client)
    before = await count()
    await direct.aclose()
    with pytest.raises(TimeoutError):
        await direct.evalsha(slow, [], [300_000], give_up_s=0.01)
    await _until_clients(count, before, polls=200)


async def test_a_connection_closed_with_its_handshake_fails_the_call_at_once(
    redis_server: RedisServerProcess,
) -> None:
    """The server answers the handshake and closes (a restart, ``CLIENT KILL``): the call
    fails with a connection error at once, on both loops (uvloop's write raised a
    ``RuntimeError`` no caller expected; asyncio's went nowhere until the socket timeout)."""

    async def answer_then_close(
        client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", redis_server.port)
        seen = b""
        try:
            while data := await client_r.read(65536):
                seen += data
                redis_w.write(data)
                await asyncio.sleep(0.05)  # every reply of what was sent
                client_w.write(await redis_r.read(65536))
                if b"LIB-VER" in seen:  # the handshake's last command (redis-py 5+)
                    await client_w.drain()
                    return
        finally:
            client_w.close()
            redis_w.close()

    proxy = await asyncio.start_server(answer_then_close, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    admin = Redis.from_url(redis_server.url)
    loop = asyncio.get_running_loop()
    try:
        sha = await admin.script_load(ECHO)
        async with _direct_on(f"redis://127.0.0.1:{port}/0?socket_timeout=3") as (_, direct):
            started = loop.time()
            with pytest.raises(RedisConnectionError):
                await direct.evalsha(sha, ["k"], [1, 2])
            assert loop.time() - started < 1.5
    finally:
        proxy.close()
        await admin.aclose()


async def test_a_reply_that_does_not_decode_is_a_redis_error(
    redis_server: RedisServerProcess,
) -> None:
    """It must be one of the errors the runner turns into the store's failure."""
    from proxy.backend.client import FAILURES

    async with _direct_on(redis_server.url + "?decode_responses=true") as (client, direct):
        raw = await client.script_load("return ARGV[1]")
        with pytest.raises(DataError) as caught:
            await direct.evalsha(raw, [], [b"\xff"])
        assert isinstance(caught.value, FAILURES)


async def test_a_connection_made_after_close_closes_even_if_its_caller_gave_up_connecting(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    """``aclose`` while a caller waits for a connection it then gives up on: the connection
    that comes afterwards, never used, is closed within the socket timeout."""
    server = redis_factory()
    admin = Redis.from_url(server.url)
    try:
        async with _direct_on(server.url + "?socket_timeout=0.5") as (_, direct):
            sha = await admin.script_load(ECHO)
            base = len(await admin.client_list())
            busy = asyncio.ensure_future(admin.eval(BUSY_MS, 0, 400))
            await asyncio.sleep(0.05)
            with pytest.raises(TimeoutError):  # connecting takes longer than its bound
                await direct.evalsha(sha, ["k"], [1, 2], give_up_s=0.1)
            await direct.aclose()
            await busy
            connecting = direct._connecting
            assert connecting is not None
            pipe = await connecting  # the connection that came after the close
            for _ in range(250):  # closed at the socket timeout (0.5 s)
                if pipe.transport.is_closing():
                    break
                await asyncio.sleep(0.02)
            assert pipe.transport.is_closing()
            await _until_clients(_clients(admin), base, polls=250, at_most=True)
    finally:
        await admin.aclose()


async def test_close_with_only_abandoned_calls_closes_at_once(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    """At shutdown during a stall the late calls are cancelled, then ``aclose``: nobody
    waits for a reply, so the connection closes now, not at the socket timeout (or never,
    if the loop ends first)."""
    import signal

    server = redis_factory()
    async with _direct_on(server.url) as (client, direct):
        echo = await client.script_load(ECHO)
        assert await direct.evalsha(echo, ["k"], [0, 0]) == [b"k", b"0", b"0"]
        pipe = direct._pipe
        assert pipe is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            late = asyncio.ensure_future(direct.evalsha(echo, ["k"], [1, 1]))
            await asyncio.sleep(0.05)  # written
            late.cancel()
            await asyncio.gather(late, return_exceptions=True)
            await direct.aclose()
            assert pipe.transport.is_closing()
        finally:
            server.proc.send_signal(signal.SIGCONT)
