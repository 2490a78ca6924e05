"""Hostile input, slow clients and one-request lockouts, over raw sockets (issue 10).

A real Sluice process on a real Redis in front of the simulator is sent what an
attacker or a careless client sends. Every answer must be Bedrock-shaped and name the
limit at fault, no connection may outlive its timeout, nothing Sluice logs may quote a
prompt or a credential, and no lease may be left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.hostile import Answer, problems, run, send
from tests.support.hostile_cases import (
    FUZZ_KEY_ID,
    FUZZ_SECRET_ENV,
    HAIKU,
    PROMPT_CANARY,
    SECRET_CANARY,
    SONNET,
    Case,
    converse_body,
    fuzz_policy,
    request,
)
from tests.support.processes import Simulator, Sluice, bedrock_client, http_json, metric_value
from tests.support.redis_fixtures import RedisServerProcess

FUZZ_SECRET = "fuzz-secret-" + SECRET_CANARY
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def fuzz_redis() -> Iterator[RedisServerProcess]:
    server = RedisServerProcess().start()
    yield server
    server.cleanup()


def _hostile_proxy(
    simulator: Simulator, redis_url: str, workdir: Path, tls: Any = None, **env: str
) -> Sluice:
    """Sluice on the fuzz policy and a real Redis (``env``: more of its environment;
    ``tls``: served over HTTPS with these files)."""
    env = {FUZZ_SECRET_ENV: FUZZ_SECRET, **env}
    policy = fuzz_policy(TIMEOUT_S)
    return Sluice(
        workdir, upstream=simulator.url, policy=policy, redis_url=redis_url, env=env, tls=tls
    )


@pytest.fixture(scope="module")
def proxy(
    simulator: Simulator, fuzz_redis: RedisServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sluice]:
    p = _hostile_proxy(simulator, fuzz_redis.url, tmp_path_factory.mktemp("hostile"))
    yield p
    p.stop()


def play(p: Sluice, case: Case, timeout_s: float = 10.0) -> Answer:
    return asyncio.run(send("127.0.0.1", p.port, case, timeout_s, TIMEOUT_S * 3 + 5))


def message(answer: Answer) -> str:
    assert problems(answer, allow_5xx=True) == [], problems(answer, allow_5xx=True)
    return str(json.loads(answer.body)["message"])


def logs(p: Sluice) -> str:
    return Path(p.stdout_path).read_text(errors="replace") + Path(p.stderr_path).read_text(
        errors="replace"
    )


# --- the HTTP parser's rejections ------------------------------------------------------

PARSER_CASES = [
    (
        request("GET", "/healthz", headers=[("X-Long", "a" * 9000)]),
        "server.connections.max_header_line_bytes",
    ),
    (request("GET", "/" + "a" * 9000), "server.connections.max_header_line_bytes"),
    (
        request("GET", "/healthz", raw_headers=b"".join(b"X-%d: y\r\n" % i for i in range(10_000))),
        "server.connections.max_headers",
    ),
    (
        request("POST", f"/model/{HAIKU}/converse", b"{}", raw_headers=b"Content-Length: 3\r\n"),
        "Content-Length",
    ),
    (b"G(ET / HTTP/1.1\r\nHost: x\r\n\r\n", "method"),
    (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", "HTTP/1.0 or HTTP/1.1"),
    (request("GET", "/healthz", raw_headers=b"X-A: a\x01b\r\n"), "header"),
    # A repeated singleton header is named, not called "a character HTTP does not allow".
    (
        request(
            "POST",
            f"/model/{HAIKU}/converse",
            b"{}",
            [("Content-Type", "application/json")],
            raw_headers=b"content-type: text/plain\r\n",
        ),
        "the header 'Content-Type' appears more than once",
    ),
    (request("GET", "/healthz", raw_headers=b"Host: other\r\n"), "the header 'Host' appears"),
]


@pytest.mark.parametrize(("data", "named"), PARSER_CASES)
def test_parser_rejection_is_bedrock_shaped_and_names_the_limit(
    proxy: Sluice, data: bytes, named: str
) -> None:
    answer = play(proxy, Case("parser", data))
    assert answer.status == 400
    assert answer.headers["x-amzn-errortype"].startswith("ValidationException:")
    assert named in message(answer)
    assert b"aaaa" not in answer.body  # the offending bytes are never echoed


# --- Sluice's own former 5xx ---------------------------------------------------------


def test_json_nested_past_the_estimator_is_a_400(proxy: Sluice) -> None:
    nest = b"[" * 1000 + b"]" * 1000
    body = b'{"messages":[{"role":"user","content":[{"text":"hi"}]}],"x":' + nest + b"}"
    answer = play(proxy, Case("deep", request("POST", f"/model/{HAIKU}/converse", body)))
    assert answer.status == 400
    assert "nested" in message(answer)


@pytest.mark.parametrize(
    "header", ["x-sluice-workload", "x-sluice-priority", "X-Amzn-Bedrock-Trace", "x-other"]
)
def test_undecodable_header_bytes_are_a_400_naming_the_header(proxy: Sluice, header: str) -> None:
    raw = header.encode() + b": \xff\xfe" + SECRET_CANARY.encode() + b"\r\n"
    data = request(
        "POST", f"/model/{HAIKU}/converse", converse_body(random.Random(1), 8), raw_headers=raw
    )
    answer = play(proxy, Case("bytes", data))
    assert answer.status == 400
    assert f"header '{header}' is not valid UTF-8" in message(answer)


# --- slow and half-closed clients ----------------------------------------------------


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"POST /model/x/converse HTTP/1.1\r\nHost: x\r\n", "header_timeout_seconds"),
        (
            request("POST", f"/model/{HAIKU}/converse", b'{"messages": []}')[:-4],
            "body_timeout_seconds",
        ),
        (
            request(
                "POST",
                f"/model/{HAIKU}/converse",
                b"ffffffffffffffff\r\n{",
                [("Transfer-Encoding", "chunked")],
                length=False,
            ),
            "body_timeout_seconds",
        ),
    ],
)
def test_stalled_request_is_answered_408_and_closed_within_its_timeout(
    proxy: Sluice, data: bytes, named: str
) -> None:
    answer = play(proxy, Case("slow", data, slow=True))
    assert answer.status == 408
    assert named in message(answer)
    assert answer.closed_after is not None and answer.closed_after < TIMEOUT_S + 2


def _read_status(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 answer's status and body, read off a raw socket (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(v) for k, _, v in (h.partition(": ") for h in lines) if k.lower() == "content-length"
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split()[1]), body


def test_stalled_body_of_a_later_request_on_the_connection_is_answered_408_on_time(
    proxy: Sluice,
) -> None:
    # The first body arrives after its head, so its body timer is armed; it is cancelled
    # when the body completes, and the second body's own must fire neither early nor late.
    full = request("POST", f"/model/{HAIKU}/converse", converse_body(random.Random(3), 2))
    cut = full.index(b"\r\n\r\n") + 4
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(full[:cut])
        time.sleep(0.1)
        sock.sendall(full[cut:])
        assert _read_status(sock)[0] == 200
        time.sleep(TIMEOUT_S / 2)
        stalled = request("POST", f"/model/{HAIKU}/converse", b'{"messages": []}')[:-4]
        started = time.monotonic()
        sock.sendall(stalled)
        status, body = _read_status(sock)
        elapsed = time.monotonic() - started
    assert status == 408 and b"body_timeout_seconds" in body
    assert TIMEOUT_S - 0.1 < elapsed < TIMEOUT_S + 2


def test_pipelined_requests_are_answered_in_order_on_one_connection(proxy: Sluice) -> None:
    """Requests sent back to back before any answer (the connection's queue of parsed
    requests is Sluice's SmallQueue, not aiohttp's deque) come back whole and in order."""
    rng = random.Random(5)
    bodies = [converse_body(rng, n) for n in (1, 3, 2, 4)]
    data = b"".join(request("POST", f"/model/{HAIKU}/converse", body) for body in bodies)
    data = request("GET", "/healthz", b"") + data
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(data)  # all five in one write: parsed together, queued
        buffered = b""
        answers: list[tuple[int, bytes]] = []
        while len(answers) < 5:
            while b"\r\n\r\n" not in buffered:
                buffered += sock.recv(65536)
            head, _, rest = buffered.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next(
                int(v)
                for k, _, v in (h.partition(": ") for h in lines)
                if k.lower() == "content-length"
            )
            while len(rest) < length:
                rest += sock.recv(65536)
            answers.append((int(lines[0].split()[1]), rest[:length]))
            buffered = rest[length:]
    assert [status for status, _ in answers] == [200] * 5
    assert json.loads(answers[0][1]) == {"status": "ok"}
    assert all("output" in json.loads(body) for _, body in answers[1:])


def test_idle_connection_is_closed_after_the_keepalive_timeout(proxy: Sluice) -> None:
    answer = play(proxy, Case("idle", b"", slow=True))
    assert answer.error is None and answer.closed_after is not None
    assert TIMEOUT_S * 2 - 0.2 < answer.closed_after < TIMEOUT_S * 2 + 2


def test_half_closed_client_still_gets_its_answer(proxy: Sluice) -> None:
    data = request("POST", f"/model/{HAIKU}/converse", converse_body(random.Random(2), 8))
    answer = play(proxy, Case("half", data, half_close=True))
    assert answer.status == 200, answer


@pytest.fixture
def slow_sim(simulator: Simulator) -> Iterator[Simulator]:
    """The session simulator at full latency (about 25 ms a token); reset afterwards."""
    simulator.reset()
    before = http_json("GET", simulator.url + "/_sim/config")["latency_scale"]
    simulator.configure({"latency_scale": 1.0})
    yield simulator
    simulator.configure({"latency_scale": before})  # (a reset keeps the config)
    simulator.reset()


def _slow_converse(version: str = "HTTP/1.1") -> bytes:
    """A Converse call the simulator answers in about a second (40 tokens at its pace)."""
    body = json.dumps(
        {"messages": [{"role": "user", "content": [{"text": "s [[sim:output_tokens=40]]"}]}]}
    )
    data = request("POST", f"/model/{SONNET}/converse", body.encode())
    return data.replace(b"HTTP/1.1", version.encode(), 1)


@pytest.fixture(scope="module")
def asyncio_proxy(
    simulator: Simulator, fuzz_redis: RedisServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sluice]:
    """The same Sluice on asyncio's own event loop instead of uvloop."""
    workdir = tmp_path_factory.mktemp("hostile-asyncio")
    p = _hostile_proxy(simulator, fuzz_redis.url, workdir, SLUICE_EVENT_LOOP="asyncio")
    yield p
    p.stop()


LOOPS = ["uvloop", "asyncio"]


def _on(loop: str, request: pytest.FixtureRequest) -> Sluice:
    return request.getfixturevalue("proxy" if loop == "uvloop" else "asyncio_proxy")  # type: ignore[no-any-return]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_half_closed_client_of_a_slow_call_gets_its_answer_through_the_probes(
    request: pytest.FixtureRequest, slow_sim: Simulator, version: str, loop: str
) -> None:
    """Its FIN is probed with interim ``100 Continue`` answers (a closed socket would answer
    them with a reset): it skips them and reads its answer. Five at most (Go's client
    gives up after more); an HTTP/1.0 client is never sent a 1xx, so it is never probed."""
    answer = play(_on(loop, request), Case("half", _slow_converse(version), half_close=True))
    assert answer.status == 200, answer
    assert json.loads(answer.body)["usage"]["outputTokens"] == 40
    if version == "HTTP/1.1":
        assert 3 <= answer.interim <= 5, answer  # at its FIN, 50 ms and 300 ms later, ...
    else:
        assert answer.interim == 0, answer


def _gone(p: Sluice) -> int:
    return len([r for r in p.access_log() if r.get("status") == 499 and r.get("disconnected")])


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("after_s", [0.0, 0.3])
def test_a_client_that_closes_its_socket_has_its_call_cancelled_upstream(
    request: pytest.FixtureRequest, slow_sim: Simulator, after_s: float, loop: str
) -> None:
    """A caller that gives up (a client timeout closes the socket) sends the same FIN as a
    half-close: the probe's reset tells them apart. Its call is cancelled at once, not run
    to the end on the quota, and the access log records a 499 -- also when the FIN comes
    right behind the request, before the handler has started (``after_s`` 0)."""
    proxy, simulator = _on(loop, request), slow_sim
    before, gone = simulator.stats()["models"][SONNET], _gone(proxy)

    async def leave() -> float:
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(_slow_converse())
        await writer.drain()
        await asyncio.sleep(after_s)  # 0.3: the call is out at the simulator
        writer.close()  # no unread byte: a FIN, not a reset
        await writer.wait_closed()
        return time.monotonic()

    left = asyncio.run(leave())
    while _gone(proxy) == gone:
        assert time.monotonic() - left < 3, "no 499: the call ran on after its caller left"
        time.sleep(0.05)
    assert time.monotonic() - left < 0.9  # cancelled, not answered (the call takes ~1 s)
    time.sleep(1.2 - (time.monotonic() - left))  # past the end of the call, had it run
    after = simulator.stats()["models"][SONNET]
    assert after["output_tokens"] == before["output_tokens"]  # nothing generated for nobody
    if after_s:
        assert after["requests"] == before["requests"] + 1  # it was out at the simulator...
        assert after["cancelled"] == before["cancelled"] + 1  # ...and cut short there


def test_a_tls_client_that_closes_its_socket_has_its_call_cancelled(
    slow_sim: Simulator, fuzz_redis: RedisServerProcess, tls_files: Any, tmp_path: Path
) -> None:
    """Over HTTPS a FIN ends the call at once (TLS has no half-close here): 499, nothing
    generated for nobody, and no probe bytes are written into the TLS stream."""
    import ssl

    p = _hostile_proxy(slow_sim, fuzz_redis.url, tmp_path, tls=tls_files)
    try:
        before = slow_sim.stats()["models"][SONNET]

        async def leave() -> None:
            ctx: ssl.SSLContext = tls_files.client_context()
            _, writer = await asyncio.open_connection("127.0.0.1", p.port, ssl=ctx)
            writer.write(_slow_converse())
            await writer.drain()
            await asyncio.sleep(0.3)
            writer.close()  # close_notify and FIN, as a client's timeout does
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

        asyncio.run(leave())
        deadline = time.monotonic() + 3
        while _gone(p) == 0:
            assert time.monotonic() < deadline, "no 499 over TLS"
            time.sleep(0.05)
        time.sleep(1.0)
        after = slow_sim.stats()["models"][SONNET]
        assert after["output_tokens"] == before["output_tokens"]
        assert "eof_received" not in logs(p)  # asyncio's "no effect when using ssl" warning
    finally:
        p.stop()


# --- caps on connections and unauthenticated requests ----------------------------------


def test_connection_and_unauthenticated_caps_answer_503_naming_the_limit(
    simulator: Simulator, tmp_path: Path
) -> None:
    policy = fuzz_policy(timeout_s=5.0, max_connections=20)
    policy["server"]["connections"]["max_unauthenticated_requests"] = 3  # type: ignore[index]
    p = Sluice(tmp_path, upstream=simulator.url, policy=policy, env={FUZZ_SECRET_ENV: "x"})
    held: list[socket.socket] = []
    try:
        partial = request("POST", f"/model/{HAIKU}/converse", b'{"messages": []}')[:-4]
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", p.port))
            s.sendall(partial)
            held.append(s)
        time.sleep(0.3)  # let the server parse the three heads
        answer = play(p, Case("unauth", partial))
        assert answer.status == 503
        assert "server.connections.max_unauthenticated_requests" in message(answer)
        while len(held) < 20:
            held.append(socket.create_connection(("127.0.0.1", p.port)))
        time.sleep(0.3)
        answer = play(p, Case("conn", request("GET", "/healthz")))
        assert answer.status == 503
        assert "server.connections.max_connections" in message(answer)
        for s in held:
            s.close()
        held.clear()
        deadline = time.monotonic() + 5
        while play(p, Case("ok", request("GET", "/healthz"))).status != 200:
            assert time.monotonic() < deadline, "the cap did not lift when connections closed"
            time.sleep(0.05)
        text = urlopen_text(p.url + "/metrics")
        assert metric_value(text, "sluice_client_refused_total", limit="max_connections") >= 1
        assert (
            metric_value(text, "sluice_client_refused_total", limit="max_unauthenticated_requests")
            >= 1
        )
    finally:
        for s in held:
            s.close()
        p.stop()


def urlopen_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


# --- one request must never lock a pool ------------------------------------------------


def lockout_policy() -> dict[str, Any]:
    return {
        "identity": {"header_mode": True, "default_workload": "anon"},
        "server": {"retry": {"max_retries": 0}},
        "models": {
            # 60,000 tokens/min: a 10,000-token bucket refilling in 10 s.
            "sonnet": {"ids": [SONNET], "tokens_per_minute": 60_000, "concurrency": 50},
            "haiku": {"ids": [HAIKU], "tokens_per_minute": 60_000, "max_output_tokens": 2048},
        },
        "priorities": {"P0": {"share": 1.0}, "P2": {"share": 0.6}},
        "workloads": {"anon": {"priority": "P2"}, "chat": {"priority": "P0"}},
    }


def test_an_absurd_output_cap_cannot_lock_p0_out_of_a_pool(
    simulator: Simulator, tmp_path: Path
) -> None:
    p = Sluice(tmp_path, upstream=simulator.url, policy=lockout_policy())
    rng = random.Random(3)
    try:
        for model in (SONNET, HAIKU):
            # The anonymous, low-class caller asks for 2**62 output tokens, twice.
            for _ in range(2):
                body = converse_body(rng, 2**62)
                answer = play(p, Case("huge", request("POST", f"/model/{model}/converse", body)))
                assert answer.status == 400, answer
                if model == SONNET:  # no declared ceiling: the reservation cannot ever fit
                    text = message(answer)
                    assert "pool.tokens_per_minute" in text
                    assert "inferenceConfig.maxTokens" in text
            # P0 is served at once, without waiting for any refill.
            good = request(
                "POST",
                f"/model/{model}/converse",
                converse_body(rng, 64),
                [("x-sluice-workload", "chat")],
            )
            answer = play(p, Case("p0", good))
            assert answer.status == 200, answer
        # Filling the class's share the honest way (real usage is settled): the refusal's
        # wait is at most the bucket's refill time (10 s), never the 86,400 s cap.
        long_prompt = {"role": "user", "content": [{"text": "word " * 2400}]}  # ~3,000 tokens
        for _ in range(20):
            body = json.dumps({"messages": [long_prompt]}).encode()
            answer = play(p, Case("big", request("POST", f"/model/{SONNET}/converse", body)))
            if answer.status == 429:
                assert 1 <= int(answer.headers["retry-after"]) <= 10, answer.headers
                break
        else:
            pytest.fail("the class share never refused")
    finally:
        p.stop()


# --- the seeded fuzz run ------------------------------------------------------------------


@pytest.mark.slow
def test_seeded_fuzz_run_leaves_no_5xx_hang_leak_or_logged_secret(
    proxy: Sluice, fuzz_redis: RedisServerProcess, record_property: Any
) -> None:
    started = time.monotonic()
    answers = asyncio.run(run("127.0.0.1", proxy.port, 3000, seed=10, timeout_s=TIMEOUT_S))
    seconds = time.monotonic() - started
    found = [msg for a in answers for msg in problems(a)]
    kinds: dict[str, int] = {}
    for a in answers:
        kinds[a.case.kind] = kinds.get(a.case.kind, 0) + 1
    record_property("fuzz_requests", len(answers))
    record_property("fuzz_seconds", round(seconds, 1))
    assert len(answers) == 3000
    assert found == [], found[:20]
    # A good, signed call still succeeds afterwards.
    client = bedrock_client(proxy.url, key_id=FUZZ_KEY_ID, secret=FUZZ_SECRET)
    reply = client.converse(
        modelId=HAIKU, messages=[{"role": "user", "content": [{"text": "still there?"}]}]
    )
    assert reply["ResponseMetadata"]["HTTPHeaders"]["x-sluice-workload"] == "chat"
    # Every lease was released (settles are asynchronous: give them a moment).
    inspect = redis.Redis.from_url(fuzz_redis.url)
    try:
        deadline = time.monotonic() + 10
        while (held := sum(int(inspect.zcard(k)) for k in inspect.scan_iter("sluice:*leases"))) > 0:
            assert time.monotonic() < deadline, f"{held} leases left after the run"
            time.sleep(0.1)
    finally:
        inspect.close()
    text = logs(proxy)
    assert PROMPT_CANARY not in text
    assert SECRET_CANARY not in text
    assert "Traceback" not in text
    metrics = urlopen_text(proxy.url + "/metrics")
    assert metric_value(metrics, "sluice_protocol_errors_total") > 0
    assert metric_value(metrics, "sluice_client_timeouts_total") > 0
