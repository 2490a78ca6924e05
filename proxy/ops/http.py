"""Sluice's own operator endpoints: the policy in force, the fleet view, the dashboard.

The dashboard is three static files shipped in the package (no CDN, no build step),
read once at start-up; the page polls ``/sluice/v1/fleet`` every two seconds.
"""

from __future__ import annotations

import os
import secrets
import socket
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.backend.client import redis_client
from proxy.backend.keys import DEFAULT_FLEET
from proxy.errors import error_response
from proxy.ops.fleetview import FleetBoard
from proxy.ops.reload import RELOADER, Reloader
from proxy.ops.snapshot import Snapshots

BOARD = web.AppKey("fleet_board", FleetBoard)
_STATIC = {
    "dashboard.html": "text/html",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}


def open_board(
    registry: CollectorRegistry, reloader: Reloader, redis_url: str | None, fleet: str | None
) -> FleetBoard:
    """This instance's fleet board (publishing to Redis when there is one).

    ``fleet`` is None without Redis or with ``--no-fleet``. A ``--no-fleet`` instance still
    shows on the default fleet's board (its admissions use the same per-pool keys in that
    Redis, so its traffic belongs in the numbers), but as running its own file: its reload
    count is no fleet version, and the board must not count it as a member running the fleet's.
    """
    own_file = bool(redis_url) and fleet is None

    def describe() -> dict[str, Any]:
        loaded = reloader.loaded
        return {
            "version": loaded.version,
            "sha": loaded.sha,
            "author": loaded.author,
            "source": loaded.source,
            "own_file": own_file,
        }

    instance = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
    snapshots = Snapshots(registry, lambda: reloader.ref.current, describe, instance)
    client = redis_client(redis_url, 1.0) if redis_url else None
    return FleetBoard(snapshots, client, fleet or DEFAULT_FLEET)


def add_routes(app: web.Application) -> None:
    """Register the operator routes (before the catch-all Bedrock route)."""
    files = resources.files("proxy.ops") / "static"
    pages = {name: (files / name).read_bytes() for name in _STATIC}

    async def static(request: web.Request) -> web.Response:
        name = request.match_info.get("name", "dashboard.html")
        if name not in pages:
            return error_response(
                "ResourceNotFoundException",
                f"the dashboard has no file '{name[:80]}' (files: {', '.join(pages)})",
                status=404,
            )
        return web.Response(
            body=pages[name],
            content_type=_STATIC[name],
            headers={"Cache-Control": "no-cache"},
        )

    app.router.add_get("/sluice/v1/policy", policy_view)
    app.router.add_get("/sluice/v1/fleet", fleet_view)
    app.router.add_get("/dashboard", static)
    app.router.add_get("/dashboard/{name}", static)


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


async def fleet_view(request: web.Request) -> web.Response:
    """The fleet's pools, classes, workloads and queues (JSON; the dashboard's data)."""
    view = await request.app[BOARD].view()
    return web.json_response(view.as_json())
