"""The simulator's live state, one per Application: models, id resolution, RNG, records."""

from __future__ import annotations

import random
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.errors import BedrockError
from proxy.simulator.auth import Verifier
from proxy.simulator.config import SimulatorConfig
from proxy.simulator.models import ModelRuntime

__all__ = ["SIM_STATE", "AsyncJob", "RequestRecord", "SimState"]

INVALID_MODEL = "The provided model identifier is invalid."
# Cross-region inference-profile prefixes Bedrock uses in front of a foundation id.
_PROFILE_PREFIXES = ("us.", "eu.", "apac.", "global.", "jp.", "au.", "ca.", "us-gov.")
_ARN = re.compile(
    r"arn:aws[a-z-]*:bedrock:[a-z0-9-]*:\d{0,12}:(foundation-model|inference-profile)/(.+)"
)
# ARNs carry arbitrary regions/accounts; resolved ones are cached up to this many entries.
_CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as received; headers stay raw until someone asks for them."""

    method: str
    path: str
    model: str | None
    status: int
    raw_headers: tuple[tuple[bytes, bytes], ...]

    def to_json(self) -> dict[str, Any]:
        """The ``GET /_sim/stats`` shape; header names lower-cased, repeats joined by ``,``."""
        headers: dict[str, str] = {}
        for name, value in self.raw_headers:
            key = name.decode("latin-1").lower()
            text = value.decode("utf-8", "replace")
            headers[key] = f"{headers[key]},{text}" if key in headers else text
        return {
            "method": self.method,
            "path": self.path,
            "model": self.model,
            "status": self.status,
            "headers": headers,
        }


@dataclass(slots=True)
class AsyncJob:
    """A StartAsyncInvoke record, kept in memory."""

    invocation_arn: str
    model_arn: str
    client_request_token: str | None
    output_data_config: Any
    submit_time: float  # wall clock, seconds
    done_at: float  # wall clock when it reports Completed


class SimState:
    """Everything the simulator's handlers share; rebuilt in place by :meth:`apply`."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.models: dict[str, ModelRuntime] = {}
        self._ids: dict[str, ModelRuntime] = {}
        self.records: deque[RequestRecord] = deque(maxlen=config.records_kept)
        self.rng = random.Random(config.seed)
        self.verifier: Verifier | None = None
        self.async_jobs: dict[str, AsyncJob] = {}
        self.apply(config)

    def apply(self, config: SimulatorConfig) -> None:
        """Switch to ``config``, keeping counters, bucket levels and in-flight calls."""
        old, self.config = self.config, config
        now = time.monotonic()
        models: dict[str, ModelRuntime] = {}
        for model_id, spec in config.models.items():
            runtime = self.models.get(model_id) or ModelRuntime(model_id, spec, 1.0)
            runtime.configure(spec, config.latency_scale, now)
            models[model_id] = runtime
        self.models = models
        self._ids = {}
        for model_id, runtime in models.items():
            self._ids[model_id] = runtime
            for prefix in _PROFILE_PREFIXES:
                self._ids[prefix + model_id] = runtime
            for alias in runtime.config.aliases:
                self._ids[alias] = runtime
        if config.seed != old.seed:
            self.rng.seed(config.seed)
        if config.records_kept != self.records.maxlen:
            self.records = deque(self.records, maxlen=config.records_kept)
        self.verifier = Verifier(config.auth) if config.auth.enabled else None

    def reset(self) -> None:
        """Zero the counters, forget records and jobs, refill buckets, reseed the RNG."""
        now = time.monotonic()
        for runtime in self.models.values():
            runtime.stats.reset()
            runtime.refill(now)
        self.records.clear()
        self.async_jobs.clear()
        self.rng.seed(self.config.seed)

    def resolve(self, model_id: str) -> ModelRuntime:
        """The model a path's id names (foundation id, profile id, ARN or alias); else 400."""
        runtime = self._ids.get(model_id)
        if runtime is not None:
            return runtime
        match = _ARN.fullmatch(model_id)
        if match is not None:
            kind, tail = match.groups()
            runtime = self._ids.get(tail)
            # A foundation-model ARN names a foundation id; an inference-profile ARN, a profile.
            if runtime is not None and (kind == "foundation-model") == (tail in self.models):
                if len(self._ids) < _CACHE_LIMIT:
                    self._ids[model_id] = runtime
                return runtime
        raise BedrockError("ValidationException", INVALID_MODEL)

    def record(self, request: web.BaseRequest, model: str | None, status: int) -> None:
        """Keep the request for ``GET /_sim/stats`` (a bounded ring)."""
        if self.records.maxlen:
            self.records.append(
                RequestRecord(request.method, request.raw_path, model, status, request.raw_headers)
            )

    def model_arn(self, runtime: ModelRuntime) -> str:
        """A plausible foundation-model ARN for ``runtime``."""
        return f"arn:aws:bedrock:{self.config.region}::foundation-model/{runtime.model_id}"


SIM_STATE = web.AppKey("sluice_simulator_state", SimState)
