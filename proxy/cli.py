"""``sluice`` commands: serve, simulate, policy check, batch, dlq, worker.

Every ``serve`` flag can also come from a ``SLUICE_*`` environment variable, so a
container needs no command line; flags win over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Sequence

from aiohttp import web

from proxy.backend.versions import DEFAULT_FLEET
from proxy.banner import banner as serve_banner
from proxy.config import PolicyError, load_policy
from proxy.jobs.commands import COMMANDS as JOB_COMMANDS
from proxy.jobs.commands import add_job_commands, run_job_command
from proxy.log import setup_logging


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"SLUICE_{name}", default)


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("--config", default=_env("CONFIG"), help="policy file (SLUICE_CONFIG)")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="bind address (SLUICE_HOST)")
    p.add_argument(
        "--port", type=int, default=int(_env("PORT", "8080") or 8080), help="port (SLUICE_PORT)"
    )
    p.add_argument(
        "--upstream",
        default=_env("UPSTREAM"),
        help="Bedrock URL, or 'simulator' for the built-in simulator "
        "(SLUICE_UPSTREAM; default: real Bedrock in the policy's region)",
    )
    p.add_argument(
        "--redis-url",
        default=_env("REDIS_URL"),
        help="redis://host:port/db or redis+cluster://host:port (SLUICE_REDIS_URL); "
        "without it an embedded store serves this one process",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=int(_env("WORKERS", "1") or 1),
        help="processes sharing the port via SO_REUSEPORT (SLUICE_WORKERS)",
    )
    p.add_argument("--region", default=_env("REGION"), help="AWS region (SLUICE_REGION)")
    p.add_argument(
        "--simulator-config",
        default=_env("SIMULATOR_CONFIG"),
        help="simulator config when --upstream simulator",
    )
    p.add_argument(
        "--tls-cert",
        default=_env("TLS_CERT"),
        help="PEM certificate chain: serve HTTPS (SLUICE_TLS_CERT). Clients that use a "
        "Bedrock API key (AWS_BEARER_TOKEN_BEDROCK) need it: botocore sends bearer "
        "tokens only over HTTPS",
    )
    p.add_argument(
        "--tls-key", default=_env("TLS_KEY"), help="PEM private key of --tls-cert (SLUICE_TLS_KEY)"
    )
    p.add_argument(
        "--fleet",
        default=_env("FLEET"),
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
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    sim = sub.add_parser("simulate", help="run the Bedrock simulator alone")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8090)
    sim.add_argument("--config", default=None, help="simulator config (YAML)")
    cache = sub.add_parser("cache", help="response cache tools")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    warm = cache_sub.add_parser("warm", help="pre-fill the response cache from a JSONL file")
    warm.add_argument("file")
    warm.add_argument(
        "--redis-url",
        default=_env("REDIS_URL"),
        help="the Redis the proxies use (SLUICE_REDIS_URL); required: an "
        "embedded cache lives only inside one running proxy",
    )
    warm.add_argument(
        "--config",
        default=_env("CONFIG"),
        help="policy: checks workloads/pools and takes each workload's TTL",
    )
    add_job_commands(sub)  # batch, dlq, worker (proxy/jobs/commands.py)
    pol = sub.add_parser("policy", help="policy tools")
    pol_sub = pol.add_subparsers(dest="policy_command", required=True)
    check = pol_sub.add_parser("check", help="validate policy files")
    check.add_argument("files", nargs="+")
    check.add_argument(
        "--strict",
        action="store_true",
        help="also fail when a secret the policy names is not available here, or when a "
        "setting can never take effect (printed as warnings)",
    )
    from proxy.ops.cli import register

    register(sub, pol_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sluice`` command."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "simulate":
        return _simulate(args)
    if args.command == "cache":
        return _cache_warm(args)
    if args.command in JOB_COMMANDS:
        return run_job_command(args)
    if hasattr(args, "run"):
        return int(args.run(args))
    return _policy_check(args.files, strict=args.strict)


def _cache_warm(args: argparse.Namespace) -> int:
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


def _policy_check(files: Sequence[str], *, strict: bool) -> int:
    from proxy.control.checks import policy_warnings
    from proxy.policy import CompiledPolicy

    failed = False
    for path in files:
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            print(exc, file=sys.stderr)
            failed = True
            continue
        warnings = policy_warnings(policy)
        for warning in warnings:
            print(f"{path}: warning: {warning}", file=sys.stderr)
        failed = failed or (strict and bool(warnings))
        note = ""
        try:
            CompiledPolicy(policy)
        except PolicyError as exc:
            note = f" (secrets not available here: {exc})"
            failed = failed or strict
        print(
            f"{path}: OK: {len(policy.models)} model pools, {len(policy.priorities)} priority "
            f"classes, {len(policy.workloads)} workloads{note}"
        )
    return 1 if failed else 0


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class TLSError(Exception):
    """--tls-cert/--tls-key cannot be used; the message says why."""


def _tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The server TLS context, or None for plain HTTP."""
    if not cert and not key:
        return None
    if not cert or not key:
        missing = "--tls-cert (SLUICE_TLS_CERT)" if not cert else "--tls-key (SLUICE_TLS_KEY)"
        raise TLSError(f"sluice: HTTPS needs both a certificate and its key; {missing} is missing")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        # ssl reports a missing file without its name; name it here.
        if not os.path.isfile(path):
            raise TLSError(f"sluice: {flag} {path}: no such file")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TLSError(
            f"sluice: --tls-cert {cert} / --tls-key {key} are not a PEM certificate and its "
            f"matching key: {exc}"
        ) from exc
    return ctx


async def _run_site(
    app: web.Application,
    host: str,
    port: int,
    reuse_port: bool,
    banner: str,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    # Cancel handlers when the client goes away: a dropped stream must stop the
    # upstream call and release its lease at once, not at the next write.
    from proxy.guard import guarded_runner  # timeouts, caps, Bedrock-shaped protocol errors

    runner = guarded_runner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(
            runner,
            host,
            port,
            reuse_port=reuse_port or None,
            backlog=2048,
            ssl_context=ssl_context,
        )
        await site.start()
        # Everything allocated so far (botocore's models, pydantic schemas, the policy)
        # lives for the whole process: move it out of the collector's sight so full
        # collections stop rescanning it while requests run.
        gc.collect()
        gc.freeze()
        if banner:
            print(banner, file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def _fleet(args: argparse.Namespace) -> str | None:
    """The fleet this instance follows: with Redis, 'default' unless named or --no-fleet."""
    if not args.redis_url or args.no_fleet:
        return None
    return str(args.fleet or DEFAULT_FLEET)


def _serve(args: argparse.Namespace) -> int:
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
        tls = _tls_context(args.tls_cert, args.tls_key)
    except TLSError as exc:
        print(exc, file=sys.stderr)
        return 2
    scheme = "https" if tls else "http"
    if args.workers > 1:
        return _serve_workers(args)
    from proxy.app import Settings, build_app

    settings = Settings(
        upstream=args.upstream,
        redis_url=args.redis_url,
        simulator_config=args.simulator_config,
        region=args.region,
        config=args.config,
        fleet=_fleet(args),
    )
    if not args.redis_url and not args.reuse_port:
        print(
            "sluice: no --redis-url: limits are kept in this process only (embedded store; "
            "one instance)",
            file=sys.stderr,
        )
    banner = (
        ""
        if args.reuse_port
        else serve_banner(
            policy,
            args.config or "default (embedded demo)",
            f"{scheme}://{args.host}:{args.port}",
            args.upstream or "Amazon Bedrock",
            args.redis_url or "embedded",
        )
    )
    _install_uvloop()
    try:
        asyncio.run(
            _run_site(
                build_app(policy, settings), args.host, args.port, args.reuse_port, banner, tls
            )
        )
    except OSError as exc:
        print(f"sluice: cannot serve on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_workers(args: argparse.Namespace) -> int:
    """Run N single-worker processes on one port (SO_REUSEPORT) and supervise them."""
    if not args.redis_url:
        print(
            "sluice: --workers > 1 needs --redis-url: the embedded store cannot be shared "
            "between processes, so each worker would enforce the limits alone",
            file=sys.stderr,
        )
        return 2
    children: list[subprocess.Popen[bytes]] = []
    upstream = args.upstream
    if upstream == "simulator":
        sim_port = _free_port()
        cmd = [sys.executable, "-m", "proxy", "simulate", "--port", str(sim_port)]
        if args.simulator_config:
            cmd += ["--config", args.simulator_config]
        children.append(subprocess.Popen(cmd))
        upstream = f"http://127.0.0.1:{sim_port}"
    base = [
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
        "--reuse-port",
        "--redis-url",
        args.redis_url,
        "--log-level",
        args.log_level,
    ]
    for flag, value in (
        ("--config", args.config),
        ("--upstream", upstream),
        ("--region", args.region),
        ("--tls-cert", args.tls_cert),
        ("--tls-key", args.tls_key),
        ("--fleet", _fleet(args)),
    ):
        if value:
            base += [flag, value]
    if args.no_fleet:
        base.append("--no-fleet")
    children += [subprocess.Popen(base) for _ in range(args.workers)]
    print(
        serve_banner(
            load_policy(args.config),
            args.config or "default (embedded demo)",
            f"{'https' if args.tls_cert else 'http'}://{args.host}:{args.port}",
            upstream or "Amazon Bedrock",
            args.redis_url,
        ),
        file=sys.stderr,
        flush=True,
    )

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)  # policy reload in every worker
    codes = [child.wait() for child in children]
    return max(codes, default=0)


def _simulate(args: argparse.Namespace) -> int:
    setup_logging("INFO")
    from proxy.simulator import build_simulator_app, load_simulator_config

    try:
        config = load_simulator_config(args.config)
    except (PolicyError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    _install_uvloop()
    banner = f"Bedrock simulator listening on http://{args.host}:{args.port}"
    asyncio.run(_run_site(build_simulator_app(config), args.host, args.port, False, banner))
    return 0
