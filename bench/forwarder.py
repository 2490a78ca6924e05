"""The minimal aiohttp + uvloop forwarder: the baseline every Sluice figure is compared with.

It is the least a Python proxy can do and still be a proxy -- one pooled ClientSession, read the
body, forward the request with the same path and headers (minus hop-by-hop), return the status,
headers and body. No signing, no admission, no logging. Whatever Sluice costs beyond this is
Sluice's own doing; this is the "minimal forwarder" of /work/shared/baselines.md.

    python bench/forwarder.py --port 8082 --upstream http://127.0.0.1:8081
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

# RFC 9110 7.6.1 hop-by-hop headers, plus the ones aiohttp recomputes for the new message.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)

SESSION = web.AppKey("session", aiohttp.ClientSession)


def _filter(headers: Mapping[str, str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in _HOP_BY_HOP:
            out.add(name, value)
    return out


def build_app(upstream: str) -> web.Application:
    """A forwarder app sending everything except ``GET /healthz`` to ``upstream``."""
    base = upstream.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # limit=0: never queue in the client pool; a queue there would be the forwarder's
        # bottleneck rather than its CPU. auto_decompress=False: pass bodies through as bytes.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
        async with aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
        ) as session:
            app[SESSION] = session
            yield

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        # raw_path keeps "%3A" as the client sent it; encoded=True stops yarl re-quoting it.
        url = URL(base + request.raw_path, encoded=True)
        async with request.app[SESSION].request(
            request.method, url, headers=_filter(request.headers), data=body
        ) as resp:
            payload = await resp.read()
            return web.Response(status=resp.status, headers=_filter(resp.headers), body=payload)

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8081")
    args = parser.parse_args()
    web.run_app(
        build_app(args.upstream),
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
