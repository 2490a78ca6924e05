"""Structured logging: one JSON object per line, stable field names.

The access log is written directly (orjson + one write) because it runs once per
request; everything else goes through :mod:`logging` with a JSON formatter.
Prompt bodies and secrets are never fields of any record.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import IO, Any

import orjson


class JsonFormatter(logging.Formatter):
    """Render a log record as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(doc, default=str).decode()
        except TypeError:
            # A field with undecodable input bytes (lone surrogates): log it, replaced.
            return _replace_surrogates(doc)


def _replace_surrogates(doc: dict[str, Any]) -> str:
    clean = {
        k: v
        if v is None or isinstance(v, int | float)
        else str(v).encode("utf-8", "replace").decode()
        for k, v in doc.items()
    }
    return orjson.dumps(clean).decode()


def setup_logging(level: str = "INFO") -> None:
    """Send every ``sluice.*`` log record to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class AccessLog:
    """Writes one JSON line per finished request.

    Lines are buffered and written together at most every ``flush_s`` (and at
    shutdown): one write per burst instead of one syscall per request.
    """

    def __init__(
        self, stream: IO[bytes] | None = None, enabled: bool = True, flush_s: float = 0.2
    ) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        self.enabled = enabled
        self._flush_s = flush_s
        self._lines: list[bytes] = []
        self._scheduled = False

    def write(self, record: dict[str, Any]) -> None:
        """Queue ``record`` with a timestamp; never raises (logging must not fail a request)."""
        if not self.enabled:
            return
        record["ts"] = round(time.time(), 3)
        self._lines.append(orjson.dumps(record))
        if not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_later(self._flush_s, self.flush)
            except RuntimeError:  # no loop (tools, tests): write at once
                self.flush()

    def flush(self) -> None:
        """Write every queued line now."""
        self._scheduled = False
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        try:
            self._stream.write(b"\n".join(lines) + b"\n")
            self._stream.flush()
        except (OSError, ValueError) as exc:
            # A closed or full log pipe must not take requests down; say so once.
            self.enabled = False
            logging.getLogger("sluice.log").error(
                "access log disabled after a failed write; %d lines lost: %s", len(lines), exc
            )
