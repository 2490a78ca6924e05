"""``sluice cache warm``: pre-fill the proxies' response cache in Redis from a JSONL file."""

from __future__ import annotations

import argparse
import asyncio
import sys

from proxy.commands import env
from proxy.config import PolicyError, load_policy


def add_cache(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``cache warm``."""
    cache = sub.add_parser("cache", help="response cache tools")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    warm = cache_sub.add_parser("warm", help="pre-fill the response cache from a JSONL file")
    warm.add_argument("file")
    warm.add_argument(
        "--redis-url",
        default=env("REDIS_URL"),
        help="the Redis the proxies use (SLUICE_REDIS_URL); required: an "
        "embedded cache lives only inside one running proxy",
    )
    warm.add_argument(
        "--config",
        default=env("CONFIG"),
        help="policy: checks workloads/pools and takes each workload's TTL",
    )


def cache_warm(args: argparse.Namespace) -> int:
    """0 when every line was stored, 1 when some were not, 2 when nothing could start."""
    from proxy.backend.cache import open_cache
    from proxy.pipeline.warm import warm

    if not args.redis_url:
        print(
            "sluice cache warm needs --redis-url (or SLUICE_REDIS_URL): the proxies read "
            "their cache from Redis",
            file=sys.stderr,
        )
        return 2
    try:
        policy = load_policy(args.config) if args.config else None
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2

    async def run() -> int:
        cache = open_cache(args.redis_url)
        try:
            report = await warm(cache, args.file, policy=policy)
        except OSError as exc:
            print(f"{args.file}: cannot read: {exc.strerror or exc}", file=sys.stderr)
            return 2
        finally:
            await cache.close()
        for bad in report.bad:
            print(f"{args.file}:{bad.line}: {bad.reason}", file=sys.stderr)
        if report.store_error:
            print(f"{args.file}: stopped: {report.store_error}", file=sys.stderr)
        print(f"{args.file}: {report.stored} of {report.lines} lines stored")
        return 0 if report.ok else 1

    return asyncio.run(run())
