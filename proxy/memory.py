"""Give memory back to the OS after a burst of held streams has ended.

Thousands of held ConverseStream responses leave CPython's and glibc's heaps full of
freed-but-kept pages: without help the process stays at its peak RSS for its whole life
(5,000 streams: 72 -> 196 MB, still 195 MB a minute after they ended). When the number of
open streams falls to a quarter of its peak (and the peak was a real burst), one full
collection (aiohttp's connection objects sit in reference cycles) and glibc's
``malloc_trim(0)`` hand those pages back. It runs at most once per burst, a couple of
seconds after the drop, so a steady load never pays for it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable

from proxy.allocator import current as current_allocator
from proxy.allocator import mallctl

log = logging.getLogger("sluice.memory")


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def release_memory() -> float:
    """Collect cycles and return free heap pages to the OS; the seconds it took."""
    started = time.perf_counter()
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    purge_jemalloc()
    return time.perf_counter() - started


def purge_jemalloc() -> None:
    """Have jemalloc hand its freed pages back now instead of after its ``dirty_decay_ms``
    (``arena.<MALLCTL_ARENAS_ALL>.purge``); nothing on other allocators."""
    control = mallctl() if current_allocator() == "jemalloc" else None
    if control is None:
        return
    failed = control(b"arena.4096.purge", None, None, None, 0)
    if failed:
        log.warning("jemalloc purge failed", extra={"fields": {"errno": failed}})


class BurstTrim:
    """Counts open streams; after a burst ends, releases memory once (see module doc)."""

    __slots__ = ("_handle", "active", "before", "delay_s", "min_peak", "peak", "trims")

    def __init__(
        self,
        min_peak: int = 256,
        delay_s: float = 2.0,
        before: Callable[[], None] | None = None,
    ) -> None:
        #: Streams smaller than this in total are not a burst worth a trim.
        self.min_peak = min_peak
        self.delay_s = delay_s
        #: Drops what the burst left behind (idle upstream connections) before the trim.
        self.before = before
        self.active = 0
        self.peak = 0
        self.trims = 0
        self._handle: asyncio.TimerHandle | None = None

    def opened(self) -> None:
        self.active += 1
        if self.active > self.peak:
            self.peak = self.active

    def closed(self) -> None:
        self.active -= 1
        if self._handle is None and self.peak >= self.min_peak and self._ended():
            loop = asyncio.get_running_loop()
            self._handle = loop.call_later(self.delay_s, self._trim)

    def _ended(self) -> bool:
        return self.active * 4 <= self.peak

    def _trim(self) -> None:
        self._handle = None
        if not self._ended():  # a new burst started meanwhile: wait for its end
            return
        if self.before is None:
            self._release()
            return
        self.before()
        # Closed transports let go of their buffers on the next loop iterations.
        self._handle = asyncio.get_running_loop().call_later(0.5, self._release)

    def _release(self) -> None:
        self._handle = None
        took = release_memory()
        self.trims += 1
        log.info(
            "memory released after a burst of held streams",
            extra={"fields": {"peak_streams": self.peak, "open": self.active, "ms": took * 1e3}},
        )
        self.peak = self.active
