"""``sluice policy apply | history | rollback | diff`` and ``sluice status``.

Registered from :mod:`proxy.cli`; each command talks to the fleet's Redis directly, so it
works from any machine that can reach it (a laptop, a CI job), no instance needed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from proxy.backend.client import FAILURES, redact, redis_client
from proxy.backend.keys import DEFAULT_FLEET
from proxy.backend.versions import PolicyVersions, Version, diff, parse_text, sha_of
from proxy.config import PolicyError, read_text
from proxy.ops.fleetview import read_fleet
from proxy.ops.reload import author
from proxy.ops.view import runs
from proxy.policy import CompiledPolicy


def _store_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--redis-url",
        default=os.environ.get("SLUICE_REDIS_URL"),
        help="the fleet's Redis (SLUICE_REDIS_URL)",
    )
    p.add_argument(
        "--fleet",
        default=os.environ.get("SLUICE_FLEET") or DEFAULT_FLEET,
        help="the fleet whose policy to act on (SLUICE_FLEET; default: %(default)s)",
    )


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    policy_sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add the commands to ``sluice`` (``sub``) and ``sluice policy`` (``policy_sub``)."""
    apply = policy_sub.add_parser("apply", help="validate a policy file and roll it out")
    apply.add_argument("file")
    apply.add_argument("--note", default="", help="why (shown by history)")
    history = policy_sub.add_parser("history", help="list the fleet's policy versions")
    history.add_argument("--limit", type=_at_least_one, default=20)
    rollback = policy_sub.add_parser("rollback", help="re-apply an earlier version")
    rollback.add_argument(
        "version", nargs="?", type=_at_least_one, help="default: the one replaced last"
    )
    pdiff = policy_sub.add_parser("diff", help="diff two versions (default: previous, current)")
    pdiff.add_argument("a", nargs="?", type=int)
    pdiff.add_argument("b", nargs="?", type=int)
    for p in (apply, rollback):
        p.add_argument(
            "--wait",
            type=float,
            default=0.0,
            metavar="SECONDS",
            help="wait until every live instance reports the new version (exit 1 if not)",
        )
    for p, run in ((apply, _apply), (history, _history), (rollback, _rollback), (pdiff, _diff)):
        _store_flags(p)
        p.set_defaults(run=_runner(run))
    from proxy.ops.status import add_status

    add_status(sub, _store_flags)


def _runner(
    command: Callable[[PolicyVersions, argparse.Namespace], Awaitable[int]],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if not args.redis_url:
            print("sluice: this command needs --redis-url (or SLUICE_REDIS_URL)", file=sys.stderr)
            return 2
        return asyncio.run(with_versions(args.redis_url, args.fleet, lambda v: command(v, args)))

    return run


async def with_versions(
    url: str, fleet: str, body: Callable[[PolicyVersions], Awaitable[int]]
) -> int:
    """Run ``body`` against the fleet's versions; a Redis failure is one clear line, exit 1."""
    client = redis_client(url, 5.0)
    try:
        return await body(PolicyVersions(client, fleet))
    except FAILURES as exc:
        print(f"sluice: Redis at {redact(url)} failed: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.aclose()


def _secrets_note(policy: Any) -> str:
    try:
        CompiledPolicy(policy)
    except PolicyError as exc:
        return f" (secrets not available here, instances must have them: {exc})"
    return ""


async def _publish(
    versions: PolicyVersions, text: str, note: str, source: str, wait_s: float = 0.0
) -> int:
    before = await versions.current()
    if before is not None and before.text == text:
        print(f"{source}: unchanged, v{before.number} (sha {before.sha[:12]}) is in force")
        return 0
    number, _ = await versions.apply(text, author(), note)
    was = f"v{before.number}" if before else "none"
    print(f"policy v{number} applied to fleet '{versions.fleet}' from {source} (was {was})")
    return await _confirm(versions, number, sha_of(text), wait_s) if wait_s > 0 else 0


def _at_least_one(text: str) -> int:
    """A version number or count: a whole number from 1 (0 read as "none given" before)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


async def _confirm(versions: PolicyVersions, number: int, sha: str, wait_s: float) -> int:
    """Watch the fleet view until every live member runs ``number`` with ``sha`` (each
    reports once a second), or ``wait_s`` passes; say which members lag and what they run.

    The sha too: after Redis lost its data the numbers start again at 1, and an instance
    still running the old v1 must not count as running the new one."""
    started = time.monotonic()
    while True:
        view = await read_fleet(versions.client, versions.fleet)
        # Every member counts, whatever it runs: one that refused the stored version at
        # start-up still runs its file (source: its path) and must show as behind, not
        # vanish from the count. Only --no-fleet instances, which never follow, are left out.
        members = [i for i in view.instances if not i.own_file]
        on = ("redis", number, sha)
        behind = [i for i in members if (i.policy_source, i.policy_version, i.policy_sha) != on]
        elapsed = time.monotonic() - started
        if (members and not behind) or elapsed >= wait_s:  # (none yet: keep waiting)
            break
        await asyncio.sleep(0.25)
    total = len(members)
    print(f"{total - len(behind)}/{total} instances on v{number} after {elapsed:.1f} s")
    if not total:
        # Nothing confirmed it: no instance runs, or none can publish its snapshot.
        print(f"  no instance of fleet '{versions.fleet}' reports to Redis", file=sys.stderr)
        return 1
    for i in behind:
        print(
            f"  {i.id} still on {runs(i.policy_version, i.policy_sha, i.policy_source)}",
            file=sys.stderr,
        )
    own = len(view.instances) - total
    if own:
        print(f"  ({own} more on their own file, --no-fleet: not waited for)")
    return 1 if behind else 0


async def _apply(versions: PolicyVersions, args: argparse.Namespace) -> int:
    try:
        text = await asyncio.to_thread(read_text, Path(args.file))
        policy = parse_text(text, args.file)  # the messages `policy check` prints
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(
        f"{args.file}: OK: {len(policy.models)} model pools, {len(policy.priorities)} priority "
        f"classes, {len(policy.workloads)} workloads{_secrets_note(policy)}"
    )
    return await _publish(versions, text, args.note, args.file, args.wait)


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


async def _history(versions: PolicyVersions, args: argparse.Namespace) -> int:
    current = await versions.current_number()
    rows = await versions.history(args.limit)
    if not rows:
        print(f"fleet '{versions.fleet}' has no policy versions yet")
        return 0
    print(f"{'':2}{'VERSION':>8}  {'APPLIED':19}  {'SHA':12}  {'BY':24}  NOTE")
    for v in rows:
        mark = "* " if v.number == current else "  "
        number = f"v{v.number}"
        print(f"{mark}{number:>8}  {_when(v.at)}  {v.sha[:12]}  {v.author:24}  {v.note}")
    return 0


async def _load(versions: PolicyVersions, number: int) -> Version:
    found = await versions.get(number)
    if found is None:
        raise LookupError(f"fleet '{versions.fleet}' has no policy v{number}")
    return found


async def _rollback(versions: PolicyVersions, args: argparse.Namespace) -> int:
    current = await versions.current()
    target_no = args.version or (current.replaced if current else 0)
    try:
        if not target_no:
            raise LookupError(f"fleet '{versions.fleet}' has no earlier version to roll back to")
        target = await _load(versions, target_no)
        parse_text(target.text, f"policy v{target_no}")
    except (LookupError, PolicyError) as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return 2
    note, source = f"rollback to v{target_no}", f"v{target_no}"
    return await _publish(versions, target.text, note, source, args.wait)


async def _diff(versions: PolicyVersions, args: argparse.Namespace) -> int:
    try:
        if args.a is not None and args.b is not None:
            a, b = await _load(versions, args.a), await _load(versions, args.b)
        else:
            current = await versions.current()
            if current is None:
                raise LookupError(f"fleet '{versions.fleet}' has no policy versions yet")
            b = current
            a = await _load(versions, args.a if args.a is not None else current.replaced or 0)
    except LookupError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(diff(a, b) or f"v{a.number} and v{b.number} are identical\n")
    return 0
