"""The ``sluice`` commands, one module per family; :mod:`proxy.cli` wires their parsers.

``serve`` (one process) and ``workers`` (N processes on one port), with the listening
socket, TLS and event loop they share in ``site``; ``simulate``; ``cache warm``;
``policy check``. Batch jobs' commands live in :mod:`proxy.jobs.commands`, the fleet's in
:mod:`proxy.ops.cli`.
"""

from __future__ import annotations

import os


def env(name: str, default: str | None = None) -> str | None:
    """``SLUICE_<name>`` from the environment: a flag's default, so containers need no flags."""
    return os.environ.get(f"SLUICE_{name}", default)
