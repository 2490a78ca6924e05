"""Durable batch jobs: Bedrock batch JSONL in, drained by admission, dead letters replayable.

``install_jobs`` is the one call ``proxy/app.py`` makes: it mounts the
``/sluice/v1/batches`` and ``/sluice/v1/dlq`` routes and starts this instance's
workers after the store and the upstream are up.
"""

from __future__ import annotations

from aiohttp import web

from proxy.jobs.api import add_routes
from proxy.jobs.dlq_api import add_dlq_routes
from proxy.jobs.runtime import JOBS, Jobs, lifecycle

__all__ = ["JOBS", "Jobs", "install_jobs"]


def install_jobs(app: web.Application, redis_url: str | None, fleet: str | None) -> None:
    """Mount the batch routes and run the queue and workers with the app (call before the
    Bedrock catch-all route is added, after the app's own cleanup context); with Redis the
    queue is ``fleet``'s own."""
    add_routes(app)
    add_dlq_routes(app)
    app.cleanup_ctx.append(lifecycle(redis_url, fleet))
