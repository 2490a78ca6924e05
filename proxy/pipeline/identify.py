"""Who is calling: SigV4 verification, bearer keys, or the trusted-header mode.

Precedence: a credential Sluice issued (SigV4 access key or bearer key) wins; then
the ``x-sluice-workload`` header when header mode is on; then the policy's default
workload; else the caller is refused with Bedrock's own 403 shapes. A key Sluice
issued with a bad signature is always refused, even when a default workload exists:
that is a forgery or a misconfigured client, not an anonymous caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from proxy.errors import BedrockError
from proxy.policy import CompiledPolicy, WorkloadInfo, token_digest
from proxy.verification import parse_authorization, verify

WORKLOAD_HEADER = "x-sluice-workload"
PRIORITY_HEADER = "x-sluice-priority"


@dataclass(frozen=True, slots=True)
class Caller:
    """An identified caller and the class its request runs at."""

    workload: WorkloadInfo
    priority: str
    #: How it was identified: "sigv4", "bearer", "header" or "default".
    via: str


def check_header_bytes(headers: Mapping[str, str]) -> None:
    """Refuse header values that are not valid UTF-8 (they could not be re-signed or logged).

    aiohttp keeps undecodable bytes as lone surrogates; encoding one fails, so the
    header is named here with a 400 instead of failing later with a 500.
    """
    if "".join(headers.values()).isascii():  # the usual case: one C call, no loop
        return
    for name, value in headers.items():
        if value.isascii():
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            safe = name.encode("utf-8", "replace").decode("ascii", "replace")[:64]
            raise BedrockError(
                "ValidationException",
                f"header '{safe}' is not valid UTF-8 (at position {exc.start} of its value)",
            ) from None


def _refuse(error_type: str, message: str) -> BedrockError:
    return BedrockError(error_type, message, status=403)


def _from_credentials(
    policy: CompiledPolicy,
    method: str,
    host: str,
    raw_path: str,
    headers: Mapping[str, str],
    body: bytes,
) -> tuple[WorkloadInfo, str] | None:
    auth = headers.get("Authorization")
    if not auth:
        return None
    if auth[:7].lower() == "bearer ":
        workload = policy.api_keys.get(token_digest(auth[7:].strip()))
        return (workload, "bearer") if workload else None
    # Most callers of a default workload present keys Sluice never issued: read the key
    # id with a slice and skip the full parse for them.
    start = auth.find("Credential=")
    if start < 0 or auth[start + 11 : auth.find("/", start)] not in policy.secrets:
        return None
    parsed = parse_authorization(auth)
    if parsed is None:
        return None
    path, _, query = raw_path.partition("?")
    result = verify(method, host, path, query, headers, body, policy.secret_for)
    if not result.ok:
        raise BedrockError(
            result.error_type or "InvalidSignatureException",
            result.message or "signature verification failed",
            status=result.status,
        )
    return policy.secrets[parsed.access_key_id][1], "sigv4"


def _priority(policy: CompiledPolicy, workload: WorkloadInfo, requested: str | None) -> str:
    if requested is None or requested == workload.priority:
        return workload.priority
    cls = policy.policy.priorities.get(requested)
    if cls is None:
        raise BedrockError(
            "ValidationException",
            f"{PRIORITY_HEADER}: unknown priority class '{requested}' "
            f"(declared: {', '.join(policy.policy.priorities)})",
        )
    if cls.share > workload.share:
        raise BedrockError(
            "ValidationException",
            f"{PRIORITY_HEADER}: '{requested}' would raise workload '{workload.name}' above its "
            f"class '{workload.priority}'; the header may only lower it",
        )
    return requested


def identify(
    policy: CompiledPolicy,
    method: str,
    host: str,
    raw_path: str,
    headers: Mapping[str, str],
    body: bytes,
) -> Caller:
    """Identify the workload behind a request or raise a Bedrock-shaped 403/400."""
    if not "".join(headers.values()).isascii():  # (the usual case without a call: one C check)
        check_header_bytes(headers)
    found = _from_credentials(policy, method, host, raw_path, headers, body)
    if found is None and policy.header_mode:
        name = headers.get(WORKLOAD_HEADER)
        if name is not None:
            workload = policy.workloads.get(name)
            if workload is None:
                raise _refuse(
                    "AccessDeniedException", f"{WORKLOAD_HEADER}: unknown workload '{name}'"
                )
            found = (workload, "header")
    if found is None and policy.default_workload is not None:
        found = (policy.default_workload, "default")
    if found is None:
        auth = headers.get("Authorization")
        if not auth:
            raise _refuse("MissingAuthenticationTokenException", "Missing Authentication Token")
        raise _refuse(
            "UnrecognizedClientException", "The security token included in the request is invalid."
        )
    workload, via = found
    requested = headers.get(PRIORITY_HEADER)
    if requested is None:  # the usual case, without a call
        return Caller(workload, workload.priority, via)
    return Caller(workload, _priority(policy, workload, requested), via)
