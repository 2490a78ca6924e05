"""A small blocking client of ``/sluice/v1`` for the CLI: auth, JSON, errors, progress.

Auth, in order: ``SLUICE_API_KEY`` (bearer), ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
(SigV4, service ``bedrock``, a key Sluice issued to the workload), and ``--workload``
as the ``x-sluice-workload`` header (header mode).
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from typing import IO, Any
from urllib.parse import urlencode, urlsplit

import orjson

from proxy.signing import Credentials, SigV4Signer


class ApiError(Exception):
    """Sluice answered an error; the message is Sluice's own (it names the limit or field)."""

    def __init__(self, status: int, error_type: str, message: str, retry_after: str | None):
        super().__init__(f"{status} {error_type}: {message}")
        self.status = status
        self.retry_after = retry_after


class Client:
    """Calls one Sluice instance as one workload."""

    def __init__(self, url: str, workload: str | None, timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.workload = workload
        self.timeout_s = timeout_s

    def _headers(self, method: str, path: str, query: str, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/x-ndjson" if body else "application/json"}
        if self.workload:
            headers["x-sluice-workload"] = self.workload
        api_key = os.environ.get("SLUICE_API_KEY")
        key_id, secret = (
            os.environ.get("AWS_ACCESS_KEY_ID"),
            os.environ.get("AWS_SECRET_ACCESS_KEY"),
        )
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        elif key_id and secret:
            region = os.environ.get("AWS_REGION", "us-east-1")
            creds = Credentials(key_id, secret, os.environ.get("AWS_SESSION_TOKEN"))
            host = urlsplit(self.url).netloc
            headers.update(
                SigV4Signer("bedrock", region).sign(method, host, path, query, headers, body, creds)
            )
        return headers

    def request(
        self, method: str, path: str, params: dict[str, str | None] | None = None, body: bytes = b""
    ) -> bytes:
        """Send one request; raise :class:`ApiError` with Sluice's message on an error status."""
        query = urlencode({k: v for k, v in (params or {}).items() if v is not None})
        full = "/sluice/v1" + path
        req = urllib.request.Request(
            self.url + full + ("?" + query if query else ""),
            data=body if method == "POST" else None,
            method=method,
            headers=self._headers(method, full, query, body),
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                message = str(orjson.loads(raw).get("message", raw[:300]))
            except (orjson.JSONDecodeError, AttributeError):
                message = raw[:300].decode("utf-8", "replace")
            kind = (exc.headers.get("x-amzn-ErrorType") or "Error").partition(":")[0]
            raise ApiError(exc.code, kind, message, exc.headers.get("Retry-After")) from None

    def json(self, method: str, path: str, params: dict[str, str | None] | None = None) -> Any:
        """A request whose answer is JSON."""
        return orjson.loads(self.request(method, path, params))


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(status: dict[str, Any], width: int = 30) -> str:
    """``[#####.....] 120/2000 done, 3 failed, 12.3 rec/s, ETA 2m31s``."""
    total = max(1, int(status["records"]))
    done = int(status["succeeded"]) + int(status["failed"])
    filled = int(width * done / total)
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} done, "
        f"{status['failed']} failed, {status['drainRatePerSecond']:.1f} rec/s, "
        f"ETA {_eta(status.get('etaSeconds'))}"
    )


def wait(client: Client, batch_id: str, out: IO[str] = sys.stderr, poll_s: float = 1.0) -> Any:
    """Poll until the batch is completed or cancelled: a bar on a terminal, lines otherwise."""
    tty = out.isatty()
    last = ""
    while True:
        status = client.json("GET", f"/batches/{batch_id}")
        line = progress_line(status)
        if tty:
            out.write("\r" + line)
        elif line != last:
            out.write(f"{batch_id}: {line}\n")
        out.flush()
        last = line
        if status["status"] != "running":
            if tty:
                out.write("\n")
            return status
        time.sleep(poll_s)
