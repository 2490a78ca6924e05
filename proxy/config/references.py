"""Checks across sections: every name a policy uses (pools, classes, workloads, time zones)
is declared, and no key id or model id is claimed twice. Each returns its messages, in the
order a reader meets the fields, so one error lists every problem at once."""

from __future__ import annotations

from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.config.workloads import Workload

if TYPE_CHECKING:
    from proxy.config.policy import Policy


def reference_problems(policy: Policy) -> list[str]:
    """Every unresolved name or duplicate claim in ``policy``, as ``field: problem``."""
    problems = [
        f"models.{name}.downgrade_to: unknown model pool '{pool.downgrade_to}'"
        for name, pool in policy.models.items()
        if pool.downgrade_to is not None and pool.downgrade_to not in policy.models
    ]
    for name, wl in policy.workloads.items():
        problems += _workload_problems(policy, name, wl)
    dw = policy.identity.default_workload
    if dw is not None and dw not in policy.workloads:
        problems.append(f"identity.default_workload: unknown workload '{dw}'")
    return problems + _shared_access_keys(policy) + _shared_model_ids(policy)


def _workload_problems(policy: Policy, name: str, wl: Workload) -> list[str]:
    problems = []
    if wl.priority not in policy.priorities:
        problems.append(
            f"workloads.{name}.priority: unknown priority class '{wl.priority}' "
            f"(declared: {', '.join(policy.priorities)})"
        )
    problems += [
        f"workloads.{name}.limits.{pool_name}: unknown model pool '{pool_name}'"
        for pool_name in wl.limits
        if pool_name != "*" and pool_name not in policy.models
    ]
    problems += _degrade_problems(policy, name, wl)
    problems += _pause_problems(policy, name, wl)
    problems += _schedule_problems(name, wl)
    problems += [
        f"workloads.{name}.models: unknown model pool '{pool_name}'"
        for pool_name in wl.models or []
        if pool_name not in policy.models
    ]
    return problems


def _degrade_problems(policy: Policy, name: str, wl: Workload) -> list[str]:
    problems = [
        f"workloads.{name}.degrade: '{step}' is neither a model pool nor 'cached' / 'template'"
        for step in wl.degrade
        if step not in ("cached", "template") and step not in policy.models
    ]
    if "template" in wl.degrade and wl.template is None:
        problems.append(f"workloads.{name}.degrade: 'template' needs workloads.{name}.template")
    if "cached" in wl.degrade and wl.cache is None:
        problems.append(f"workloads.{name}.degrade: 'cached' needs workloads.{name}.cache")
    return problems


def _pause_problems(policy: Policy, name: str, wl: Workload) -> list[str]:
    if wl.pause is None:
        return []
    cls = wl.pause.when_class
    if cls not in policy.priorities:
        return [f"workloads.{name}.pause.when_class: unknown priority class '{cls}'"]
    if policy.priorities[cls].target_p99_ms is None:
        return [
            f"workloads.{name}.pause.when_class: class '{cls}' has no "
            f"target_p99_ms, so the pause could never trigger"
        ]
    return []


def _schedule_problems(name: str, wl: Workload) -> list[str]:
    if wl.schedule is None:
        return []
    try:
        ZoneInfo(wl.schedule.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return [f"workloads.{name}.schedule.timezone: unknown time zone '{wl.schedule.timezone}'"]
    return []


def _shared_access_keys(policy: Policy) -> list[str]:
    problems = []
    seen: dict[str, str] = {}
    for name, wl in policy.workloads.items():
        for key in wl.access_keys:
            if key.access_key_id in seen:
                problems.append(
                    f"workloads.{name}.access_keys: access key id {key.access_key_id} is "
                    f"already given to workload '{seen[key.access_key_id]}'"
                )
            seen[key.access_key_id] = name
    return problems


def _named(model_id: str) -> str:
    """What an id names, ARN or not: ``arn:...:foundation-model/X`` is ``X`` and
    ``arn:...:inference-profile/us.X`` is ``us.X`` (a cross-region profile keeps its prefix:
    Bedrock gives it a quota of its own, so it may have a pool of its own)."""
    if model_id.startswith("arn:"):
        _, slash, resource = model_id.partition("/")
        if slash and resource:
            return resource
    return model_id


def _shared_model_ids(policy: Policy) -> list[str]:
    problems = []
    owner: dict[str, str] = {}
    for name, pool in policy.models.items():
        for model_id in pool.ids:
            if model_id in owner:
                problems.append(
                    f"models.{name}.ids: '{model_id}' already belongs to pool '{owner[model_id]}'"
                )
            owner[model_id] = name
    return problems


def same_model_in_two_pools(policy: Policy) -> list[str]:
    """Ids that name one model in two pools through an ARN (``X`` in one,
    ``arn:...:foundation-model/X`` in another): one quota metered twice. A warning, not an
    error: policies that did this were accepted before, and refusing them at start-up would
    stop a fleet mid-upgrade."""
    out = []
    owner: dict[str, tuple[str, str]] = {}
    for name, pool in policy.models.items():
        for model_id in pool.ids:
            first = owner.setdefault(_named(model_id), (name, model_id))
            if first[0] != name and first[1] != model_id:
                out.append(
                    f"models.{name}.ids: '{model_id}' names the same model as '{first[1]}' "
                    f"of pool '{first[0]}': one Bedrock quota, metered in two pools"
                )
    return out
