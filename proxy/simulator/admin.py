"""Admin endpoints under ``/_sim/`` (not Bedrock routes; never authenticated).

* ``GET /_sim/healthz`` → ``{"status": "ok"}``
* ``GET /_sim/stats`` → ``{"models": {id: counters}, "requests": [records, oldest first]}``
* ``POST /_sim/reset`` → zero counters, forget records, refill buckets, reseed the RNG
* ``GET /_sim/config`` → the configuration in force
* ``POST /_sim/config`` → deep-merge a partial configuration and apply it at once; answers the
  new configuration. Model keys may be any id form (profile id, ARN, alias).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from proxy.errors import BedrockError
from proxy.simulator.config import SimulatorConfig, describe_validation_error, merge_patch
from proxy.simulator.parsing import parse_json
from proxy.simulator.state import SIM_STATE, SimState

__all__ = ["add_admin_routes"]


def _json(doc: Any) -> web.Response:
    return web.Response(body=orjson.dumps(doc), content_type="application/json")


async def _healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _stats(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    return _json(
        {
            "models": {mid: asdict(rt.stats) for mid, rt in state.models.items()},
            "requests": [record.to_json() for record in state.records],
        }
    )


async def _reset(request: web.Request) -> web.Response:
    request.app[SIM_STATE].reset()
    return _json({"status": "reset"})


async def _get_config(request: web.Request) -> web.Response:
    return _json(request.app[SIM_STATE].config.model_dump(mode="json"))


def _canonical_models(state: SimState, patch: dict[str, Any]) -> dict[str, Any]:
    models = patch.get("models")
    if not isinstance(models, dict):
        return patch
    renamed: dict[str, Any] = {}
    for key, value in models.items():
        if key not in state.models:
            with contextlib.suppress(BedrockError):  # unknown: a new model, keep its id
                key = state.resolve(key).model_id
        renamed[key] = value
    return {**patch, "models": renamed}


async def _set_config(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    patch = parse_json(await request.read())
    if not isinstance(patch, dict):
        raise BedrockError("ValidationException", "POST /_sim/config: expected a JSON object")
    merged = merge_patch(state.config.model_dump(), _canonical_models(state, patch))
    try:
        config = SimulatorConfig.model_validate(merged)
    except ValidationError as exc:
        raise BedrockError(
            "ValidationException", describe_validation_error("POST /_sim/config", exc)
        ) from None
    state.apply(config)
    return _json(config.model_dump(mode="json"))


def add_admin_routes(app: web.Application) -> None:
    """Register the ``/_sim/`` endpoints."""
    app.router.add_get("/_sim/healthz", _healthz)
    app.router.add_get("/_sim/stats", _stats)
    app.router.add_post("/_sim/reset", _reset)
    app.router.add_get("/_sim/config", _get_config)
    app.router.add_post("/_sim/config", _set_config)
