"""The policy model: what a policy file may say, and the messages when it says it wrong.

A policy is YAML validated by pydantic with unknown keys forbidden, so a typo is an
error that names the file and the field path instead of a limit silently missing.
Secrets never live in the YAML: a workload names the environment variable or file
that holds them, and they are resolved when the policy is compiled (``policy.py``).

The sections live beside this module (``pools``, ``workloads``, ``server``; the checks
across them in ``references``); every name is importable from ``proxy.config``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from proxy.config.fields import Name, PositiveFloat, PositiveInt, Share, TierName
from proxy.config.policy import Policy
from proxy.config.pools import Adaptive, Breaker, Limits, ModelPool, TierPrice
from proxy.config.server import (
    AdaptivityTuning,
    Connections,
    Jobs,
    Retry,
    Server,
    UpstreamTimeout,
)
from proxy.config.workloads import (
    AccessKey,
    BatchRule,
    CacheRule,
    Identity,
    InputBudget,
    PauseRule,
    PriorityClass,
    Schedule,
    ScheduleWindow,
    SecretRef,
    Template,
    Workload,
)

__all__ = [
    "DEFAULT_POLICY", "AccessKey", "Adaptive", "AdaptivityTuning", "BatchRule", "Breaker",
    "CacheRule", "Connections", "Identity", "InputBudget", "Jobs", "Limits", "ModelPool", "Name",
    "PauseRule", "Policy", "PolicyError", "PositiveFloat", "PositiveInt", "PriorityClass",
    "Retry", "Schedule", "ScheduleWindow", "SecretRef", "Server", "Share", "Template", "TierName",
    "TierPrice", "UpstreamTimeout", "Workload", "load_policy", "parse_policy",
]  # fmt: skip

#: Where the packaged default policy lives (used when no --config is given).
DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"


class PolicyError(Exception):
    """A policy file that cannot be used; the message names the file and each field at fault."""


def _format(path: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {loc + ': ' if loc else ''}{msg}")
    return "\n".join(lines)


def parse_policy(data: Any, source: str = "<policy>") -> Policy:
    """Validate an already-parsed document; raise :class:`PolicyError` naming ``source``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: the top level must be a mapping, not {type(data).__name__}")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_format(source, exc)) from None


def load_policy(path: str | Path | None) -> Policy:
    """Read and validate a policy file (the packaged default when ``path`` is None)."""
    file = Path(path) if path is not None else DEFAULT_POLICY
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{file}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{file}: not valid YAML: {exc}") from None
    return parse_policy(data, str(file))
