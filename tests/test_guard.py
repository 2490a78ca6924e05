"""The connection guard's framing edges, over raw sockets against a real Sluice process.

Bad chunk framing after a body started, stray bytes sent while an answer streams, a
pipelined batch followed by a half-close, and a partial head behind a body's last bytes:
each must be answered (Bedrock-shaped, naming what is at fault) or timed out on time, and
must leave no slot, connection or half-open socket behind.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hostile_cases import FUZZ_SECRET_ENV, HAIKU, SONNET, fuzz_policy, request
from tests.support.processes import Simulator, Sluice, http_json, metric_value

TIMEOUT_S = 1.0
#: requests still sending their body, at most (three bad ones in a row would exhaust it).
UNAUTH_CAP = 2


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sluice]:
    policy = fuzz_policy(TIMEOUT_S)
    policy["server"]["connections"]["max_unauthenticated_requests"] = UNAUTH_CAP  # type: ignore[index]
    p = Sluice(
        tmp_path_factory.mktemp("guard"),
        upstream=simulator.url,
        policy=policy,
        env={FUZZ_SECRET_ENV: "x"},
    )
    yield p
    p.stop()


@pytest.fixture
def slow_sim(simulator: Simulator) -> Iterator[Simulator]:
    """The session simulator at full latency (about 25 ms a token); reset afterwards."""
    simulator.reset()
    before = http_json("GET", simulator.url + "/_sim/config")["latency_scale"]
    simulator.configure({"latency_scale": 1.0})
    yield simulator
    simulator.configure({"latency_scale": before})
    simulator.reset()


def _metrics(p: Sluice) -> str:
    with urllib.request.urlopen(p.url + "/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def _logs(p: Sluice) -> str:
    return Path(p.stdout_path).read_text(errors="replace") + Path(p.stderr_path).read_text(
        errors="replace"
    )


def _answer(sock: socket.socket, buffered: bytes = b"") -> tuple[int, dict[str, str], bytes, bytes]:
    """One Content-Length framed answer off ``sock`` (``buffered``: bytes already read):
    status, headers, body, and the bytes after it."""
    data, lines = buffered, ["HTTP/1.1 100 -"]
    while 100 <= int(lines[0].split()[1]) < 200:  # interim answers (probes) are skipped
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            assert more, f"closed without an answer: {data!r}"
            data += more
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
    rest = data
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        more = sock.recv(65536)
        assert more, "closed inside an answer"
        rest += more
    return int(lines[0].split()[1]), headers, rest[:length], rest[length:]


def _closed(sock: socket.socket, within_s: float) -> bool:
    """Does the server close ``sock`` (EOF or reset) within ``within_s``?"""
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


def _converse(text: str = "hi", path: str = f"/model/{HAIKU}/converse") -> bytes:
    body = json.dumps({"messages": [{"role": "user", "content": [{"text": text}]}]}).encode()
    return request("POST", path, body)


CHUNKED_HEAD = request(
    "POST", f"/model/{HAIKU}/converse", headers=[("Transfer-Encoding", "chunked")], length=False
)


# --- bad chunk framing once the body started -------------------------------------------


@pytest.mark.parametrize("client_closes", [False, True])
def test_bad_chunk_framing_after_the_body_started_is_a_400_and_frees_its_slot(
    proxy: Sluice, client_closes: bool
) -> None:
    """The parser's error mid-body ends that body (it never completes otherwise): a 400
    naming the chunked encoding, the connection closed, the unauthenticated slot given
    back. More of them than the cap must not lock split-body requests out."""
    for _ in range(UNAUTH_CAP + 1):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(CHUNKED_HEAD)
            time.sleep(0.3)  # the handler is waiting for the body
            sock.sendall(b"5\r\nabcde\r\nZZ\r\n")
            if client_closes:
                sock.shutdown(socket.SHUT_WR)
            status, headers, body, _ = _answer(sock)
            assert status == 400, body
            assert headers["x-amzn-errortype"].startswith("ValidationException:")
            assert "chunked transfer encoding" in json.loads(body)["message"]
            assert _closed(sock, 3)
    deadline = time.monotonic() + 3
    while (text := _metrics(proxy)) and metric_value(text, "sluice_unauthenticated_requests"):
        assert time.monotonic() < deadline, "an unauthenticated slot was never given back"
        time.sleep(0.05)
    assert metric_value(text, "sluice_protocol_errors_total", reason="chunked") >= UNAUTH_CAP + 1
    assert "Traceback" not in _logs(proxy)
    # A well-formed chunked request whose body comes in two parts is still served.
    good = json.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(CHUNKED_HEAD)
        time.sleep(0.3)
        sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(good), good))
        assert _answer(sock)[0] == 200


# --- bytes sent while an answer streams --------------------------------------------------


def _stream_request() -> bytes:
    """A ConverseStream call the slowed simulator takes about 2 s to answer (past the 1 s
    header timeout)."""
    return _converse("s [[sim:output_tokens=80]]", f"/model/{SONNET}/converse-stream")


def _read_stream(sock: socket.socket, within_s: float) -> bytes:
    """A chunked answer's bytes up to its last chunk (whatever comes after is left)."""
    sock.settimeout(within_s)
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        more = sock.recv(65536)
        assert more, f"the stream was cut after {len(data)} bytes"
        data += more
    return data


def test_a_stray_crlf_during_a_streaming_answer_neither_cuts_it_nor_the_connection(
    proxy: Sluice, slow_sim: Simulator
) -> None:
    """RFC 9112 2.2: a CRLF before a request line is ignored, so it arms no header timer."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(_stream_request())
        time.sleep(0.2)
        sock.sendall(b"\r\n")
        started = time.monotonic()
        stream = _read_stream(sock, 10)
        assert time.monotonic() - started > TIMEOUT_S + 0.3  # it outlived the header timeout
        assert stream.startswith(b"HTTP/1.1 200")
        sock.sendall(request("GET", "/healthz"))  # the connection is still good
        assert _answer(sock)[0] == 200


def test_a_partial_head_during_a_streaming_answer_does_not_cut_it(
    proxy: Sluice, slow_sim: Simulator
) -> None:
    """The head's timeout, while an answer streams, closes the connection after the
    answer: nothing is interleaved into it and it is not cut short."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(_stream_request())
        time.sleep(0.2)
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        stream = _read_stream(sock, 10)
        assert stream.startswith(b"HTTP/1.1 200") and b"messageStop" in stream
        assert _closed(sock, 2)
    assert not [r for r in proxy.access_log() if r.get("status") == 499]  # nobody left


# --- half-close and partial heads ------------------------------------------------------


def test_pipelined_requests_then_a_half_close_are_all_answered(proxy: Sluice) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(_converse("one") + _converse("two") + request("GET", "/healthz"))
        sock.shutdown(socket.SHUT_WR)
        rest = b""
        statuses = []
        for _ in range(3):
            status, _, _, rest = _answer(sock, rest)
            statuses.append(status)
        assert statuses == [200, 200, 200]
        assert rest == b"" and _closed(sock, 2)


@pytest.mark.parametrize(
    ("chunked", "split"), [(False, 0), (True, 0), (True, 1), (True, 2), (True, 3)]
)
def test_a_partial_head_behind_the_last_body_bytes_gets_the_header_timeout(
    proxy: Sluice, chunked: bool, split: int
) -> None:
    """The next head's first bytes in the read that ends a body: answered 408 after the
    header timeout (1 s here), not left to the keep-alive timeout (2 s). ``split``: the
    last chunk's final CRLF CRLF ends that many bytes into the read (the rest came before)."""
    full = _converse()
    cut = full.index(b"\r\n\r\n") + 4
    head, body = full[:cut], full[cut:]
    if chunked:
        head = CHUNKED_HEAD
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(head)
        time.sleep(0.2)  # the body timer is armed: the body is a read of its own
        if split:
            sock.sendall(body[:-split])
            time.sleep(0.2)  # a read of its own: the body has not ended yet
            body = body[-split:]
        sock.sendall(body + b"GET /healthz HTTP/1.1\r\n")
        started = time.monotonic()
        status, _, _, rest = _answer(sock)
        assert status == 200
        status, _, answer, _ = _answer(sock, rest)
        assert status == 408 and b"header_timeout_seconds" in answer
        assert time.monotonic() - started < TIMEOUT_S + 0.7
