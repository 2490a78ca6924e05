"""Verifying inbound SigV4 requests; failures carry Bedrock's own error type and message.

The canonical request and signature are :mod:`proxy.signing`'s, so what Sluice verifies
is byte for byte what it would sign (and what botocore signs).
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

from multidict import MultiMapping

from proxy.signing import (
    ALGORITHM,
    AMZ_DATE_FORMAT,
    TERMINATOR,
    canonical_request,
    signature,
    trim,
)

_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. "
    "Consult the service documentation for details."
)
_UNKNOWN_KEY = "The security token included in the request is invalid."

#: The header in which a SigV4 client states its payload hash (botocore signs its value as the
#: canonical request's payload hash when present); honoured only when it is a signed header.
CONTENT_SHA256 = "x-amz-content-sha256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_WORD = re.compile(r"[A-Za-z0-9-]{1,64}")


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
    if term != TERMINATOR:
        return f"Credential should be scoped with a valid terminator: '{TERMINATOR}'."
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
        dt = datetime.strptime(value, AMZ_DATE_FORMAT)
    except ValueError:
        return None
    seconds: int = calendar.timegm(dt.timetuple())
    return float(seconds)


def _fmt(ts: float) -> str:
    return time.strftime(AMZ_DATE_FORMAT, time.gmtime(ts))


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
        return parsedate_to_datetime(date[0]).strftime(AMZ_DATE_FORMAT)
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
    refused = _check_scope(
        parsed, amz_date, time.time() if now is None else now, max_skew_s, services
    )
    if refused is not None:
        return refused
    secret = secret_for(akid)
    if secret is None:
        return _fail("UnrecognizedClientException", _UNKNOWN_KEY, akid)
    return _checksignature(method, host, raw_path, query, getall, body, parsed, amz_date, secret)


def _check_scope(
    parsed: ParsedAuth, amz_date: str, now: float, max_skew_s: float, services: frozenset[str]
) -> VerifyResult | None:
    """The failure when the request's date or credential scope cannot be right, else None."""
    akid = parsed.access_key_id
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
    skew = _skew_error(amz_date, ts, now, max_skew_s)
    if skew is not None:
        return _fail("InvalidSignatureException", skew, akid)
    return None


def _check_payload_hash(value: str, body: bytes, akid: str) -> VerifyResult | None:
    """The failure when a signed ``x-amz-content-sha256`` cannot stand for this body.

    ``UNSIGNED-PAYLOAD`` is refused: the signature would then cover everything but the body,
    and anyone who saw one such signed request could send any prompt under the caller's
    identity for the whole clock-skew window. No Bedrock runtime SDK sends it (botocore
    states it for S3 only). A hex hash must be the body's, or a body swapped under a valid
    signature would pass.
    """
    if value == UNSIGNED_PAYLOAD:
        return _fail(
            "InvalidSignatureException",
            f"x-amz-content-sha256: {UNSIGNED_PAYLOAD} is not accepted: Sluice verifies the "
            "body too; sign the body's SHA-256 (the SDKs do unless told otherwise).",
            akid,
        )
    if not _HEX64.fullmatch(value):
        # Echoed only as a short ASCII word (request data otherwise: never quoted).
        shown = value if _WORD.fullmatch(value) else "(not a token)"
        return _fail(
            "InvalidSignatureException",
            f"x-amz-content-sha256 must be the hex SHA-256 of the body; '{shown}' is not "
            "supported.",
            akid,
        )
    if value.lower() != hashlib.sha256(body).hexdigest():
        return _fail(
            "InvalidSignatureException",
            "The provided 'x-amz-content-sha256' header does not match what was computed "
            "from the request body.",
            akid,
        )
    return None


def _checksignature(
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
    payload_hash: str | None = None
    for name in names:
        if name == "host":
            value = host
        else:
            values = getall(name)
            if not values:
                # A header the client signed did not arrive: the signatures cannot match.
                return _fail("InvalidSignatureException", _MISMATCH, akid)
            value = values[0] if len(values) == 1 else ",".join(trim(v) for v in values)
            if name == CONTENT_SHA256:
                payload_hash = value
        lines.append(f"{name}:{trim(value)}")
    if payload_hash is not None:
        refused = _check_payload_hash(payload_hash, body, akid)
        if refused is not None:
            return refused
    cr = canonical_request(
        method, raw_path, query, "\n".join(lines), parsed.signed_headers, body, payload_hash
    )
    scope = f"{parsed.date}/{parsed.region}/{parsed.service}/{TERMINATOR}"
    expected = signature(secret, amz_date, scope, parsed.region, parsed.service, cr)
    if not hmac.compare_digest(expected, parsed.signature):
        return _fail("InvalidSignatureException", _MISMATCH, akid)
    return VerifyResult(True, akid, None, None)
