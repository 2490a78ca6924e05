"""Telling a client that left from one that only shut its write side (``SHUT_WR``).

Both send the same FIN while their request is served. :class:`proxy.guard.GuardedHandler`
keeps the connection open (a half-closed client still reads its answer) and probes it with
an interim ``100 Continue``: a closed socket answers those bytes with a reset, the next
write fails and aiohttp cancels the handler, so a gone caller's call stops (its upstream
call, or the retry it waits to send); a half-closed client skips it (RFC 9110 15.2; as
http.client under botocore, httpcore under the Anthropic SDK and aiohttp's client do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import HttpVersion11
from aiohttp.http_parser import RawRequestMessage
from aiohttp.http_writer import StreamWriter
from aiohttp.web_request import BaseRequest

#: The probe of a client that sent FIN while its request is served (GuardedHandler._probe).
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: The waits between probes: a reset takes one round trip to come back (µs on a sidecar's
#: loopback, up to seconds across a bad network). Five probes in all: Go's HTTP client
#: gives up on a response after more than five 1xx.
PROBE_AFTER_S = (0.05, 0.25, 1.0, 4.0)
#: A connection's probing: not yet, started (once per connection), never (HTTP/1.0 or
#: an unparsable request: no 1xx for them), never and no half-close either (TLS).
READY, PROBING, NEVER, TLS = 0, 1, 2, 3


def probe_safe(messages: Sequence[tuple[Any, Any]], added: int) -> bool:
    """Can the ``added`` requests just parsed (the last of ``messages``, aiohttp's queue
    of (head, payload)) be sent an interim 1xx? Only HTTP/1.1 heads can."""
    for i in range(max(0, len(messages) - added), len(messages)):
        head = messages[i][0]
        if not isinstance(head, RawRequestMessage) or head.version < HttpVersion11:
            return False
    return True


def answer_started(answering: bool, request: BaseRequest | None) -> bool:
    """Has the answer begun (a probe then would land after its bytes)? ``answering``:
    aiohttp is writing it (finish_response, when the request is no longer current).
    Between a request's parse and its handler's first step (one loop turn, ``request``
    None) nothing has."""
    if answering:
        return True
    if request is None:
        return False
    writer = request._payload_writer
    if not isinstance(writer, StreamWriter):
        return True
    # Headers are buffered until the first body write (aiohttp >= 3.12), else written.
    buffered = getattr(writer, "_headers_buf", None) or getattr(writer, "_headers_written", 0)
    return bool(buffered or writer.output_size)
