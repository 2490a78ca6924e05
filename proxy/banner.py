"""The start-up banner: where Sluice listens and a copy-paste call the served policy accepts.

A newcomer's first call is the banner's example, so it must work against the policy being
served: the ``demo`` keys only when unknown callers map to a default workload, else a key the
policy issues (its secret read from where the policy reads it, never printed), else a plain
statement of what to configure.
"""

from __future__ import annotations

from proxy.config import AccessKey, Policy, SecretRef

__all__ = ["banner"]

#: Used when the policy names no pool the caller may use (``unknown_models: allow``).
FALLBACK_MODEL = "anthropic.claude-3-haiku-20240307-v1:0"

_CALL = """\
    import os, boto3
    client = boto3.client("bedrock-runtime", region_name="{region}",
                          endpoint_url="{url}",
                          aws_access_key_id="{key_id}",
                          aws_secret_access_key={secret})
    reply = client.converse(
        modelId="{model}",
        messages=[{{"role": "user", "content": [{{"text": "Hello!"}}]}}])
    print(reply["output"]["message"]["content"][0]["text"])
"""

_NO_CALLER = """\
This policy refuses callers it does not know and issues no SigV4 key: give a workload
access_keys, or set identity.default_workload (policies/README.md), to call it.
"""


def _secret_expr(ref: SecretRef) -> str:
    if ref.env is not None:
        return f'os.environ["{ref.env}"]'
    return f'open("{ref.file}").read().strip()'


def _caller(policy: Policy) -> tuple[str, str, AccessKey | None] | None:
    """(workload, why, key): the default workload (no key needed), else the highest class's key."""
    default = policy.identity.default_workload
    if default is not None:
        return default, "any key maps to it", None
    keyed = [(name, wl) for name, wl in policy.workloads.items() if wl.access_keys]
    if not keyed:
        return None
    name, workload = max(keyed, key=lambda item: policy.priorities[item[1].priority].share)
    return name, f"key {workload.access_keys[0].access_key_id}", workload.access_keys[0]


def _model(policy: Policy, workload: str) -> str:
    allowed = policy.workloads[workload].models if workload in policy.workloads else None
    pools = [p for name, p in policy.models.items() if allowed is None or name in allowed]
    ids = [i for pool in pools for i in pool.ids if not i.startswith("arn:")]
    if FALLBACK_MODEL in ids or not ids:
        return FALLBACK_MODEL  # Haiku: the cheapest call, and the simulator knows it
    return ids[0]


def banner(
    policy: Policy, source: str, url: str, upstream: str, store: str, allocator: str = "pymalloc"
) -> str:
    """The text ``sluice serve`` prints once it listens."""
    head = (
        f"Sluice is listening on {url} "
        f"(upstream: {upstream}; store: {store}; memory: {allocator}).\n"
    )
    caller = _caller(policy)
    if caller is None:
        return head + _NO_CALLER + "Stop it with Ctrl-C.\n"
    workload, why, key = caller
    call = _CALL.format(
        region=policy.server.region or "us-east-1",
        url=url,
        key_id="demo" if key is None else key.access_key_id,
        secret='"demo"' if key is None else _secret_expr(key.secret),
        model=_model(policy, workload),
    )
    where = ""
    if key is not None and key.secret.env is not None:
        where = f"; run it where ${key.secret.env} is set, as it is for Sluice"
    return (
        f"{head}Try it (policy {source}: workload '{workload}', {why}{where}):\n\n{call}\n"
        "Stop it with Ctrl-C.\n"
    )
