"""``sluice policy check``: validate policy files (the fleet's policy commands are in
:mod:`proxy.ops.cli`, registered on the same ``policy`` parser)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from proxy.config import PolicyError, load_policy


def add_policy(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """Register ``policy check``; return the ``policy`` subcommands for the fleet's to join."""
    pol = sub.add_parser("policy", help="policy tools")
    pol_sub = pol.add_subparsers(dest="policy_command", required=True)
    check = pol_sub.add_parser("check", help="validate policy files")
    check.add_argument("files", nargs="+")
    check.add_argument(
        "--strict",
        action="store_true",
        help="also fail when a secret the policy names is not available here, or when a "
        "setting can never take effect (printed as warnings)",
    )
    return pol_sub


def _policy_check(files: Sequence[str], *, strict: bool) -> int:
    from proxy.control.checks import policy_warnings
    from proxy.policy import CompiledPolicy

    failed = False
    for path in files:
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            print(exc, file=sys.stderr)
            failed = True
            continue
        warnings = policy_warnings(policy)
        for warning in warnings:
            print(f"{path}: warning: {warning}", file=sys.stderr)
        failed = failed or (strict and bool(warnings))
        note = ""
        try:
            CompiledPolicy(policy)
        except PolicyError as exc:
            note = f" (secrets not available here: {exc})"
            failed = failed or strict
        print(
            f"{path}: OK: {len(policy.models)} model pools, {len(policy.priorities)} priority "
            f"classes, {len(policy.workloads)} workloads{note}"
        )
    return 1 if failed else 0


def policy_check(args: argparse.Namespace) -> int:
    """``policy check FILE…``: 0 when every file is usable, else 1."""
    return _policy_check(args.files, strict=args.strict)
