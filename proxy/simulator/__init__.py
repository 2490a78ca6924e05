"""A Bedrock runtime simulator: same routes and wire shapes, realistic latency and quotas.

Used for local development, the test suite and benchmarks (``latency_scale: 0`` makes it the
zero-latency baseline). See :mod:`proxy.simulator.config` for every setting and
:mod:`proxy.simulator.admin` for the ``/_sim/`` endpoints.

Prompt directives (anywhere in the message text, not the system prompt) make behaviour
deterministic for tests:

* ``[[sim:output_tokens=N]]`` — reply with N tokens (still capped by the request's max tokens);
* ``[[sim:fail=throttle|unavailable|internal]]`` — 429 / 503 / 500 before admission;
* ``[[sim:fail=timeout]]`` — admitted, waits the time to first token, then 408;
* ``[[sim:fail=stream_error|stream_throttle]]`` — streams send N events (default 2, or
  ``[[sim:stream_error_after=N]]``, or the model's ``stream_error_after``) then a
  ``modelStreamErrorException`` / ``throttlingException`` frame; non-streaming calls ignore it.

Unknown directives are a ``ValidationException`` so a typo cannot pass silently.
"""

from __future__ import annotations

from proxy.simulator.app import build_simulator_app
from proxy.simulator.config import SimulatorConfig, SimulatorConfigError, load_simulator_config

__all__ = [
    "SimulatorConfig",
    "SimulatorConfigError",
    "build_simulator_app",
    "load_simulator_config",
]
