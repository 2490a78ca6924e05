"""Policy versions kept in Redis: one source for the whole fleet.

Every version is the policy file's text as applied (comments kept), its sha256, who applied
it and when, and the version it replaced. ``current`` names the one in force; applying or
rolling back writes a new version and publishes its number, so history is a straight line.
All keys of one fleet share one hash tag, so the script below also runs on a Redis Cluster;
several fleets (``--fleet NAME``) can share one Redis without seeing each other's policies.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.backend.client import FAILURES, Redis, RedisCluster
from proxy.backend.keys import DEFAULT_FLEET, policy_keys
from proxy.backend.lua import load_script
from proxy.config import Policy, parse_yaml


def sha_of(text: str) -> str:
    """The content hash a version is known by."""
    return hashlib.sha256(text.encode()).hexdigest()


def parse_text(text: str, source: str) -> Policy:
    """Validate a policy document; raise :class:`PolicyError` with ``policy check``'s messages."""
    return parse_yaml(text, source)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class Version:
    """One stored policy version."""

    number: int
    text: str
    sha: str
    author: str
    at: float
    note: str
    replaced: int  # the version that was current when this one was applied (0: none)

    def summary(self) -> dict[str, Any]:
        """Everything but the text (history listings, the policy endpoint)."""
        return {
            "version": self.number,
            "sha": self.sha,
            "author": self.author,
            "at": self.at,
            "note": self.note,
            "replaced": self.replaced,
        }


def diff(a: Version, b: Version) -> str:
    """A unified diff of two versions' texts (empty when they are equal)."""
    return "".join(
        difflib.unified_diff(
            a.text.splitlines(keepends=True),
            b.text.splitlines(keepends=True),
            f"v{a.number}",
            f"v{b.number}",
        )
    )


class PolicyVersions:
    """Read and write the fleet's policy versions through one Redis client."""

    def __init__(self, client: Redis | RedisCluster, fleet: str = DEFAULT_FLEET) -> None:
        self.client = client
        self.fleet = fleet
        prefix, self.channel = policy_keys(fleet)
        self._prefix = prefix
        self._seq, self._current = f"{prefix}:seq", f"{prefix}:current"
        self._apply = client.register_script(load_script("policy_apply"))

    async def current_number(self) -> int | None:
        """The version in force, or None when the fleet has none yet."""
        raw = await self.client.get(self._current)
        return int(raw) if raw is not None else None

    async def sha(self, number: int) -> str | None:
        """A stored version's sha (one small read: instances check it every second)."""
        raw = await self.client.hget(f"{self._prefix}:v:{number}", "sha")
        return _s(raw) if raw is not None else None

    async def get(self, number: int) -> Version | None:
        """A stored version, or None."""
        raw = await self.client.hgetall(f"{self._prefix}:v:{number}")
        if not raw:
            return None
        f = {_s(k): _s(v) for k, v in raw.items()}
        return Version(
            number,
            f.get("text", ""),
            f.get("sha", ""),
            f.get("author", ""),
            float(f.get("at", "0") or 0),
            f.get("note", ""),
            int(f.get("from", "0") or 0),
        )

    async def current(self) -> Version | None:
        """The version in force, or None."""
        number = await self.current_number()
        return await self.get(number) if number is not None else None

    async def history(self, limit: int = 20) -> list[Version]:
        """The newest ``limit`` versions, newest first."""
        top = int(await self.client.get(self._seq) or 0)
        found = [await self.get(n) for n in range(top, max(0, top - limit), -1)]
        return [v for v in found if v is not None]

    async def apply(
        self, text: str, author: str, note: str = "", *, only_if_none: bool = False
    ) -> tuple[int, bool]:
        """Store ``text`` as the new current version and tell the fleet.

        Returns (version, written). ``only_if_none``: write only if no version exists yet
        (then an existing current version is returned with written=False).
        """
        args = [text, sha_of(text), author, repr(time.time()), note, "1" if only_if_none else "0"]
        n = int(await self._apply(keys=[self._seq, self._current, f"{self._prefix}:v:"], args=args))
        if n < 0:
            return -n, False
        await self.client.publish(self.channel, str(n))
        return n, True

    async def listen(self, changed: Callable[[], None]) -> None:
        """Call ``changed`` on every published version until the subscription fails
        (raises one of :data:`~proxy.backend.client.FAILURES`; the caller re-subscribes)."""
        pubsub = self.client.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    changed()
        finally:
            with contextlib.suppress(*FAILURES):
                await pubsub.aclose()
