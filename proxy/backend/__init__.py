"""Everything Sluice keeps outside the process: the only package that imports ``redis``.

* :mod:`.client`: one client factory for ``--redis-url`` (one server or a cluster);
* :mod:`.runner`: one script runner (``scripts/*.lua``, NOSCRIPT reload, timeouts);
* :mod:`.keys`: the key layout of every Redis key Sluice writes;
* :mod:`.store`: the admission store (:class:`~.store.RedisStore` or the embedded twin,
  :class:`~.store.EmbeddedStore`), :mod:`.wakeups` its pub/sub, :mod:`.cache` the response
  cache, :mod:`.job_queue` the batch queue (:mod:`.job_submit` its submit, :mod:`.job_store`
  its keys), :mod:`.versions` policy versions,
  :mod:`.fleet_board` the fleet view's snapshots.

Whatever fails, callers see one exception, :class:`BackendUnavailable` (also known by its
older per-use names ``StoreUnavailable``, ``CacheUnavailable``, ``QueueUnavailable``).
This module imports nothing else, so every layer can import the exception.
"""

from __future__ import annotations

__all__ = ["BackendUnavailable"]


class BackendUnavailable(Exception):
    """Redis (or the embedded store) could not answer in time: error, timeout or closed.

    The caller picks what that means for its request: fail open, fail closed (503), retry.
    """
