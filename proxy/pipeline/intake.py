"""The identify stage: which operation, which body, which caller → Caller | Refused."""

from __future__ import annotations

from aiohttp import web

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
            content_type = request.headers.get("Content-Type")
            # Bedrock treats a missing Content-Type as JSON (boto3's invoke_model sends none
            # unless asked); anything else that is not JSON cannot be a Bedrock body.
            if (
                content_type is not None
                and "json" not in content_type
                and "*/*" not in content_type
            ):
                raise _not_json(route, content_type)
            content = request.content
            if content.is_eof():
                # The whole body is buffered already (the usual case: the guard starts the
                # handler once it is in): take it in one read, without read()'s coroutines
                # and copies; over aiohttp's client_max_size is refused as read() would be.
                body = content.read_nowait()
                if request.client_max_size and len(body) > request.client_max_size:
                    return Refused(_too_large(None, max_body))
            else:
                body = await request.read()
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
