"""The Lua scripts Sluice runs in Redis, loaded from files (never Python strings).

Admission's scripts (``admit``, ``settle``, ``extend``, ``stats``) live beside their pure
twin in ``proxy/admission/scripts/``; the fleet tick and the breaker transition live in
``proxy/backend/scripts/``.
"""

from __future__ import annotations

from importlib import resources

_PLACES = ("proxy.backend", "proxy.admission")


def load_script(name: str) -> str:
    """The text of ``scripts/<name>.lua`` (backend's scripts first, then admission's)."""
    for package in _PLACES:
        path = resources.files(package) / "scripts" / f"{name}.lua"
        if path.is_file():
            return path.read_text("utf-8")
    raise FileNotFoundError(f"no Lua script named {name!r} in {', '.join(_PLACES)}")
