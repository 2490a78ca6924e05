"""``sluice status``: the fleet view in a terminal — a table per pool, class and workload.

Reads Redis directly (no instance needed) with ``--redis-url``, or asks an instance's
``/sluice/v1/fleet`` with ``--url``. ``--json`` prints the view for scripts; ``--watch``
redraws every ``--interval`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from proxy.backend.client import FAILURES, redact, redis_client
from proxy.ops.fleetview import read_fleet
from proxy.ops.view import runs

_POOLS = [
    "pool",
    "limit",
    "adaptive",
    "in-flight",
    "req/min",
    "quota",
    "tok/min",
    "quota",
    "throttled",
    "breaker",
]
_CLASSES = ["class", "share", "admitted/s", "refused/s", "degraded/s", "p50", "p99", "target"]
_WORKLOADS = ["workload", "class", "admitted/s", "refused/s", "degraded/s", "p50", "p99", "state"]


def add_status(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    store_flags: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add ``sluice status``."""
    p = sub.add_parser("status", help="the fleet's pools, classes and workloads, live")
    store_flags(p)
    p.add_argument(
        "--url",
        default=os.environ.get("SLUICE_URL", "http://127.0.0.1:8080"),
        help="an instance to ask when there is no --redis-url (SLUICE_URL)",
    )
    p.add_argument("--json", action="store_true", help="print the fleet view as JSON")
    p.add_argument("--watch", action="store_true", help="redraw until interrupted")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between redraws")
    p.set_defaults(run=status)


def _num(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}" if isinstance(v, float) and digits else f"{round(v):,}"


def _ms(v: Any) -> str:
    return "-" if v is None else (f"{v / 1000:.2f}s" if v >= 1000 else f"{v:.0f}ms")


def table(title: str, head: Sequence[str], rows: list[list[str]]) -> str:
    """A plain aligned table: first column left, the rest right."""
    widths = [max(len(str(r[i])) for r in [list(head), *rows]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        first, *rest = (str(c) for c in cells)
        cols = [c.rjust(w) for c, w in zip(rest, widths[1:], strict=True)]
        return "  ".join([first.ljust(widths[0]), *cols])

    return "\n".join([title, line(head), *(line(r) for r in rows)]) + "\n"


def _runs(i: dict[str, Any]) -> str:
    return runs(i.get("policy_version"), i.get("policy_sha"), i.get("policy_source"))


def _header(view: dict[str, Any]) -> str:
    pol = view.get("policy") or {}
    version = f"v{pol['version']}" if pol.get("version") is not None else "-"
    # Members only: an instance on its own file shares the Redis, not the fleet's policy.
    members = view.get("members", len(view["instances"]))
    lines = [
        f"fleet {view['fleet']}: {members} instances, policy {version}"
        f" (sha {str(pol.get('sha') or '')[:12]}, by {pol.get('author') or '-'})"
    ]
    # An instance that runs anything else is named: a count alone would hide it.
    off = [i for i in view["instances"] if not i.get("own_file") and not i.get("on_policy", True)]
    own = [i for i in view["instances"] if i.get("own_file")]
    for title, items in ((f"not on {version}", off), ("own file, not members (--no-fleet)", own)):
        if items:
            lines.append(f"{title}: {len(items)}")
            lines += [f"  {i['id']}  {_runs(i)}" for i in items]
    return "\n".join(lines) + "\n"


def render(view: dict[str, Any]) -> str:
    """The fleet view as text."""
    out = [_header(view)]
    pools = [
        [
            p["name"], _num(p["limit"], 0), _num(p["adaptive_limit"], 0), _num(p["in_flight"], 0),
            _num(p["requests_per_min"]), _num(p["quota"].get("rpm"), 0),
            _num(p["tokens_per_min"], 0), _num(p["quota"].get("tpm"), 0),
            f"{p['throttle_rate'] * 100:.1f}%", p["breaker"] or "-",
        ]
        for p in view["pools"]
    ]  # fmt: skip
    out.append(table("POOLS", _POOLS, pools))
    classes = [
        [c["name"], f"{(c.get('share') or 0) * 100:.0f}%", _num(c["admitted_per_s"], 2),
         _num(c["refused_per_s"], 2), _num(c["degraded_per_s"], 2), _ms(c["p50_ms"]),
         _ms(c["p99_ms"]), _ms(c.get("target_p99_ms"))]
        for c in view["classes"]
    ]  # fmt: skip
    out.append(table("CLASSES", _CLASSES, classes))
    workloads = [
        [w["name"], w.get("priority") or "-", _num(w["admitted_per_s"], 2),
         _num(w["refused_per_s"], 2), _num(w["degraded_per_s"], 2), _ms(w["p50_ms"]),
         _ms(w["p99_ms"]), "paused" if w["paused"] else "running"]
        for w in view["workloads"]
    ]  # fmt: skip
    out.append(table("WORKLOADS", _WORKLOADS, workloads))
    for name, items in (("SCHEDULES", view["schedules"]), ("BATCH", view["batch"]),
                        ("DEAD LETTERS", view["dlq"])):  # fmt: skip
        if items:
            out.append(name + "\n" + "".join(f"  {k}: {v}\n" for k, v in items.items()))
    return "\n".join(out)


async def _fetch(args: argparse.Namespace) -> dict[str, Any]:
    if args.redis_url:
        client = redis_client(args.redis_url, 5.0)
        try:
            return (await read_fleet(client, args.fleet)).as_json()
        finally:
            await client.aclose()
    url = args.url.rstrip("/") + "/sluice/v1/fleet"
    with await asyncio.to_thread(urllib.request.urlopen, url, timeout=5) as resp:
        return json.loads(await asyncio.to_thread(resp.read))  # type: ignore[no-any-return]


def status(args: argparse.Namespace) -> int:
    """Print the fleet view once, or keep redrawing it with --watch (Ctrl-C stops)."""
    try:
        while True:
            code = _show(args)
            if code or not args.watch:
                return code
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _show(args: argparse.Namespace) -> int:
    try:
        view = asyncio.run(_fetch(args))
    except FAILURES as exc:
        where = redact(args.redis_url) if args.redis_url else args.url
        print(f"sluice: cannot read the fleet view from {where}: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(view, indent=2) if args.json else render(view)
    if args.watch:
        sys.stdout.write("\x1b[H\x1b[2J")  # clear the screen, like watch(1)
    print(text, flush=True)
    return 0
