"""``/sluice/v1/dlq``: list, show, replay and discard the caller's workload's dead letters.

Identified and answered like the batch routes (:mod:`proxy.jobs.api`): a dead letter
belongs to its record's workload and only that workload sees, replays or discards it.
"""

from __future__ import annotations

import logging
from collections import Counter

from aiohttp import web

from proxy.errors import BedrockError
from proxy.jobs.api import PREFIX, allowed_pool, answers, caller_of, jobs_of, json_response
from proxy.jobs.queue import DeadLetter
from proxy.jobs.runtime import Jobs
from proxy.pipeline.identify import Caller

log = logging.getLogger("sluice.jobs")


def _matching(request: web.Request, caller: Caller, entries: list[DeadLetter]) -> list[DeadLetter]:
    q = request.query
    return [
        d
        for d in entries
        if d.workload == caller.workload.name
        and q.get("reason") in (None, d.reason)
        and q.get("batch") in (None, d.batch_id)
    ]


async def _own_dead_letter(request: web.Request, caller: Caller) -> DeadLetter:
    """The dead letter the path names, if it is the caller's workload's (else 404)."""
    dlq_id = request.match_info["dlq_id"]
    entry = await jobs_of(request).queue.dead_letter_by_id(dlq_id)
    if entry is None or entry.workload != caller.workload.name:
        raise BedrockError(
            "ResourceNotFoundException",
            f"dead letter '{dlq_id}' not found for workload '{caller.workload.name}'",
            status=404,
        )
    return entry


@answers
async def dlq_list(request: web.Request) -> web.Response:
    """Dead letters of the caller's workload (``?reason=``, ``?batch=``)."""
    caller = caller_of(request)
    entries = _matching(request, caller, await jobs_of(request).queue.dead_letters())
    return json_response({"deadLetters": [d.to_json() for d in entries]})


@answers
async def dlq_show(request: web.Request) -> web.Response:
    """One dead letter, with its model input and the upstream error."""
    entry = await _own_dead_letter(request, caller_of(request))
    return json_response(entry.to_json())


@answers
async def dlq_replay(request: web.Request) -> web.Response:
    """Replay matching dead letters (``?reason= ?batch= ?modelId=``) into their batches.

    ``modelId`` must be a model the workload may call, exactly as for a submit. A dead
    letter of a cancelled (or deleted) batch stays where it is: the answer counts those
    under ``skipped``, by reason.
    """
    caller = caller_of(request)
    jobs = jobs_of(request)
    model = request.query.get("modelId")
    if model:
        allowed_pool(jobs.policy, caller, model)
    entries = _matching(request, caller, await jobs.queue.dead_letters())
    replayed = 0
    skipped: Counter[str] = Counter()
    for entry in entries:
        outcome = await jobs.queue.replay(entry, model)
        if outcome == "replayed":
            replayed += 1
            jobs.replayed(entry)
            continue
        skipped[outcome] += 1
        jobs.metrics.replay_skipped.labels(entry.workload, outcome).inc()
    if skipped:
        log.warning(
            "dead letters not replayed",
            extra={"fields": {"workload": caller.workload.name, "replayed": replayed,
                              **{f"skipped_{k}": v for k, v in sorted(skipped.items())}}},
        )  # fmt: skip
    return json_response(
        {"replayed": replayed, "skipped": skipped.total(), "skippedReasons": dict(skipped)}
    )


def _discarded(jobs: Jobs, caller: Caller, dropped: list[DeadLetter], asked: int) -> None:
    """Count and log what a discard dropped: the records are given up for good."""
    for entry in dropped:
        jobs.metrics.discarded.labels(entry.workload, entry.reason).inc()
    log.warning(
        "dead letters discarded",
        extra={"fields": {"workload": caller.workload.name, "discarded": len(dropped),
                          "taken_by_another_call": asked - len(dropped),
                          "reasons": dict(Counter(d.reason for d in dropped))}},
    )  # fmt: skip


@answers
async def dlq_discard(request: web.Request) -> web.Response:
    """Discard matching dead letters (``?reason= ?batch=``) for good: their records keep
    their error lines and are never replayed. One a concurrent replay took is not counted."""
    caller = caller_of(request)
    jobs = jobs_of(request)
    entries = _matching(request, caller, await jobs.queue.dead_letters())
    dropped = await jobs.queue.discard(entries)
    _discarded(jobs, caller, dropped, len(entries))
    return json_response({"discarded": len(dropped)})


@answers
async def dlq_delete(request: web.Request) -> web.Response:
    """Discard one dead letter; 404 when it is not the caller's, or a concurrent replay or
    discard took it first."""
    caller = caller_of(request)
    jobs = jobs_of(request)
    entry = await _own_dead_letter(request, caller)
    dropped = await jobs.queue.discard([entry])
    if not dropped:
        raise BedrockError(
            "ResourceNotFoundException",
            f"dead letter '{entry.dlq_id}' not found for workload '{caller.workload.name}': "
            "a concurrent replay or discard took it first",
            status=404,
        )
    _discarded(jobs, caller, dropped, 1)
    return json_response({"discarded": 1})


def add_dlq_routes(app: web.Application) -> None:
    """Mount the dead-letter routes (before the Bedrock catch-all)."""
    r = app.router
    r.add_get(f"{PREFIX}/dlq", dlq_list)
    r.add_post(f"{PREFIX}/dlq/replay", dlq_replay)
    r.add_post(f"{PREFIX}/dlq/discard", dlq_discard)
    r.add_get(PREFIX + "/dlq/{dlq_id}", dlq_show)
    r.add_delete(PREFIX + "/dlq/{dlq_id}", dlq_delete)
