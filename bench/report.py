"""Turning repetitions into figures: medians, ratios, the table, the warnings, the JSON document."""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common import CpuLayout, fmt, median, render_table, timestamp
from systems import SYSTEMS

Run = dict[str, Any]


def _by(runs: list[Run], test: str) -> dict[tuple[int, str], Run]:
    return {(r["rep"], r["system"]): r for r in runs if r["test"] == test and "error" not in r}


def summarize(runs: list[Run], systems: list[str], reps: int) -> dict[str, Any]:
    """Medians over repetitions; ratios and differences are taken within a repetition first."""
    sat, lat = _by(runs, "saturation"), _by(runs, "latency")

    def per_rep(
        by_rep: dict[tuple[int, str], Run], name: str, fn: Callable[[Run, int], float | None]
    ) -> float | None:
        return median(fn(by_rep[(r, name)], r) for r in range(reps) if (r, name) in by_rep)

    def rps(run: Run) -> float:
        return float(run["result"]["rps"])

    def lat_ms(run: Run, q: str) -> float | None:
        value = run["result"]["latency_ms"][q]
        return None if value is None else float(value)

    def ratio(base: str) -> Callable[[dict[str, Any], int], float | None]:
        return lambda run, r: rps(run) / rps(sat[(r, base)]) if (r, base) in sat else None

    def added(q: str) -> Callable[[dict[str, Any], int], float | None]:
        def fn(run: Run, r: int) -> float | None:
            if (r, "direct") not in lat:
                return None
            own, ref = lat_ms(run, q), lat_ms(lat[(r, "direct")], q)
            return None if own is None or ref is None else own - ref

        return fn

    out: dict[str, Any] = {}
    for name in systems:
        out[name] = {
            "saturation_rps": per_rep(sat, name, lambda run, _r: rps(run)),
            "vs_forwarder": per_rep(sat, name, ratio("forwarder")),
            "vs_direct": per_rep(sat, name, ratio("direct")),
            "cpu_us_per_req_saturation": per_rep(sat, name, lambda run, _r: run["cpu_us_per_req"]),
            "cpu_us_per_req_at_rate": per_rep(lat, name, lambda run, _r: run["cpu_us_per_req"]),
            "interference_saturation": per_rep(sat, name, lambda run, _r: run["interference"]),
            "sut_cpu_busy_saturation": per_rep(sat, name, lambda run, _r: run["sut_cpu_busy"]),
            "p50_ms": per_rep(lat, name, lambda run, _r: lat_ms(run, "p50")),
            "p99_ms": per_rep(lat, name, lambda run, _r: lat_ms(run, "p99")),
            "added_p50_ms": per_rep(lat, name, added("p50")),
            "added_p99_ms": per_rep(lat, name, added("p99")),
            "errors": sum(
                r["result"].get("errors", 0) + r["result"].get("non_2xx", 0)
                for r in runs
                if r["system"] == name and "result" in r
            ),
            "failed_runs": sum(1 for r in runs if r["system"] == name and "error" in r),
        }
    return out


def table(summary: Mapping[str, Mapping[str, Any]], rate: float) -> str:
    headers = [
        "System",
        "Sat. req/s",
        "vs forwarder",
        "vs direct",
        "CPU µs/req (sat)",
        "core lost",
        f"p50 ms @{rate:g}/s",
        "p99 ms",
        "added p50",
        "added p99",
        f"CPU µs/req @{rate:g}/s",
        "errors",
    ]
    rows = [
        [
            name,
            fmt(s["saturation_rps"]),
            fmt(s["vs_forwarder"], ".2f", "×"),
            fmt(s["vs_direct"], ".2f", "×"),
            fmt(s["cpu_us_per_req_saturation"]),
            fmt(s["interference_saturation"], ".0%"),
            fmt(s["p50_ms"], ".2f"),
            fmt(s["p99_ms"], ".2f"),
            fmt(s["added_p50_ms"], "+.2f"),
            fmt(s["added_p99_ms"], "+.2f"),
            fmt(s["cpu_us_per_req_at_rate"]),
            f"{s['errors']}" + (f" ({s['failed_runs']} runs failed)" if s["failed_runs"] else ""),
        ]
        for name, s in summary.items()
    ]
    return render_table(headers, rows)


def per_start(runs: list[Run], systems: list[str], reps: int) -> str:
    """Every fresh start's saturation figures, not only medians: a slow start shows here.

    One row per system: req/s ratio to the forwarder of the same repetition and CPU µs/req
    for each start, then the largest deviation from the system's median (the issue's
    "every start within ±10% of the median").
    """
    sat = _by(runs, "saturation")
    headers = ["System", *[f"start {r + 1}" for r in range(reps)], "max dev. from median"]
    rows = []
    for name in systems:
        cells, values = [name], []
        for r in range(reps):
            run, base = sat.get((r, name)), sat.get((r, "forwarder"))
            if run is None:
                cells.append("failed")
                continue
            rps = float(run["result"]["rps"])
            values.append(rps)
            ratio = f"{rps / float(base['result']['rps']):.2f}× " if base else ""
            cells.append(f"{ratio}{fmt(run['cpu_us_per_req'])} µs")
        mid = median(values)
        dev = max((abs(v - mid) / mid for v in values), default=None) if mid else None
        cells.append(fmt(dev, ".1%"))
        rows.append(cells)
    return render_table(headers, rows)


def warnings(runs: list[Run]) -> list[str]:
    """Things that make a figure a lower bound or suspect; printed under the table."""
    notes = []
    for run in runs:
        tag = f"rep {run['rep']} {run['test']} {run['system']}"
        if "error" in run:
            notes.append(f"{tag}: FAILED: {run['error'].splitlines()[0]}")
            continue
        res = run["result"]
        if (run.get("interference") or 0) > 0.1:
            notes.append(f"{tag}: other processes took {run['interference']:.0%} of the SUT CPUs")
        if run.get("sut_cpu_busy", 1.0) < 0.8:
            notes.append(
                f"{tag}: system under test used only {run['sut_cpu_busy']:.0%} of "
                "its CPU at saturation"
            )
        if run.get("rest_cpu_busy", 0.0) > 0.9:
            notes.append(
                f"{tag}: generator/upstream CPUs {run['rest_cpu_busy']:.0%} busy "
                "-- the figure may be limited by them, not by the system"
            )
        if res.get("errors") or res.get("non_2xx"):
            notes.append(f"{tag}: {res.get('errors', 0)} errors, {res.get('non_2xx', 0)} non-2xx")
        lag = (res.get("send_lag_ms") or {}).get("p99")
        if lag is not None and lag > 5:
            notes.append(f"{tag}: open-loop sends lagged the timetable (p99 {lag:.1f} ms)")
    return notes


def one_line(run: Run) -> str:
    res = run["result"]
    cpu = fmt(run["cpu_us_per_req"], ".0f", " µs/req")
    if run["test"] == "saturation":
        return f"{res['rps']:,.0f} req/s, {cpu}, {res['errors'] + res['non_2xx']} errors"
    lat = res["latency_ms"]
    return (
        f"p50 {fmt(lat['p50'], '.2f')} ms, p99 {fmt(lat['p99'], '.2f')} ms, {cpu}, "
        f"{res['ok']}/{res['scheduled']} ok"
    )


def document(
    opts: argparse.Namespace,
    layout: CpuLayout,
    runs: list[Run],
    summary: dict[str, Any],
    text: str,
    notes: list[str],
) -> dict[str, Any]:
    return {
        "benchmark": "passthrough",
        "timestamp": timestamp(),
        "host": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": sorted(os.sched_getaffinity(0)),
            "cpu_model": _cpu_model(),
        },
        "layout": {**asdict(layout), "description": layout.describe()},
        "generators": {"saturation": opts.generator, "latency": "python-open-loop"},
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "systems": {n: SYSTEMS[n].description for n in opts.systems},
        "summary": summary,
        "table": text,
        "notes": notes,
        "runs": runs,
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
