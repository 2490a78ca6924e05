"""The access-log line, formatted without a dict, says exactly what the dict form said."""

from __future__ import annotations

import io
import json
import time
from typing import Any, cast

import orjson
import pytest

from proxy.log import AccessLog, json_str
from proxy.pipeline.call import Call
from proxy.pipeline.identify import Caller
from proxy.pipeline.settle import Settler
from proxy.policy import CompiledPolicy
from proxy.routes import Route
from proxy.usage import Usage

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"


def _reference(call: Call, operation: str, pool: str, workload: str) -> dict[str, Any]:
    """The line as the dict-building code wrote it (before the direct formatter)."""
    return {
        "event": "request",
        "request_id": call.request_id,
        "operation": operation,
        "model": call.route.model_id if call.route else None,
        "pool": pool,
        "workload": workload,
        "priority": call.caller.priority if call.caller else None,
        "via": call.caller.via if call.caller else None,
        "status": call.status,
        "error_type": call.error_type,
        "input_tokens": call.usage.input_tokens,
        "output_tokens": call.usage.output_tokens,
        "usage_known": call.usage.known,
        "upstream_ms": round(call.upstream_s * 1000, 2),
        "disconnected": call.disconnected,
        "retries": call.retries,
        "trimmed_messages": call.trimmed_messages,
        "degraded": call.degraded.get("x-sluice-degraded") if call.degraded else None,
        "coalesced": call.coalesced,
    }


def _call(model: str | None, *, caller: bool = True, **fields: Any) -> Call:
    call = Call(
        "0123abcd-0000-4000-a000-00000000002a", time.perf_counter(), cast(CompiledPolicy, None)
    )
    call.route = Route("InvokeModel", model, False, True, "/model/x/invoke", "")
    if caller:
        workload = cast(Any, type("W", (), {"name": "orders"})())
        call.caller = Caller(workload, "P0", "sigv4")
    for name, value in fields.items():
        setattr(call, name, value)
    return call


CALLS = {
    "plain": lambda: _call(HAIKU, status=200, upstream_s=0.01234, usage=Usage(12, 34, known=True)),
    "anonymous": lambda: _call(None, caller=False, status=499, disconnected=True),
    "error": lambda: _call(HAIKU, status=429, error_type="ThrottlingException", retries=2),
    "quotes": lambda: _call('we"ird\\mo\ndel\u00e9\u2028', status=400, upstream_s=1e-7),
    "surrogate": lambda: _call("bad\udcffid", status=404),
    "degraded": lambda: _call(
        HAIKU,
        status=200,
        degraded={"x-sluice-degraded": "downgrade"},
        coalesced=True,
        trimmed_messages=3,
        upstream_s=12345.678912,
    ),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_line_parses_to_the_dict_form(name: str) -> None:
    call = CALLS[name]()
    out = io.BytesIO()
    log = AccessLog(out)
    log.write_fields(Settler._line(call, "InvokeModel", "haiku", "orders"))
    line = json.loads(out.getvalue())
    expected = _reference(call, "InvokeModel", "haiku", "orders")
    if name == "surrogate":  # the dict form could not be encoded at all; now it is replaced
        with pytest.raises(TypeError):
            orjson.dumps(expected)
        expected["model"] = "bad?id"  # as JsonFormatter replaces them
    overhead, ts = line.pop("overhead_ms"), line.pop("ts")
    assert line == expected
    assert list(line) == list(expected)  # same member order
    assert 0 <= overhead < 60_000
    assert abs(ts - time.time()) < 60


def test_disabled_log_writes_nothing() -> None:
    out = io.BytesIO()
    AccessLog(out, enabled=False).write_fields('"event":"request"')
    assert out.getvalue() == b""


def test_json_str_is_json_and_bounded() -> None:
    assert json_str(None) == "null"
    assert json.loads(json_str('a"b\\c')) == 'a"b\\c'
    for i in range(5000):  # caller-chosen model ids must not grow the memo without bound
        json_str(f"model-{i}")
    from proxy import log

    assert len(log._JSON_STRINGS) <= log._JSON_STRINGS_MAX
