"""``sluice simulate``: the Bedrock simulator alone."""

from __future__ import annotations

import argparse
import asyncio
import sys

from proxy.commands.site import install_uvloop, run_site
from proxy.config import PolicyError
from proxy.log import setup_logging


def add_simulate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``simulate``."""
    sim = sub.add_parser("simulate", help="run the Bedrock simulator alone")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8090)
    sim.add_argument("--config", default=None, help="simulator config (YAML)")


def simulate(args: argparse.Namespace) -> int:
    """Run the simulator until SIGTERM/SIGINT; 2 when its config is unusable."""
    setup_logging("INFO")
    from proxy.simulator import build_simulator_app, load_simulator_config

    try:
        config = load_simulator_config(args.config)
    except (PolicyError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    install_uvloop()
    banner = f"Bedrock simulator listening on http://{args.host}:{args.port}"
    asyncio.run(run_site(build_simulator_app(config), args.host, args.port, False, banner))
    return 0
