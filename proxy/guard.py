"""Connection-level protections: timeouts, caps, and Bedrock-shaped protocol errors.

aiohttp's :class:`~aiohttp.web_protocol.RequestHandler` is the HTTP/1.1 connection;
this subclass adds what it lacks for a server facing careless or hostile clients,
all from the policy's ``server.connections`` section:

* a header timeout (the request line and headers must arrive in time) and a body
  timeout (longest pause between two body reads), answered 408 and closed;
* an idle (keep-alive) timeout, a cap on open connections per instance and on
  requests still sending their body — the ones nobody has identified yet;
* parser rejections (bad method, oversized lines, too many headers, ...) answered in
  Bedrock's shape and logged as one rate-limited structured warning, no traceback;
* a client that half-closes (``SHUT_WR``) after full requests still gets every answer,
  while one that closed its socket has its call cancelled (``_probe``);
* bad chunk framing once a body started ends that body with a Bedrock-shaped 400 (aiohttp
  would queue the error as a request of its own and leave the body waiting forever).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.config import Connections
from proxy.errors import BedrockError, error_response
from proxy.guard_errors import (
    TIMEOUT_TYPE,
    GuardMetrics,
    ProtocolLog,
    Rejection,
    describe,
    from_http_exception,
    raw_response,
)
from proxy.guard_probe import (
    CONTINUE,
    NEVER,
    PROBE_AFTER_S,
    PROBING,
    READY,
    TLS,
    answer_started,
    probe_safe,
)
from proxy.lean import NO_CONTEXT, SmallQueue

_IDLE, _HEAD, _BODY = 0, 1, 2
#: How a split body is framed, for finding what follows its last byte (_arm_after_body):
#: its Content-Length of undecoded bytes, chunked, or neither (decompressed as it comes).
_LENGTH, _CHUNKED, _OTHER = 0, 1, 2

_PREFIX = "server.connections."


@dataclass(slots=True)
class GuardState:
    """Per-process counters and settings shared by every connection."""

    limits: Connections
    metrics: GuardMetrics
    log: ProtocolLog = field(default_factory=ProtocolLog)
    connections: int = 0
    unauthenticated: int = 0


class BodyRefused(BedrockError):
    """Raised from ``request.read()`` when the guard ends a body (already counted and
    logged then: not logged again when it escapes aiohttp's lingering read)."""


class BodyTimeout(BodyRefused):
    """The client stopped sending its body."""


class BodyMalformed(BodyRefused):
    """The body's chunked framing broke after it started."""


class GuardedHandler(RequestHandler):
    """One client connection with Sluice's protections (see the module docstring)."""

    # One per open connection, so per held stream: slots, not a per-instance dict.
    __slots__ = (
        "_answered",
        "_answering",
        "_body",
        "_counted",
        "_framing",
        "_guard",
        "_half_closed",
        "_inner",
        "_last_read",
        "_phase",
        "_probe_timer",
        "_probes",
        "_timer",
    )

    def __init__(self, manager: web.Server, *, guard: GuardState, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        # aiohttp's queue of parsed requests is a deque: 760 bytes for every open
        # connection, held streams included, where a list holds its one or two requests.
        # Only where aiohttp caps that queue (3.14.5+: _max_msg_queue_size): popleft is
        # O(n) on a list, and an uncapped queue of pipelined requests could grow long.
        capped = getattr(self, "_max_msg_queue_size", 0)
        if capped and isinstance(self._messages, collections.deque):
            self._messages = SmallQueue()  # type: ignore[assignment]
        self._guard = guard
        self._inner = manager.request_handler
        self._request_handler = self._guarded
        self._phase = _IDLE
        self._timer: asyncio.TimerHandle | None = None
        self._probe_timer: asyncio.TimerHandle | None = None
        self._probes = READY
        self._answering = False
        self._body: StreamReader | None = None
        self._framing = _OTHER
        self._half_closed = False  # FIN received with requests unanswered: close once done
        self._last_read = 0.0
        self._counted = False
        self._answered = 0  # responses finished; _request_count counts requests parsed

    # --- connection life ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if transport.get_extra_info("sslcontext") is not None:
            self._probes = TLS
        guard = self._guard
        guard.connections += 1
        self._counted = True
        guard.metrics.open.inc()
        if guard.connections > guard.limits.max_connections:
            guard.metrics.refused.labels("max_connections").inc()
            self._reject_raw(
                Rejection(
                    503,
                    "ServiceUnavailableException",
                    f"this Sluice instance has {guard.limits.max_connections} client "
                    f"connections open ({_PREFIX}max_connections); retry shortly",
                    "max_connections",
                ),
                {"Retry-After": "1"},
            )

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timer()
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        if self._counted:
            self._counted = False
            self._guard.connections -= 1
            self._guard.metrics.open.dec()
        super().connection_lost(exc)

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio reads the bool
        # A client that shut its write side after whole requests still reads the answers:
        # keep our side open until every request it sent is answered, then close
        # (finish_response). Not close() here: aiohttp would stop after the current one
        # and drop the pipelined rest. (TLS has no half-close here: its transport ignores
        # True, so a FIN ends the call at once.) Mid-body, the body can never complete:
        # closed, and the handler reading it is cancelled.
        if self._probes == TLS or self._phase == _BODY or self._request_count <= self._answered:
            return False
        if self._phase == _HEAD:
            # The rest of this head can never come: answer the requests before it, then
            # close, rather than wait for the header timeout to cut them.
            self._cancel_timer()
            self._phase = _IDLE
        self._half_closed = True
        if self._probes == READY:  # once per connection (uvloop may call this again)
            self._probes = PROBING
            self._probe(0)
        return True

    def _probe(self, n: int) -> None:
        """Probe a FIN'd connection (:mod:`proxy.guard_probe`): probe ``n``, then the next
        after a wait; never once the answer started (the bytes would land after it)."""
        self._probe_timer = None
        transport = self.transport
        if (
            transport is None
            or transport.is_closing()
            or answer_started(self._answering, self._current_request)
        ):
            return
        transport.write(CONTINUE)
        if n < len(PROBE_AFTER_S):
            self._probe_timer = self._loop.call_later(PROBE_AFTER_S[n], self._probe, n + 1)

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # Raised by aiohttp itself (router, body size). An HTTPException is the one response
        # that is an Exception: that check skips the ABC instance check on every answer.
        if isinstance(resp, Exception):
            assert isinstance(resp, web.HTTPException)
            resp = self._from_http_exception(resp)
        self._answering = True
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._answering = False
            self._answered += 1
            if self._half_closed and self._answered >= self._request_count:
                self.close()  # the last request sent before the FIN is answered

    def _process_keepalive(self) -> None:
        open_before = not self._force_close
        super()._process_keepalive()
        if open_before and self._force_close:
            self._guard.metrics.timeouts.labels("idle").inc()

    # --- reading: header and body timeouts -------------------------------------------

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        body = self._body  # (not None: phase _BODY)
        had = 0
        if body is not None:
            self._last_read = self._loop.time()
            had = body.total_bytes
        before = self._request_count
        RequestHandler.data_received(self, data)  # (no super object made per read)
        if (added := self._request_count - before) != 0:
            self._parsed(phase, added)
        elif phase == _IDLE:
            # Bare CRLFs before a request line are ignored (RFC 9112 2.2), so they start no
            # head: one sent while an answer streams must not arm a timer that cuts it.
            if data.strip(b"\r\n"):
                self._phase = _HEAD  # the first bytes of a head that is not complete yet
                self._arm(self._guard.limits.header_timeout_seconds, self._head_expired)
        elif body is not None and self._phase == _IDLE:
            self._arm_after_body(body, data, had)

    def _parsed(self, phase: int, added: int) -> None:
        """``added`` requests were queued by the read (``phase``: the one before it)."""
        head, payload = self._messages[-1]
        if self._body is not None and not isinstance(head, RawRequestMessage):
            # No head completes before the body in progress: this is the parser's error
            # inside that body (bad chunk framing).
            self._refuse_body(self._body)
            return
        # A head completed (the usual case: head and body in one read, no timer set).
        if phase == _HEAD:
            self._cancel_timer()
        if self._probes == READY and not probe_safe(self._messages, added):
            self._probes = NEVER
        self._phase = _IDLE
        if isinstance(head, RawRequestMessage) and not payload.is_eof():  # (_ErrInfo: empty)
            self._phase, self._body, self._last_read = _BODY, payload, self._loop.time()
            self._framing = (
                _CHUNKED if head.chunked else _LENGTH if head.compression is None else _OTHER
            )
            payload.on_eof(self._body_done)
            self._arm(self._guard.limits.body_timeout_seconds, self._body_expired)

    def _arm_after_body(self, body: StreamReader, data: bytes, had: int) -> None:
        """The body ended in this read and no head completed: if the next head started in
        it, time that head (else only the keep-alive timeout would). aiohttp's parser keeps
        those bytes out of reach: they are found from the body's framing instead. A
        Content-Length body's bytes are counted by its reader; a chunked body ends with its
        read's last CRLF CRLF (a partial head has none), or, when that CRLF CRLF was split
        over two reads, within this read's first three bytes, all CR or LF (and CRLFs before
        a request line are ignored: RFC 9112 2.2); a compressed one is not told."""
        if self._framing == _LENGTH:
            rest = data[body.total_bytes - had :]
        elif self._framing == _CHUNKED:
            end = data.rfind(b"\r\n\r\n")
            rest = data[end + 4 :] if end >= 0 else data.lstrip(b"\r\n")
        else:
            return
        if rest.strip(b"\r\n"):
            self._phase = _HEAD
            self._arm(self._guard.limits.header_timeout_seconds, self._head_expired)

    def _refuse_body(self, body: StreamReader) -> None:
        """The parser failed inside the body in progress. aiohttp queued its error as a
        request of its own and left the body waiting for bytes the parser will never pass
        on: the handler would wait forever, holding its unauthenticated slot, and a FIN
        would find a request unanswered and keep the socket half-open. Instead the error is
        taken off the queue (one answer per request) and ends the body: its handler answers
        the 400, and the connection closes after it."""
        error = self._messages.pop()[0]
        self._request_count -= 1
        exc = getattr(error, "exc", None)
        rejection = describe(
            exc if isinstance(exc, BaseException) else None, 400, self._guard.limits
        )
        self._guard.metrics.protocol_errors.labels(rejection.reason).inc()
        self._note(rejection, error=type(exc).__name__)
        self._phase, self._body = _IDLE, None
        self._cancel_timer()
        body.set_exception(
            BodyMalformed(rejection.error_type, rejection.message, status=rejection.status)
        )
        self.close()  # the parser is spent: nothing more can be read on this connection

    def _body_done(self) -> None:
        if self._phase == _BODY:
            self._phase, self._body = _IDLE, None
            # Not left armed to fire idle: a held stream would keep its timer (with its
            # handle and context) for the body timeout, on every split request.
            self._cancel_timer()

    def _head_expired(self) -> None:
        self._timer = None
        if self._phase != _HEAD or self.transport is None:
            return
        limit = self._guard.limits.header_timeout_seconds
        self._guard.metrics.timeouts.labels("header").inc()
        rejection = Rejection(
            408,
            TIMEOUT_TYPE,
            f"the request line and headers did not arrive within {limit:g} s "
            f"({_PREFIX}header_timeout_seconds)",
            "header_timeout",
        )
        if self._request_in_progress or self._messages:
            # An answer is under way: never interleave another, never cut it (a stray byte
            # must not end a stream). The connection closes once it is sent.
            self._note(rejection)
            self.close()
        else:
            self._reject_raw(rejection)

    def _body_expired(self) -> None:
        self._timer = None
        body = self._body
        if self._phase != _BODY or body is None or body.is_eof():
            return
        limit = self._guard.limits.body_timeout_seconds
        left = self._last_read + limit - self._loop.time()
        if left > 0:  # data came in since the timer was set: wait for the rest
            self._arm(left, self._body_expired)
            return
        self._guard.metrics.timeouts.labels("body").inc()
        message = f"the request body stalled for {limit:g} s ({_PREFIX}body_timeout_seconds)"
        self._note(Rejection(408, TIMEOUT_TYPE, message, "body_timeout"))
        self._phase, self._body = _IDLE, None
        # The handler reading the body gets a Bedrock-shaped 408; the connection closes
        # after it (the rest of the body will never come).
        body.set_exception(BodyTimeout(TIMEOUT_TYPE, message, status=408))
        self.close()

    def _arm(self, delay: float, callback: Any) -> None:
        self._cancel_timer()
        # (no context copied per timer: the callbacks read no context variable)
        self._timer = self._loop.call_later(delay, callback, context=NO_CONTEXT)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- requests: the unauthenticated cap ---------------------------------------------

    def _guarded(self, request: BaseRequest) -> Awaitable[web.StreamResponse]:
        # The handler's coroutine is returned, not awaited: no frame of ours for every
        # resumption of the request. An HTTPException it raises reaches finish_response.
        if request.content.is_eof():  # the whole body is here: identified at once
            return self._inner(request)
        return self._capped(request)

    def _from_http_exception(self, exc: web.HTTPException) -> web.Response:
        """aiohttp's own HTTP error (router, body size) in Bedrock's shape, counted."""
        rejection = from_http_exception(exc)
        self._guard.metrics.protocol_errors.labels(rejection.reason).inc()
        return error_response(rejection.error_type, rejection.message, status=rejection.status)

    async def _capped(self, request: BaseRequest) -> web.StreamResponse:
        """A request still sending its body, within server.connections.max_unauthenticated."""
        payload = request.content
        guard = self._guard
        limit = guard.limits.max_unauthenticated_requests
        if guard.unauthenticated >= limit:
            guard.metrics.refused.labels("max_unauthenticated_requests").inc()
            message = (
                f"this Sluice instance already has {limit} requests sending their body "
                f"({_PREFIX}max_unauthenticated_requests); retry shortly"
            )
            self._note(Rejection(503, "ServiceUnavailableException", message, "max_unauth"))
            response = error_response(
                "ServiceUnavailableException", message, status=503, headers={"Retry-After": "1"}
            )
            response.force_close()
            return response
        guard.unauthenticated += 1
        guard.metrics.unauthenticated.inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                guard.unauthenticated -= 1
                guard.metrics.unauthenticated.dec()

        payload.on_eof(release)
        try:
            return await self._inner(request)
        finally:
            release()

    # --- answers and logs ----------------------------------------------------------------

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's error answer, in Bedrock's shape and without echoing request bytes."""
        rejection = describe(exc, status, self._guard.limits)
        self._guard.metrics.protocol_errors.labels(rejection.reason).inc()
        self._note(rejection, error=type(exc).__name__ if exc is not None else None)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already started; closing the connection")
        response = error_response(rejection.error_type, rejection.message, status=rejection.status)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, BodyRefused):
            return  # already counted and logged when the guard ended the body
        name = type(exc).__name__ if isinstance(exc, BaseException) else None
        self._guard.log.warn("connection_error", self._peer(), error=name)

    def _note(self, rejection: Rejection, **fields: object) -> None:
        self._guard.log.warn(rejection.reason, self._peer(), status=rejection.status, **fields)

    def _reject_raw(self, rejection: Rejection, extra: dict[str, str] | None = None) -> None:
        self._note(rejection)
        transport = self.transport
        if transport is not None:
            transport.write(raw_response(rejection, extra))
        self.force_close()

    def _peer(self) -> str | None:
        transport = self.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else None


class GuardedServer(web.Server):
    """aiohttp's low-level server, making :class:`GuardedHandler` connections."""

    guard: GuardState

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, guard=self.guard, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """An AppRunner whose connections are :class:`GuardedHandler`."""

    def __init__(self, app: web.Application, guard: GuardState, **kwargs: Any) -> None:
        limits = guard.limits
        kwargs.setdefault("keepalive_timeout", limits.keepalive_timeout_seconds)
        kwargs.setdefault("max_line_size", limits.max_header_line_bytes)
        kwargs.setdefault("max_field_size", limits.max_header_line_bytes)
        kwargs.setdefault("max_headers", limits.max_headers)
        super().__init__(app, **kwargs)
        self._guard = guard

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # Server builds a plain RequestHandler per connection; swap in the guarded one.
        server.__class__ = GuardedServer
        assert isinstance(server, GuardedServer)
        server.guard = self._guard
        return server


def guarded_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """The runner for ``app``: guarded when it is a Sluice proxy app, plain otherwise."""
    from proxy.app import METRICS, POLICY

    if POLICY not in app or METRICS not in app:
        return web.AppRunner(app, **kwargs)
    limits = app[POLICY].policy.server.connections
    state = GuardState(limits, GuardMetrics(app[METRICS].registry))
    return GuardedRunner(app, state, **kwargs)
