"""The simulator's aiohttp Application: Bedrock runtime routes, auth, records, error mapping."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.errors import STATUS, BedrockError, error_response, from_exception
from proxy.simulator import side_ops
from proxy.simulator.admin import add_admin_routes
from proxy.simulator.calls import Operation, serve_call
from proxy.simulator.config import SimulatorConfig
from proxy.simulator.models import ModelRuntime
from proxy.simulator.parsing import converse_call, parse_anthropic, parse_json
from proxy.simulator.state import SIM_STATE, SimState
from proxy.simulator.tiers import requested_tier, tier_config

__all__ = ["build_simulator_app"]

log = logging.getLogger("sluice.simulator")

_MODEL = web.RequestKey("sluice_simulator_model", str)
_ADMIN_PREFIX = "/_sim/"
# Bedrock accepts request bodies up to about 20 MB (images, documents); leave headroom.
_MAX_BODY = 25 * 1024 * 1024
_CLIENT_CLOSED = 499  # recorded status of a request whose client went away
_CONVERSE_ECHO = ("performanceConfig", "serviceTier")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_simulator_app(config: SimulatorConfig) -> web.Application:
    """A ready-to-run Application simulating bedrock-runtime as ``config`` describes."""
    app = web.Application(
        middlewares=[_bedrock_middleware],
        client_max_size=_MAX_BODY,
        # Cancel a handler when its client disconnects, so "cancelled" is counted even while
        # a call sleeps before answering; and no access log: the simulator is a benchmark
        # baseline and must not pay per-request logging. These override the runner's settings.
        handler_args={"handler_cancellation": True, "access_log": None},
    )
    app[SIM_STATE] = SimState(config)
    router = app.router
    operations: tuple[tuple[str, Operation], ...] = (
        ("invoke", "invoke"),
        ("invoke-with-response-stream", "invoke_stream"),
        ("converse", "converse"),
        ("converse-stream", "converse_stream"),
    )
    for suffix, operation in operations:
        router.add_post(f"/model/{{model_id:.+}}/{suffix}", _model_call_handler(operation))
    router.add_post("/model/{model_id:.+}/count-tokens", _count_tokens)
    router.add_post("/guardrail/{guardrail_id}/version/{version}/apply", _apply_guardrail)
    router.add_post("/guardrail-checks/invoke", _guardrail_checks)
    router.add_post("/async-invoke", _start_async)
    router.add_get("/async-invoke", _list_async)
    router.add_get("/async-invoke/{arn:.+}", _get_async)
    add_admin_routes(app)
    return app


def _resolve(request: web.Request, state: SimState) -> ModelRuntime:
    runtime = state.resolve(request.match_info["model_id"])
    request[_MODEL] = runtime.model_id
    runtime.stats.requests += 1
    return runtime


def _model_call_handler(operation: Operation) -> Handler:
    invoke = operation in ("invoke", "invoke_stream")

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[SIM_STATE]
        runtime = _resolve(request, state)
        default_output = state.config.default_output_tokens
        try:
            body = await request.read()
            echo: dict[str, Any] = {}
            doc = None
            if invoke:
                call = parse_anthropic(body, runtime.config, default_output)
            else:
                doc = parse_json(body)
                call = converse_call(doc, runtime.config, default_output)
                echo = {key: doc[key] for key in _CONVERSE_ECHO if key in doc}
            tier = tier_config(state.config, runtime, requested_tier(request.headers, doc))
            return await serve_call(request, state, runtime, call, operation, echo, tier)
        except BedrockError as exc:
            if exc.status == 429:
                runtime.stats.throttled += 1
            else:
                runtime.stats.errors += 1
            raise

    return handle


async def _count_tokens(request: web.Request) -> web.StreamResponse:
    runtime = _resolve(request, request.app[SIM_STATE])
    return side_ops.count_tokens(await request.read(), runtime)


async def _apply_guardrail(request: web.Request) -> web.StreamResponse:
    return side_ops.apply_guardrail(await request.read(), request.app[SIM_STATE])


async def _guardrail_checks(request: web.Request) -> web.StreamResponse:
    return side_ops.guardrail_checks(await request.read(), request.app[SIM_STATE])


async def _start_async(request: web.Request) -> web.StreamResponse:
    return side_ops.start_async(await request.read(), request.app[SIM_STATE])


async def _get_async(request: web.Request) -> web.StreamResponse:
    return side_ops.get_async(request.match_info["arn"], request.app[SIM_STATE])


async def _list_async(request: web.Request) -> web.StreamResponse:
    return side_ops.list_async(request.query, request.app[SIM_STATE])


def _http_error(exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (no route, wrong method, body too large) in Bedrock's shape."""
    if exc.status in (404, 405):
        return error_response(
            "UnknownOperationException",
            "The requested operation is not recognized by the service.",
            status=404,
        )
    if exc.status == 413:
        return error_response(
            "ValidationException",
            f"Input is too long for requested model (over {_MAX_BODY} bytes).",
        )
    kind = next((k for k, v in STATUS.items() if v == exc.status), "ValidationException")
    return error_response(kind, exc.reason, status=exc.status)


@web.middleware
async def _bedrock_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate Bedrock routes, map every error to Bedrock's shape, record the request."""
    admin = request.raw_path.startswith(_ADMIN_PREFIX)
    state = request.app[SIM_STATE]
    status = _CLIENT_CLOSED
    try:
        if state.verifier is not None and not admin:
            state.verifier.verify(request, await request.read())
        response = await handler(request)
        status = response.status
        return response
    except BedrockError as exc:
        status = exc.status
        return from_exception(exc)
    except web.HTTPException as exc:
        error = _http_error(exc)
        status = error.status
        return error
    except Exception:
        log.exception("simulator request failed: %s %s", request.method, request.raw_path)
        status = 500
        return error_response("InternalServerException", "The simulator failed; see its log.")
    finally:
        if not admin:
            state.record(request, request.get(_MODEL), status)
