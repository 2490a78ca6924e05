"""Small stand-ins that keep down what each open connection costs (issue 12: a held
stream's bytes): a queue for one or two items, and a context for timers that read none."""

from __future__ import annotations

import contextvars
from typing import Any, Final

#: The context of timers whose callbacks read and set no context variable: uvloop would
#: otherwise copy the current context for each (a 64-byte object a held stream keeps while
#: it waits). One for the process: its callbacks run one at a time on the one event loop
#: (a Context cannot be entered by two threads at once).
NO_CONTEXT: Final = contextvars.Context()


class SmallQueue(list[Any]):
    """A deque's ``popleft``/``appendleft`` on a list: for queues of one or two items,
    56 bytes where a ``collections.deque`` takes 760 (its first 64-slot block)."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)
