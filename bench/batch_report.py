"""Tables and the plot of a ``batch_jobs.py`` run (queue depth, age, drain rate, real-time p99)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:,.0f}"


def phase_figures(doc: dict[str, Any], phase: dict[str, Any]) -> dict[str, Any]:
    """Real-time and batch figures of one phase, from the samples and the outcomes."""
    start, end = phase["start"], phase.get("end", phase["start"])
    rt = [o for o in doc["realtime"] if start <= o["t"] < end]
    ok = [o["latency"] for o in rt if o["status"] == 200]
    samples = [s for s in doc["samples"] if start <= s["t"] <= end]
    drained = samples[-1]["done"] - samples[0]["done"] if len(samples) > 1 else 0
    span = samples[-1]["t"] - samples[0]["t"] if len(samples) > 1 else 0.0
    return {
        "seconds": end - start,
        "rt_calls": len(rt),
        "rt_success": len(ok) / len(rt) if rt else None,
        "rt_p50": _pct(ok, 0.5),
        "rt_p99": _pct(ok, 0.99),
        "drained": drained,
        "drain_rate": drained / span if span else 0.0,
        "max_depth": max((s["depth"] for s in samples), default=0),
        "max_age": max((s["age"] for s in samples), default=0.0),
    }


def phase_table(doc: dict[str, Any]) -> str:
    """One markdown row per phase."""
    rows = [
        "| Phase | s | RT calls | RT success | RT p50 ms | RT p99 ms | Records done | "
        "Drain /s | Max depth | Max age s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for phase in doc["phases"]:
        f = phase_figures(doc, phase)
        success = "-" if f["rt_success"] is None else f"{f['rt_success']:.1%}"
        rows.append(
            f"| {phase['name']} | {f['seconds']:.0f} | {f['rt_calls']} | {success} | "
            f"{_ms(f['rt_p50'])} | {_ms(f['rt_p99'])} | {f['drained']} | "
            f"{f['drain_rate']:.2f} | {f['max_depth']} | {f['max_age']:.1f} |"
        )
    return "\n".join(rows)


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """What the issue's targets ask about, one line each."""
    c = doc["checks"]
    out = [
        f"- records submitted {c.get('submitted', '?')}, output lines {c['output_lines']}, "
        f"duplicated {c['duplicates']}, still queued at the end {c.get('queued_at_end', '?')}, "
        f"lost {c.get('lost', '?')}; dead letters by reason {c['dlq_by_reason'] or 'none'}",
        f"- attempts by reason {c['attempts_by_reason']}; succeeded per instance "
        f"{[int(x) for x in c['succeeded_per_instance']]}",
    ]
    if doc.get("submit_s") is not None:
        out.append(f"- submit of the main batch accepted in {doc['submit_s']:.2f} s")
    if doc["producer"]:
        out.append(
            f"- producer submits by status {doc['producer']}; Retry-After given "
            f"{sorted(set(doc['retry_after'])) or '-'} s"
        )
    if doc.get("replayed") is not None:
        out.append(f"- dead letters replayed with the right model: {doc['replayed']}")
    figures = {p["name"]: phase_figures(doc, p) for p in doc["phases"]}
    cap = doc["spec"].get("batch_cap_per_s")
    if cap and "batch alone" in figures:
        rate = figures["batch alone"]["drain_rate"]
        out.append(
            f"- drain rate with no real-time traffic {rate:.2f}/s = {rate / cap:.0%} of {cap}/s"
        )
    alone = next((f for n, f in figures.items() if "alone" in n and f["rt_p99"]), None)
    both = next((f for n, f in figures.items() if "+" in n and f["rt_p99"]), None)
    if alone and both:
        out.append(
            f"- real-time p99 {_ms(alone['rt_p99'])} ms alone vs {_ms(both['rt_p99'])} ms with "
            f"the batch draining ({both['rt_p99'] / alone['rt_p99'] - 1:+.0%}); success "
            f"{both['rt_success']:.1%}"
        )
    return out + [f"- note: {n}" for n in doc["notes"]]


def _rolling(points: list[tuple[float, float]], t: float, window: float) -> list[float]:
    return [v for (pt, v) in points if t - window < pt <= t]


def plot(doc: dict[str, Any], path: Path) -> str | None:
    """Queue depth, oldest age, drain rate and real-time p99 over time; None when written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib missing (pip install -e '.[bench]'): no PNG written"
    samples = doc["samples"]
    ts = [s["t"] for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    axes[0].plot(ts, [s["depth"] for s in samples], label="queued records (stream)")
    axes[0].plot(ts, [s["pending"] for s in samples], "--", label="pending in submitted batches")
    axes[0].set_ylabel("queue depth")
    axes[0].legend(loc="upper right")
    axes[1].plot(ts, [s["age"] for s in samples], color="tab:orange")
    axes[1].set_ylabel("oldest record age (s)")
    done = [(s["t"], float(s["done"])) for s in samples]
    rates = []
    for t, d in done:
        earlier = [p for p in done if t - 5.0 <= p[0] < t]
        rates.append((d - earlier[0][1]) / (t - earlier[0][0]) if earlier else 0.0)
    axes[2].plot(ts, rates, color="tab:green", label="records finished/s (5 s)")
    cap = doc["spec"].get("batch_cap_per_s")
    if cap:
        axes[2].axhline(cap, color="grey", linestyle=":", label="batch workload cap")
    axes[2].set_ylabel("drain rate (/s)")
    axes[2].legend(loc="upper right")
    ok = [(o["t"] + o["latency"], o["latency"]) for o in doc["realtime"] if o["status"] == 200]
    p99 = [_pct(_rolling(ok, t, 5.0), 0.99) for t in ts]
    axes[3].plot(ts, [None if v is None else v * 1000 for v in p99], color="tab:red")
    target = doc["spec"]["realtime"].get("target_p99_ms")
    if target:
        axes[3].axhline(target, color="grey", linestyle=":", label="target p99")
        axes[3].legend(loc="upper right")
    axes[3].set_ylabel("real-time p99 (ms, 5 s)")
    axes[3].set_xlabel("seconds")
    for ax in axes:
        for i, phase in enumerate(doc["phases"]):
            if i % 2:
                ax.axvspan(phase["start"], phase.get("end", phase["start"]), alpha=0.08)
    for phase in doc["phases"]:
        axes[0].annotate(phase["name"], (phase["start"], 0), fontsize=8, rotation=90, va="bottom")
    fig.suptitle(doc["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None
