"""The Lua scripts Sluice runs in Redis, loaded from files (never Python strings).

Admission's scripts (``admit``, ``settle``, ``extend``, ``stats``) live beside their pure
twin in ``proxy/admission/scripts/``; the fleet tick, the breaker transition, the job
queue's and policy versions' scripts in ``proxy/backend/scripts/``. A line
``--! include <name>`` is replaced by that script's text (shared Lua functions).
"""

from __future__ import annotations

from importlib import resources

_PLACES = ("proxy.backend", "proxy.admission")
_INCLUDE = "--! include "


def load_script(name: str) -> str:
    """The text of ``scripts/<name>.lua`` (backend's scripts first, then admission's)."""
    for package in _PLACES:
        path = resources.files(package) / "scripts" / f"{name}.lua"
        if path.is_file():
            return "".join(_expand(line) for line in path.read_text("utf-8").splitlines(True))
    raise FileNotFoundError(f"no Lua script named {name!r} in {', '.join(_PLACES)}")


def _expand(line: str) -> str:
    if not line.startswith(_INCLUDE):
        return line
    return load_script(line[len(_INCLUDE) :].strip())
