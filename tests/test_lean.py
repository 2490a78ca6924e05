"""``SmallQueue`` stands in for the deques aiohttp keeps per connection and per request
body (``proxy/lean.py``): the same order and the same calls, a tenth of the bytes."""

from __future__ import annotations

import collections
import random
import sys

from proxy.lean import SmallQueue


def test_a_small_queue_behaves_as_a_deque_under_every_call_aiohttp_makes() -> None:
    rng = random.Random(12)
    small, deque = SmallQueue(), collections.deque[int]()
    for step in range(2_000):
        op = rng.choice(["append", "appendleft", "popleft", "clear", "index"])
        if op == "append":
            small.append(step)
            deque.append(step)
        elif op == "appendleft":
            small.appendleft(step)
            deque.appendleft(step)
        elif op == "popleft" and deque:
            assert small.popleft() == deque.popleft()
        elif op == "clear" and rng.random() < 0.05:
            small.clear()
            deque.clear()
        elif op == "index" and deque:
            assert small[0] == deque[0] and small[-1] == deque[-1]
        assert len(small) == len(deque) and bool(small) == bool(deque)
        assert list(small) == list(deque)


def test_a_small_queue_is_a_tenth_of_an_empty_deque() -> None:
    assert sys.getsizeof(SmallQueue()) * 10 <= sys.getsizeof(collections.deque())
