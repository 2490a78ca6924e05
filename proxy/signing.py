"""SigV4 for the hot path: sign upstream requests, verify inbound ones, hold upstream credentials.

botocore's ``SigV4Auth`` costs ~88 µs per 1 KB request, mostly in building ``AWSRequest`` /
``HTTPMessage`` objects and re-deriving the signing key.  This module computes the same bytes
from plain strings and caches the derived key per (secret, date, region, service), so it costs a
fraction of that.  ``tests/test_signing.py`` proves the output byte-identical to botocore's.

Canonical-request rules mirrored from ``botocore.auth.SigV4Auth`` (botocore 1.43):

* URI: ``quote(remove_dot_segments(raw_path), safe='/~')`` -- ``raw_path`` is already
  percent-encoded, so ``%3A`` is encoded again to ``%253A``, exactly as botocore does.
* Query: the raw query split on ``&``, each pair split at the first ``=``, sorted, re-joined; no
  re-encoding (botocore signs the already-encoded query of the URL).
* Headers: lower-cased names, sorted; values trimmed with ``' '.join(v.split())``; repeated names
  joined with ``,``; botocore's hop-by-hop blacklist (``user-agent``, ``x-amzn-trace-id``, ...) is
  never signed.
* Payload hash: ``sha256(body)``; no ``X-Amz-Content-SHA256`` header is added.
"""

from __future__ import annotations

import calendar
import contextlib
import functools
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

from multidict import MultiMapping

ALGORITHM = "AWS4-HMAC-SHA256"
_TERMINATOR = "aws4_request"
_AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"

# botocore's SIGNED_HEADERS_BLACKLIST: proxies may rewrite these, so they are never signed.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "expect",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "x-amzn-trace-id",
    }
)
# sign() owns these: host comes from its own argument, the rest are (re)generated like
# botocore's _modify_request_before_signing.  ``date`` is dropped because botocore would switch
# to Date-based signing if it were present; the caller must not forward a client's Date.
_NOT_SIGNED = _HOP_BY_HOP | {"host", "authorization", "x-amz-date", "x-amz-security-token", "date"}

_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. "
    "Consult the service documentation for details."
)
_UNKNOWN_KEY = "The security token included in the request is invalid."


@dataclass(frozen=True, slots=True)
class Credentials:
    """One set of AWS credentials, immutable so a refresh can swap them atomically."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:
        # Keep secrets out of tracebacks, logs and pytest assertion output.
        return f"Credentials(access_key_id={self.access_key_id!r}, secret_access_key='***')"


@dataclass(frozen=True, slots=True)
class ParsedAuth:
    """The parts of an ``AWS4-HMAC-SHA256`` Authorization header."""

    access_key_id: str
    date: str
    region: str
    service: str
    signed_headers: str  # as sent: lower-case names joined with ';'
    signature: str  # 64 lower-case hex digits

    @property
    def signed_header_names(self) -> list[str]:
        """The signed header names in the order the client listed them."""
        return self.signed_headers.split(";")


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of :func:`verify`; on failure ``error_type``/``message`` are Bedrock's own."""

    ok: bool
    access_key_id: str | None
    error_type: str | None
    message: str | None
    status: int = 200  # HTTP status Bedrock uses for ``error_type`` (403, or 400 if malformed)


def _fail(error_type: str, message: str, akid: str | None = None) -> VerifyResult:
    status = 400 if error_type == "IncompleteSignatureException" else 403
    return VerifyResult(False, akid, error_type, message, status)


# ---------------------------------------------------------------------------------------------
# Canonical request: shared by sign() and verify()


def _remove_dot_segments(path: str) -> str:
    # Same as botocore.utils.remove_dot_segments: RFC 3986 5.2.4, plus AWS's collapse of "//".
    out: list[str] = []
    for seg in path.split("/"):
        if seg == "..":
            if out:
                out.pop()
        elif seg and seg != ".":
            out.append(seg)
    first = "/" if path[0] == "/" else ""
    last = "/" if path[-1] == "/" and out else ""
    return first + "/".join(out) + last


@functools.lru_cache(maxsize=4096)
def canonical_uri(raw_path: str) -> str:
    """The SigV4 canonical URI of an already percent-encoded path (cached: few distinct paths)."""
    if not raw_path:
        return "/"
    return quote(_remove_dot_segments(raw_path), safe="/~")


def canonical_query(query: str) -> str:
    """botocore's canonical form of a raw (already percent-encoded) query string."""
    if not query:
        return ""
    pairs = [pair.partition("=")[::2] for pair in query.split("&")]
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


# hashlib has no public type for hash objects; this is what sha256() returns.
_Hash = Any


@functools.lru_cache(maxsize=1024)
def _signing_key(secret: str, date: str, region: str, service: str) -> tuple[_Hash, _Hash]:
    """The day's derived key, as HMAC-SHA256 inner/outer states primed with its pads.

    Cached because the key only changes daily (saves four HMACs per request); kept as primed
    sha256 states because copying them is ~2x faster than hmac.digest() with OpenSSL 3.
    """
    k = hmac.digest(("AWS4" + secret).encode(), date.encode(), "sha256")
    k = hmac.digest(k, region.encode(), "sha256")
    k = hmac.digest(k, service.encode(), "sha256")
    k = hmac.digest(k, b"aws4_request", "sha256").ljust(64, b"\0")  # RFC 2104: pad to block size
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in k))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in k))
    return inner, outer


def _signature(
    secret: str,
    amz_date: str,
    scope: str,
    region: str,
    service: str,
    canonical_request: str,
) -> str:
    cr_hash = hashlib.sha256(canonical_request.encode()).hexdigest()
    inner0, outer0 = _signing_key(secret, amz_date[:8], region, service)
    inner = inner0.copy()
    inner.update(f"{ALGORITHM}\n{amz_date}\n{scope}\n{cr_hash}".encode())
    outer = outer0.copy()
    outer.update(inner.digest())
    return str(outer.hexdigest())


def _canonical_request(
    method: str, raw_path: str, query: str, headers_block: str, signed: str, body: bytes
) -> str:
    payload_hash = hashlib.sha256(body).hexdigest()
    return (
        f"{method.upper()}\n{canonical_uri(raw_path)}\n{canonical_query(query)}\n"
        f"{headers_block}\n\n{signed}\n{payload_hash}"
    )


def _trim(value: str) -> str:
    return " ".join(value.split())


# ---------------------------------------------------------------------------------------------
# Signing


class SigV4Signer:
    """Fast SigV4 for one service+region; caches derived signing keys per (secret, date)."""

    __slots__ = ("_date", "_region", "_scope_tail", "_second", "_service")

    def __init__(self, service: str, region: str) -> None:
        self._service = service
        self._region = region
        self._scope_tail = f"/{region}/{service}/{_TERMINATOR}"
        self._second = -1
        self._date = ""

    def _now(self) -> str:
        # strftime(gmtime()) costs ~2.5 µs; a busy proxy signs many requests per second.
        second = int(time.time())
        if second != self._second:
            self._date = time.strftime(_AMZ_DATE_FORMAT, time.gmtime(second))
            self._second = second
        return self._date

    def sign(
        self,
        method: str,
        host: str,
        raw_path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
        creds: Credentials,
        amz_date: str | None = None,
    ) -> dict[str, str]:
        """Return the headers to add (Authorization, X-Amz-Date, [X-Amz-Security-Token]).

        ``headers`` are the headers that will be sent, any case; ``host`` is signed as ``host``.
        ``raw_path``/``query`` are as on the wire (percent-encoded).  Output equals botocore's
        ``SigV4Auth.add_auth`` for the same inputs and timestamp, byte for byte.  Host,
        Authorization, X-Amz-Date, X-Amz-Security-Token and Date in ``headers`` are ignored
        (replaced, as botocore does); don't send them alongside the returned headers.
        """
        if amz_date is None:
            amz_date = self._now()
        items = []
        for key, value in headers.items():
            name = key.lower()
            if name not in _NOT_SIGNED:
                items.append((name, value))
        items.append(("host", host))
        items.append(("x-amz-date", amz_date))
        token = creds.session_token
        if token:
            items.append(("x-amz-security-token", token))
        # Stable sort keeps repeated names in send order, as botocore's get_all() does.
        items.sort(key=_first)
        lines: list[str] = []
        names: list[str] = []
        for name, value in items:
            value = " ".join(value.split())  # SigV4 "Trimall"
            if names and names[-1] == name:
                lines[-1] += "," + value
            else:
                names.append(name)
                lines.append(f"{name}:{value}")
        signed = ";".join(names)
        cr = _canonical_request(method, raw_path, query, "\n".join(lines), signed, body)
        scope = amz_date[:8] + self._scope_tail
        sig = _signature(creds.secret_access_key, amz_date, scope, self._region, self._service, cr)
        out = {
            "Authorization": (
                f"{ALGORITHM} Credential={creds.access_key_id}/{scope}, "
                f"SignedHeaders={signed}, Signature={sig}"
            ),
            "X-Amz-Date": amz_date,
        }
        if token:
            out["X-Amz-Security-Token"] = token
        return out


def _first(item: tuple[str, str]) -> str:
    return item[0]


# ---------------------------------------------------------------------------------------------
# Verification


# What every botocore-family SDK sends; a miss falls back to the diagnosing parser below.
_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/,\s]+)/(\d{8})/([^/,\s]+)/([^/,\s]+)/aws4_request, ?"
    r"SignedHeaders=([a-z0-9;._-]+), ?Signature=([0-9a-f]{64})\s*"
)


def _parse(value: str) -> ParsedAuth | str:
    """Parse an Authorization header; on failure return AWS's wording for what is wrong."""
    m = _AUTH_RE.fullmatch(value)
    if m is not None:
        return ParsedAuth(*m.groups())
    return _parse_slow(value)


def _parse_slow(value: str) -> ParsedAuth | str:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        return f"Unsupported AWS 'algorithm': '{algorithm[:32]}'; expected '{ALGORITHM}'."
    fields: dict[str, str] = {}
    for part in rest.split(","):
        key, eq, val = part.strip().partition("=")
        if eq:
            fields[key] = val.strip()
    missing = [k for k in ("Credential", "Signature", "SignedHeaders") if not fields.get(k)]
    if missing:
        return " ".join(f"Authorization header requires '{k}' parameter." for k in missing)
    cred = fields["Credential"].split("/")
    if len(cred) != 5 or not all(cred):
        return (
            "Credential must have exactly 5 slash-delimited elements, "
            "e.g. keyid/date/region/service/term."
        )
    akid, date, region, service, term = cred
    if term != _TERMINATOR:
        return f"Credential should be scoped with a valid terminator: '{_TERMINATOR}'."
    if len(date) != 8 or not date.isdigit():
        return "Credential date must be in the form YYYYMMDD."
    sig = fields["Signature"]
    if len(sig) != 64 or sig.strip("0123456789abcdef"):
        return "Signature must be 64 lower-case hexadecimal characters."
    return ParsedAuth(akid, date, region, service, fields["SignedHeaders"].lower(), sig)


def parse_authorization(value: str) -> ParsedAuth | None:
    """Parse ``AWS4-HMAC-SHA256 Credential=AKID/date/region/service/aws4_request, ...``.

    Returns ``None`` if the header is not a well-formed SigV4 Authorization value.
    """
    parsed = _parse(value)
    return parsed if isinstance(parsed, ParsedAuth) else None


@functools.lru_cache(maxsize=256)
def _parse_amz_date(value: str) -> float | None:
    # Cached: a busy proxy sees the same second over and over; strptime alone costs ~10 µs.
    if len(value) != 16 or value[8] != "T" or value[15] != "Z":
        return None
    try:
        dt = datetime.strptime(value, _AMZ_DATE_FORMAT)
    except ValueError:
        return None
    seconds: int = calendar.timegm(dt.timetuple())
    return float(seconds)


def _fmt(ts: float) -> str:
    return time.strftime(_AMZ_DATE_FORMAT, time.gmtime(ts))


def _skew_error(amz_date: str, ts: float, now: float, max_skew_s: float) -> str | None:
    if now - ts > max_skew_s:
        minutes = f"{max_skew_s / 60:g}"
        return (
            f"Signature expired: {amz_date} is now earlier than {_fmt(now - max_skew_s)} "
            f"({_fmt(now)} - {minutes} min.)"
        )
    if ts - now > max_skew_s:
        minutes = f"{max_skew_s / 60:g}"
        return (
            f"Signature not yet current: {amz_date} is still later than "
            f"{_fmt(now + max_skew_s)} ({_fmt(now)} + {minutes} min.)"
        )
    return None


def _header_getter(headers: Mapping[str, str]) -> Callable[[str], list[str]]:
    if isinstance(headers, MultiMapping):
        multi: MultiMapping[str] = headers
        return lambda name: multi.getall(name, [])
    lowered: dict[str, list[str]] = {}
    for k, v in headers.items():
        lowered.setdefault(k.lower(), []).append(v)
    return lambda name: lowered.get(name, [])


def _request_date(getall: Callable[[str], list[str]]) -> str | None:
    """The SigV4 timestamp: X-Amz-Date, else an RFC 1123 Date header (which SigV4 also allows)."""
    amz = getall("x-amz-date")
    if amz:
        return amz[0]
    date = getall("date")
    if not date:
        return None
    with contextlib.suppress(TypeError, ValueError):
        return parsedate_to_datetime(date[0]).strftime(_AMZ_DATE_FORMAT)
    return ""


def verify(
    method: str,
    host: str,
    raw_path: str,
    query: str,
    headers: Mapping[str, str],
    body: bytes,
    secret_for: Callable[[str], str | None],
    *,
    now: float | None = None,
    max_skew_s: float = 900.0,
    services: frozenset[str] = frozenset({"bedrock"}),
) -> VerifyResult:
    """Check an inbound SigV4 request; failures carry Bedrock's own error type and message.

    ``headers`` is case-insensitive (aiohttp ``CIMultiDictProxy``) as received; ``host`` is the
    Host value as received (port included); ``raw_path``/``query`` are as on the wire.  Only the
    headers the client listed as signed are used, and ``host`` must be among them.  The scope
    may name any region but its date must match the request's; its service must be in
    ``services``.  ``secret_for(akid)`` returns the key's secret or ``None`` if unknown.
    """
    getall = _header_getter(headers)
    auth = getall("authorization")
    if not auth:
        return _fail("MissingAuthenticationTokenException", "Missing Authentication Token")
    parsed = _parse(auth[0])
    if isinstance(parsed, str):
        return _fail("IncompleteSignatureException", parsed)
    akid = parsed.access_key_id
    amz_date = _request_date(getall)
    if amz_date is None:
        return _fail(
            "IncompleteSignatureException",
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.",
            akid,
        )
    ts = _parse_amz_date(amz_date)
    if ts is None:
        return _fail(
            "IncompleteSignatureException", "X-Amz-Date must be in ISO-8601 basic format.", akid
        )
    if parsed.date != amz_date[:8]:
        return _fail(
            "InvalidSignatureException",
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
            f"from HTTP: '{parsed.date}' != '{amz_date[:8]}', from '{amz_date}'.",
            akid,
        )
    if parsed.service not in services:
        expected = "', '".join(sorted(services))
        return _fail(
            "InvalidSignatureException",
            f"Credential should be scoped to correct service: '{expected}'. ",
            akid,
        )
    skew = _skew_error(amz_date, ts, time.time() if now is None else now, max_skew_s)
    if skew is not None:
        return _fail("InvalidSignatureException", skew, akid)
    secret = secret_for(akid)
    if secret is None:
        return _fail("UnrecognizedClientException", _UNKNOWN_KEY, akid)
    return _check_signature(method, host, raw_path, query, getall, body, parsed, amz_date, secret)


def _check_signature(
    method: str,
    host: str,
    raw_path: str,
    query: str,
    getall: Callable[[str], list[str]],
    body: bytes,
    parsed: ParsedAuth,
    amz_date: str,
    secret: str,
) -> VerifyResult:
    akid = parsed.access_key_id
    names = parsed.signed_header_names
    if "host" not in names:
        return _fail(
            "IncompleteSignatureException",
            "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.",
            akid,
        )
    lines: list[str] = []
    for name in names:
        if name == "host":
            value = host
        else:
            values = getall(name)
            if not values:
                # A header the client signed did not arrive: the signatures cannot match.
                return _fail("InvalidSignatureException", _MISMATCH, akid)
            value = values[0] if len(values) == 1 else ",".join(_trim(v) for v in values)
        lines.append(f"{name}:{_trim(value)}")
    cr = _canonical_request(method, raw_path, query, "\n".join(lines), parsed.signed_headers, body)
    scope = f"{parsed.date}/{parsed.region}/{parsed.service}/{_TERMINATOR}"
    expected = _signature(secret, amz_date, scope, parsed.region, parsed.service, cr)
    if not hmac.compare_digest(expected, parsed.signature):
        return _fail("InvalidSignatureException", _MISMATCH, akid)
    return VerifyResult(True, akid, None, None)
