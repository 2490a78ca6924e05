"""Playing hostile requests over raw sockets and judging the answers.

:func:`send` plays one :class:`~tests.support.hostile_cases.Case` on its own connection;
:func:`problems` says what is wrong with the answer (missing, a 5xx, not Bedrock-shaped,
a connection open past its timeout); :func:`run` plays a seeded batch.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

from tests.support.hostile_cases import Case, generate


@dataclass(slots=True)
class Answer:
    """What came back on one connection."""

    case: Case
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0
    #: Seconds until the server closed the connection after a slow case (None: not waited).
    closed_after: float | None = None
    error: str | None = None
    #: Interim (1xx) answers read before it.
    interim: int = 0


async def _read_answer(reader: asyncio.StreamReader, answer: Answer) -> None:
    lines = ["HTTP/1.1 100 -"]
    while 100 <= int(lines[0].split(" ")[1]) < 200:  # interim answers, skipped as by any client
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        answer.interim += int(lines[0].split(" ")[1]) < 200
    answer.status = int(lines[0].split(" ")[1])
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            answer.headers[k.strip().lower()] = v.strip()
    length = int(answer.headers.get("content-length", "0") or 0)
    answer.body = await reader.readexactly(length) if length else b""


async def _wait_closed(reader: asyncio.StreamReader, answer: Answer, close_s: float) -> None:
    started = time.monotonic() - answer.seconds
    try:
        async with asyncio.timeout(close_s):
            while await reader.read(65536):
                pass
    except ConnectionError:
        pass
    except TimeoutError:
        answer.error = answer.error or f"connection still open {close_s} s later"
        return
    answer.closed_after = time.monotonic() - started


async def send(host: str, port: int, case: Case, timeout_s: float, close_s: float) -> Answer:
    """Send ``case`` on a new connection and read the first answer (within ``timeout_s``);
    after a slow case also wait (``close_s`` at most) for the server to close."""
    answer = Answer(case)
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(case.data)
        if case.half_close:
            writer.write_eof()
        if not case.data:  # silent client: no answer is due, only the idle close
            await _wait_closed(reader, answer, close_s)
            return answer
        try:
            async with asyncio.timeout(timeout_s):
                await _read_answer(reader, answer)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            answer.error = f"closed without an answer ({type(exc).__name__})"
        except TimeoutError:
            answer.error = f"no answer within {timeout_s} s"
        answer.seconds = time.monotonic() - started
        if case.slow and answer.error is None:
            await _wait_closed(reader, answer, close_s)
    finally:
        writer.close()
    return answer


def problems(answer: Answer, *, allow_5xx: bool = False) -> list[str]:
    """What is wrong with an answer: missing, a 5xx (unless allowed), or not Bedrock-shaped."""
    kind = answer.case.kind
    if answer.error is not None:
        return [f"{kind}: {answer.error}"]
    if answer.status is None:
        return [] if not answer.case.data else [f"{kind}: no answer"]
    out = []
    # Interim 100s are Sluice's probes of a FIN (at most five), or the answer to an Expect.
    probed = answer.case.half_close or b"\r\nexpect:" in answer.case.data.lower()
    if answer.interim > (5 if probed else 0):
        out.append(f"{kind}: {answer.interim} interim answers")
    if answer.status >= 500 and not allow_5xx:
        out.append(f"{kind}: status {answer.status}: {answer.body[:200]!r}")
    if answer.status >= 300:
        if "x-amzn-errortype" not in answer.headers:
            out.append(f"{kind}: {answer.status} without x-amzn-ErrorType")
        if not answer.headers.get("content-type", "").startswith("application/json"):
            out.append(f"{kind}: {answer.status} is {answer.headers.get('content-type')}")
        try:
            doc = json.loads(answer.body)
            if not isinstance(doc, dict) or not isinstance(doc.get("message"), str):
                out.append(f"{kind}: body without a message: {answer.body[:200]!r}")
        except ValueError:
            out.append(f"{kind}: body is not JSON: {answer.body[:200]!r}")
    return out


async def run(
    host: str,
    port: int,
    n: int,
    seed: int,
    *,
    concurrency: int = 16,
    timeout_s: float = 1.0,
    slow: bool = True,
) -> list[Answer]:
    """Play ``n`` generated requests with ``concurrency`` connections at a time."""
    rng = random.Random(seed)
    cases = [generate(rng, slow=slow) for _ in range(n)]
    answers: list[Answer] = []
    gate = asyncio.Semaphore(concurrency)
    # A slow case ends by the server's timeout: allow it that, plus scheduling slack.
    wait_s, close_s = timeout_s * 3 + 5, timeout_s * 3 + 5

    async def one(case: Case) -> None:
        async with gate:
            answers.append(await send(host, port, case, wait_s, close_s))

    await asyncio.gather(*(one(c) for c in cases))
    return answers
