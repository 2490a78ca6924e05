"""The identify stage: which operation, which body, which caller → Caller | Refused."""

from __future__ import annotations

import re

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from proxy.errors import BedrockError
from proxy.pipeline.call import Call, Refused
from proxy.pipeline.identify import Caller, identify
from proxy.routes import Route, match


async def identify_call(request: web.Request, call: Call) -> Caller | Refused:
    """Match the route, read the body and identify the caller, recording each on ``call``."""
    max_body = call.policy.policy.server.max_body_bytes
    try:
        route = call.route = match(request.method, request.raw_path)
        call.headers = request.headers
        body = b""
        if request.method == "POST":
            # Checked and read here, not in helpers: no call made for them per request.
            length = request.content_length
            if length is not None and length > max_body:
                raise _too_large(length, max_body)
            headers = request.headers
            content_type = headers.get("Content-Type")
            # Bedrock treats a missing Content-Type as JSON (boto3's invoke_model sends none
            # unless asked); anything else that is not JSON cannot be a Bedrock body.
            if content_type is not None and not _is_json(content_type):
                raise _not_json(route, content_type)
            if "Content-Encoding" in headers:
                # Bedrock's API takes no coded bodies (no SDK compresses them), and Sluice
                # neither decodes them (the server runs with auto_decompress off,
                # proxy/commands/site.py: no decompression bomb, no zlib error) nor forwards
                # the header: refused before a byte of the body is read.
                _check_coding(headers.getall("Content-Encoding"))
            content = request.content
            if content.is_eof():
                # The whole body is buffered already (the usual case: the guard starts the
                # handler once it is in): take it in one read, without read()'s coroutines
                # and copies; over aiohttp's client_max_size is refused as read() would be.
                body = content.read_nowait()
                if request.client_max_size and len(body) > request.client_max_size:
                    return Refused(_too_large(None, max_body))
            else:
                body = await _read(request)
            if len(body) > max_body:
                raise _too_large(len(body), max_body)
        call.body = body
        call.caller = identify(
            call.policy, request.method, request.host, request.raw_path, request.headers, body
        )
        return call.caller
    except web.HTTPRequestEntityTooLarge:
        return Refused(_too_large(None, max_body))
    except BedrockError as exc:
        return Refused(exc)


#: AWS's own JSON protocols name their versions in the subtype (application/x-amz-json-1.1).
_AMZ_JSON = "x-amz-json-"


def _is_json(content_type: str) -> bool:
    """Whether a Content-Type names a JSON body: its media type, compared without case
    (RFC 9110 8.3.1), parameters ignored; ``*/*`` as sent by generic clients counts."""
    media = content_type.partition(";")[0].strip().lower()
    if media == "application/json" or media == "*/*":  # the usual cases: no split
        return True
    kind, slash, sub = media.partition("/")
    if not slash or kind not in ("application", "text"):
        return False
    return sub == "json" or sub.endswith("+json") or sub.startswith(_AMZ_JSON)


def _check_coding(values: list[str]) -> None:
    """Refuse any content coding but ``identity`` (an empty value codes nothing either)."""
    for value in values:
        for coding in value.split(","):
            if coding.strip().lower() not in ("", "identity"):
                raise _coded(value)


def _coded(coding: str) -> BedrockError:
    # A header value is request data: echoed only when it is plain tokens, and short.
    shown = coding[:40] if _TOKEN_LIST.fullmatch(coding[:40]) else "(not a token list)"
    return BedrockError(
        "ValidationException",
        f"Content-Encoding '{shown}' is not supported: Bedrock takes the body as it is, "
        "so send it uncompressed (no Content-Encoding, or identity)",
        headers={"Accept-Encoding": "identity"},
    )


#: Content codings as RFC 9110 spells them: tokens, comma-separated (echoed only if so).
_TOKEN_LIST = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")


async def _read(request: web.Request) -> bytes:
    """The body of a request still sending it (the slow path, so a call of its own)."""
    try:
        return await request.read()
    except RequestPayloadError:
        # The parser could not decode the body's framing (or, in a runner left with
        # auto_decompress on, its coding): the client's fault, not a 500 with a traceback.
        raise BedrockError(
            "ValidationException",
            "The request body could not be read: its chunked framing or its "
            "Content-Encoding is malformed",
        ) from None


def _not_json(route: Route, content_type: str) -> BedrockError:
    return BedrockError(
        "ValidationException",
        f"{route.operation} takes a JSON body; Content-Type '{content_type[:80]}' "
        "is not supported (use application/json)",
    )


def _too_large(size: int | None, max_body: int) -> BedrockError:
    got = f"{size} bytes" if size is not None else "larger than that"
    return BedrockError(
        "ValidationException",
        f"Request body is {got}; this Sluice accepts at most {max_body} bytes "
        "(server.max_body_bytes)",
        status=413,
    )
