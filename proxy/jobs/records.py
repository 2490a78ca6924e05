"""Bedrock batch-inference records: parsing the input JSONL, shaping the output lines.

Input is Bedrock's own batch format (``{"recordId": ..., "modelInput": {...}}`` per
line) so existing batch files work unchanged; bad input is refused whole, naming the
line and the field, before anything is queued.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import orjson

Invocation = Literal["invoke", "converse"]
INVOCATIONS: tuple[Invocation, ...] = ("invoke", "converse")
#: Longest recordId kept (Bedrock's own limit is far below it).
MAX_RECORD_ID = 256


class BatchInputError(ValueError):
    """The submitted JSONL cannot be queued; the message names the line and field at fault."""


@dataclass(frozen=True, slots=True)
class Record:
    """One record as queued: its id and its model input, re-serialised compactly."""

    record_id: str
    model_input: bytes


def _assigned_id(line_no: int) -> str:
    # Bedrock assigns ids to records that lack one: 11 digits, zero-padded, 1-based.
    return f"{line_no:011d}"


def _parse_line(raw: bytes, line_no: int, invocation: Invocation) -> Record:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BatchInputError(f"line {line_no}: not valid JSON ({exc.msg})") from None
    if not isinstance(doc, dict):
        raise BatchInputError(f"line {line_no}: a record must be a JSON object")
    model_input = doc.get("modelInput")
    if model_input is None:
        raise BatchInputError(f"line {line_no}: modelInput missing")
    if not isinstance(model_input, dict):
        raise BatchInputError(f"line {line_no}: modelInput must be a JSON object")
    if invocation == "converse" and not isinstance(model_input.get("messages"), list):
        raise BatchInputError(f"line {line_no}: modelInput.messages missing (Converse request)")
    record_id = doc.get("recordId")
    if record_id is None:
        record_id = _assigned_id(line_no)
    elif not isinstance(record_id, str) or not record_id or len(record_id) > MAX_RECORD_ID:
        raise BatchInputError(
            f"line {line_no}: recordId must be a non-empty string of at most "
            f"{MAX_RECORD_ID} characters"
        )
    return Record(record_id, orjson.dumps(model_input))


def parse_jsonl(data: bytes, invocation: Invocation) -> list[Record]:
    """Every record of a JSONL document, or :class:`BatchInputError` for the first bad line.

    Blank lines are skipped (they carry no record); a recordId used twice is an error,
    because the output has exactly one line per recordId.
    """
    records: list[Record] = []
    seen: set[str] = set()
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        record = _parse_line(raw, line_no, invocation)
        if record.record_id in seen:
            raise BatchInputError(f"line {line_no}: recordId '{record.record_id}' used twice")
        seen.add(record.record_id)
        records.append(record)
    if not records:
        raise BatchInputError("the body holds no records (one JSON object per line)")
    return records


def success_line(record_id: str, model_input: bytes, model_output: bytes) -> bytes:
    """An output line for a record Bedrock answered (``modelOutput`` is Bedrock's body)."""
    return (
        b'{"recordId":'
        + orjson.dumps(record_id)
        + b',"modelInput":'
        + model_input
        + b',"modelOutput":'
        + model_output
        + b"}"
    )


def error_line(record_id: str, model_input: bytes, status: int, code: str, message: str) -> bytes:
    """An output line for a record that failed, in Bedrock's ``error`` shape: ``errorCode``
    is the HTTP status, a number, as Bedrock writes it (parsers of its output read it as
    one); ``errorType``, the exception's name, is Sluice's own addition."""
    error = orjson.dumps({"errorCode": status, "errorMessage": message, "errorType": code})
    return (
        b'{"recordId":'
        + orjson.dumps(record_id)
        + b',"modelInput":'
        + model_input
        + b',"error":'
        + error
        + b"}"
    )


def upstream_path(model_id: str, invocation: Invocation) -> str:
    """The bedrock-runtime path a record of ``model_id`` is sent to."""
    operation = "converse" if invocation == "converse" else "invoke"
    return f"/model/{quote(model_id, safe='')}/{operation}"


#: Error types worth another attempt (Bedrock's retryable exceptions and network failures).
RETRYABLE_TYPES = frozenset(
    {
        "ThrottlingException",
        "ServiceUnavailableException",
        "ModelTimeoutException",
        "InternalServerException",
        "ModelNotReadyException",
        "ServiceQuotaExceededException",
        "BadGatewayException",
    }
)

#: 403s that judge the signature Sluice made, not the record: credentials expired or
#: rotated under a running instance, a clock that drifted. They pass when the credential
#: chain refreshes (or the operator fixes it), so they are retried like throttles; a record
#: dead-lettered on one while they last (``retries_exhausted``) replays as it was.
#: AccessDeniedException stays permanent: an IAM policy is not fixed by waiting.
CREDENTIAL_TYPES = frozenset(
    {
        "ExpiredTokenException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "MissingAuthenticationTokenException",
    }
)


def is_retryable(status: int, error_type: str | None) -> bool:
    """Throttles, timeouts, 5xx, network failures and Sluice's own credential failures are
    retried; other 4xx are permanent."""
    if error_type in CREDENTIAL_TYPES:
        return True
    if error_type in RETRYABLE_TYPES:
        return True
    return status in (408, 429) or status >= 500


def backoff_s(attempt: int, base_ms: int, max_ms: int, rng: random.Random) -> float:
    """Full-jitter delay before attempt ``attempt + 1``: uniform in [0, min(max, base·2^(n-1))]."""
    window_ms = min(float(max_ms), base_ms * math.pow(2.0, min(attempt - 1, 30)))
    return rng.uniform(0.0, window_ms) / 1000.0


def manifest(info: dict[str, Any]) -> dict[str, int]:
    """Bedrock's ``manifest.json.out`` counts for a batch's status document."""
    return {
        "totalRecordCount": int(info["records"]),
        "processedRecordCount": int(info["succeeded"]) + int(info["failed"]),
        "successRecordCount": int(info["succeeded"]),
        "errorRecordCount": int(info["failed"]),
        "inputTokenCount": int(info["inputTokens"]),
        "outputTokenCount": int(info["outputTokens"]),
    }
