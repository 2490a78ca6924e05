"""Hot reload: one policy in force per instance, switched atomically when a new one lands.

In a fleet (``--fleet NAME`` with ``--redis-url``) the fleet's current version in Redis
(:mod:`proxy.backend.versions`) is the source: a pub/sub message wakes every instance at once,
and a periodic check catches a missed message. Otherwise the ``--config`` file is the
source: it is re-read when it changes and on SIGHUP. Whatever the source, a policy that
does not validate or compile (a secret missing here) is never applied: the instance keeps
its policy, logs it and counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy import hangup
from proxy.backend.client import FAILURES, redis_client
from proxy.backend.versions import PolicyVersions, Version, diff, parse_text, sha_of
from proxy.config import DEFAULT_POLICY, PolicyError, read_text
from proxy.policy import CompiledPolicy, PolicyRef
from proxy.tasks import stop_tasks

log = logging.getLogger("sluice.policy")

SwapHook = Callable[[CompiledPolicy], Awaitable[None]]
_STORE_ERRORS = FAILURES


@dataclass(frozen=True, slots=True)
class Loaded:
    """Which policy this instance runs (``GET /sluice/v1/policy``)."""

    version: int
    sha: str
    author: str
    loaded_at: float
    source: str  # "redis" or the file's path


class PolicyMetrics:
    """sluice_policy_version, sluice_policy_errors_total, sluice_policy_switches_total."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.version = Gauge(
            "sluice_policy_version", "Policy version in force on this instance.", registry=registry
        )
        self.errors = Counter(
            "sluice_policy_errors",
            "Policies this instance refused to apply, by reason (invalid, compile, store).",
            ["reason"],
            registry=registry,
        )
        self.switches = Counter(
            "sluice_policy_switches", "Policy switches made by this instance.", registry=registry
        )
        self.p99_target = Gauge(
            "sluice_policy_p99_target_seconds",
            "Latency each priority class is promised (target_p99_ms), for alert rules.",
            ["priority"],
            registry=registry,
        )

    def describe(self, policy: CompiledPolicy) -> None:
        """Export what the alert rules compare against from the policy in force."""
        self.p99_target.clear()
        for name, cls in policy.policy.priorities.items():
            if cls.target_p99_ms is not None:
                self.p99_target.labels(name).set(cls.target_p99_ms / 1000)


def author() -> str:
    """Who applies a policy: $USER at this host."""
    return f"{os.environ.get('USER') or 'unknown'}@{socket.gethostname()}"


class Reloader:
    """Keeps ``ref`` on the fleet's (or the file's) current policy; runs ``hooks`` per switch."""

    def __init__(
        self,
        ref: PolicyRef,
        registry: CollectorRegistry,
        *,
        config_path: str | None,
        redis_url: str | None,
        fleet: str | None = None,
        timeout_s: float = 1.0,
        poll_s: float | None = None,
    ) -> None:
        self.ref = ref
        self.hooks: list[SwapHook] = []
        self.metrics = PolicyMetrics(registry)
        self._path = Path(config_path) if config_path else DEFAULT_POLICY
        joined = bool(redis_url and fleet)
        self._watch = config_path is not None and not joined
        self._client = redis_client(redis_url, timeout_s) if redis_url and fleet else None
        self.versions = PolicyVersions(self._client, fleet) if self._client and fleet else None
        self._poll_s = poll_s if poll_s is not None else (0.5 if joined else 1.0)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._bad: int | str | None = None  # the version (or file sha) that failed last
        self._stat: tuple[int, int] | None = None
        self._store_down = False
        self._force = False  # SIGHUP: compile again even if the text did not change
        self.loaded = Loaded(0, "", "", time.time(), str(self._path))

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt the fleet's policy (or publish ours), then follow changes in the background."""
        try:
            text: str | None = await asyncio.to_thread(self._path.read_text, encoding="utf-8")
        except OSError:  # a policy built in memory (tests, embedding) with no file behind it
            text = None
        sha = sha_of(text) if text is not None else ""
        self.loaded = replace(self.loaded, version=1 if self._watch else 0, sha=sha)
        self._stat = await asyncio.to_thread(self._file_stat)
        if self.versions is not None and text is not None:
            await self._join_fleet(text)
            self._tasks.append(asyncio.create_task(self._listen()))
        self.metrics.version.set(self.loaded.version)
        self.metrics.describe(self.ref.current)
        self._tasks.append(asyncio.create_task(self._run()))
        with contextlib.suppress(RuntimeError, ValueError, NotImplementedError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.hup)
        if hangup.taken():  # one came while starting: the file read above may predate it
            self.hup()

    async def close(self) -> None:
        """Stop following; the policy in force stays."""
        with contextlib.suppress(RuntimeError, ValueError, NotImplementedError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        hangup.hold()  # (that restored the default: a reload sent while stopping would kill)
        await stop_tasks(self._tasks, "policy reloader")
        if self._client is not None:
            await self._client.aclose()

    def hup(self) -> None:
        """SIGHUP: read the source now and compile it again (secret files are re-read too)."""
        self._stat = None  # re-read the file even if its mtime did not move
        self._force = True
        self._wake.set()

    # --- following the source --------------------------------------------------------------

    async def _join_fleet(self, text: str) -> None:
        assert self.versions is not None
        try:
            who = author()
            number, written = await self.versions.apply(
                text, who, f"published at start-up from {self._path}", only_if_none=True
            )
            if written:
                log.info(f"policy v{number} published from {self._path} (sha {sha_of(text)[:12]})")
                self.loaded = replace(self.loaded, version=number, author=who, source="redis")
                return
            stored = await self.versions.get(number)
            if stored is not None and stored.sha != self.loaded.sha:
                mine = Version(0, text, self.loaded.sha, "", 0.0, "", 0)
                changed = diff(mine, stored).splitlines()[2:42]
                log.warning(
                    f"policy v{number} from Redis differs from {self._path}; using v{number}",
                    extra={"fields": {"event": "policy_differs", "diff": "\n".join(changed)}},
                )
            await self.check()
        except _STORE_ERRORS as exc:
            self._store_failed(exc)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.check()
            except _STORE_ERRORS as exc:
                self._store_failed(exc)
            except Exception:
                log.exception("policy check failed", extra={"fields": {"event": "policy_bug"}})

    async def _listen(self) -> None:
        """Wake the check loop on every published version (the poll covers lost messages)."""
        assert self._client is not None and self.versions is not None
        while True:
            try:
                await self.versions.listen(self._wake.set)
            except _STORE_ERRORS:
                await asyncio.sleep(1.0)

    async def check(self) -> None:
        """One look at the source; switch when it holds a new, valid policy."""
        if self.versions is None:
            await self._check_file()
            return
        number = await self.versions.current_number()
        self._store_down = False
        force, self._force = self._force, False
        if number is None:
            return
        # A version is its number and its sha: after Redis lost its data the numbers start
        # again at 1, and a new v1 must not pass for the old one this instance runs.
        sha = await self.versions.sha(number)
        tag = f"v{number}:{sha}"
        if sha is None or (
            not force and tag in (f"v{self.loaded.version}:{self.loaded.sha}", self._bad)
        ):
            return
        stored = await self.versions.get(number)
        if stored is None:
            return
        compiled = self._compile(stored.text, f"policy v{number}", tag)
        if compiled is not None:
            await self.install(
                compiled, Loaded(number, stored.sha, stored.author, time.time(), "redis")
            )

    async def _check_file(self) -> None:
        if not self._watch:
            return
        stat = await asyncio.to_thread(self._file_stat)
        if stat == self._stat:
            return
        self._stat = stat
        try:
            text = await asyncio.to_thread(read_text, self._path)
        except PolicyError as exc:  # unreadable, or not UTF-8: refused and counted
            self._refuse("invalid", str(exc))
            return
        sha = sha_of(text)
        force, self._force = self._force, False
        if sha in (self.loaded.sha, self._bad) and not force:
            return
        compiled = self._compile(text, str(self._path), sha)
        if compiled is not None:
            loaded = Loaded(self.loaded.version + 1, sha, author(), time.time(), str(self._path))
            await self.install(compiled, loaded)

    def _file_stat(self) -> tuple[int, int] | None:
        try:
            st = self._path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    # --- switching ---------------------------------------------------------------------------

    def _compile(self, text: str, source: str, tag: int | str) -> CompiledPolicy | None:
        try:
            policy = parse_text(text, source)
        except PolicyError as exc:
            self._bad = tag
            self._refuse("invalid", str(exc))
            return None
        try:
            return CompiledPolicy(policy)
        except PolicyError as exc:
            self._bad = tag
            self._refuse("compile", str(exc))
            return None

    def _refuse(self, reason: str, message: str) -> None:
        self.metrics.errors.labels(reason).inc()
        log.error(
            f"policy not applied, keeping v{self.loaded.version}: {message}",
            extra={"fields": {"event": "policy_refused", "reason": reason}},
        )

    def _store_failed(self, exc: BaseException) -> None:
        if not self._store_down:  # once per outage, not once per poll
            self._store_down = True
            self.metrics.errors.labels("store").inc()
            log.warning(
                f"policy store unreachable, keeping v{self.loaded.version}: {exc!r}",
                extra={"fields": {"event": "policy_store_down"}},
            )

    async def install(self, compiled: CompiledPolicy, loaded: Loaded) -> None:
        """Switch to ``compiled``: requests that start from now on see it, then run the hooks."""
        before = self.loaded.version
        self.ref.swap(compiled)
        self.loaded = loaded
        self.metrics.version.set(loaded.version)
        self.metrics.switches.inc()
        self.metrics.describe(compiled)
        log.info(
            f"policy v{before} -> v{loaded.version} (sha {loaded.sha[:12]}, by {loaded.author})",
            extra={"fields": {"event": "policy_switch", "version": loaded.version}},
        )
        for hook in self.hooks:
            try:
                await hook(compiled)
            except Exception:
                log.exception("policy switch hook failed", extra={"fields": {"event": "hook_bug"}})


RELOADER = web.AppKey("reloader", Reloader)
