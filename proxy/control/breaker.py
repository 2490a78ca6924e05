"""Circuit breaker per model pool: the pure state machine and each instance's local view.

One record per pool is shared by the fleet (``sluice:{<pool>}:breaker``, a hash written
only through a compare-and-set on its generation, see :data:`TRANSITION_LUA`), read by
every instance once per tick (:mod:`proxy.control.fleet`). The request path never waits
for Redis: :meth:`BreakerBoard.allow` reads the local copy and, while half-open, spends a
probe token this instance claimed from the fleet-wide probe counter on its last tick.

Two ways to be open, chosen by whether the pool has an adaptive limit:

* **Cut limit** (:func:`next_state_cut`, pools with ``adaptive``): open means "stop
  hammering Bedrock", not "refuse everyone". The controller cuts the pool's limit when the
  breaker opens and holds it while open (at most back up to the quota last learned from
  Bedrock's throttles: :func:`proxy.control.law.next_limit`); every call still goes
  through admission, so the
  pool keeps serving at the cut limit, highest class first (class shares, waiters in
  priority order), and classes with a degradation chain go down it when refused. Evidence
  is the volume served since the last transition: each state needs ``min_requests``
  outcomes before it may move, open lasts at least ``open_seconds``, and half-open closes
  only after ``open_seconds`` more of sustained success (failures under half the
  threshold), so a handful of calls can never flap it.
* **Probes** (:func:`next_state`, pools without ``adaptive``: there is no limit to cut):
  closed → open at the threshold with at least ``min_requests``; open refuses every call
  for ``open_seconds``; half-open lets ``half_open_probes`` calls through and closes once
  they succeeded (or every probe there was demand for, after ``open_seconds``), → open on
  a probe failure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Final

from proxy.backend.lua import load_script
from proxy.config import Breaker

CLOSED: Final = 0
HALF_OPEN: Final = 1
OPEN: Final = 2
STATE_NAMES: Final = ("closed", "half_open", "open")

#: A half-open episode whose probes never report back (their instance died mid-call) is
#: restarted after this long: open again, then half-open with fresh probe slots.
STALL_MIN_S: Final = 60.0

#: The one way a breaker record changes: compare-and-set on ``gen`` with the server clock.
#: KEYS: 1 breaker hash. ARGV: 1 expected gen, 2 new state, 3 ttl ms.
#: Returns {1 if applied else 0, HGETALL of the record after}.
TRANSITION_LUA: Final = load_script("breaker_transition")


@dataclass(frozen=True, slots=True)
class BreakerRecord:
    """The fleet's breaker record of one pool (an absent record is a fresh closed breaker).

    ``since_ms`` is the server time of the last transition; ``probes`` the probe slots
    claimed in this half-open episode, ``ok`` / ``fail`` the probe outcomes reported.
    """

    state: int = CLOSED
    gen: int = 0
    since_ms: int = 0
    probes: int = 0
    ok: int = 0
    fail: int = 0

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> BreakerRecord:
        """Parse an HGETALL of the record (missing fields take their defaults)."""

        def get(name: str) -> int:
            value = fields.get(name)
            return int(float(value)) if value else 0

        return cls(get("state"), get("gen"), get("since"), get("probes"), get("ok"), get("fail"))


def next_state(
    rec: BreakerRecord, requests: int, failures: int, cfg: Breaker, now_ms: int
) -> tuple[int, str] | None:
    """The state ``rec`` should move to now, with the reason, or None to stay.

    ``requests`` / ``failures`` (throttles + 5xx) are fleet counts over the rolling window,
    counted only since the breaker last closed (older outcomes already had their say).
    ``now_ms`` is on the clock of ``rec.since_ms`` (Redis server time, or local monotonic).
    """
    if rec.state == CLOSED:
        if requests >= cfg.min_requests and failures >= cfg.threshold * requests:
            return OPEN, f"{failures}/{requests} failed (threshold {cfg.threshold:g})"
        return None
    elapsed_s = (now_ms - rec.since_ms) / 1000.0
    if rec.state == OPEN:
        if elapsed_s >= cfg.open_seconds:
            return HALF_OPEN, f"open for {cfg.open_seconds:g} s"
        return None
    if rec.fail > 0:
        return OPEN, f"{rec.fail} probe(s) failed"
    if rec.ok >= cfg.half_open_probes:
        return CLOSED, f"{rec.ok} probe(s) succeeded"
    if rec.ok and rec.ok == rec.probes and elapsed_s >= cfg.open_seconds:
        # Too little traffic to send every probe: each one claimed succeeded, and unspent
        # slots were given back, so waiting longer would only keep a healthy pool shut.
        return CLOSED, f"{rec.ok} probe(s) succeeded, no demand for more"
    if elapsed_s >= max(STALL_MIN_S, 2 * cfg.open_seconds):
        return OPEN, "probes did not report back"
    return None


def next_state_cut(
    rec: BreakerRecord, requests: int, failures: int, cfg: Breaker, now_ms: int
) -> tuple[int, str] | None:
    """The move of a cut-limit breaker (see the module docstring), or None to stay.

    ``requests`` / ``failures`` are the fleet's outcomes since the last transition (at most
    the window); the pool keeps serving while open, so every state has fresh evidence.
    """
    if requests < cfg.min_requests:
        return None  # too little evidence to move in any direction
    failing = failures >= cfg.threshold * requests
    counts = f"{failures}/{requests} failed"
    if rec.state == CLOSED:
        return (OPEN, f"{counts} (threshold {cfg.threshold:g})") if failing else None
    elapsed_s = (now_ms - rec.since_ms) / 1000.0
    if rec.state == OPEN:
        if elapsed_s >= cfg.open_seconds and not failing:
            return HALF_OPEN, f"{counts} at the cut limit after {elapsed_s:.1f} s open"
        return None
    if failing:
        return OPEN, f"{counts} while half-open"
    if elapsed_s >= cfg.open_seconds and failures < cfg.threshold / 2 * requests:
        return CLOSED, f"{counts}: sustained success for {elapsed_s:.1f} s"
    return None


#: How long an unspent half-open probe slot is kept for the callers that asked for it.
PROBE_KEEP_S = 2.0


@dataclass(slots=True)
class _Local:
    """One pool as this instance sees it between ticks."""

    rec: BreakerRecord = field(default_factory=BreakerRecord)
    #: Probe slots claimed from the fleet and not yet spent by a request.
    tokens: int = 0
    #: Probes spent whose outcome is not yet observed.
    out: int = 0
    #: Outcomes of spent probes not yet reported to the fleet.
    ok: int = 0
    fail: int = 0
    #: A request was refused for want of a probe token since the last tick.
    wanted: bool = False
    #: When a request last wanted a probe token (monotonic seconds).
    wanted_at: float = 0.0


class BreakerBoard:
    """Every pool's breaker as this instance last read it, plus its probe bookkeeping.

    Not thread-safe; lives on the event loop. ``allow`` and ``outcome`` are the hot path
    (dictionary reads); ``probe_request`` / ``update`` run once per tick.
    """

    def __init__(self) -> None:
        self._pools: dict[str, _Local] = {}
        #: When False the fleet view is stale and every pool is treated as closed.
        self.fresh = True

    def _get(self, pool: str) -> _Local:
        local = self._pools.get(pool)
        if local is None:
            local = self._pools[pool] = _Local()
        return local

    def state(self, pool: str) -> int:
        """The pool's last known state (CLOSED for a pool never seen)."""
        local = self._pools.get(pool)
        return CLOSED if local is None else local.rec.state

    def allow(self, pool: str) -> bool:
        """May a request go to ``pool`` now? Spends a probe token when half-open."""
        local = self._pools.get(pool)
        if local is None or local.rec.state == CLOSED or not self.fresh:
            return True
        if local.rec.state == OPEN:
            return False
        if local.tokens > 0:
            local.tokens -= 1
            local.out += 1
            return True
        local.wanted = True
        local.wanted_at = time.monotonic()
        return False

    def outcome(self, pool: str, failed: bool) -> None:
        """Attribute a finished call to an outstanding probe of ``pool``, if there is one.

        The request path does not say which call was a probe, so the first outcomes after
        probes were spent count as theirs; calls still in flight from before the breaker
        opened may be taken for probes, which errs on the side of their fresher evidence.
        """
        local = self._pools.get(pool)
        if local is None or local.out == 0:
            return
        local.out -= 1
        if failed:
            local.fail += 1
        else:
            local.ok += 1

    def probe_request(self, pool: str) -> tuple[int, int, int, int]:
        """What to tell the fleet this tick: (probe op, gen, probes ok, probes failed).

        Probe op 1 claims one slot (a request here is waiting for one), -1 gives back an
        unspent slot so another instance with traffic can take it, 0 neither. Reported
        outcomes are taken out of the local tally (they are lost if the tick fails, and
        the half-open stall timeout then restarts the episode).
        """
        local = self._get(pool)
        op = 0
        if local.rec.state == HALF_OPEN:
            # Keep an unspent slot a while: callers refused a moment ago back off for
            # about a second and come back for it; giving it away at once starves them.
            idle = time.monotonic() - local.wanted_at > PROBE_KEEP_S
            if local.tokens > 0 and not local.wanted and idle:
                op, local.tokens = -1, local.tokens - 1
            elif local.tokens == 0 and local.wanted:
                op = 1
        local.wanted = False
        ok, fail, local.ok, local.fail = local.ok, local.fail, 0, 0
        return op, local.rec.gen, ok, fail

    def update(self, pool: str, rec: BreakerRecord, granted: bool) -> None:
        """Install the record read this tick; a new generation voids local probe state."""
        local = self._get(pool)
        if rec.gen != local.rec.gen:
            local.tokens = local.out = local.ok = local.fail = 0
        local.rec = rec
        if granted and rec.state == HALF_OPEN:
            local.tokens += 1
