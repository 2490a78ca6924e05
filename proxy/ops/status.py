"""``sluice status``: the fleet view in a terminal (placeholder until the fleet view lands)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_status(sub: Any, store_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``sluice status``."""
    p = sub.add_parser("status", help="the fleet's pools, classes and policy, from Redis")
    store_flags(p)
