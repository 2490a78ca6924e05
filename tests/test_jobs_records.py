"""Batch input parsing, output shapes, error classes and backoff: pure functions."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.jobs.queue import pool_of
from proxy.jobs.records import (
    BatchInputError,
    backoff_s,
    error_line,
    is_retryable,
    parse_jsonl,
    success_line,
)

BODY = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5, "messages": []}


def test_missing_record_ids_are_assigned_as_bedrock_does() -> None:
    data = "\n".join(json.dumps({"modelInput": BODY}) for _ in range(2)).encode()
    assert [r.record_id for r in parse_jsonl(data, "invoke")] == ["00000000001", "00000000002"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"[1]", "line 2: a record must be a JSON object"),
        (b'{"recordId": "a"}', "line 2: modelInput missing"),
        (b'{"modelInput": 3}', "line 2: modelInput must be a JSON object"),
        (b'{"recordId": 7, "modelInput": {}}', "line 2: recordId must be a non-empty string"),
        (b"{oops", "line 2: not valid JSON"),
    ],
)
def test_bad_lines_name_their_line_and_field(line: bytes, expected: str) -> None:
    data = json.dumps({"modelInput": BODY}).encode() + b"\n" + line
    with pytest.raises(BatchInputError, match=expected):
        parse_jsonl(data, "invoke")


def test_converse_records_need_messages() -> None:
    with pytest.raises(BatchInputError, match=r"line 1: modelInput\.messages missing"):
        parse_jsonl(b'{"modelInput": {"system": []}}', "converse")


def test_empty_body_is_refused() -> None:
    with pytest.raises(BatchInputError, match="no records"):
        parse_jsonl(b"\n\n", "invoke")


def test_output_lines_are_bedrock_shaped() -> None:
    ok = json.loads(success_line("r1", b'{"a":1}', b'{"content":[]}'))
    assert ok == {"recordId": "r1", "modelInput": {"a": 1}, "modelOutput": {"content": []}}
    err = json.loads(error_line("r2", b"{}", 400, "ValidationException", 'bad "model"'))
    # Bedrock's errorCode is the HTTP status, a number; errorType is Sluice's own addition.
    assert err["error"] == {
        "errorCode": 400,
        "errorMessage": 'bad "model"',
        "errorType": "ValidationException",
    }


@pytest.mark.parametrize(
    ("status", "kind", "retry"),
    [
        (429, "ThrottlingException", True),
        (503, "ServiceUnavailableException", True),
        (408, "ModelTimeoutException", True),
        (500, None, True),
        (400, "ValidationException", False),
        (403, "AccessDeniedException", False),
        # Sluice's own signature judged: credentials expired or rotated, a clock drifted.
        (403, "ExpiredTokenException", True),
        (403, "UnrecognizedClientException", True),
        (403, "InvalidSignatureException", True),
        (403, "MissingAuthenticationTokenException", True),
        (404, "ResourceNotFoundException", False),
    ],
)
def test_errors_are_classified(status: int, kind: str | None, retry: bool) -> None:
    assert is_retryable(status, kind) is retry


@given(st.integers(1, 40), st.integers(1, 1000), st.integers(1, 60000))
def test_full_jitter_stays_inside_its_window(attempt: int, base: int, cap: int) -> None:
    delay = backoff_s(attempt, base, cap, random.Random(attempt))
    assert 0 <= delay <= min(cap, base * 2 ** (attempt - 1)) / 1000


def test_ids_name_their_pool() -> None:
    assert pool_of("haiku:0123abcd") == "haiku"
    assert pool_of("nonsense") is None
