"""Operations that do not generate text: CountTokens, ApplyGuardrail and async invocations.

They answer at once (no simulated latency or quota): they exist so clients and the proxy can
exercise every Bedrock route end to end.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from aiohttp import web

from proxy.errors import BedrockError
from proxy.simulator.models import ModelRuntime
from proxy.simulator.parsing import parse_count_tokens, parse_json
from proxy.simulator.responses import new_request_id
from proxy.simulator.state import AsyncJob, SimState

__all__ = [
    "apply_guardrail",
    "count_tokens",
    "get_async",
    "guardrail_checks",
    "list_async",
    "start_async",
]

_JSON = "application/json"


def _json(doc: Any) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc),
        headers={"Content-Type": _JSON, "x-amzn-RequestId": new_request_id()},
    )


def count_tokens(body: bytes, runtime: ModelRuntime) -> web.Response:
    """``{"inputTokens": N}`` for either input form (same count the model calls charge)."""
    return _json({"inputTokens": parse_count_tokens(body, runtime.config)})


def _guardrail_texts(doc: Any) -> list[str]:
    if not isinstance(doc, dict) or doc.get("source") not in ("INPUT", "OUTPUT"):
        raise BedrockError(
            "ValidationException",
            "1 validation error detected: Value at 'source' failed to satisfy constraint: "
            "Member must satisfy enum value set: [INPUT, OUTPUT]",
        )
    content = doc.get("content")
    if not isinstance(content, list):
        raise BedrockError(
            "ValidationException",
            "1 validation error detected: Value null at 'content' failed to satisfy "
            "constraint: Member must not be null",
        )
    texts = []
    for block in content:
        text = block.get("text") if isinstance(block, dict) else None
        if isinstance(text, dict) and isinstance(text.get("text"), str):
            texts.append(text["text"])
    return texts


def apply_guardrail(body: bytes, state: SimState) -> web.Response:
    """Intervene when a configured blocked word appears, else pass (``action: NONE``)."""
    texts = _guardrail_texts(parse_json(body))
    config = state.config
    lowered = "\n".join(texts).lower()
    matches = [w for w in config.guardrail_blocked_words if w.lower() in lowered]
    units = max(1, -(-sum(len(t) for t in texts) // 1000))  # one unit per 1,000 characters
    usage = {
        "topicPolicyUnits": units,
        "contentPolicyUnits": units,
        "wordPolicyUnits": units,
        "sensitiveInformationPolicyUnits": units,
        "sensitiveInformationPolicyFreeUnits": 0,
        "contextualGroundingPolicyUnits": 0,
    }
    if not matches:
        return _json({"usage": usage, "action": "NONE", "outputs": [], "assessments": [{}]})
    words = [{"match": w, "action": "BLOCKED", "detected": True} for w in matches]
    return _json(
        {
            "usage": usage,
            "action": "GUARDRAIL_INTERVENED",
            "outputs": [{"text": config.guardrail_blocked_message}],
            "assessments": [{"wordPolicy": {"customWords": words, "managedWordLists": []}}],
        }
    )


#: InvokeGuardrailChecks' checks (each result's score is per category asked for).
_CHECKS: Final = ("contentFilter", "promptAttack", "sensitiveInformation")


def guardrail_checks(body: bytes, state: SimState) -> web.Response:
    """InvokeGuardrailChecks: one result per configured check; a configured blocked word
    scores 1.0 on each category asked for, anything else 0.0 (and no sensitive entities)."""
    doc = parse_json(body)
    messages = doc.get("messages") if isinstance(doc, dict) else None
    checks = doc.get("checks") if isinstance(doc, dict) else None
    for key, value, kind in (("messages", messages, list), ("checks", checks, dict)):
        if not isinstance(value, kind):
            raise BedrockError(
                "ValidationException",
                f"1 validation error detected: Value null at '{key}' failed to satisfy "
                "constraint: Member must not be null",
            )
    assert isinstance(messages, list) and isinstance(checks, dict)
    texts = [
        block["text"]
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for block in message["content"]
        if isinstance(block, dict) and isinstance(block.get("text"), str)
    ]
    lowered = "\n".join(texts).lower()
    hit = any(w.lower() in lowered for w in state.config.guardrail_blocked_words)
    units = max(1, -(-sum(len(t) for t in texts) // 1000))  # one unit per 1,000 characters
    results: dict[str, Any] = {}
    usage: dict[str, Any] = {}
    for check in _CHECKS:
        config = checks.get(check)
        if not isinstance(config, dict):
            continue
        usage[check] = {"textUnits": units}
        if check == "sensitiveInformation":
            results[check] = {"results": [], "truncated": False}
            continue
        categories = [
            c.get("category") for c in config.get("categories") or [] if isinstance(c, dict)
        ]
        results[check] = {
            "results": [{"category": c, "severityScore": 1.0 if hit else 0.0} for c in categories]
        }
    return _json({"results": results, "usage": usage})


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _job_json(job: AsyncJob, now: float) -> dict[str, Any]:
    done = now >= job.done_at
    doc: dict[str, Any] = {
        "invocationArn": job.invocation_arn,
        "modelArn": job.model_arn,
        "status": "Completed" if done else "InProgress",
        "submitTime": _iso(job.submit_time),
        "lastModifiedTime": _iso(job.done_at if done else job.submit_time),
        "outputDataConfig": job.output_data_config,
    }
    if job.client_request_token is not None:
        doc["clientRequestToken"] = job.client_request_token
    if done:
        doc["endTime"] = _iso(job.done_at)
    return doc


def start_async(body: bytes, state: SimState) -> web.Response:
    """StartAsyncInvoke: remember the job; it completes after the model's simulated latency."""
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise BedrockError("ValidationException", "Malformed input request: expected an object")
    for key in ("modelId", "modelInput", "outputDataConfig"):
        if doc.get(key) is None:
            raise BedrockError(
                "ValidationException",
                f"1 validation error detected: Value null at '{key}' failed to satisfy "
                "constraint: Member must not be null",
            )
    runtime = state.resolve(str(doc["modelId"]))
    token = doc.get("clientRequestToken")
    for job in state.async_jobs.values():  # idempotency: same token, same invocation
        if token is not None and job.client_request_token == token:
            return _json({"invocationArn": job.invocation_arn})
    now = time.time()
    arn = (
        f"arn:aws:bedrock:{state.config.region}:{state.config.account_id}:async-invoke/"
        + (uuid.uuid4().hex[:12])
    )
    duration = runtime.first_token_delay(0) + runtime.output_delay(
        state.config.default_output_tokens
    )
    state.async_jobs[arn] = AsyncJob(
        arn, state.model_arn(runtime), token, doc["outputDataConfig"], now, now + duration
    )
    return _json({"invocationArn": arn})


def get_async(arn: str, state: SimState) -> web.Response:
    """GetAsyncInvoke, or 404 ResourceNotFoundException for an unknown ARN."""
    job = state.async_jobs.get(arn)
    if job is None:
        raise BedrockError("ResourceNotFoundException", f"The invocation {arn} was not found.")
    return _json(_job_json(job, time.time()))


def list_async(query: Any, state: SimState) -> web.Response:
    """ListAsyncInvokes with ``statusEquals``, ``maxResults`` and ``nextToken`` (an offset)."""
    now = time.time()
    jobs = [_job_json(job, now) for job in state.async_jobs.values()]
    wanted = query.get("statusEquals")
    if wanted:
        jobs = [job for job in jobs if job["status"] == wanted]
    jobs.sort(key=lambda job: job["submitTime"], reverse=query.get("sortOrder") != "Ascending")
    try:
        offset = int(query.get("nextToken") or 0)
        limit = int(query.get("maxResults") or 1000)
    except ValueError:
        raise BedrockError("ValidationException", "Invalid nextToken or maxResults") from None
    page: dict[str, Any] = {"asyncInvokeSummaries": jobs[offset : offset + limit]}
    if offset + limit < len(jobs):
        page["nextToken"] = str(offset + limit)
    return _json(page)
