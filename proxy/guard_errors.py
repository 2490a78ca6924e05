"""What the connection guard says and logs: Bedrock-shaped answers and rate-limited warnings.

aiohttp's own answers to bad HTTP are ``text/plain`` and quote the offending bytes, and
its log records carry tracebacks with those bytes (prompt text, Authorization values).
Here every such rejection becomes ``{"message": ...}`` + ``x-amzn-ErrorType`` naming the
limit at fault, and one structured warning line without any request byte.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from http import HTTPStatus

from aiohttp import http_exceptions as hx
from aiohttp.web_exceptions import HTTPException
from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.config import Connections
from proxy.errors import error_body, error_headers

log = logging.getLogger("sluice.protocol")

_PREFIX = "server.connections."
#: Answers to requests that never reached a handler (no request id exists yet).
TIMEOUT_TYPE = "RequestTimeoutException"


#: aiohttp's words for a repeated singleton header (http_parser.py and _http_parser.pyx).
_DUPLICATE = re.compile(r"Duplicate '(.*)' header found\.", re.DOTALL)
#: An RFC 9110 token: what a header name is made of.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True, slots=True)
class Rejection:
    """A protocol-level refusal: HTTP status, Bedrock error type, message, metric reason."""

    status: int
    error_type: str
    message: str
    reason: str


def describe(exc: BaseException | None, status: int, limits: Connections) -> Rejection:
    """The answer to a parser rejection or an error that escaped the handler.

    The parser's own text is read only to classify; it quotes request bytes, so it is
    never echoed or logged (but for a repeated header's name, once checked to be a token).
    """
    if status >= 500 or not isinstance(exc, hx.HttpProcessingError):
        return Rejection(
            500, "InternalServerException", "Sluice failed to handle the request", "internal"
        )
    text = str(exc.message).lower()
    if isinstance(exc, hx.LineTooLong):
        return _bad(
            f"the request line or a header line is longer than {limits.max_header_line_bytes} "
            f"bytes ({_PREFIX}max_header_line_bytes)",
            "line_too_long",
        )
    if "too many headers" in text:
        return _bad(
            f"the request has more than {limits.max_headers} headers ({_PREFIX}max_headers)",
            "too_many_headers",
        )
    if isinstance(exc, hx.BadHttpMethod):
        return _bad("the request method is not a valid HTTP method", "bad_method")
    if "version" in text:
        return _bad("the request line does not name HTTP/1.0 or HTTP/1.1", "bad_version")
    framing = _header_problem(exc, text)
    if framing is not None:
        return framing
    if isinstance(exc, hx.BadStatusLine | hx.InvalidURLError):
        return _bad("the request line is not valid HTTP/1.1", "bad_request_line")
    return _bad("the request is not valid HTTP/1.1", "malformed")


def _header_problem(exc: hx.HttpProcessingError, text: str) -> Rejection | None:
    """The answer to a header the parser refused (length, repeats, framing, bytes), if so."""
    if "content-length" in text:
        return _bad("the request has a duplicate or invalid Content-Length", "content_length")
    duplicate = _DUPLICATE.fullmatch(str(exc.message))
    if duplicate is not None:
        # aiohttp refuses a second copy of a header that may appear once (Host, Content-Type,
        # Transfer-Encoding...). A header name is not request data, but it is echoed only as
        # a short plain token: never a byte that could be anything else.
        name = duplicate.group(1)
        if len(name) <= 64 and _TOKEN.fullmatch(name):
            return _bad(
                f"the header '{name}' appears more than once; it may appear once", "duplicate"
            )
        return _bad("a header that may appear once appears more than once", "duplicate")
    if "chunk" in text or "transfer-encoding" in text:
        return _bad("the request's chunked transfer encoding is malformed", "chunked")
    if isinstance(exc, hx.InvalidHeader) or "header" in text:
        return _bad(
            "a header contains a character HTTP does not allow (control bytes, or a "
            "malformed name)",
            "bad_header",
        )
    return None


def from_http_exception(exc: HTTPException) -> Rejection:
    """aiohttp's own HTTP answers (e.g. the router's 404 for ``OPTIONS *``) in Bedrock's shape."""
    if exc.status == 404:
        return Rejection(
            404, "UnknownOperationException", "no Bedrock operation at this path", "not_found"
        )
    if exc.status == 413:
        return Rejection(
            413,
            "ValidationException",
            "the request body is larger than this Sluice accepts (server.max_body_bytes)",
            "too_large",
        )
    error_type = "ValidationException" if exc.status < 500 else "InternalServerException"
    return Rejection(exc.status, error_type, f"the request was refused: {exc.reason}", "http")


def _bad(message: str, reason: str) -> Rejection:
    return Rejection(400, "ValidationException", f"Malformed HTTP request: {message}", reason)


def raw_response(rejection: Rejection, extra: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 answer for a connection no request handler owns; it closes."""
    body = error_body(rejection.message)
    headers = error_headers(rejection.error_type)
    headers.update(extra or {})
    headers["Connection"] = "close"
    headers["Content-Length"] = str(len(body))
    phrase = HTTPStatus(rejection.status).phrase
    head = f"HTTP/1.1 {rejection.status} {phrase}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    return head.encode("ascii") + b"\r\n" + body


class ProtocolLog:
    """Structured, rate-limited warnings: ``burst`` lines, then ``per_second``.

    A flood of bad requests must not become a flood of log lines; suppressed lines are
    counted and reported on the next line that is written.
    """

    def __init__(self, burst: float = 20.0, per_second: float = 2.0) -> None:
        self._burst = burst
        self._rate = per_second
        self._level = burst
        self._at = time.monotonic()
        self.suppressed = 0

    def warn(self, reason: str, peer: str | None, **fields: object) -> None:
        """Log one protocol error (never any request byte) unless over the rate."""
        now = time.monotonic()
        self._level = min(self._burst, self._level + (now - self._at) * self._rate)
        self._at = now
        if self._level < 1:
            self.suppressed += 1
            return
        self._level -= 1
        record = {"event": "protocol_error", "reason": reason, "peer": peer, **fields}
        if self.suppressed:
            record["suppressed"] = self.suppressed
            self.suppressed = 0
        log.warning("rejected a client request: %s", reason, extra={"fields": record})


class GuardMetrics:
    """Counters of the connection guard (registered in the app's registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.open = Gauge(
            "sluice_client_connections", "Client connections open now", registry=registry
        )
        self.refused = Counter(
            "sluice_client_refused",
            "Connections or requests refused by a server.connections limit",
            ["limit"],
            registry=registry,
        )
        self.timeouts = Counter(
            "sluice_client_timeouts",
            "Client connections closed by a read or idle timeout",
            ["phase"],
            registry=registry,
        )
        self.protocol_errors = Counter(
            "sluice_protocol_errors",
            "Requests rejected before reaching the handler (malformed HTTP)",
            ["reason"],
            registry=registry,
        )
        self.unauthenticated = Gauge(
            "sluice_unauthenticated_requests",
            "Requests still sending their body (not yet identified)",
            registry=registry,
        )
