"""Helpers for the batch-job tests and benchmarks: policies, JSONL, the /sluice/v1 API."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
#: In the same Sluice pool as HAIKU but a separate simulator model, so fault injection
#: can hit the batch's model while real-time calls share the pool's quota unharmed.
HAIKU_RT = "anthropic.claude-3-5-haiku-20241022-v1:0"


def jobs_policy(
    *,
    batch: dict[str, Any] | None = None,
    jobs: dict[str, Any] | None = None,
    enrich_limits: dict[str, Any] | None = None,
    pool: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Header mode; pool ``haiku``; workloads ``checkout`` (P0) and ``enrich`` (batch, 40%)."""
    enrich: dict[str, Any] = {
        "priority": "batch",
        "batch": {
            "max_attempts": 10,
            "base_backoff_ms": 50,
            "max_backoff_ms": 1000,
            **(batch or {}),
        },
    }
    if enrich_limits:
        enrich["limits"] = {"haiku": enrich_limits}
    return {
        "identity": {"header_mode": True},
        "models": {
            "haiku": {
                "ids": [HAIKU, HAIKU_RT],
                "concurrency": 20,
                "requests_per_minute": 60000,
                **(pool or {}),
            }
        },
        "priorities": {"p0": {"share": 1.0}, "batch": {"share": 0.4}},
        "workloads": {"checkout": {"priority": "p0"}, "enrich": enrich},
        "server": {
            "access_log": False,
            "jobs": {"lease_seconds": 2, "workers": 8, **(jobs or {})},
        },
    }


def record(i: int, text: str = "", max_tokens: int = 30) -> dict[str, Any]:
    """One Bedrock batch record with an Anthropic Messages body."""
    return {
        "recordId": f"rec-{i:05d}",
        "modelInput": {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"synopsis for title {i} {text}".strip()}],
        },
    }


def jsonl(records: list[dict[str, Any]]) -> bytes:
    """Records as a JSONL body."""
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in records).encode() + b"\n"


def call(
    base: str,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    workload: str = "enrich",
    timeout: float = 30,
) -> tuple[int, dict[str, str], bytes]:
    """One raw request to ``/sluice/v1``; returns status, headers and body (errors too)."""
    req = urllib.request.Request(
        base + "/sluice/v1" + path,
        data=body,
        method=method,
        headers={"x-sluice-workload": workload},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def submit(base: str, records: list[dict[str, Any]], model: str = HAIKU, **kw: Any) -> str:
    """Submit and return the batch id (asserts 202)."""
    status, _, raw = call(base, "POST", f"/batches?modelId={model}", body=jsonl(records), **kw)
    assert status == 202, raw
    doc = json.loads(raw)
    assert doc["records"] == len(records)
    return str(doc["batchId"])


def status(base: str, batch_id: str, **kw: Any) -> dict[str, Any]:
    """The batch's status document."""
    code, _, raw = call(base, "GET", f"/batches/{batch_id}", **kw)
    assert code == 200, raw
    return dict(json.loads(raw))


def wait_done(base: str, batch_id: str, timeout: float = 120, **kw: Any) -> dict[str, Any]:
    """Poll until the batch is no longer running."""
    deadline = time.monotonic() + timeout
    while True:
        doc = status(base, batch_id, **kw)
        if doc["status"] != "running":
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"batch still running after {timeout}s: {doc}")
        time.sleep(0.2)


def output(base: str, batch_id: str, **kw: Any) -> list[dict[str, Any]]:
    """The batch's output lines, parsed."""
    code, _, raw = call(base, "GET", f"/batches/{batch_id}/output", **kw)
    assert code == 200, raw
    return [json.loads(line) for line in raw.decode().splitlines() if line]


def dead_letters(base: str, query: str = "", **kw: Any) -> list[dict[str, Any]]:
    """The caller's dead letters."""
    code, _, raw = call(base, "GET", "/dlq" + query, **kw)
    assert code == 200, raw
    return list(json.loads(raw)["deadLetters"])


def wait_until(
    check: Callable[[], bool], timeout: float, why: str = "", poll: float = 0.05
) -> None:
    """Poll ``check`` until it is true; fail with ``why`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, why or f"not true after {timeout}s"
        time.sleep(poll)


def wait_succeeded(base: str, batch_id: str, at_least: int, **kw: Any) -> None:
    """Block until at least ``at_least`` records of the batch succeeded (mid-batch faults)."""
    wait_until(lambda: status(base, batch_id, **kw)["succeeded"] >= at_least, 60)


def one_fleet() -> list[str]:
    """``--fleet`` args that put several Sluice processes in one fleet: one batch queue."""
    return ["--fleet", f"jobs-{uuid.uuid4().hex}"]
