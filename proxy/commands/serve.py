"""``sluice serve``: the proxy, in one process or (``--workers N``) N on one port.

Every flag can also come from a ``SLUICE_*`` environment variable; flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys

from proxy.allocator import current as current_allocator
from proxy.backend.client import redact
from proxy.backend.keys import DEFAULT_FLEET
from proxy.banner import banner as serve_banner
from proxy.commands import env
from proxy.commands.site import TLSError, install_uvloop, run_site, tls_context
from proxy.config import Policy, PolicyError, load_policy
from proxy.log import setup_logging


def add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``serve`` and its flags (in ``--help`` order)."""
    p = sub.add_parser("serve", help="run the proxy")
    _add_where_flags(p)
    _add_tls_fleet_flags(p)
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"))


def _add_where_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=env("CONFIG"), help="policy file (SLUICE_CONFIG)")
    p.add_argument("--host", default=env("HOST", "127.0.0.1"), help="bind address (SLUICE_HOST)")
    p.add_argument(
        "--port", type=int, default=int(env("PORT", "8080") or 8080), help="port (SLUICE_PORT)"
    )
    p.add_argument(
        "--upstream",
        default=env("UPSTREAM"),
        help="Bedrock URL, or 'simulator' for the built-in simulator "
        "(SLUICE_UPSTREAM; default: real Bedrock in the policy's region)",
    )
    p.add_argument(
        "--redis-url",
        default=env("REDIS_URL"),
        help="redis://host:port/db or redis+cluster://host:port (SLUICE_REDIS_URL); "
        "without it an embedded store serves this one process",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=int(env("WORKERS", "1") or 1),
        help="processes sharing the port via SO_REUSEPORT (SLUICE_WORKERS)",
    )
    p.add_argument("--region", default=env("REGION"), help="AWS region (SLUICE_REGION)")
    p.add_argument(
        "--simulator-config",
        default=env("SIMULATOR_CONFIG"),
        help="simulator config when --upstream simulator",
    )


def _add_tls_fleet_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tls-cert",
        default=env("TLS_CERT"),
        help="PEM certificate chain: serve HTTPS (SLUICE_TLS_CERT). Clients that use a "
        "Bedrock API key (AWS_BEARER_TOKEN_BEDROCK) need it: botocore sends bearer "
        "tokens only over HTTPS",
    )
    p.add_argument(
        "--tls-key", default=env("TLS_KEY"), help="PEM private key of --tls-cert (SLUICE_TLS_KEY)"
    )
    p.add_argument(
        "--fleet",
        default=env("FLEET"),
        help="with --redis-url: the fleet whose policy in Redis this instance follows, "
        "hot-reloaded (SLUICE_FLEET; default: 'default'). The stored policy wins over "
        "--config; the first instance of a fleet publishes its file",
    )
    p.add_argument(
        "--no-fleet",
        action="store_true",
        help="with --redis-url: run the --config file alone (watched, reloaded on SIGHUP) "
        "instead of the fleet's stored policy",
    )


def fleet(args: argparse.Namespace) -> str | None:
    """The fleet this instance follows: with Redis, 'default' unless named or --no-fleet."""
    if not args.redis_url or args.no_fleet:
        return None
    return str(args.fleet or DEFAULT_FLEET)


def banner(args: argparse.Namespace, policy: Policy, upstream: str | None) -> str:
    """The start-up banner: policy, listening URL, upstream and store."""
    return serve_banner(
        policy,
        args.config or "default (embedded demo)",
        f"{'https' if args.tls_cert else 'http'}://{args.host}:{args.port}",
        upstream or "Amazon Bedrock",
        redact(args.redis_url) if args.redis_url else "embedded",
        current_allocator(),
    )


def serve(args: argparse.Namespace) -> int:
    """Check policy, worker count and TLS before anything starts (exit 2), then serve."""
    setup_logging(args.log_level)
    try:
        policy = load_policy(args.config)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.workers < 1:
        print("--workers must be at least 1", file=sys.stderr)
        return 2
    try:
        # Checked before any worker starts, so a bad file is one clear error.
        tls = tls_context(args.tls_cert, args.tls_key)
    except TLSError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.workers > 1:
        from proxy.commands.workers import serve_workers

        return serve_workers(args, policy)
    return _serve_one(args, policy, tls)


def _serve_one(args: argparse.Namespace, policy: Policy, tls: ssl.SSLContext | None) -> int:
    """This process serves (alone, or as one of ``--workers`` sharing the port)."""
    from proxy.app import Settings, build_app
    from proxy.backend import BackendUnavailable
    from proxy.credentials import NoCredentialsFoundError

    settings = Settings(
        upstream=args.upstream,
        redis_url=args.redis_url,
        simulator_config=args.simulator_config,
        region=args.region,
        config=args.config,
        fleet=fleet(args),
    )
    if not args.redis_url and not args.reuse_port:
        print(
            "sluice: no --redis-url: limits are kept in this process only (embedded store; "
            "one instance)",
            file=sys.stderr,
        )
    # A worker of --workers N stays quiet: the supervisor prints one banner for all.
    text = "" if args.reuse_port else banner(args, policy, args.upstream)
    install_uvloop()
    try:
        app = build_app(policy, settings)
        asyncio.run(run_site(app, args.host, args.port, args.reuse_port, text, tls))
    except OSError as exc:
        print(f"sluice: cannot serve on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    except BackendUnavailable as exc:  # Redis down or unreachable at start
        print(f"sluice: cannot start: the quota store did not answer: {exc}", file=sys.stderr)
        return 1
    except NoCredentialsFoundError as exc:
        print(f"sluice: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0
