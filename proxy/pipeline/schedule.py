"""Time-of-day concurrency for a workload (incident 4: batch full at night, zero at peak).

Windows are local wall-clock times in the schedule's time zone, so a JST peak stays
10:00–13:00 JST whatever zone the proxies run in. A window whose end is before its
start wraps past midnight; ``24:00`` means the end of the day.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from proxy.config import Schedule, ScheduleWindow


@dataclass(frozen=True, slots=True)
class ScheduledCap:
    """The concurrency a schedule allows now, and when that changes."""

    concurrency: int
    #: Seconds until the current window ends (when the cap is lifted or changes).
    seconds_left: float
    window: str


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def _inside(window: ScheduleWindow, minute: int) -> int | None:
    """Minutes left in ``window`` at ``minute`` of the day, or None when outside it."""
    start, end = _minutes(window.start), _minutes(window.end)
    if start == end:
        return None
    if start < end:
        return end - minute if start <= minute < end else None
    # Wraps past midnight.
    if minute >= start:
        return 24 * 60 - minute + end
    if minute < end:
        return end - minute
    return None


def cap_at(schedule: Schedule, now: datetime) -> ScheduledCap | None:
    """The first window covering ``now`` (an aware datetime), or None outside all windows."""
    local = now.astimezone(ZoneInfo(schedule.timezone))
    minute = local.hour * 60 + local.minute
    for window in schedule.windows:
        left = _inside(window, minute)
        if left is not None:
            seconds = left * 60 - local.second - local.microsecond / 1e6
            label = f"{window.start}-{window.end} {schedule.timezone}"
            return ScheduledCap(window.concurrency, max(1.0, seconds), label)
    return None


def describe_next_change(cap: ScheduledCap, now: datetime) -> str:
    """Human time at which the current window ends, for refusal messages."""
    return (now + timedelta(seconds=cap.seconds_left)).strftime("%H:%M UTC")
