"""The durable queue's contract: what the worker, the HTTP API and the CLI rely on.

Two implementations: :mod:`proxy.backend.job_queue` (Redis Streams with a consumer
group, keys hash-tagged per pool so every script touches one Cluster slot) and
:mod:`proxy.jobs.sqlite_queue` (one on-disk file for a single embedded instance).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import orjson

from proxy.backend import BackendUnavailable
from proxy.jobs.records import Invocation, Record

#: Consumer group every worker of the fleet reads through.
GROUP = "sluice-workers"


#: The queue's store did not answer; the caller retries later (the records are safe).
QueueUnavailable = BackendUnavailable


class SubmitOutcomeUnknown(BackendUnavailable):
    """A submit failed at its last step and the store could not say whether that step ran:
    the batch may be running. Nothing was removed; the client looks before resubmitting."""

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"submit of batch '{batch_id}': outcome unknown")
        self.batch_id = batch_id


class QueueFull(Exception):
    """A submit would take its workload past ``batch.max_queued_records``; nothing of it was
    written. ``queued`` counts the records already queued or being submitted."""

    def __init__(self, queued: int) -> None:
        super().__init__(f"{queued} records queued")
        self.queued = queued


#: How long a batch may stay ``submitting`` (its submit still writing records) before
#: workers take its submit for dead and drop what it wrote. Far above the longest submit
#: (``server.jobs.max_submit_bytes`` in chunks, each bounded by the store's timeout), so a
#: live submit is never abandoned; the submit's final flip to ``running`` is conditional
#: anyway, so a submit that did outlive it answers 503 instead of running half a batch.
SUBMIT_GRACE_MS = 10 * 60 * 1000

#: What :meth:`JobQueue.replay` did with one dead letter: ``replayed`` back into its batch's
#: queue, or left where it is because its batch was cancelled (``batch_cancelled``: the
#: cancel dropped its records, a replay must not bring one back only to drop it again) or no
#: longer exists (``batch_gone``), or a concurrent replay or discard took it first
#: (``already_replayed``).
ReplayOutcome = Literal["replayed", "batch_cancelled", "batch_gone", "already_replayed"]


#: How long a finished batch is kept when the queue is given no retention (the default of
#: ``server.jobs.retention_hours``).
DEFAULT_RETENTION_S = 168 * 3600.0


class BatchRunning(Exception):
    """A delete found the batch running (a replay may have restarted it since it was
    looked at): deleting it would orphan the records in flight."""


class BatchCompleted(Exception):
    """A cancel found every record of the batch done (it may have completed since it was
    looked at): cancelling it would only make its dead letters unreplayable."""


@dataclass(frozen=True, slots=True)
class Deleted:
    """What deleting one batch removed."""

    output_lines: int
    queued_records: int
    dead_letters: int

    def to_json(self) -> dict[str, int]:
        """The public (HTTP/CLI) shape."""
        return {
            "outputLines": self.output_lines,
            "queuedRecords": self.queued_records,
            "deadLetters": self.dead_letters,
        }


@dataclass(frozen=True, slots=True, order=True)
class Stream:
    """One queue: a workload's records for one model pool (the pool is the hash tag)."""

    pool: str
    workload: str


@dataclass(slots=True)
class BatchMeta:
    """A batch's identity and counters, as stored."""

    batch_id: str
    workload: str
    pool: str
    model: str
    invocation: Invocation
    records: int
    created_ms: int
    succeeded: int = 0
    failed: int = 0
    cancelled: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    #: Its submit has not finished writing its records (Redis only: SQLite commits a
    #: submit whole). Such a batch is not listed and workers never run its records.
    submitting: bool = False

    @property
    def stream(self) -> Stream:
        """The queue this batch's records wait in."""
        return Stream(self.pool, self.workload)

    @property
    def pending(self) -> int:
        """Records without an output line yet."""
        return 0 if self.cancelled else max(0, self.records - self.succeeded - self.failed)

    @property
    def status(self) -> str:
        """``submitting``, ``cancelled``, ``completed`` or ``running``."""
        if self.submitting:
            return "submitting"
        if self.cancelled:
            return "cancelled"
        return "completed" if self.pending == 0 else "running"


@dataclass(frozen=True, slots=True)
class Claimed:
    """A record a worker holds under its lease, with the attempts counted so far (this one too)."""

    stream: Stream
    entry_id: str
    batch_id: str
    record_id: str
    model_input: bytes
    #: A replay's corrected model id (else the batch's model).
    model: str | None
    attempts: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record set aside with its reason; replay puts it back in its batch's queue."""

    dlq_id: str
    batch_id: str
    record_id: str
    workload: str
    pool: str
    model: str
    reason: str
    error_code: str
    message: str
    attempts: int
    model_input: bytes
    at_ms: int

    def to_json(self) -> dict[str, Any]:
        """The public (HTTP/CLI) shape; ``modelInput`` stays raw JSON for the caller."""
        return {
            "id": self.dlq_id,
            "batchId": self.batch_id,
            "recordId": self.record_id,
            "workload": self.workload,
            "pool": self.pool,
            "model": self.model,
            "reason": self.reason,
            "errorCode": self.error_code,
            "errorMessage": self.message,
            "attempts": self.attempts,
            "modelInput": orjson.loads(self.model_input),
            "at": self.at_ms,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DeadLetter:
        """Inverse of :meth:`to_json` (how both stores keep dead letters)."""
        return cls(
            dlq_id=d["id"], batch_id=d["batchId"], record_id=d["recordId"],
            workload=d["workload"], pool=d["pool"], model=d["model"], reason=d["reason"],
            error_code=d["errorCode"], message=d["errorMessage"], attempts=d["attempts"],
            model_input=orjson.dumps(d["modelInput"]), at_ms=d["at"],
        )  # fmt: skip


def new_id(pool: str) -> str:
    """A batch or dead-letter id that names its pool, so look-ups need no index."""
    return f"{pool}:{secrets.token_hex(8)}"


def pool_of(some_id: str) -> str | None:
    """The pool a batch or dead-letter id names, or None for an id Sluice never issued."""
    pool, sep, rest = some_id.partition(":")
    return pool if sep and pool and rest else None


class JobQueue(Protocol):
    """Durable records: submit, claim under a lease, complete exactly once, dead-letter."""

    async def start(self) -> None:
        """Connect (and warn about missing durability)."""

    async def close(self) -> None:
        """Close connections."""

    async def submit(
        self, meta: BatchMeta, records: list[Record], max_queued: int | None = None
    ) -> None:
        """Store the batch and every record; returns only once all are durable.

        All or nothing for the workers: when it raises, no record of the batch is ever
        run (what was written is removed, or left ``submitting`` for workers to abandon).
        With ``max_queued``, raises :class:`QueueFull` (nothing written) when the workload's
        queued records and these would exceed it, decided atomically against other submits.
        """

    async def streams(self) -> list[Stream]:
        """Every queue a batch was ever submitted to."""

    async def claim(self, stream: Stream, consumer: str, lease_ms: int) -> Claimed | None:
        """The oldest record whose lease expired, else the next new one; counts an attempt."""

    async def has_work(self, stream: Stream, lease_ms: int) -> bool:
        """True when a record waits undelivered or a held record's lease has expired."""

    async def renew(
        self, stream: Stream, consumer: str, entry_ids: list[str], lease_ms: int
    ) -> list[str]:
        """Restart the lease of records ``consumer`` still owns; returns those."""

    async def next_attempt(self, claimed: Claimed) -> int:
        """Count another attempt of a held record; returns the new count."""

    async def release(self, claimed: Claimed) -> None:
        """Leave a claimed record untouched, its attempt uncounted; it is claimed again once
        its lease expires (a record of a batch whose submit is still writing)."""

    async def abandon(self, batch_id: str) -> int | None:
        """Drop a batch still ``submitting`` (its submit died) and every record it wrote;
        the number dropped, or None when the batch is not (or no longer) submitting."""

    async def complete(
        self, claimed: Claimed, line: bytes | None, ok: bool, tokens: tuple[int, int]
    ) -> bool:
        """Write the record's output line unless one exists, then drop it from the queue.

        ``line`` None drops it without output (a cancelled batch). True when this call
        wrote the line (so counts move exactly once per recordId).
        """

    async def complete_and_claim(
        self,
        claimed: Claimed,
        line: bytes,
        tokens: tuple[int, int],
        consumer: str,
        lease_ms: int,
    ) -> tuple[bool, Claimed | None]:
        """:meth:`complete` a success and :meth:`claim` the stream's next record together
        (the caller already holds the next record's admission)."""

    async def dead_letter(self, claimed: Claimed, entry: DeadLetter, line: bytes) -> bool:
        """Like :meth:`complete` with an error line, and keep ``entry`` for replay."""

    async def batch(self, batch_id: str) -> BatchMeta | None:
        """A batch's meta and counters."""

    async def batches(self, workload: str | None) -> list[BatchMeta]:
        """Batches, newest first, optionally of one workload."""

    def output(self, batch_id: str) -> AsyncIterator[bytes]:
        """The output lines written so far."""

    async def cancel(self, batch_id: str) -> BatchMeta | None:
        """Mark cancelled and drop its waiting records; raises :class:`BatchCompleted` when
        every record is done (checked in the same step as the mark)."""

    async def depth(self, stream: Stream) -> tuple[int, float]:
        """Records waiting or in flight, and the oldest one's age in seconds."""

    async def drain_rate(self, stream: Stream) -> float:
        """Records finished per second over the last minute, fleet-wide."""

    async def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter (callers filter)."""

    async def dead_letter_counts(self) -> dict[tuple[str, str], int]:
        """How many dead letters per (workload, reason), without reading any of them."""

    async def dead_letter_by_id(self, dlq_id: str) -> DeadLetter | None:
        """One dead letter."""

    async def discard(self, entries: list[DeadLetter]) -> list[DeadLetter]:
        """Drop dead letters for good (their records keep their error lines); returns those
        this call dropped: one a concurrent replay or discard took first is not among them."""

    async def replay(self, entry: DeadLetter, model: str | None) -> ReplayOutcome:
        """Put a dead letter back in its batch's queue (its error line removed), unless its
        batch was cancelled or is gone: then the dead letter stays where it is."""

    async def delete(self, batch_id: str) -> Deleted | None:
        """Remove a completed or cancelled batch: meta, output lines, records still queued and
        dead letters. None when there is no such batch; raises :class:`BatchRunning`."""

    async def sweep(self) -> int:
        """One bounded pass of retention: finish removing batches past their retention (or
        half deleted); how many this pass removed. Called every few seconds."""
