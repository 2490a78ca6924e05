"""SigV4 for the hot path: sign upstream requests and hold upstream credentials.

Inbound requests are verified by :mod:`proxy.verification`, on the same canonical request.

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
* Payload hash: ``sha256(body)``; no ``X-Amz-Content-SHA256`` header is added.  (Verifying,
  a signed ``X-Amz-Content-SHA256`` is the payload hash instead, as botocore signs it.)
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"
TERMINATOR = "aws4_request"
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"

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
NOT_SIGNED = _HOP_BY_HOP | {"host", "authorization", "x-amz-date", "x-amz-security-token", "date"}


@dataclass(frozen=True, slots=True)
class Credentials:
    """One set of AWS credentials, immutable so a refresh can swap them atomically."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:
        # Keep secrets out of tracebacks, logs and pytest assertion output.
        return f"Credentials(access_key_id={self.access_key_id!r}, secret_access_key='***')"


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


def signature(
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


def canonical_request(
    method: str,
    raw_path: str,
    query: str,
    headers_block: str,
    signed: str,
    body: bytes,
    payload_hash: str | None = None,
) -> str:
    """The SigV4 canonical request; ``payload_hash`` is the caller's ``x-amz-content-sha256``
    when it sent one (botocore signs that value as is; verification checks it is the body's), else
    the body's SHA-256 is computed here."""
    if payload_hash is None:
        payload_hash = hashlib.sha256(body).hexdigest()
    return (
        f"{method.upper()}\n{canonical_uri(raw_path)}\n{canonical_query(query)}\n"
        f"{headers_block}\n\n{signed}\n{payload_hash}"
    )


def trim(value: str) -> str:
    return " ".join(value.split())


# ---------------------------------------------------------------------------------------------
# Signing


class SigV4Signer:
    """Fast SigV4 for one service+region; caches derived signing keys per (secret, date)."""

    __slots__ = ("_date", "_region", "_scope_tail", "_second", "_service")

    def __init__(self, service: str, region: str) -> None:
        self._service = service
        self._region = region
        self._scope_tail = f"/{region}/{service}/{TERMINATOR}"
        self._second = -1
        self._date = ""

    def _now(self) -> str:
        # strftime(gmtime()) costs ~2.5 µs; a busy proxy signs many requests per second.
        second = int(time.time())
        if second != self._second:
            self._date = time.strftime(AMZ_DATE_FORMAT, time.gmtime(second))
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
        items = []
        for key, value in headers.items():
            name = key.lower()
            if name not in NOT_SIGNED:
                items.append((name, value))
        return self.sign_items(method, host, raw_path, query, items, body, creds, amz_date)

    def sign_items(
        self,
        method: str,
        host: str,
        raw_path: str,
        query: str,
        items: list[tuple[str, str]],
        body: bytes,
        creds: Credentials,
        amz_date: str | None = None,
    ) -> dict[str, str]:
        """:meth:`sign` for headers already as ``(lowercase name, value)`` pairs, none of them
        in :data:`NOT_SIGNED` (the upstream path lower-cases each name once, for both its
        allow-list and this)."""
        if amz_date is None:
            amz_date = self._now()
        token = creds.session_token
        key = tuple(items)
        template = _header_template if len(key) <= _TEMPLATE_ITEMS else _build_template
        head, tail, signed = template(key, host, token)
        cr = canonical_request(method, raw_path, query, head + amz_date + tail, signed, body)
        scope = amz_date[:8] + self._scope_tail
        sig = signature(creds.secret_access_key, amz_date, scope, self._region, self._service, cr)
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


def _build_template(
    items: tuple[tuple[str, str], ...], host: str, token: str | None
) -> tuple[str, str, str]:
    """The canonical header block around the X-Amz-Date value, and the signed-header list.

    Cached: a client sends the same signed headers (content-type, accept) call after call,
    and only the date changes, so the sort and trim run once per distinct header set.
    ``x-amz-date`` is always present exactly once (sign() owns it), so its line is one
    ``head`` ending in ``x-amz-date:`` and the ``tail`` after it.
    """
    full = [*items, ("host", host), ("x-amz-date", "")]
    if token:
        full.append(("x-amz-security-token", token))
    lines, names = _header_lines(full)
    at = names.index("x-amz-date") + 1
    head = "\n".join(lines[:at])
    tail = "".join("\n" + line for line in lines[at:])
    return head, tail, ";".join(names)


#: Header sets of at most this many signed headers are cached (a client's usual few), which
#: bounds what the cache can hold when clients send large values: 64 x 6 header lines.
_TEMPLATE_ITEMS = 6
_header_template = functools.lru_cache(maxsize=64)(_build_template)


def _header_lines(items: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """The canonical header lines (``name:value``, sorted) and their distinct names."""
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
    return lines, names


def _first(item: tuple[str, str]) -> str:
    return item[0]
