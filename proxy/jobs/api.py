"""``/sluice/v1/batches`` and ``/sluice/v1/dlq``: submit, watch, fetch, cancel, replay.

Every route identifies its caller exactly like a Bedrock call (SigV4 key, bearer key,
header mode, default workload); a batch belongs to the caller's workload and is
visible only to it. Every refusal is Bedrock-shaped and counted in
``sluice_rejections_total``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import orjson
from aiohttp import web

from proxy.admission.gate import retry_headers
from proxy.errors import BedrockError, from_exception
from proxy.jobs.queue import (
    BatchCompleted,
    BatchMeta,
    BatchRunning,
    QueueFull,
    QueueUnavailable,
    SubmitOutcomeUnknown,
    new_id,
)
from proxy.jobs.records import INVOCATIONS, BatchInputError, Invocation, manifest, parse_jsonl
from proxy.jobs.runtime import JOBS, Jobs
from proxy.pipeline.identify import Caller, identify
from proxy.policy import CompiledPolicy, PoolInfo
from proxy.routes import check_model_id

log = logging.getLogger("sluice.jobs")
PREFIX = "/sluice/v1"
#: Retry-After bounds for a producer refused by the queue cap.
_MIN_RETRY_S, _MAX_RETRY_S, _NO_RATE_RETRY_S = 1, 3600, 60


def jobs_of(request: web.Request) -> Jobs:
    """The Application's batch queue, workers and metrics."""
    return request.app[JOBS]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Request-scoped: the identified workload, for metric labels.
_WORKLOAD = web.RequestKey("sluice_workload", str)
_QUEUE_DOWN_RETRY_MS = 1000
#: The thread batch files are parsed on (see :func:`submit`).
_PARSER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-jsonl")


def answers(handler: Handler) -> Handler:
    """Answer a :class:`BedrockError` (or an unreachable queue, 503) in Bedrock's shape."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except SubmitOutcomeUnknown as exc:
            log.warning("batch queue unavailable: %s", exc)
            error = BedrockError(
                "ServiceUnavailableException",
                f"Sluice's batch queue store stopped answering as batch '{exc.batch_id}' was "
                "being completed: it may have been accepted. Look it up (GET "
                f"{PREFIX}/batches/{exc.batch_id}) before resubmitting: a resubmitted batch "
                "would run its records again",
                status=503,
                headers=retry_headers(_QUEUE_DOWN_RETRY_MS),
            )
        except QueueUnavailable as exc:
            log.warning("batch queue unavailable: %s", exc)
            # "Nothing was changed" holds for a submit too: one that fails half-way removes
            # what it wrote, and workers never run a record of a batch not fully submitted.
            error = BedrockError(
                "ServiceUnavailableException",
                f"Sluice's batch queue store is unreachable or refused the write ({exc}); "
                "nothing was changed by this request; retry in "
                f"{_QUEUE_DOWN_RETRY_MS // 1000} s",
                status=503,
                headers=retry_headers(_QUEUE_DOWN_RETRY_MS),
            )
        except BedrockError as exc:
            error = exc
        workload = request.get(_WORKLOAD, "-")
        jobs_of(request).metrics_app.rejections.labels(error.error_type, workload).inc()
        return from_exception(error)

    return wrapped


def caller_of(request: web.Request, body: bytes = b"") -> Caller:
    """Who calls, identified as a Bedrock call is (remembered for the refusal metric)."""
    jobs = jobs_of(request)
    caller = identify(
        jobs.policy, request.method, request.host, request.raw_path, request.headers, body
    )
    request[_WORKLOAD] = caller.workload.name
    return caller


def json_response(doc: object, status: int = 200) -> web.Response:
    """``doc`` as a JSON answer."""
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


async def _status_doc(jobs: Jobs, meta: BatchMeta) -> dict[str, object]:
    depth, age = await jobs.queue.depth(meta.stream)
    rate = await jobs.queue.drain_rate(meta.stream)
    pending = meta.pending
    # The workload's queue on this pool drains in order, shared by its batches: this one is
    # done once what was queued before it has drained too. Its own records alone at the
    # queue's rate (as before) said "1 s" for a batch behind 1,460 others' (done in 108 s).
    # At the last minute's rate, the whole queue is about when the newest batch ends and
    # later than older ones do.
    eta = None if pending == 0 or rate <= 0 else round(max(depth, pending) / rate, 1)
    info = {
        "records": meta.records,
        "succeeded": meta.succeeded,
        "failed": meta.failed,
        "inputTokens": meta.input_tokens,
        "outputTokens": meta.output_tokens,
    }
    return {
        "batchId": meta.batch_id,
        "workload": meta.workload,
        "pool": meta.pool,
        "modelId": meta.model,
        "invocationType": meta.invocation,
        "status": meta.status,
        **info,
        "pending": pending,
        "createdAt": meta.created_ms,
        "queueDepth": depth,
        "oldestPendingAgeSeconds": round(age, 1) if pending else 0.0,
        "drainRatePerSecond": round(rate, 3),
        "etaSeconds": eta,
        "manifest": manifest(info),
    }


async def _own_batch(request: web.Request) -> BatchMeta:
    caller = caller_of(request)
    meta = await jobs_of(request).queue.batch(request.match_info["batch_id"])
    # A batch still submitting was never answered 202: it does not exist for anyone yet.
    if meta is None or meta.submitting or meta.workload != caller.workload.name:
        raise BedrockError(
            "ResourceNotFoundException",
            f"batch '{request.match_info['batch_id']}' not found for workload "
            f"'{caller.workload.name}'",
            status=404,
        )
    return meta


def _resolve_submit(
    policy: CompiledPolicy, request: web.Request, caller: Caller
) -> tuple[str, str]:
    model = request.query.get("modelId")
    if not model:
        raise BedrockError("ValidationException", "modelId: query parameter missing")
    invocation = request.query.get("invocationType", "invoke")
    if invocation not in INVOCATIONS:
        raise BedrockError(
            "ValidationException",
            f"invocationType: '{invocation[:40]}' is not one of {', '.join(INVOCATIONS)}",
        )
    allowed_pool(policy, caller, model)
    return model, invocation


def allowed_pool(policy: CompiledPolicy, caller: Caller, model: str) -> PoolInfo:
    """The pool ``model`` runs on, if the caller's ``models:`` allow-list has it (else 403;
    a malformed or unknown model is refused as a live call's is). Submit and replay both
    ask here."""
    check_model_id(model)
    pool = policy.resolve_pool(model)
    allowed = caller.workload.allowed_pools
    if allowed is not None and pool.name not in allowed:
        raise BedrockError(
            "AccessDeniedException",
            f"workload '{caller.workload.name}' may not call model pool '{pool.name}'",
            status=403,
        )
    return pool


def _check_size(workload: str, cap: int, incoming: int) -> None:
    """Refuse a batch no queue could ever take whole (``batch.max_queued_records``)."""
    if incoming > cap:
        raise BedrockError(
            "ValidationException",
            f"batch of {incoming} records exceeds batch.max_queued_records ({cap}) of "
            f"workload '{workload}'; split it",
        )


async def _queue_full(
    jobs: Jobs, workload: str, cap: int, incoming: int, queued: int
) -> BedrockError:
    """The 429 for a submit the store found no room for, with Retry-After from the drain
    rate (the store decided atomically; this only words the answer)."""
    rate = 0.0
    for stream in await jobs.queue.streams():
        if stream.workload == workload:
            rate += await jobs.queue.drain_rate(stream)
    excess = max(1, queued + incoming - cap)
    wait_s = math.ceil(excess / rate) if rate > 0 else _NO_RATE_RETRY_S
    wait_s = max(_MIN_RETRY_S, min(_MAX_RETRY_S, wait_s))
    return BedrockError(
        "ThrottlingException",
        f"Too many requests: workload '{workload}' has {queued} batch records queued or "
        f"being submitted; "
        f"{incoming} more would exceed batch.max_queued_records ({cap}); draining at "
        f"{rate:.1f} records/s, retry in {wait_s} s",
        status=429,
        headers=retry_headers(wait_s * 1000),
    )


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The whole JSONL body, streamed in chunks (not capped by ``server.max_body_bytes``)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(1 << 20):
        size += len(chunk)
        if size > limit:
            raise BedrockError(
                "ValidationException",
                f"batch body is larger than server.jobs.max_submit_bytes ({limit} bytes); split it",
                status=413,
            )
        chunks.append(chunk)
    return b"".join(chunks)


@answers
async def submit(request: web.Request) -> web.Response:
    """POST a Bedrock batch JSONL body; 202 once every record is durable."""
    jobs = jobs_of(request)
    body = await _read_body(request, jobs.policy.policy.server.jobs.max_submit_bytes)
    caller = caller_of(request, body)
    model, invocation = _resolve_submit(jobs.policy, request, caller)
    kind: Invocation = "converse" if invocation == "converse" else "invoke"
    try:
        # Off the event loop: a 44 MB file parsed on it stalled every live call for 0.42 s;
        # in a thread the loop still waits for the GIL between its slices (5 ms median, 45 ms
        # at worst over that parse). One thread of its own: submits parse one at a time (and
        # hold one file's records in memory at a time), never queued behind SQLite writes.
        loop = asyncio.get_running_loop()
        records = await loop.run_in_executor(_PARSER, parse_jsonl, body, kind)
    except BatchInputError as exc:
        raise BedrockError("ValidationException", f"batch input: {exc}") from None
    cap = jobs.policy.policy.workloads[caller.workload.name].batch.max_queued_records
    _check_size(caller.workload.name, cap, len(records))
    pool = jobs.policy.resolve_pool(model)
    meta = BatchMeta(
        batch_id=new_id(pool.name),
        workload=caller.workload.name,
        pool=pool.name,
        model=model,
        invocation=kind,
        records=len(records),
        created_ms=int(time.time() * 1000),
    )
    try:
        await jobs.queue.submit(meta, records, max_queued=cap)
    except QueueFull as exc:
        raise await _queue_full(jobs, meta.workload, cap, meta.records, exc.queued) from None
    jobs.submitted(meta)
    return json_response({"batchId": meta.batch_id, "records": meta.records}, status=202)


@answers
async def status(request: web.Request) -> web.Response:
    """Counts, oldest pending age, drain rate and ETA of one batch."""
    meta = await _own_batch(request)
    return json_response(await _status_doc(jobs_of(request), meta))


@answers
async def listing(request: web.Request) -> web.Response:
    """The caller's batches, newest first."""
    caller = caller_of(request)
    asked = request.query.get("workload", caller.workload.name)
    if asked != caller.workload.name:
        raise BedrockError(
            "AccessDeniedException",
            f"workload '{caller.workload.name}' may not list the batches of '{asked[:64]}'",
            status=403,
        )
    jobs = jobs_of(request)
    metas = await jobs.queue.batches(caller.workload.name)
    return json_response({"batches": [await _status_doc(jobs, m) for m in metas]})


@answers
async def output(request: web.Request) -> web.StreamResponse:
    """The output lines written so far (JSONL, streamed; partial while running)."""
    meta = await _own_batch(request)
    lines = jobs_of(request).queue.output(meta.batch_id)
    first = await anext(lines, None)  # a store failure before any byte is a clean 503
    response = web.StreamResponse(headers={"Content-Type": "application/jsonl"})
    await response.prepare(request)
    if first is not None:
        await response.write(first + b"\n")
        try:
            async for line in lines:
                await response.write(line + b"\n")
        except QueueUnavailable as exc:
            # Headers are gone: end the body short rather than pretend it is whole.
            log.warning("batch output cut short: %s", exc)
            raise ConnectionResetError("batch queue unavailable mid-output") from None
    await response.write_eof()
    return response


@answers
async def cancel(request: web.Request) -> web.Response:
    """Stop a batch: its waiting records are dropped, finished ones keep their lines."""
    meta = await _own_batch(request)
    jobs = jobs_of(request)
    try:
        done = await jobs.queue.cancel(meta.batch_id)
    except BatchCompleted:  # (checked by the store with the mark: read again for counts)
        raise _completed(await _own_batch(request)) from None
    if done is None:  # deleted (on request or by retention) since it was read
        raise _gone(request)
    # Cancelled records get no output line and no dead letter: say so once, with counts.
    log.warning(
        "batch cancelled",
        extra={"fields": {"batch_id": meta.batch_id, "workload": meta.workload,
                          "dropped_records": meta.pending}},
    )  # fmt: skip
    return json_response(await _status_doc(jobs, done))


def _completed(meta: BatchMeta) -> BedrockError:
    # Cancelling it would change nothing but its status, and leave its dead letters
    # unreplayable for good (a cancelled batch's records are not run again). The store
    # checks it with the mark, so a batch completing as the cancel arrives is refused too.
    return BedrockError(
        "ConflictException",
        f"batch '{meta.batch_id}' is already completed ({meta.succeeded} succeeded, "
        f"{meta.failed} failed): nothing to cancel; its dead letters stay replayable",
    )


def _running(batch_id: str, detail: str) -> BedrockError:
    return BedrockError(
        "ConflictException",
        f"batch '{batch_id}' is running ({detail}): cancel it first (POST "
        f"{PREFIX}/batches/{batch_id}/cancel), then delete it; deleting it now would orphan "
        "the records in flight",
    )


def _gone(request: web.Request) -> BedrockError:
    return BedrockError(
        "ResourceNotFoundException",
        f"batch '{request.match_info['batch_id']}' not found for workload '{request[_WORKLOAD]}'",
        status=404,
    )


@answers
async def delete(request: web.Request) -> web.Response:
    """Delete a completed or cancelled batch: meta, output lines, records still queued
    and dead letters; answers what was removed. A running batch is refused."""
    meta = await _own_batch(request)
    if meta.status == "running":
        raise _running(meta.batch_id, f"{meta.pending} of {meta.records} records pending")
    jobs = jobs_of(request)
    try:
        removed = await jobs.queue.delete(meta.batch_id)
    except BatchRunning:
        raise _running(meta.batch_id, "a dead-letter replay restarted it") from None
    if removed is None:  # deleted (on request or by retention) since it was read
        raise _gone(request)
    jobs.retention.deleted.labels("request").inc()
    log.warning(
        "batch deleted",
        extra={"fields": {"batch_id": meta.batch_id, "workload": meta.workload,
                          "was": meta.status, **removed.to_json()}},
    )  # fmt: skip
    doc = {"batchId": meta.batch_id, "status": "deleted", "deleted": removed.to_json()}
    return json_response(doc)


def add_routes(app: web.Application) -> None:
    """Mount the batch routes (before the Bedrock catch-all)."""
    r = app.router
    r.add_post(f"{PREFIX}/batches", submit)
    r.add_get(f"{PREFIX}/batches", listing)
    r.add_get(PREFIX + "/batches/{batch_id}", status)
    r.add_get(PREFIX + "/batches/{batch_id}/output", output)
    r.add_post(PREFIX + "/batches/{batch_id}/cancel", cancel)
    r.add_delete(PREFIX + "/batches/{batch_id}", delete)
