"""One script call for a batch of the store's requests, without a task in the usual case,
and every step of it within one deadline.

A batch is written at once on the direct connection and answered from a done-callback on
its reply's future (at low load each request is a batch of its own, and a task each cost
one per request, issue 12). Only what must be awaited runs in a task, and within the time
the batch has left: making the connection, and reloading the scripts after ``NOSCRIPT``
(the call ran nothing, so it is sent again). At the deadline, counted from when the batch
was first sent, its callers are answered with the store's timeout:

* a call still connecting or reloading is then never written (its callers were answered:
  grants taken now would be held by nobody);
* a call written and unanswered retires its connection at once (new calls go to a new
  one: this one may be dead without a sign), and, with ``wait_late``, its reply is still
  waited for (a stalled Redis runs the script when it resumes), up to the connection's
  socket timeout, then passed on as late: the store gives its grants back. Such calls are
  in the runner's ``late`` set, which closing the store cancels.

A Redis Cluster has no direct connection: its batches run in a task of their own
(:meth:`~proxy.backend.runner.ScriptRunner.run_past`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from proxy.admission.protocol import StoreUnavailable
from proxy.backend.client import NoScriptError
from proxy.backend.inflight import InFlight
from proxy.backend.runner import Arg, ScriptRunner

__all__ = ["Answer", "BatchCall"]

#: Told the call's result (the script's reply, or the failure) and whether it is late (its
#: callers were already answered with the timeout). Called once not late, then, with
#: ``wait_late``, at most once late.
Answer = Callable[[Any, bool], None]

_WAITING, _DONE, _LATE = 0, 1, 2


class BatchCall:
    """A batch's call of one script: :meth:`start` it; ``answer`` is told the outcome."""

    __slots__ = (
        "_answer", "_args", "_call", "_deadline", "_inflight", "_keys", "_loop", "_name",
        "_runner", "_state", "_timer", "_wait_late",
    )  # fmt: skip

    def __init__(
        self,
        runner: ScriptRunner,
        inflight: InFlight,
        name: str,
        keys: Sequence[str],
        args: Sequence[Arg],
        timeout_s: float,
        answer: Answer,
        *,
        wait_late: bool,
    ) -> None:
        self._runner = runner
        self._inflight = inflight
        self._name = name
        self._keys = keys
        self._args = args
        self._answer = answer
        self._wait_late = wait_late
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + timeout_s
        self._timer = self._loop.call_later(timeout_s, self._timed_out)
        #: The reply's future of the call written (None: not written yet).
        self._call: asyncio.Future[Any] | None = None
        #: _WAITING, then _DONE (answered with its outcome) or _LATE (with the timeout).
        self._state = _WAITING

    def start(self) -> None:
        """Write the call now if the connection is ready, else make it ready first."""
        try:
            call = self._runner.send_now(self._name, self._keys, self._args)
        except StoreUnavailable as exc:  # arguments that cannot be sent: nothing was
            self._finish(exc)
            return
        if call is None:
            self._inflight.spawn(self._prepare(reload=False))
            return
        self._call = call
        self._inflight.sent(call, self._replied)

    async def _prepare(self, reload: bool) -> None:
        """Connect (and reload the scripts, after NOSCRIPT) within the time left, then
        write the call, unless its callers were answered meanwhile."""
        try:
            await self._runner.ready(self._name, self._deadline - self._loop.time(), reload)
        except StoreUnavailable as exc:
            if self._state == _WAITING:
                self._finish(exc)
            return
        if self._state == _WAITING:  # (else answered with the timeout: never written)
            self.start()

    def _timed_out(self) -> None:
        call = self._call
        if call is not None and call.done():
            # Its reply came in time, but the loop ran late (a stall: GC, a busy CPU) and
            # runs its callback after this timer: the reply wins (_replied answers).
            return
        self._state = _LATE
        if call is not None:
            self._runner.retire(call)
            if self._wait_late:
                self._inflight.timed_out(call)  # waited for, but not by a flush or close
            else:
                call.cancel()  # its reply, when it comes, is dropped
        self._answer(self._runner.timed_out(self._name), False)

    def _replied(self) -> None:
        call = self._call
        assert call is not None
        try:
            res = self._runner.outcome(self._name, call)
        except NoScriptError:
            # It ran nothing: sent again after a reload, within the same deadline (late,
            # its callers were answered: nothing to send).
            if self._state == _WAITING:
                self._call = None
                self._inflight.spawn(self._prepare(reload=True))
            return
        except StoreUnavailable as exc:
            res = exc
        except asyncio.CancelledError:  # given up at the deadline, or abandoned on close
            res = StoreUnavailable(f"redis {self._name} failed: abandoned")
        if self._state == _WAITING:
            self._finish(res)
        elif self._state == _LATE and self._wait_late:
            self._answer(res, True)

    def _finish(self, res: Any) -> None:
        """Answered before the deadline (a reply, or a failure)."""
        self._timer.cancel()
        self._state = _DONE
        self._answer(res, False)
