"""Bedrock-shaped error responses: the one place that builds them.

Every refusal Sluice or its simulator sends looks like one from Bedrock itself:
a JSON body ``{"message": ...}`` plus ``x-amzn-ErrorType``.  botocore names the
error from that header (cut at the first ``:``), so the header decides whether
boto3 retries; the body only carries the human-readable reason.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import orjson
from aiohttp import web

# Bedrock appends this namespace to the error type; botocore cuts it off again.
_TYPE_SUFFIX = ":http://internal.amazon.com/coral/com.amazon.bedrock/"

#: HTTP status Bedrock uses for each exception it can raise.
STATUS: Mapping[str, int] = {
    "ThrottlingException": 429,
    "ModelNotReadyException": 429,
    "ServiceUnavailableException": 503,
    "InternalServerException": 500,
    "ModelTimeoutException": 408,
    "ValidationException": 400,
    "ServiceQuotaExceededException": 400,
    "ConflictException": 400,
    "AccessDeniedException": 403,
    "UnrecognizedClientException": 403,
    "InvalidSignatureException": 403,
    "MissingAuthenticationTokenException": 403,
    "IncompleteSignatureException": 400,
    "ResourceNotFoundException": 404,
    "ModelErrorException": 424,
    "ModelStreamErrorException": 424,
    "RequestEntityTooLargeException": 413,
    "BadGatewayException": 502,
    "UnknownOperationException": 404,
}


class BedrockError(Exception):
    """An error to be answered in Bedrock's shape; raise it anywhere on the request path."""

    def __init__(
        self,
        error_type: str,
        message: str,
        *,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.status = status if status is not None else STATUS.get(error_type, 400)
        self.headers = dict(headers) if headers else {}


def error_body(message: str) -> bytes:
    """The JSON body Bedrock sends with an error."""
    try:
        return orjson.dumps({"message": message})
    except TypeError:
        # A message quoting undecodable input (lone surrogates): never let the error
        # answer itself fail; show those bytes as U+FFFD.
        clean = message.encode("utf-8", "replace").decode("utf-8")
        return orjson.dumps({"message": clean})


def error_headers(error_type: str, request_id: str | None = None) -> dict[str, str]:
    """The headers that make botocore recognise ``error_type``."""
    return {
        "Content-Type": "application/json",
        "x-amzn-ErrorType": error_type + _TYPE_SUFFIX,
        "x-amzn-RequestId": request_id or str(uuid.uuid4()),
    }


def error_response(
    error_type: str,
    message: str,
    *,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
    request_id: str | None = None,
) -> web.Response:
    """Build the aiohttp response for a Bedrock-style error."""
    all_headers = error_headers(error_type, request_id)
    if headers:
        all_headers.update(headers)
    return web.Response(
        status=status if status is not None else STATUS.get(error_type, 400),
        body=error_body(message),
        headers=all_headers,
    )


def from_exception(exc: BedrockError, request_id: str | None = None) -> web.Response:
    """Turn a raised :class:`BedrockError` into its response."""
    return error_response(
        exc.error_type, exc.message, status=exc.status, headers=exc.headers, request_id=request_id
    )
