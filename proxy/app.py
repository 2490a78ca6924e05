"""Builds the aiohttp Application: routes, start-up and shutdown.

Everything a request needs hangs off the Application under typed keys; nothing is
module-global, so several Sluice apps (tests, workers) can share one interpreter.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

from aiohttp import web
from aiohttp.http import HttpVersion11
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.admission import Store, StoreUnavailable
from proxy.admission.gate import Gate
from proxy.backend.store import Backend
from proxy.config import Policy
from proxy.control.controller import Adaptivity
from proxy.credentials import CredentialSource, bearer_token_from_env
from proxy.errors import error_response
from proxy.jobs import JOBS, install_jobs
from proxy.log import AccessLog
from proxy.metrics import Metrics
from proxy.ops.fleetview import FleetBoard
from proxy.ops.http import BOARD, add_routes, open_board
from proxy.ops.live import LIVE, LiveProxy
from proxy.ops.reload import RELOADER, Reloader
from proxy.pipeline import Pipeline
from proxy.policy import CompiledPolicy, PolicyRef
from proxy.signing import Credentials
from proxy.upstream import Upstream, bedrock_url

log = logging.getLogger("sluice.app")

#: Credentials used towards the built-in simulator: never send real keys to it.
SIMULATOR_CREDENTIALS = Credentials("SLUICESIMULATOR", "sluice-simulator-secret")


@dataclass(frozen=True, slots=True)
class Settings:
    """How this process runs (flags / SLUICE_* environment), as opposed to the policy."""

    upstream: str | None = None  # URL, "simulator", or None for real Bedrock
    redis_url: str | None = None
    simulator_config: str | None = None
    region: str | None = None
    config: str | None = None  # the policy file, watched for changes outside a fleet
    fleet: str | None = None  # with redis_url: follow this fleet's policy versions in Redis


POLICY = web.AppKey("policy", CompiledPolicy)
#: The policy in force for new requests (hot reload swaps it); POLICY is the one loaded.
POLICY_REF = web.AppKey("policy_ref", PolicyRef)
METRICS = web.AppKey("metrics", Metrics)
BACKEND = web.AppKey("backend", Backend)
STORE = web.AppKey("store", Store)
UPSTREAM = web.AppKey("upstream", Upstream)
SIMULATOR = web.AppKey("simulator", web.AppRunner)


def resolve_region(policy: Policy, settings: Settings) -> str:
    """Region from the flag, the policy, then the AWS environment."""
    return (
        settings.region
        or policy.server.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    )


async def _start_simulator(app: web.Application, settings: Settings) -> str:
    from proxy.simulator import build_simulator_app, load_simulator_config

    runner = web.AppRunner(build_simulator_app(load_simulator_config(settings.simulator_config)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    app[SIMULATOR] = runner
    port = runner.addresses[0][1]
    return f"http://127.0.0.1:{port}"


async def _make_upstream(app: web.Application, settings: Settings, region: str) -> Upstream:
    server = app[POLICY].policy.server
    bearer: str | None = None
    source: CredentialSource | None = None
    if settings.upstream == "simulator":
        url = await _start_simulator(app, settings)
        source = CredentialSource.static(SIMULATOR_CREDENTIALS)
    else:
        url = settings.upstream or bedrock_url(region)
        bearer = bearer_token_from_env()
        if bearer is None:
            source = await CredentialSource.create()
    return Upstream(
        url,
        region,
        credentials=source,
        bearer_token=bearer,
        connect_timeout_s=server.upstream_connect_timeout_seconds,
        read_timeout_s=server.upstream_read_timeout_seconds,
    )


async def _clear_static_limits(store: Store, policy: CompiledPolicy) -> None:
    """A pool without adaptive control has no dynamic limit: drop one an earlier policy's
    controller left in the store (it would cap the pool below its concurrency for good)."""
    for name, pool in policy.policy.models.items():
        if pool.adaptive is not None:
            continue
        try:
            await store.set_pool_limit(name, None)
        except StoreUnavailable as exc:
            log.warning(
                "stale adaptive limit not cleared",
                extra={"fields": {"event": "limit_not_cleared", "pool": name, "error": str(exc)}},
            )


def _adaptivity(
    policy: CompiledPolicy, store: Store, redis_url: str | None, metrics: Metrics
) -> Adaptivity | None:
    """Fleet-wide controllers, only when the policy asks for any (they tick in the background)."""
    pol = policy.policy
    wanted = any(p.adaptive or p.breaker for p in pol.models.values()) or any(
        w.pause for w in pol.workloads.values()
    )
    for name, pool in pol.models.items():
        if pool.concurrency is not None:
            # set_function, not set(): a gauge once given a function ignores set(), and an
            # earlier policy's controllers may have given it one.
            metrics.pool_limit.labels(name).set_function(partial(float, pool.concurrency))
    if not wanted:
        return None
    tuning = pol.server.adaptivity
    adaptivity = Adaptivity(
        policy,
        store,
        redis_url,
        registry=metrics.registry,
        tick_s=tuning.tick_seconds,
        pause_window_s=tuning.pause_window_seconds,
    )
    for name, pool in pol.models.items():
        configured = pool.concurrency

        def current(name: str = name, configured: int | None = configured) -> float:
            return float(adaptivity.limit(name) or configured or 0)

        metrics.pool_limit.labels(name).set_function(current)
    return adaptivity


def build_app(
    policy: Policy, settings: Settings, *, access_log: AccessLog | None = None
) -> web.Application:
    """An Application serving the bedrock-runtime API under ``policy``."""
    app = web.Application(client_max_size=policy.server.max_body_bytes + 1)
    app[POLICY] = CompiledPolicy(policy)
    app[POLICY_REF] = PolicyRef(app[POLICY])
    app[METRICS] = Metrics()
    region = resolve_region(policy, settings)
    logs = access_log or AccessLog(enabled=policy.server.access_log)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        backend = await _open_backend(app, settings)
        upstream = app[UPSTREAM] = await _make_upstream(app, settings, region)
        gauge, pool = app[METRICS].upstream_connections, upstream.pool
        gauge.labels("idle").set_function(lambda: pool.idle)
        gauge.labels("busy").set_function(lambda: pool.open - pool.idle)
        live = await _start_live(app, backend, upstream, logs)
        reloader, board = await _start_ops(app, settings, live, backend.store)
        fields = {"upstream": upstream.base_url, "region": region, "store": backend.kind}
        log.info("sluice ready", extra={"fields": fields})
        yield
        await board.close()
        await reloader.close()
        await live.close()
        await upstream.close()
        await backend.close()
        if SIMULATOR in app:
            await app[SIMULATOR].cleanup()

    app.cleanup_ctx.append(lifecycle)
    install_jobs(app, settings.redis_url, settings.fleet)  # batch routes + workers (proxy/jobs)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    add_routes(app)
    app.router.add_route("*", "/{tail:.*}", dispatch, expect_handler=expect_continue)
    return app


async def _open_backend(app: web.Application, settings: Settings) -> Backend:
    """The one Backend of this process (app[BACKEND]; its store is also app[STORE])."""
    server = app[POLICY].policy.server
    timeout_s = server.store_timeout_ms / 1000
    backend = app[BACKEND] = Backend.open(
        settings.redis_url, app[METRICS], timeout_s, server.grants_ahead
    )
    app[STORE] = backend.store
    await backend.start()
    return backend


async def _start_live(
    app: web.Application, backend: Backend, upstream: Upstream, logs: AccessLog
) -> LiveProxy:
    metrics, ref, store = app[METRICS], app[POLICY_REF], backend.store
    gate, cache = Gate(store, metrics), backend.cache
    # The pipeline reads the policy from ``ref`` per request; it is rebuilt on a switch
    # only because the adaptive controllers it holds are derived from the policy.
    live = app[LIVE] = LiveProxy(
        app[POLICY],
        lambda p, a: Pipeline(ref, gate, upstream, metrics, logs, cache, a),
        lambda p: _adaptivity(p, store, backend.url, metrics),
        metrics.registry,
    )
    await live.start()
    return live


async def _start_ops(
    app: web.Application, settings: Settings, live: LiveProxy, store: Store
) -> tuple[Reloader, FleetBoard]:
    """Hot reload (file or fleet versions) and the fleet board, following ``live``."""
    registry = app[METRICS].registry
    reloader = app[RELOADER] = Reloader(
        app[POLICY_REF],
        registry,
        config_path=settings.config,
        redis_url=settings.redis_url,
        fleet=settings.fleet,
        timeout_s=app[POLICY].policy.server.store_timeout_ms / 1000 + 1,
    )
    reloader.hooks.append(live.follow)
    reloader.hooks.append(lambda new: _clear_static_limits(store, new))

    async def wake_batch_worker(_new: CompiledPolicy) -> None:
        # Records held back by the old policy (a closed schedule lifted, a pause ended) are
        # looked at now, not after the refusal's Retry-After.
        jobs = app.get(JOBS)
        if jobs is not None and jobs.worker is not None:
            jobs.worker.policy_swapped()

    reloader.hooks.append(wake_batch_worker)
    await reloader.start()
    await _clear_static_limits(store, app[POLICY_REF].current)
    board = app[BOARD] = open_board(registry, reloader, settings.redis_url, settings.fleet)
    live.tap = board.snapshots.tap
    await board.start()
    return reloader, board


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Every path that is not Sluice's own goes to the Bedrock handler in force."""
    # The pipeline's own coroutine, not LiveProxy.handle's: one call less per request.
    return await request.app[LIVE].proxy.handle(request)


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: invite the body only if Sluice would take it.

    aiohttp's default handler sends ``100 Continue`` to every such request, so a client
    would upload a body the handler then refuses for its size; here a Content-Length over
    ``server.max_body_bytes`` gets its 413 (counted like the handler's, in
    ``sluice_rejections``) instead, with ``Connection: close``: the body never comes, and
    no next request can follow it (aiohttp still drains for its lingering time, 10 s, if the
    client keeps the socket open).
    """
    expect = request.headers.get("Expect", "")
    if request.version != HttpVersion11:
        return None  # HTTP/1.0 has no interim answers: the body just follows
    if expect.lower() != "100-continue":
        # As aiohttp's default does; the guard answers it in Bedrock's shape, counted.
        raise web.HTTPExpectationFailed()
    max_body = request.app[POLICY_REF].current.policy.server.max_body_bytes
    length = request.content_length
    if length is not None and length > max_body:
        request.app[METRICS].rejections.labels("ValidationException", "-").inc()
        request_id = str(uuid.uuid4())  # (UUID-shaped, as the pipeline's)
        response = error_response(
            "ValidationException",
            f"Request body is {length} bytes; this Sluice accepts at most {max_body} bytes "
            "(server.max_body_bytes)",
            status=413,
            headers={"x-sluice-request-id": request_id},
            request_id=request_id,
        )
        response.force_close()
        return response
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # (as aiohttp's own: the interim answer is not the body)
    return None


async def healthz(request: web.Request) -> web.Response:
    """The process is up and serving."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when both the store and the upstream answer."""
    app = request.app
    started = time.perf_counter()
    store_ok = await app[STORE].ping()
    upstream_ok = await app[UPSTREAM].probe()
    body = {
        "store": "ok" if store_ok else "unreachable",
        "upstream": "ok" if upstream_ok else "unreachable",
        "checked_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    if store_ok and upstream_ok:
        return web.json_response({"status": "ready", **body})
    missing = [name for name in ("store", "upstream") if body[name] != "ok"]
    response = error_response(
        "ServiceUnavailableException", f"not ready: {', '.join(missing)} unreachable", status=503
    )
    return response


async def metrics_view(request: web.Request) -> web.Response:
    """Prometheus exposition of this process's metrics."""
    data = generate_latest(request.app[METRICS].registry)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})
