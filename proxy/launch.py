"""The ``sluice`` command's entry point (and ``python -m proxy``'s).

``sluice serve`` may re-execute itself on jemalloc (:mod:`proxy.allocator`); deciding here,
before the rest of Sluice is imported, keeps the first interpreter's work to a few
milliseconds instead of the half second the whole command line takes to import.
"""

from __future__ import annotations

import sys

from proxy import hangup
from proxy.allocator import AllocatorError, choose


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        hangup.block()  # (a reload asked for while starting must not kill the process)
        try:
            choose()  # never returns when it re-executes
        except AllocatorError as exc:
            print(f"sluice: {exc}", file=sys.stderr)
            return 2
        hangup.hold()
    from proxy.cli import main as cli_main

    return cli_main()
