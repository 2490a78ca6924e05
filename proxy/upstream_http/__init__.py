"""Sluice's HTTP/1.1 client to the upstream: keep-alive connections, one request at a time each.

Sluice sends one kind of request upstream (a signed POST with a known body, now and then a
GET) and reads one kind of answer (a JSON body, or an event stream relayed as it arrives).
aiohttp's ``ClientSession`` does far more per request (cookies, redirects, tracing, proxies,
per-request timer objects, a task per body write, copies of the request kept for
``raise_for_status``): it was about a fifth of a proxied request's CPU. This client writes the
request in one call and parses the answer with llhttp (``httptools``, the parser uvloop's
authors ship and uvicorn runs on), keeping nothing per request beyond the answer itself.

Errors are aiohttp's exception types (``ClientError`` subclasses, and ``TimeoutError`` for a
read that waited too long), so callers handle one family whichever client sent the request.

* :mod:`.reply` -- one answer, read whole or as it arrives;
* :mod:`.connection` -- one connection: llhttp's callbacks feed the answer in flight;
* :mod:`.resolve` -- the host's addresses, looked up once for many connections;
* :mod:`.pool` -- the connections: reuse, connect, idle expiry.
"""

from proxy.upstream_http.pool import UpstreamPool
from proxy.upstream_http.reply import UpstreamConnectError, UpstreamReply

__all__ = ["UpstreamConnectError", "UpstreamPool", "UpstreamReply"]
