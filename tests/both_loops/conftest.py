"""Every test in this folder runs twice: on asyncio's event loop and on uvloop, Sluice's.

(pytest-asyncio asks this hook about each test it collects below this folder only, so the
rest of the suite keeps its single default loop.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
