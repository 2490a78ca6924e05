"""Many ConverseStream responses held open at once through one Sluice all complete intact;
after the burst, memory is handed back (``proxy.memory.BurstTrim``).

The CI-sized version of ``bench/held_streams.py`` (which holds 1,000-10,000).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from proxy.eventstream import EventStreamDecoder
from proxy.memory import BurstTrim, release_memory
from tests.support.jobs_helpers import wait_until
from tests.support.processes import Simulator, Sluice

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
PATH = "/model/" + HAIKU.replace(":", "%3A") + "/converse-stream"
POLICY = str(Path(__file__).resolve().parent.parent / "bench" / "policies" / "passthrough.yaml")
STREAMS = 300
DELTAS = 5  # content deltas per stream, one every DELTA_S: each stream is held >= 4 s
DELTA_S = 1.0


async def _hold(url: str, all_open: asyncio.Event, opened: list[int]) -> dict[str, int]:
    body = json.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}).encode()
    events: dict[str, int] = {}
    decoder = EventStreamDecoder()  # checks both CRCs of every frame
    timeout = aiohttp.ClientTimeout(total=120)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url + PATH, data=body, headers={"Content-Type": "application/json"}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        async for chunk in resp.content.iter_any():
            for msg in decoder.feed(chunk):
                kind = str(msg.headers.get(":event-type") or msg.headers.get(":exception-type"))
                events[kind] = events.get(kind, 0) + 1
            if sum(events.values()) and events.get("messageStop") is None and not all_open.is_set():
                opened.append(1)
                if len(opened) == STREAMS:
                    all_open.set()
            if events.get("messageStop") and not all_open.is_set():
                events["finished_before_all_open"] = 1
    return events


@pytest.mark.timeout(180)
@pytest.mark.long  # 6-14 s: runs in `make test-all`, not in CI's `make test`
async def test_hundreds_of_held_streams_complete_intact(
    make_simulator: Callable[..., Simulator], make_sluice: Callable[..., Sluice]
) -> None:
    sim = make_simulator(
        {
            "latency_scale": 1.0,
            "tokens_per_delta": 3,
            "default_output_tokens": 3 * DELTAS,
            "models": {
                HAIKU: {
                    "latency": {
                        "ttft_s": 0.0,
                        "ttft_per_1k_input_s": 0.0,
                        "output_tokens_per_s": 3 / DELTA_S,
                    }
                }
            },
        }
    )
    proxy = make_sluice(upstream=sim.url, policy=POLICY)
    all_open = asyncio.Event()
    opened: list[int] = []
    # Each stream lasts >= (DELTAS - 1) * DELTA_S = 4 s, ample to open 300 local connections
    # even on a busy machine: all of them are held at the same moment.
    results = await asyncio.gather(*(_hold(proxy.url, all_open, opened) for _ in range(STREAMS)))
    expected = {"messageStart": 1, "contentBlockDelta": DELTAS, "messageStop": 1, "metadata": 1}
    broken = [r for r in results if {k: r.get(k) for k in expected} != expected]
    assert not broken, f"{len(broken)} of {STREAMS} streams not intact, e.g. {broken[0]}"
    assert all("None" not in r for r in results)  # no exception frame
    assert all_open.is_set(), "the streams were never all open at once"
    assert not any("finished_before_all_open" in r for r in results)

    def logged() -> list[dict[str, object]]:
        return [r for r in proxy.access_log() if r.get("operation") == "ConverseStream"]

    wait_until(lambda: len(logged()) == STREAMS, 10, "one access-log line per stream")
    assert all(r["status"] == 200 and r["usage_known"] for r in logged())


async def test_burst_trim_runs_once_after_a_burst_ends() -> None:
    trim = BurstTrim(min_peak=8, delay_s=0.01)
    for _ in range(10):
        trim.opened()
    for _ in range(8):  # 2 of 10 still open: a quarter of the peak or less
        trim.closed()
    await asyncio.sleep(0.05)
    assert trim.trims == 1
    assert trim.peak == 2  # the next burst is measured from what stayed open


async def test_burst_trim_waits_while_a_new_burst_runs() -> None:
    trim = BurstTrim(min_peak=8, delay_s=0.02)
    for _ in range(10):
        trim.opened()
    for _ in range(10):
        trim.closed()
    for _ in range(9):  # a new burst before the trim fires
        trim.opened()
    await asyncio.sleep(0.06)
    assert trim.trims == 0


async def test_small_traffic_never_trims() -> None:
    trim = BurstTrim(min_peak=256, delay_s=0.0)
    for _ in range(100):
        trim.opened()
        trim.closed()
    await asyncio.sleep(0.01)
    assert trim.trims == 0


def test_release_memory_runs_here() -> None:
    assert release_memory() >= 0.0


async def test_burst_trim_drops_idle_connections_first() -> None:
    calls: list[int] = []
    trim = BurstTrim(min_peak=2, delay_s=0.0, before=lambda: calls.append(trim.trims))
    for _ in range(4):
        trim.opened()
    for _ in range(4):
        trim.closed()
    await asyncio.sleep(0.05)
    assert calls == [0] and trim.trims == 0  # the release waits for the sockets to close
    await asyncio.sleep(0.7)
    assert trim.trims == 1
