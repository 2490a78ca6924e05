"""Sockets that misbehave on purpose, for the upstream's fault tests."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def dead_address() -> Iterator[tuple[str, int]]:
    """A port whose accept queue is full: its SYNs go unanswered, like a dead address."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(listener.getsockname())
        fillers.append(s)
    try:
        yield listener.getsockname()
    finally:
        listener.close()
        for s in fillers:
            s.close()
