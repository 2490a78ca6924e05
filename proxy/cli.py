"""``sluice`` commands: serve, simulate, policy check, batch, dlq, worker.

Every ``serve`` flag can also come from a ``SLUICE_*`` environment variable, so a
container needs no command line; flags win over the environment.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from proxy.commands.cache import add_cache, cache_warm
from proxy.commands.policy import add_policy, policy_check
from proxy.commands.serve import add_serve, serve
from proxy.commands.serve import fleet as _fleet
from proxy.commands.simulate import add_simulate, simulate
from proxy.jobs.commands import COMMANDS as JOB_COMMANDS
from proxy.jobs.commands import add_job_commands, run_job_command

__all__ = ["_fleet", "_parser", "main"]  # _fleet, _parser: tests read the parsed flags


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve(sub)  # proxy/commands/serve.py
    add_simulate(sub)  # proxy/commands/simulate.py
    add_cache(sub)  # proxy/commands/cache.py
    add_job_commands(sub)  # batch, dlq, worker (proxy/jobs/commands.py)
    pol_sub = add_policy(sub)  # proxy/commands/policy.py
    from proxy.ops.cli import register

    register(sub, pol_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sluice`` command."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)  # (run as a program, proxy/launch.py chose its allocator first)
    if args.command == "simulate":
        return simulate(args)
    if args.command == "cache":
        return cache_warm(args)
    if args.command in JOB_COMMANDS:
        return run_job_command(args)
    if hasattr(args, "run"):
        return int(args.run(args))
    return policy_check(args)
