"""``sluice cache warm``: pre-fill the response cache from a JSONL file before an event.

Each line is validated on its own and stored with one write, so a bad line is reported
by number and never half-written; good lines around it still land.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import ErrorDetails

from proxy.config import Name, Policy, PositiveFloat
from proxy.pipeline.cache import (
    CachedResponse,
    CacheUnavailable,
    ResponseCache,
    cache_key,
)


class WarmLine(BaseModel):
    """One line of a warm file: a request and the answer to serve for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workload: Name
    model_pool: Name
    operation: Literal["Converse", "InvokeModel"]
    request: dict[str, Any]
    response: dict[str, Any]
    ttl_seconds: PositiveFloat | None = None

    @model_validator(mode="after")
    def _response_shape(self) -> WarmLine:
        # A Converse answer that boto3 could not parse would be served to every caller
        # until it expires; InvokeModel bodies are the model's own format and not judged.
        if self.operation == "Converse":
            output = self.response.get("output")
            message = output.get("message") if isinstance(output, dict) else None
            if not isinstance(message, dict) or not isinstance(message.get("content"), list):
                raise ValueError("a Converse response needs output.message.content (a list)")
            if not isinstance(self.response.get("stopReason"), str):
                raise ValueError("a Converse response needs stopReason")
        return self


@dataclass(frozen=True, slots=True)
class BadLine:
    """A warm-file line that was not stored, and why (1-based line number)."""

    line: int
    reason: str


@dataclass(frozen=True, slots=True)
class WarmReport:
    """What ``warm`` did: lines read, entries stored, lines refused, and a store failure."""

    lines: int
    stored: int
    bad: tuple[BadLine, ...]
    #: Set when the store failed; warming stopped at that line (nothing after it stored).
    store_error: str | None = None

    @property
    def ok(self) -> bool:
        """Every line was stored."""
        return not self.bad and self.store_error is None


async def warm(
    cache: ResponseCache,
    path: str | Path,
    *,
    policy: Policy | None = None,
    default_ttl_s: float = 300.0,
    now: Callable[[], float] = time.time,
) -> WarmReport:
    """Store every valid line of the JSONL file ``path``; report the others by line number.

    With ``policy``, a line's workload must exist and have a cache rule, its pool must
    exist, and its TTL defaults to the workload's ``cache.ttl_seconds`` (else
    ``default_ttl_s``). Each entry is one write, so a line is stored whole or not at all.
    Stops at the first store failure (``store_error``). ``OSError`` if the file is unreadable.
    """
    bad: list[BadLine] = []
    stored = lines = 0
    with open(path, "rb") as file:  # noqa: ASYNC230 - read in batches off the loop below
        while batch := await asyncio.to_thread(_read_batch, file):
            for raw in batch:
                lines += 1
                entry = _parse_line(raw, policy, default_ttl_s)
                if isinstance(entry, str):
                    if entry:
                        bad.append(BadLine(lines, entry))
                    continue
                key, value, ttl_s = entry
                try:
                    await cache.put(key, _with_time(value, now()), ttl_s)
                except CacheUnavailable as exc:
                    return WarmReport(lines, stored, tuple(bad), f"line {lines}: {exc}")
                stored += 1
    return WarmReport(lines, stored, tuple(bad))


def _read_batch(file: IO[bytes], size: int = 1000) -> list[bytes]:
    return list(itertools.islice(file, size))


def _with_time(value: CachedResponse, stored_at: float) -> CachedResponse:
    return CachedResponse(value.status, value.headers, value.body, stored_at)


def _parse_line(
    raw: bytes, policy: Policy | None, default_ttl_s: float
) -> tuple[str, CachedResponse, float] | str:
    """The entry a line stores, or why not (``""``: a blank line, skipped silently)."""
    if not raw.strip():
        return ""
    try:
        line = WarmLine.model_validate_json(raw)
    except ValidationError as exc:
        return "; ".join(_problem(err) for err in exc.errors())
    ttl_s = line.ttl_seconds or default_ttl_s
    if policy is not None:
        problem = _policy_problem(line, policy)
        if problem:
            return problem
        rule = policy.workloads[line.workload].cache
        ttl_s = line.ttl_seconds or (rule.ttl_seconds if rule else default_ttl_s)
    key = cache_key(line.workload, line.model_pool, line.operation, orjson.dumps(line.request))
    headers = (("Content-Type", "application/json"),)
    return key, CachedResponse(200, headers, orjson.dumps(line.response), 0.0), ttl_s


def _problem(err: ErrorDetails) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _policy_problem(line: WarmLine, policy: Policy) -> str | None:
    workload = policy.workloads.get(line.workload)
    if workload is None:
        return f"workload: unknown workload '{line.workload}'"
    if workload.cache is None:
        return (
            f"workload: '{line.workload}' has no cache rule (workloads.{line.workload}.cache), "
            "so its cache is never read"
        )
    if line.model_pool not in policy.models:
        return f"model_pool: unknown model pool '{line.model_pool}'"
    return None
