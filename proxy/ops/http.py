"""Sluice's own operator endpoints: the policy in force, the fleet view, the dashboard."""

from __future__ import annotations

from aiohttp import web

from proxy.ops.reload import RELOADER


def add_routes(app: web.Application) -> None:
    """Register the operator routes (before the catch-all Bedrock route)."""
    app.router.add_get("/sluice/v1/policy", policy_view)


async def policy_view(request: web.Request) -> web.Response:
    """Which policy this instance runs: version, hash, author, when it was loaded, from where."""
    loaded = request.app[RELOADER].loaded
    return web.json_response(
        {
            "version": loaded.version,
            "sha": loaded.sha,
            "author": loaded.author,
            "loaded_at": loaded.loaded_at,
            "source": loaded.source,
        }
    )
