"""One ``--redis-url`` for everything Sluice keeps in Redis (limits, cache, fleet state).

``redis://host:port/db`` (also ``rediss://``, ``unix://``) is one server;
``redis+cluster://host:port`` (any node as seed) is a Redis Cluster.
"""

from __future__ import annotations

import re
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

__all__ = [
    "FAILURES",
    "NoScriptError",
    "Redis",
    "RedisCluster",
    "ResponseError",
    "node_client",
    "node_url",
    "redact",
    "redis_client",
]

#: What a failed Redis call can raise (cluster setup errors are not RedisError subclasses).
FAILURES: Final = (RedisError, RedisClusterException, OSError, TimeoutError)


def redis_client(url: str, timeout_s: float) -> Redis | RedisCluster:
    """A client for ``url``; every caller bounds its own calls by ``timeout_s`` as well."""
    opts: dict[str, Any] = {
        # Connecting may take longer than one decision may wait (a cluster reads its slot
        # map first); each call is bounded by the caller's timeout on top of this anyway.
        "socket_connect_timeout": max(timeout_s, 2.0),
        # One immediate retry covers a pooled connection that died with a restarted server.
        "retry": Retry(NoBackoff(), 1),
    }
    scheme, sep, rest = url.partition("://")
    if scheme in ("redis+cluster", "rediss+cluster"):
        return RedisCluster.from_url(scheme.split("+")[0] + sep + rest, **opts)
    return Redis.from_url(url, **opts)


def node_url(url: str, node: str | None = None) -> str:
    """A plain ``redis://`` URL of one node: the cluster seed for ``redis+cluster://``, or
    ``node`` (``host:port``) with the URL's credentials, TLS and options."""
    scheme, sep, rest = url.partition("://")
    if node is not None:
        authority, slash, tail = rest.partition("/")
        creds, at, _ = authority.rpartition("@")
        rest = f"{creds}{at}{node}{slash}{tail}"
    return scheme.split("+")[0] + sep + rest


def node_client(url: str, timeout_s: float) -> Redis:
    """A client of one node (a cluster's seed): pub/sub, which every node of a cluster relays."""
    return Redis.from_url(node_url(url), socket_connect_timeout=max(timeout_s, 2.0))


def redact(url: str) -> str:
    """``url`` fit for a log line or message: its password (``user:pw@`` or ``?password=``)
    replaced by ``***``, everything else (scheme, user, host, port, db) kept."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority, slash, tail = rest.partition("/")
    creds, at, host = authority.rpartition("@")
    if at and ":" in creds:
        authority = f"{creds.partition(':')[0]}:***@{host}"
    return _QUERY_PASSWORD.sub(r"\1***", f"{scheme}{sep}{authority}{slash}{tail}")


_QUERY_PASSWORD: Final = re.compile(r"([?&]password=)[^&#]*")
