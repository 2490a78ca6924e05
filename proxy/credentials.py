"""Upstream credentials: botocore's standard chain, refreshed off the event loop.

Sluice signs every upstream call with these; resolving or refreshing them can block
(IMDS, SSO, assume-role), so it always runs in an executor, and the request path only
ever reads the latest frozen copy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from proxy.signing import Credentials
from proxy.tasks import stop_tasks

logger = logging.getLogger("sluice.credentials")


class NoCredentialsFoundError(RuntimeError):
    """botocore's credential chain found nothing to sign upstream requests with."""


def bearer_token_from_env() -> str | None:
    """The Bedrock API key from ``AWS_BEARER_TOKEN_BEDROCK``, or ``None`` if unset/empty."""
    return os.environ.get("AWS_BEARER_TOKEN_BEDROCK") or None


def _freeze(botocore_creds: Any) -> Credentials:
    frozen = botocore_creds.get_frozen_credentials()
    return Credentials(frozen.access_key, frozen.secret_key, frozen.token or None)


def _log(level: int, event: str, **fields: object) -> None:
    logger.log(level, json.dumps({"event": event, **fields}, default=str))


def next_refresh_delay(
    seconds_to_advisory: float | None,
    failures: int,
    *,
    min_interval_s: float,
    max_interval_s: float,
    backoff_max_s: float,
) -> float:
    """Seconds until the next background read: just inside botocore's advisory window, capped
    at ``max_interval_s``; after ``failures`` consecutive failures, exponential backoff."""
    if failures:
        return min(min_interval_s * 2.0 ** (failures - 1), backoff_max_s)
    if seconds_to_advisory is None:
        return max_interval_s
    # +1 s lands inside the window, so botocore's refresh_needed() is true when we call it.
    return max(min_interval_s, min(seconds_to_advisory + 1.0, max_interval_s))


class CredentialSource:
    """Upstream credentials from botocore's standard chain, refreshed in the background.

    ``current()`` never blocks: botocore's refresh (STS, SSO, IMDS, container endpoint...) runs
    in an executor ahead of expiry, and a failed refresh keeps the old credentials in use.
    """

    def __init__(
        self,
        creds: Credentials,
        botocore_creds: Any = None,
        *,
        min_interval_s: float = 1.0,
        max_interval_s: float = 300.0,
        backoff_max_s: float = 60.0,
    ) -> None:
        """Prefer :meth:`create`, :meth:`from_botocore` or :meth:`static`."""
        self._current = creds
        self._botocore = botocore_creds
        self._min = min_interval_s
        self._max = max_interval_s
        self._backoff_max = backoff_max_s
        self._task: asyncio.Task[None] | None = None
        if botocore_creds is not None and hasattr(botocore_creds, "refresh_needed"):
            self._task = asyncio.get_running_loop().create_task(
                self._refresh_loop(), name="sluice-credential-refresh"
            )

    @classmethod
    async def create(cls, *, profile: str | None = None, **tuning: float) -> CredentialSource:
        """Resolve botocore's default chain (in an executor); raise if it finds nothing."""

        def resolve() -> Any:
            import botocore.session

            return botocore.session.Session(profile=profile).get_credentials()

        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, resolve)
        if found is None:
            where = f"profile {profile!r}" if profile else "the default chain"
            raise NoCredentialsFoundError(
                f"no AWS credentials found for upstream Bedrock calls in {where} "
                "(env, shared config/SSO/process, assume-role, container, IMDS); "
                "or set AWS_BEARER_TOKEN_BEDROCK"
            )
        return await cls.from_botocore(found, **tuning)

    @classmethod
    async def from_botocore(cls, botocore_creds: Any, **tuning: float) -> CredentialSource:
        """Wrap botocore ``Credentials``/``RefreshableCredentials``; refresh the latter."""
        loop = asyncio.get_running_loop()
        first = await loop.run_in_executor(None, _freeze, botocore_creds)
        _log(logging.INFO, "upstream_credentials_loaded", method=botocore_creds.method)
        return cls(first, botocore_creds, **tuning)

    @classmethod
    def static(cls, creds: Credentials) -> CredentialSource:
        """Fixed credentials (tests, the simulator upstream); no background task."""
        return cls(creds)

    def current(self) -> Credentials:
        """The latest frozen credentials; never blocks."""
        return self._current

    async def close(self) -> None:
        """Stop the background refresher (an in-flight executor read is left to finish)."""
        task, self._task = self._task, None
        if task is not None:
            await stop_tasks([task], "credential refresher")

    def _seconds_to_advisory(self) -> float | None:
        # botocore exposes no public expiry accessor; these attributes are stable since 1.x.
        rc = self._botocore
        if getattr(rc, "_expiry_time", None) is None:
            return None
        advisory = float(getattr(rc, "_advisory_refresh_timeout", 15 * 60))
        return float(rc._seconds_remaining()) - advisory

    def _read(self) -> tuple[Credentials, bool]:
        # Runs in an executor: get_frozen_credentials() may do network I/O to refresh.
        fresh = _freeze(self._botocore)
        return fresh, bool(self._botocore.refresh_needed())

    async def _refresh_loop(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            delay = next_refresh_delay(
                self._seconds_to_advisory(),
                failures,
                min_interval_s=self._min,
                max_interval_s=self._max,
                backoff_max_s=self._backoff_max,
            )
            await asyncio.sleep(delay)
            try:
                fresh, still_due = await loop.run_in_executor(None, self._read)
            except Exception as exc:  # any provider error: keep the old creds, back off
                failures += 1
                self._log_failure(type(exc).__name__, str(exc), failures)
                continue
            self._current = fresh
            if still_due:
                # botocore swallows advisory-window refresh errors and hands back the old creds.
                failures += 1
                self._log_failure(
                    "RefreshNotRenewed", "credentials still due for refresh", failures
                )
            else:
                failures = 0

    def _log_failure(self, error_type: str, message: str, failures: int) -> None:
        cur = self._current
        for secret in (cur.secret_access_key, cur.session_token):
            if secret:
                message = message.replace(secret, "***")
        _log(
            logging.WARNING,
            "upstream_credentials_refresh_failed",
            error_type=error_type,
            error=message[:500],
            attempt=failures,
            access_key_id=cur.access_key_id,
            method=getattr(self._botocore, "method", None),
        )


def static(creds: Credentials) -> CredentialSource:
    """Fixed credentials (tests, the simulator upstream); same as ``CredentialSource.static``."""
    return CredentialSource.static(creds)
