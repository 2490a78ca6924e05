"""What ``serve`` and ``simulate`` share: the event loop, the TLS context, the listening site."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import ssl
import sys

from aiohttp import web


def install_uvloop() -> None:
    """Run asyncio on uvloop where it is installed (``SLUICE_EVENT_LOOP=asyncio``: not;
    the tests run the connection guard on both loops)."""
    if os.environ.get("SLUICE_EVENT_LOOP") == "asyncio":
        return
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class TLSError(Exception):
    """--tls-cert/--tls-key cannot be used; the message says why."""


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
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


async def run_site(
    app: web.Application,
    host: str,
    port: int,
    reuse_port: bool,
    banner: str,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Serve ``app`` on host:port until SIGTERM or SIGINT; print ``banner`` once listening."""
    # Cancel handlers when the client goes away: a dropped stream must stop the
    # upstream call and release its lease at once, not at the next write.
    from proxy.guard import guarded_runner  # timeouts, caps, Bedrock-shaped protocol errors

    # Listening for SIGTERM/SIGINT before the start-up work (Redis, credentials, the
    # policy): one that comes meanwhile stops the instance cleanly once it is up, instead
    # of killing it half-started.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # auto_decompress off: a coded request body stays as sent, bounded by max_body_bytes, and
    # is refused by intake unread (Bedrock takes none); decoding it would let a small gzip
    # body inflate past every limit, and SigV4 would hash other bytes than the client did.
    runner = guarded_runner(app, handler_cancellation=True, access_log=None, auto_decompress=False)
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
        await stop.wait()
    finally:
        await runner.cleanup()
