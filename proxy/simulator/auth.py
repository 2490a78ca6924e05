"""SigV4 and bearer-token verification, with botocore's own signer as the reference.

Tests use the simulator to prove that Sluice's re-signing is valid, so the check must be the
reference implementation (bedrock-wire.md §5), not a second implementation that could share a
bug with the proxy's: the canonical request and signature come from ``botocore.auth.SigV4Auth``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import UTC, datetime, timedelta

from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from proxy.errors import BedrockError
from proxy.simulator.config import AuthConfig

__all__ = ["Verifier"]

_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/,\s]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request,\s*"
    r"SignedHeaders=([^,\s]+),\s*Signature=([0-9a-f]{64})$"
)
_UNSIGNED = "UNSIGNED-PAYLOAD"
_AMZ_DATE = "%Y%m%dT%H%M%SZ"
#: How far a request's X-Amz-Date may be from the server's clock, either way (AWS: 15 min).
SKEW = timedelta(minutes=15)

MISSING_TOKEN = "Missing Authentication Token"
BAD_TOKEN = "The security token included in the request is invalid."
BAD_SIGNATURE = (
    "The request signature we calculated does not match the signature you provided. Check your "
    "AWS Secret Access Key and signing method. Consult the service documentation for details."
)


def _invalid_signature() -> BedrockError:
    return BedrockError("InvalidSignatureException", BAD_SIGNATURE)


class Verifier:
    """Checks a request's ``Authorization`` against the configured test credentials."""

    __slots__ = ("_bearer", "_secrets")

    def __init__(self, auth: AuthConfig) -> None:
        self._secrets: dict[str, str] = {}
        if auth.access_key_id is not None and auth.secret_access_key is not None:
            self._secrets[auth.access_key_id] = auth.secret_access_key
        self._bearer = auth.bearer_token

    def verify(self, request: web.BaseRequest, body: bytes) -> None:
        """Return if the request is authentic; else raise the 403 Bedrock would send."""
        header = request.headers.get("Authorization")
        if not header:
            raise BedrockError("MissingAuthenticationTokenException", MISSING_TOKEN, status=403)
        if header.startswith("Bearer "):
            token = header[7:].strip()
            if self._bearer is None or not hmac.compare_digest(token, self._bearer):
                raise BedrockError("UnrecognizedClientException", BAD_TOKEN)
            return
        match = _AUTH_RE.match(header)
        if match is None:
            raise BedrockError(
                "IncompleteSignatureException",
                f"Authorization header requires 'Credential', 'Signature' and 'SignedHeaders' "
                f"parameters. Authorization={header.split(' ', 1)[0]}",
                status=403,
            )
        akid, _date, region, service, signed, signature = match.groups()
        secret = self._secrets.get(akid)
        if secret is None:
            raise BedrockError("UnrecognizedClientException", BAD_TOKEN)
        self._check_body_hash(request, body)
        check_skew(request.headers.get("x-amz-date"), datetime.now(UTC))
        expected = _reference_signature(request, body, akid, secret, region, service, signed)
        if expected is None or not hmac.compare_digest(expected, signature):
            raise _invalid_signature()

    @staticmethod
    def _check_body_hash(request: web.BaseRequest, body: bytes) -> None:
        # botocore trusts a client-supplied X-Amz-Content-SHA256 when it builds the canonical
        # request, so a tampered body would still verify; check the claim against the body.
        claimed = request.headers.get("X-Amz-Content-SHA256")
        if claimed in (None, _UNSIGNED):
            return
        if not hmac.compare_digest(claimed, hashlib.sha256(body).hexdigest()):
            raise _invalid_signature()


def check_skew(amz_date: str | None, now: datetime) -> None:
    """Refuse a signature dated more than 15 minutes from ``now``, with AWS's messages."""
    try:
        signed = datetime.strptime(amz_date or "", _AMZ_DATE).replace(tzinfo=UTC)
    except ValueError:
        return  # no usable date: the signature check refuses it
    stamp = now.strftime(_AMZ_DATE)
    if signed < now - SKEW:
        raise BedrockError(
            "InvalidSignatureException",
            f"Signature expired: {amz_date} is now earlier than "
            f"{(now - SKEW).strftime(_AMZ_DATE)} ({stamp} - 15 min.)",
        )
    if signed > now + SKEW:
        raise BedrockError(
            "InvalidSignatureException",
            f"Signature not yet current: {amz_date} is still later than "
            f"{(now + SKEW).strftime(_AMZ_DATE)} ({stamp} + 15 min.)",
        )


def _reference_signature(
    request: web.BaseRequest,
    body: bytes,
    akid: str,
    secret: str,
    region: str,
    service: str,
    signed: str,
) -> str | None:
    """botocore's signature for the request as received (None if a signed header is absent)."""
    headers = request.headers
    names = signed.split(";")
    if "host" not in names or "x-amz-date" not in headers:
        return None
    subset: dict[str, str] = {}
    for name in names:
        if name == "host":
            subset["host"] = request.host
        elif name in headers:
            subset[name] = headers[name]
        else:
            return None
    aws_request = AWSRequest(
        request.method, "http://" + request.host + request.raw_path, headers=subset, data=body
    )
    aws_request.context["timestamp"] = headers["x-amz-date"]
    signer = SigV4Auth(
        Credentials(akid, secret, headers.get("x-amz-security-token")), service, region
    )
    canonical = signer.canonical_request(aws_request)
    signature: str = signer.signature(signer.string_to_sign(aws_request, canonical), aws_request)
    return signature
