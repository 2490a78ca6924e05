"""A tiny Bedrock-runtime stand-in: answers InvokeModel with an Anthropic-shaped body.

Used as the upstream when the simulator is not wanted (``--upstream stub``) and for the
fixed-delay latency test: it does the least work an upstream can do, so what a proxy adds
stands out.

    python bench/stub_upstream.py --port 8081 [--delay-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json

from aiohttp import web

_RESPONSE = json.dumps(
    {
        "id": "msg_bdrk_01Bench0000000000000000",
        "type": "message",
        "role": "assistant",
        "model": "claude-3-haiku-20240307",
        "content": [
            {
                "type": "text",
                "text": "Natsume's Book of Friends has the same quiet, episodic wonder. "
                "Try Aria too.",
            }
        ],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 231, "output_tokens": 22},
    },
    separators=(",", ":"),
).encode()

# The headers Bedrock sets on InvokeModel responses; precomputed except the request id.
_STATIC_HEADERS = {
    "Content-Type": "application/json",
    "X-Amzn-Bedrock-Input-Token-Count": "231",
    "X-Amzn-Bedrock-Output-Token-Count": "22",
    "X-Amzn-Bedrock-Invocation-Latency": "0",
}


def build_app(delay_ms: float) -> web.Application:
    """The stub app; every POST under /model/ is answered after ``delay_ms``."""
    delay = delay_ms / 1000.0
    ids = itertools.count()

    async def invoke(request: web.Request) -> web.Response:
        await request.read()  # a real upstream consumes the body; so must the stub
        if delay:
            await asyncio.sleep(delay)
        headers = {**_STATIC_HEADERS, "x-amzn-RequestId": f"00000000-bench-{next(ids):012d}"}
        return web.Response(body=_RESPONSE, headers=headers)

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/model/{model_id}/{operation}", invoke)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    # access_log=None: logging every request would be most of the stub's CPU.
    web.run_app(
        build_app(args.delay_ms),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=1.0,
        loop=_new_loop(),
    )


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


if __name__ == "__main__":
    main()
