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
    "TierPrice", "UpstreamTimeout", "Workload", "load_policy", "parse_policy", "parse_yaml",
    "read_text",
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
    except RecursionError:
        raise PolicyError(f"{source}: nested too deeply to be a policy") from None


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    one silently, so a second ``haiku:`` pool or workload would erase the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: merged by the base loader; an explicit key
                # may override a merged one
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base loader says so itself
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str) -> Policy:
    """Parse and validate a policy document's text (``policy check``'s messages)."""
    try:
        data = yaml.load(text, Loader=_UniqueKeys)  # (a subclass of the safe loader)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise PolicyError(f"{source}: nested too deeply to be a policy") from None
    return parse_policy(data, source)


def read_text(file: Path) -> str:
    """A policy file's text; :class:`PolicyError` when unreadable or not UTF-8."""
    try:
        return file.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{file}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{file}: not UTF-8 text (byte {exc.start})") from None


def load_policy(path: str | Path | None) -> Policy:
    """Read and validate a policy file (the packaged default when ``path`` is None)."""
    file = Path(path) if path is not None else DEFAULT_POLICY
    return parse_yaml(read_text(file), str(file))
