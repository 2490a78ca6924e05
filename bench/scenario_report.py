"""The incident scenarios' report: per-class figures, markdown tables and the PNG plot.

Run by ``bench/scenarios.py``; reads what :mod:`scenario_load` recorded and sampled.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import (
    fmt,
    percentile,
    render_table,
)
from scenario_load import CLIENT_TIMEOUT_S, SAMPLE_S, Outcome, Sample, Scenario

# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def class_figures(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Requests, success, latency of successes, degradations, refusals, other errors."""
    ok = sorted(o.latency_s for o in outcomes if o.status == 200)
    refused = sum(1 for o in outcomes if o.retry_after)
    # Refusals that carry Retry-After are counted on their own; the rest are what a caller
    # can do nothing about (Bedrock's throttles passed through, timeouts, 5xx).
    errors = Counter(
        o.error or str(o.status) for o in outcomes if o.status != 200 and not o.retry_after
    )
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "success_rate": len(ok) / len(outcomes) if outcomes else None,
        "p50_ms": _ms(percentile(ok, 50)),
        "p99_ms": _ms(percentile(ok, 99)),
        "degraded": dict(Counter(o.degraded for o in outcomes if o.degraded)),
        "refused_retry_after": refused,
        "errors": dict(errors),
    }


def summarize(run: dict[str, Any], scenario: Scenario, duration: float) -> dict[str, Any]:
    outcomes: list[Outcome] = run["outcomes"]
    classes = scenario.classes
    per_class = {c: class_figures([o for o in outcomes if o.priority == c]) for c in classes}
    per_phase: dict[str, dict[str, Any]] = {}
    for phase, start, end in scenario.phase_bounds(duration):
        key = f"{phase.name} [{start:.0f}-{end:.0f} s]"
        per_phase[key] = {
            c: class_figures([o for o in outcomes if o.priority == c and start <= o.t < end])
            for c in classes
        }
    samples: list[Sample] = run["samples"]
    upstream: dict[str, Any] = {}
    if samples:
        # The simulator was reset just before the load, so its final counters are the run's.
        for model, now in samples[-1].sim.items():
            upstream[model] = {
                "requests": now["requests"],
                "throttled": now["throttled"],
                "throttle_rate": now["throttled"] / now["requests"] if now["requests"] else None,
                "peak_in_flight": now["peak_concurrency"],
            }
    return {"classes": per_class, "phases": per_phase, "upstream": upstream}


def _degraded_text(d: dict[str, int], n: int) -> str:
    if not d:
        return "0"
    total = sum(d.values())
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))
    return f"{total} ({total / n:.0%}: {kinds})"


def _errors_text(d: dict[str, int]) -> str:
    if not d:
        return "0"
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:3])


def class_table(summaries: dict[str, dict[str, Any]]) -> str:
    headers = ["Class", "System", "Requests", "Success", "p50 ms", "p99 ms", "Degraded",
               "Refused w/ Retry-After", "Other errors (top 3)"]  # fmt: skip
    rows = []
    classes = next(iter(summaries.values()))["classes"]
    for cls in classes:
        for system, summary in summaries.items():
            f = summary["classes"][cls]
            rows.append(
                [
                    cls,
                    system,
                    f"{f['requests']:,}",
                    fmt(None if f["success_rate"] is None else f["success_rate"] * 100, ".1f", "%"),
                    fmt(f["p50_ms"]),
                    fmt(f["p99_ms"]),
                    _degraded_text(f["degraded"], f["requests"]),
                    f"{f['refused_retry_after']:,}",
                    _errors_text(f["errors"]),
                ]
            )
    return render_table(headers, rows)


def phase_table(summary: dict[str, Any]) -> str:
    headers = ["Phase", "Class", "Requests", "Success", "p99 ms", "Degraded", "Refused w/ RA"]
    rows = []
    for phase, by_class in summary["phases"].items():
        for cls, f in by_class.items():
            rows.append(
                [
                    phase,
                    cls,
                    f"{f['requests']:,}",
                    fmt(None if f["success_rate"] is None else f["success_rate"] * 100, ".1f", "%"),
                    fmt(f["p99_ms"]),
                    f"{sum(f['degraded'].values()):,}",
                    f"{f['refused_retry_after']:,}",
                ]
            )
    return render_table(headers, rows)


def upstream_table(summaries: dict[str, dict[str, Any]], quotas: dict[str, int | None]) -> str:
    headers = ["Upstream model", "System", "Calls", "Throttled", "Throttle rate", "Peak in-flight",
               "Quota"]  # fmt: skip
    rows = []
    models = sorted({m for s in summaries.values() for m in s["upstream"]})
    for model in models:
        for system, summary in summaries.items():
            u = summary["upstream"].get(model)
            if u is None:
                continue
            rate = u["throttle_rate"]
            rows.append(
                [
                    model.split(".", 1)[-1],
                    system,
                    f"{u['requests']:,}",
                    f"{u['throttled']:,}",
                    fmt(None if rate is None else rate * 100, ".1f", "%"),
                    str(u["peak_in_flight"]),
                    str(quotas.get(model) or "-"),
                ]
            )
    return render_table(headers, rows)


# --------------------------------------------------------------------------------------------
# Time series and the plot
# --------------------------------------------------------------------------------------------


def pool_models(policy: dict[str, Any], sim_config: dict[str, Any]) -> dict[str, str]:
    """Sluice pool -> the simulator model whose quota it draws on (aliases resolved)."""
    alias = {a: m for m, spec in (sim_config.get("models") or {}).items()
             for a in spec.get("aliases", [])}  # fmt: skip
    return {p: alias.get(spec["ids"][0], spec["ids"][0]) for p, spec in policy["models"].items()}


def series(
    run: dict[str, Any], policy: dict[str, Any], pools: dict[str, str]
) -> tuple[dict[str, Any], list[str]]:
    """Per-sample time series for the plot and JSON, plus notes about metrics not exposed."""
    samples: list[Sample] = run["samples"]
    notes: list[str] = []
    ts = [s.t for s in samples]
    out: dict[str, Any] = {"t": ts, "models": {}, "limits": {}, "breaker": {}, "paused": {}}
    out["sluice_in_flight"] = {}
    for model in {m for s in samples for m in s.sim}:
        out["models"][model] = _model_series(samples, ts, model)
    if run["system"] != "sluice":
        return out, notes
    for pool in pools:
        _pool_series(out, notes, samples, pool, policy["models"][pool])
    for wl, spec in policy.get("workloads", {}).items():
        if spec.get("pause"):
            vals = _gauge(samples, "sluice_workload_paused", wl, max)
            if any(v is not None for v in vals):
                out["paused"][wl] = vals
            else:
                notes.append(f"workload {wl}: pause rule set but sluice_workload_paused absent")
    return out, notes


def _model_series(samples: list[Sample], ts: list[float], model: str) -> dict[str, Any]:
    inflight = [s.sim.get(model, {}).get("in_flight", 0) for s in samples]
    throttled = [s.sim.get(model, {}).get("throttled", 0) for s in samples]
    # Over the trailing second: a 250 ms delta of a handful of throttles is mostly noise.
    back = round(1 / SAMPLE_S)
    rates = [
        (throttled[i] - throttled[max(0, i - back)]) / max(1e-6, ts[i] - ts[max(0, i - back)])
        for i in range(len(ts))
    ]
    return {"in_flight": inflight, "throttles_per_s": rates}


def _gauge(
    samples: list[Sample], name: str, label: str, combine: Callable[[list[float]], float]
) -> list[float | None]:
    vals: list[float | None] = []
    for s in samples:
        got = [g[name][label] for g in s.gauges if label in g.get(name, {})]
        vals.append(combine(got) if got else None)
    return vals


def _pool_series(
    out: dict[str, Any], notes: list[str], samples: list[Sample], pool: str, spec: dict[str, Any]
) -> None:
    vals = _gauge(samples, "sluice_in_flight", pool, sum)
    if any(v for v in vals):
        out["sluice_in_flight"][pool] = vals
    configured = spec.get("concurrency")
    for name in ("sluice_pool_concurrency_limit", "sluice_adaptive_limit"):
        vals = _gauge(samples, name, pool, max)
        if any(v is not None for v in vals):
            out["limits"][pool] = {"source": name, "values": vals}
            break
    else:
        out["limits"][pool] = {"source": "configured", "values": [configured] * len(samples)}
        notes.append(
            f"pool {pool}: no sluice_pool_concurrency_limit / sluice_adaptive_limit in "
            f"/metrics; plotted the configured limit ({configured})"
        )
    if spec.get("breaker"):
        vals = _gauge(samples, "sluice_breaker_state", pool, max)
        if any(v is not None for v in vals):
            out["breaker"][pool] = vals
        else:
            notes.append(f"pool {pool}: breaker configured but sluice_breaker_state absent")


def _per_second(
    outcomes: Sequence[Outcome], duration: float, pick: Callable[[Outcome], bool]
) -> tuple[list[int], list[int]]:
    bins = [0] * (int(duration) + 1)
    for o in outcomes:
        if pick(o):
            bins[min(len(bins) - 1, int(o.t))] += 1
    return list(range(len(bins))), bins


def _rolling_p99(
    outcomes: Sequence[Outcome], duration: float, window: float = 5.0
) -> tuple[list[int], list[float]]:
    done = sorted((o.t + o.latency_s, o.latency_s) for o in outcomes if o.status == 200)
    xs, ys = [], []
    for end in range(1, int(duration + CLIENT_TIMEOUT_S) + 1):
        lat = sorted(v for t, v in done if end - window < t <= end)
        if lat:
            xs.append(end)
            ys.append((percentile(lat, 99) or 0) * 1000)
    return xs, ys


def plot(
    path: Path,
    scenario: Scenario,
    runs: dict[str, dict[str, Any]],
    ts_by_system: dict[str, dict[str, Any]],
    policy: dict[str, Any],
    pools: dict[str, str],
    quotas: dict[str, int | None],
    duration: float,
) -> str | None:
    """Write the PNG; returns a message instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install -e '.[bench]'): no PNG written"
    main = "sluice" if "sluice" in ts_by_system else next(iter(ts_by_system))
    ts = ts_by_system[main]
    models = [m for m in dict.fromkeys(pools.values()) if m in ts["models"]]
    classes = scenario.classes
    fig, axes = plt.subplots(len(models) + 2, 1, figsize=(12, 3.2 * (len(models) + 2)), sharex=True)
    palette = {"P0": "tab:red", "P1": "tab:orange", "P2": "tab:blue", "batch": "tab:gray"}
    spare = iter(["tab:olive", "tab:cyan", "tab:pink", "tab:brown"])
    colors = {c: palette.get(c) or next(spare, "black") for c in classes}
    for ax, model in zip(axes, models, strict=False):
        _plot_model(ax, model, ts, ts_by_system, main, pools, quotas)
    outcomes: list[Outcome] = runs[main]["outcomes"]
    _plot_rates(axes[-2], outcomes, classes, colors, duration)
    _plot_p99(axes[-1], outcomes, classes, colors, duration, policy)
    for ax in axes:
        _shade(ax, scenario, ts, duration)
    axes[-1].set_xlim(0, duration + 3)
    fig.suptitle(f"{scenario.title} ({main}, {runs[main]['targets']} target(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _shade(ax: Any, scenario: Scenario, ts: dict[str, Any], duration: float) -> None:
    for phase, start, end in scenario.phase_bounds(duration):
        if phase.multiplier > 1:
            ax.axvspan(start, end, color="gold", alpha=0.12, lw=0)
    for vals in ts["paused"].values():
        for t, v in zip(ts["t"], vals, strict=True):
            if v:
                ax.axvspan(t, t + SAMPLE_S, color="purple", alpha=0.10, lw=0)


def _plot_model(
    ax: Any,
    model: str,
    ts: dict[str, Any],
    ts_by_system: dict[str, dict[str, Any]],
    main: str,
    pools: dict[str, str],
    quotas: dict[str, int | None],
) -> None:
    m = ts["models"][model]
    ax.plot(ts["t"], m["in_flight"], color="tab:blue", lw=1, label="in-flight (simulator)")
    if quotas.get(model):
        ax.axhline(quotas[model], color="black", ls=":", lw=1, label="account quota")
    mine = [p for p, x in pools.items() if x == model]
    for pool, color in zip(mine, ["tab:green", "tab:purple", "tab:brown"], strict=False):
        _plot_pool(ax, ts, pool, color, shared=len(mine) > 1)
    twin = ax.twinx()
    twin.plot(ts["t"], m["throttles_per_s"], color="tab:red", lw=0.8, alpha=0.8,
              label="throttles/s")  # fmt: skip
    base = ts_by_system.get("direct", {}).get("models", {}).get(model)
    if base is not None and main != "direct":
        twin.plot(ts_by_system["direct"]["t"], base["throttles_per_s"], color="tab:red",
                  lw=0.8, ls=":", alpha=0.6, label="throttles/s, direct baseline")  # fmt: skip
    twin.set_ylabel("throttles/s")
    peak = max([1.0, *m["throttles_per_s"], *(base or {}).get("throttles_per_s", [])])
    twin.set_ylim(bottom=0, top=peak * 1.1)
    ax.set_ylabel("concurrent calls")
    ax.set_title(f"{model} -- Sluice pools {mine}")
    lines = ax.get_legend_handles_labels()
    tl = twin.get_legend_handles_labels()
    ax.legend(lines[0] + tl[0], lines[1] + tl[1], loc="upper left", fontsize=7)


def _plot_pool(ax: Any, ts: dict[str, Any], pool: str, color: str, *, shared: bool) -> None:
    held = ts.get("sluice_in_flight", {}).get(pool)
    if held and shared:  # which pool holds the shared quota's slots
        ax.plot(ts["t"], [v or 0 for v in held], color=color, lw=0.8, ls="--",
                label=f"in-flight via {pool} (Sluice)")  # fmt: skip
    lim = ts["limits"].get(pool)
    if lim:
        ax.step(ts["t"], [v if v is not None else float("nan") for v in lim["values"]],
                where="post", lw=1.5, color=color,
                label=f"limit {pool} ({lim['source']})")  # fmt: skip
    for t, v in zip(ts["t"], ts["breaker"].get(pool, []), strict=False):
        if v == 2:
            ax.axvspan(t, t + SAMPLE_S, color="red", alpha=0.15, lw=0)


def _plot_rates(
    ax: Any,
    outcomes: list[Outcome],
    classes: Sequence[str],
    colors: dict[str, str],
    duration: float,
) -> None:
    for cls in classes:
        x, ok = _per_second(
            outcomes, duration, lambda o, c=cls: o.priority == c and o.status == 200
        )
        _, deg = _per_second(
            outcomes, duration, lambda o, c=cls: o.priority == c and bool(o.degraded)
        )
        _, ref = _per_second(
            outcomes, duration, lambda o, c=cls: o.priority == c and o.status != 200
        )
        ax.plot(x, ok, color=colors[cls], lw=1.2, label=f"{cls} answered/s")
        if any(deg):
            ax.plot(x, deg, color=colors[cls], lw=0.8, ls="--", label=f"{cls} degraded/s")
        if any(ref):
            ax.plot(x, ref, color=colors[cls], lw=0.8, ls=":", label=f"{cls} not 200/s")
    ax.set_ylabel("requests/s (by send time)")
    ax.legend(loc="upper left", fontsize=7, ncol=3)


def _plot_p99(
    ax: Any,
    outcomes: list[Outcome],
    classes: Sequence[str],
    colors: dict[str, str],
    duration: float,
    policy: dict[str, Any],
) -> None:
    for cls in classes:
        x, y = _rolling_p99([o for o in outcomes if o.priority == cls], duration)
        ax.plot(x, y, color=colors[cls], lw=1.2, label=f"{cls} p99 (5 s window)")
        target = (policy.get("priorities", {}).get(cls) or {}).get("target_p99_ms")
        if target:
            ax.axhline(target, color=colors[cls], ls=":", lw=1, label=f"{cls} target")
            ax.axhline(2 * target, color=colors[cls], ls="--", lw=1, label=f"{cls} 2x target")
    ax.set_ylabel("p99 of answers, ms")
    ax.set_xlabel("seconds (gold: surge phase; purple: batch paused; red: breaker open)")
    ax.legend(loc="upper left", fontsize=7, ncol=3)
