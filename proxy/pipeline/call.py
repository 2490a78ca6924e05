"""What one request has learned so far, and the values the stages hand each other.

A :class:`Call` is the request's record (it becomes its access-log line) and the one
owner of its lease: the admit stage stores a grant in ``call.ticket`` in the same step
the store hands it over, and :func:`proxy.pipeline.settle.Settler.settle` releases it
exactly once, from the ``finally`` of whoever runs the call (the handler, or the
coalesced flight that runs it for a group of identical requests).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from proxy.admission.gate import Ticket
from proxy.errors import BedrockError
from proxy.pipeline.degrade import Downgrade, Fallback
from proxy.pipeline.identify import Caller
from proxy.pipeline.tiers import TierChoice
from proxy.policy import CompiledPolicy, PoolInfo
from proxy.routes import Route
from proxy.usage import Usage


@dataclass(slots=True)
class Call:
    """One request: what it learned so far (its access-log line) and the lease it holds."""

    request_id: str
    started: float
    #: The policy this request is decided under, taken once when it starts (hot reload).
    policy: CompiledPolicy
    route: Route | None = None
    caller: Caller | None = None
    pool: PoolInfo | None = None
    #: The grant this call owns until :meth:`Settler.settle` releases it.
    ticket: Ticket | None = None
    status: int = 0
    error_type: str | None = None
    upstream_status: int | None = None
    upstream_s: float = 0.0
    usage: Usage = field(default_factory=Usage)
    disconnected: bool = False
    #: The body as it goes upstream (trimmed when the input budget says so).
    body: bytes = b""
    read_timeout_s: float | None = None
    retries: int = 0
    trimmed_messages: int = 0
    #: Upstream path when a downgrade rewrote the model id (else the route's own).
    path: str | None = None
    #: Headers naming what served a degraded call (x-sluice-degraded, -served-model).
    degraded: dict[str, str] | None = None
    #: Exact-match cache key when this workload caches this operation.
    cache_key: str | None = None
    coalesced: bool = False
    #: A coalesced flight runs this call (and settles it), not the request's handler.
    in_flight_group: bool = False
    #: The caller's request headers (the service tier is chosen from them before admission).
    headers: Mapping[str, str] | None = None
    #: The service tier chosen for the call (None: an operation without tiers), and served.
    tier: TierChoice | None = None
    served_tier: str | None = None
    #: The attempt (``retries``) whose throttle already fired the throttle reflex (-1: none).
    reflexed: int = -1
    #: The attempt (``retries``) already reported to the controller when it was retried
    #: (-1: none): a requeue that finds no slot must not report its throttle a second
    #: time, late, when the call settles.
    observed: int = -1

    @property
    def lease(self) -> str | None:
        """The pool lease the call holds (None: no concurrency limit applied)."""
        return self.ticket.lease if self.ticket else None


class Admitted:
    """Admission said yes; the grant (if any limit applied) is in ``call.ticket``."""

    __slots__ = ()


#: The one Admitted value: the grant lives on its owner, so admitting allocates nothing.
ADMITTED: Final = Admitted()


@dataclass(frozen=True, slots=True)
class Refused:
    """A stage's answer that the call ends here, with the Bedrock-shaped error to send."""

    error: BedrockError


class Throttled:
    """Bedrock throttled a class with a chain past Sluice's retries: settle, then degrade."""

    __slots__ = ()


#: The one Throttled value (the throttled answer is read and released already).
THROTTLED: Final = Throttled()


#: The pool said no and a degradation step serves instead.
Degraded = Downgrade | Fallback
