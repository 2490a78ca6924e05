"""Every Redis key Sluice writes, in one place.

A pool's keys carry the pool as Redis Cluster hash tag, so one admission decision (or one
job script) touches one slot and pools spread across shards. Admission (``admit.lua``'s
header says what each field holds)::

    sluice:{<pool>}:pool                  hash  p = packed pool rpm/tpm TATs (ms),
                                                w:<workload> = packed workload TATs,
                                                lim = dynamic concurrency limit,
                                                wseq = waiter arrival sequence
    sluice:{<pool>}:leases                zset  lease id -> expiry ms (pool in-flight)
    sluice:{<pool>}:w:<workload>:leases   zset  lease id -> expiry ms (workload in-flight)
    sluice:{<pool>}:waiters               zset  waiter id -> rank * 2^42 + arrival (the queue)
    sluice:{<pool>}:waiters:exp           zset  waiter id -> expiry ms (reaps dead instances')
    sluice:{<pool>}:released              channel  "capacity may have come back" for waiters

A service tier with its own quota is the scope ``<pool>:tier:<tier>``: its hash is
``sluice:{<pool>}:tier:<tier>`` itself and its other keys hang off that name
(``…:tier:flex:leases``), under the pool's hash tag. TATs live in the pool hash, which
persists (it holds the dynamic limit); lease zsets expire with their last lease.

Elsewhere: the fleet control loops ``sluice:{<pool>}:fleet:<i>``, ``:breaker``, ``:leader``
(:mod:`proxy.control.fleet`); batch jobs ``sluice:{<pool>}:jobs:…``, ``:batch:…``, ``:dlq…``
and ``sluice[:fleet:<name>]:jobs:streams|batches`` (:mod:`.job_store`); the response cache
``sluice:{cache:<workload>}:<digest>`` (:mod:`proxy.pipeline.cache`); policy versions
``sluice:{policy:<fleet>}:…`` (:mod:`.versions`); the fleet board ``sluice:{ops:<fleet>}:…``
(:mod:`.fleet_board`).
"""

from __future__ import annotations

from typing import Final, NamedTuple

#: Key prefix; the pool name in braces is the Redis Cluster hash tag.
KEY_PREFIX: Final = "sluice"
#: Separates a pool from a service tier in a *scope*: the name of one set of pool-level
#: buckets and leases. A pool's own quota is the scope ``<pool>``; a tier with its own quota
#: (Bedrock accounts tiers separately) is ``<pool>:tier:<tier>``. Pool names hold no colon.
TIER_SCOPE: Final = ":tier:"
#: The fleet an instance with Redis follows unless ``--fleet`` names another.
DEFAULT_FLEET: Final = "default"


class PlanKeys(NamedTuple):
    """Redis key names of one plan; all share the pool's hash tag (one cluster slot)."""

    #: hash: p = packed <dd> pool rpm/tpm TATs, w:<workload> = packed <dd> workload TATs,
    #: lim = dynamic concurrency limit, wseq = waiter sequence (see admit.lua)
    pool: str
    pool_leases: str  # zset: lease id -> expiry ms
    workload_leases: str  # zset: lease id -> expiry ms
    waiters: str  # zset: waiter id -> rank * RANK_SPAN + arrival seq (the fleet's queue)
    waiters_exp: str  # zset: waiter id -> expiry ms (reaps a dead instance's waiters)
    channel: str  # pub/sub channel: "capacity may have come back" while waiters exist


def pool_tag(pool: str) -> str:
    """``sluice:{<pool>}``: the start of every key of one pool (its cluster slot)."""
    return f"{KEY_PREFIX}:{{{pool}}}"


def job_fleet_segment(fleet: str | None) -> str:
    """What a fleet's batch keys add after the pool tag (and after ``sluice``).

    Batch records are drained by the fleet they were submitted to, under its policy: two
    fleets on one Redis must never take each other's records. The default fleet (and an
    instance outside any fleet) keeps the original layout, so records queued before fleets
    had queues of their own still drain after an upgrade.
    """
    if fleet is None or fleet == DEFAULT_FLEET:
        return ""
    return f":fleet:{fleet}"


def scope_name(pool: str, tier: str | None) -> str:
    """The scope of ``pool``'s own quota (``tier`` None) or of a tier's own quota."""
    return pool if tier is None else f"{pool}{TIER_SCOPE}{tier}"


def plan_keys(scope: str, workload: str) -> PlanKeys:
    """Key names for ``workload`` in a scope; admit.lua's header says what each holds.

    A tier's keys keep the pool's hash tag (``sluice:{sonnet}:tier:flex`` instead of
    ``sluice:{sonnet}:pool``), so they live in the pool's cluster slot.
    """
    pool, sep, tier = scope.partition(TIER_SCOPE)
    base = pool_tag(pool)
    if sep:
        base += f"{TIER_SCOPE}{tier}"
    return PlanKeys(
        base if sep else f"{base}:pool",
        f"{base}:leases",
        f"{base}:w:{workload}:leases",
        f"{base}:waiters",
        f"{base}:waiters:exp",
        f"{base}:released",
    )


def policy_keys(fleet: str) -> tuple[str, str]:
    """The prefix of a fleet's policy-version keys and its change channel."""
    return f"{KEY_PREFIX}:{{policy:{fleet}}}", f"{KEY_PREFIX}:policy:{fleet}:changed"


def board_keys(fleet: str) -> tuple[str, str, str]:
    """A fleet board's instance set, snapshot key prefix and history list."""
    base = f"{KEY_PREFIX}:{{ops:{fleet}}}"
    return f"{base}:instances", f"{base}:snap:", f"{base}:history"
