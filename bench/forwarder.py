"""The minimal aiohttp + uvloop forwarder: the baseline every Sluice figure is compared with.

It is the least a Python proxy can do and still be a proxy -- one pooled ClientSession, read the
body, forward the request with the same path and headers (minus hop-by-hop), return the status,
headers and body. No signing, no admission, no logging. Whatever Sluice costs beyond this is
Sluice's own doing; this is the "minimal forwarder" of /work/shared/baselines.md.

With ``--redis-url`` it is issue 12's second baseline, "forwarder + 1 Redis Lua call per
request": before forwarding, one unbatched ``EVALSHA`` of a small counter script through
redis-py's asyncio client, awaited on the request path -- the least a Redis-backed limiter can
add, and so the floor for what Sluice's quotas add to latency on the same machine.

    python bench/forwarder.py --port 8082 --upstream http://127.0.0.1:8081
    python bench/forwarder.py --port 8082 --upstream http://127.0.0.1:8081 --redis-url redis://127.0.0.1:6379
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import aiohttp
import redis.asyncio as redis
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

# A fixed-window counter: one key read and written per call, as cheap as a Lua limiter gets.
_COUNT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""


def _filter(headers: Mapping[str, str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in _HOP_BY_HOP:
            out.add(name, value)
    return out


def build_app(upstream: str, redis_url: str | None = None) -> web.Application:
    """A forwarder app sending everything except ``GET /healthz`` to ``upstream``; with
    ``redis_url``, one Redis script call per request before it is forwarded."""
    base = upstream.rstrip("/")
    count: Callable[[], Awaitable[object]] | None = None

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # limit=0: never queue in the client pool; a queue there would be the forwarder's
        # bottleneck rather than its CPU. auto_decompress=False: pass bodies through as bytes.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
        async with aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
        ) as session:
            app[SESSION] = session
            if redis_url is None:
                yield
                return
            nonlocal count
            client = redis.Redis.from_url(redis_url)
            sha = await client.script_load(_COUNT)

            def count() -> Awaitable[object]:
                return client.evalsha(sha, 1, "forwarder:count", 60_000)

            try:
                yield
            finally:
                await client.aclose()

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        if count is not None:
            await count()
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
    parser.add_argument("--redis-url", help="one EVALSHA per request against this Redis")
    args = parser.parse_args()
    web.run_app(
        build_app(args.upstream, args.redis_url),
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
