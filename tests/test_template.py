"""Degraded answers in the caller's shape: templates, cached answers as streams, downgrades.

Every rendered body is served by a real aiohttp server on a loopback port and parsed by a
real boto3 client, so "the right shape" means "what boto3 accepts", not what we think.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import botocore.session
import pytest
from aiohttp import web
from botocore.eventstream import EventStreamBuffer
from hypothesis import given
from hypothesis import strategies as st

from proxy.pipeline.rewrite import (
    downgrade_body_problem,
    downgrade_path,
    encode_model_id,
    served_model_headers,
)
from proxy.pipeline.template import (
    EVENT_STREAM,
    TEMPLATE_MODEL,
    TemplateUnsupported,
    as_stream,
    render_template,
)
from proxy.routes import match
from proxy.simulator.responses import Reply, converse_body, invoke_body
from tests.support.processes import bedrock_client

SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
HAIKU_35 = "us.anthropic.claude-3-5-haiku-20241022-v1:0"
HAIKU_45 = "us.anthropic.claude-haiku-4-5-20251001-v1:0"
TEXTS = [
    "Our store is open 10:00-20:00 JST.",
    "営業時間は10時〜20時です。ご不便をおかけします🙇‍♀️",
    'quotes " and \\ backslashes\nand newlines',
]

_RESPONSE = web.AppKey("response", dict)

Serve = Callable[[bytes, dict[str, str]], Awaitable[Any]]


@pytest.fixture
async def serve(aiohttp_server: Any) -> Serve:
    """Start a loopback server answering every POST with the given body and headers.

    Returns an async function that sets the answer and gives back a boto3 client.
    """
    app = web.Application()
    app[_RESPONSE] = {}

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        spec = request.app[_RESPONSE]
        return web.Response(status=200, body=spec["body"], headers=spec["headers"])

    app.router.add_post("/{tail:.*}", answer)
    server = await aiohttp_server(app)
    client = bedrock_client(str(server.make_url("")))

    async def set_answer(body: bytes, headers: dict[str, str]) -> Any:
        app[_RESPONSE].update(body=body, headers=headers)
        return client

    return set_answer


def _messages() -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"text": "When do you open?"}]}]


def _invoke_body() -> str:
    return json.dumps(
        {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": 100,
            "messages": [{"role": "user", "content": "When do you open?"}],
        }
    )


def _converse_events(client: Any, model_id: str = SONNET) -> list[dict[str, Any]]:
    return list(client.converse_stream(modelId=model_id, messages=_messages())["stream"])


def _native_events(client: Any, model_id: str = SONNET) -> tuple[list[dict[str, Any]], Any]:
    resp = client.invoke_model_with_response_stream(modelId=model_id, body=_invoke_body())
    events = [json.loads(e["chunk"]["bytes"]) for e in resp["body"]]
    return events, resp


# --- templates ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
async def test_converse_template_is_parsed_by_boto3(serve: Serve, text: str) -> None:
    client = await serve(*render_template("Converse", text, SONNET))
    out = await asyncio.to_thread(client.converse, modelId=SONNET, messages=_messages())
    assert out["output"]["message"] == {"role": "assistant", "content": [{"text": text}]}
    assert out["stopReason"] == "end_turn"
    assert out["usage"] == {"inputTokens": 0, "outputTokens": 0, "totalTokens": 0}
    assert out["metrics"] == {"latencyMs": 0}


@pytest.mark.parametrize("text", TEXTS)
async def test_invoke_model_template_is_an_anthropic_message_naming_no_real_model(
    serve: Serve, text: str
) -> None:
    body, headers = render_template("InvokeModel", text, SONNET)
    client = await serve(body, headers)
    out = await asyncio.to_thread(client.invoke_model, modelId=SONNET, body=_invoke_body())
    assert out["contentType"] == "application/json"
    message = json.loads(out["body"].read())
    assert message["type"] == "message"
    assert message["model"] == TEMPLATE_MODEL
    assert message["content"] == [{"type": "text", "text": text}]
    assert message["stop_reason"] == "end_turn"
    assert message["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert headers["x-amzn-bedrock-output-token-count"] == "0"


@pytest.mark.parametrize("text", TEXTS)
async def test_converse_stream_template_sends_the_full_event_sequence(
    serve: Serve, text: str
) -> None:
    body, headers = render_template("ConverseStream", text, SONNET)
    assert headers["Content-Type"] == EVENT_STREAM
    client = await serve(body, headers)
    events = await asyncio.to_thread(_converse_events, client)
    assert [next(iter(e)) for e in events] == [
        "messageStart",
        "contentBlockDelta",
        "contentBlockStop",
        "messageStop",
        "metadata",
    ]
    assert events[1]["contentBlockDelta"] == {"delta": {"text": text}, "contentBlockIndex": 0}
    assert events[3]["messageStop"] == {"stopReason": "end_turn"}
    assert events[4]["metadata"]["usage"] == {"inputTokens": 0, "outputTokens": 0, "totalTokens": 0}
    assert events[4]["metadata"]["metrics"] == {"latencyMs": 0}


@pytest.mark.parametrize("text", TEXTS)
async def test_invoke_stream_template_sends_native_events_with_zero_metrics(
    serve: Serve, text: str
) -> None:
    body, headers = render_template("InvokeModelWithResponseStream", text, SONNET)
    client = await serve(body, headers)
    events, resp = await asyncio.to_thread(_native_events, client)
    assert resp["contentType"] == "application/json"
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0]["message"]["model"] == TEMPLATE_MODEL
    assert events[2]["delta"] == {"type": "text_delta", "text": text}
    assert events[4]["delta"]["stop_reason"] == "end_turn"
    assert events[5]["amazon-bedrock-invocationMetrics"] == {
        "inputTokenCount": 0,
        "outputTokenCount": 0,
        "invocationLatency": 0,
        "firstByteLatency": 0,
    }


def test_native_templates_are_refused_for_non_anthropic_models() -> None:
    for operation in ("InvokeModel", "InvokeModelWithResponseStream"):
        with pytest.raises(TemplateUnsupported, match="Anthropic models only"):
            render_template(operation, "hi", "amazon.nova-lite-v1:0")
    body, _ = render_template("Converse", "hi", "amazon.nova-lite-v1:0")
    assert json.loads(body)["output"]["message"]["content"] == [{"text": "hi"}]
    opaque = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3"
    assert render_template("InvokeModel", "hi", opaque)[0]


def test_non_invocation_operations_have_no_template() -> None:
    with pytest.raises(TemplateUnsupported, match="not a model invocation"):
        render_template("CountTokens", "hi", SONNET)


def test_render_template_hands_out_fresh_headers() -> None:
    _, first = render_template("Converse", "hi", SONNET)
    first["x-sluice-degraded"] = "template"
    _, second = render_template("Converse", "hi", SONNET)
    assert "x-sluice-degraded" not in second


# --- cached answers as streams -------------------------------------------------------------


def _reply(text: str = "We open at ten.") -> Reply:
    return Reply("msg_bdrk_01abc", "claude-3-sonnet-20240229", list(text), 12, "end_turn")


def _converse_with_tools() -> dict[str, Any]:
    return {
        "output": {
            "message": {
                "role": "assistant",
                "content": [
                    {"reasoningContent": {"reasoningText": {"text": "think", "signature": "sig"}}},
                    {"text": "Let me look that up."},
                    {
                        "toolUse": {
                            "toolUseId": "tooluse_1",
                            "name": "stock",
                            "input": {"isbn": "978-4-08-882000-0", "qty": 2},
                        }
                    },
                ],
            }
        },
        "stopReason": "tool_use",
        "usage": {"inputTokens": 40, "outputTokens": 25, "totalTokens": 65},
        "metrics": {"latencyMs": 812},
    }


async def test_cached_converse_answer_streams_as_converse_stream(serve: Serve) -> None:
    cached = converse_body(_reply(), 640, {})
    client = await serve(as_stream("ConverseStream", cached), {"Content-Type": EVENT_STREAM})
    events = await asyncio.to_thread(_converse_events, client)
    text = "".join(
        e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e
    )
    assert text == "We open at ten."
    assert events[-2]["messageStop"] == {"stopReason": "end_turn"}
    usage = events[-1]["metadata"]["usage"]
    assert usage == json.loads(cached)["usage"]  # a replay reports the answer's own usage


async def test_cached_converse_tool_use_and_reasoning_stream_faithfully(serve: Serve) -> None:
    cached = json.dumps(_converse_with_tools()).encode()
    client = await serve(as_stream("ConverseStream", cached), {"Content-Type": EVENT_STREAM})
    events = await asyncio.to_thread(_converse_events, client)
    starts = [e["contentBlockStart"] for e in events if "contentBlockStart" in e]
    assert starts == [
        {"start": {"toolUse": {"toolUseId": "tooluse_1", "name": "stock"}}, "contentBlockIndex": 2}
    ]
    deltas = [e["contentBlockDelta"] for e in events if "contentBlockDelta" in e]
    assert deltas[0] == {"delta": {"reasoningContent": {"text": "think"}}, "contentBlockIndex": 0}
    assert deltas[1]["delta"] == {"reasoningContent": {"signature": "sig"}}
    assert deltas[2] == {"delta": {"text": "Let me look that up."}, "contentBlockIndex": 1}
    tool_input = json.loads(deltas[3]["delta"]["toolUse"]["input"])
    assert tool_input == {"isbn": "978-4-08-882000-0", "qty": 2}
    stops = [e["contentBlockStop"]["contentBlockIndex"] for e in events if "contentBlockStop" in e]
    assert stops == [0, 1, 2]
    assert events[-2]["messageStop"]["stopReason"] == "tool_use"


async def test_cached_anthropic_answer_streams_as_native_events(serve: Serve) -> None:
    cached = invoke_body(_reply())
    body = as_stream("InvokeModelWithResponseStream", cached)
    client = await serve(body, {"Content-Type": EVENT_STREAM})
    events, _ = await asyncio.to_thread(_native_events, client)
    assert _rebuild_anthropic(events) == json.loads(cached)
    assert events[-1]["amazon-bedrock-invocationMetrics"]["inputTokenCount"] == 12
    assert events[-1]["amazon-bedrock-invocationMetrics"]["outputTokenCount"] == 15


async def test_cached_anthropic_tool_use_and_thinking_rebuild_exactly(serve: Serve) -> None:
    message = {
        "id": "msg_bdrk_01x",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-20250514",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "c2ln"},
            {"type": "redacted_thinking", "data": "b3BhcXVl"},
            {"type": "text", "text": "Checking stock."},
            {"type": "tool_use", "id": "toolu_1", "name": "stock", "input": {"isbn": "x"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 30, "output_tokens": 20},
    }
    body = as_stream("InvokeModelWithResponseStream", json.dumps(message).encode())
    client = await serve(body, {"Content-Type": EVENT_STREAM})
    events, _ = await asyncio.to_thread(_native_events, client)
    assert _rebuild_anthropic(events) == message


def _rebuild_anthropic(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Assemble native stream events back into a Messages response, as the Anthropic SDK does."""
    message: dict[str, Any] = {}
    for event in events:
        kind = event["type"]
        if kind == "message_start":
            message = dict(event["message"])
        elif kind == "content_block_start":
            message["content"].append(dict(event["content_block"]))
        elif kind == "content_block_delta":
            block, delta = message["content"][event["index"]], event["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta["type"] == "input_json_delta":
                block["input"] = json.loads(delta["partial_json"])
        elif kind == "message_delta":
            message.update(event["delta"])
            message["usage"]["output_tokens"] = event["usage"]["output_tokens"]
    return message


def _decode_frames(data: bytes) -> Iterator[tuple[str, dict[str, Any]]]:
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    for frame in buffer:
        yield frame.headers[":event-type"], json.loads(frame.payload)


@given(pieces=st.lists(st.text(min_size=1), min_size=1, max_size=5))
def test_as_stream_keeps_every_text_block_for_any_text(pieces: list[str]) -> None:
    doc = {
        "output": {"message": {"role": "assistant", "content": [{"text": p} for p in pieces]}},
        "stopReason": "max_tokens",
        "usage": {"inputTokens": 1, "outputTokens": 2, "totalTokens": 3},
        "metrics": {"latencyMs": 5},
    }
    frames = list(_decode_frames(as_stream("ConverseStream", json.dumps(doc).encode())))
    texts = [p["delta"]["text"] for kind, p in frames if kind == "contentBlockDelta"]
    assert texts == pieces
    assert frames[-2] == ("messageStop", {"stopReason": "max_tokens"})


@pytest.mark.parametrize(
    ("operation", "body", "reason"),
    [
        ("ConverseStream", b"not json", "not JSON"),
        ("ConverseStream", b"[1, 2]", "not a JSON object"),
        ("ConverseStream", b'{"output": {}}', "not a Converse response"),
        ("InvokeModelWithResponseStream", b'{"outputs": [{"text": "x"}]}', "not an Anthropic"),
        ("Converse", b"{}", "not a streaming"),
    ],
)
def test_as_stream_refuses_bodies_of_the_wrong_shape(
    operation: str, body: bytes, reason: str
) -> None:
    with pytest.raises(TemplateUnsupported, match=reason):
        as_stream(operation, body)


def test_as_stream_refuses_blocks_with_no_streamed_form() -> None:
    doc = _converse_with_tools()
    doc["output"]["message"]["content"] = [{"image": {"format": "png", "source": {"bytes": ""}}}]
    with pytest.raises(TemplateUnsupported, match=r"content block 0 \(image\)"):
        as_stream("ConverseStream", json.dumps(doc).encode())


# --- downgrade -----------------------------------------------------------------------------

MODEL_IDS = [
    HAIKU,
    HAIKU_35,
    "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-haiku-20240307-v1:0",
    "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3d4e5",
]


def _boto3_path(operation: str, model_id: str) -> str:
    """The path botocore's own serializer builds for ``operation`` on ``model_id``."""
    session = botocore.session.get_session()
    model = session.get_service_model("bedrock-runtime").operation_model(operation)
    from botocore.serialize import create_serializer

    params: dict[str, Any] = {"modelId": model_id}
    if operation.startswith("Converse"):
        params["messages"] = _messages()
    else:
        params["body"] = b"{}"
    request = create_serializer("rest-json").serialize_to_request(params, model)
    return str(request["url_path"])


@pytest.mark.parametrize("model_id", MODEL_IDS)
@pytest.mark.parametrize(
    ("operation", "action"),
    [
        ("InvokeModel", "invoke"),
        ("InvokeModelWithResponseStream", "invoke-with-response-stream"),
        ("Converse", "converse"),
        ("ConverseStream", "converse-stream"),
    ],
)
def test_downgrade_path_encodes_the_target_exactly_as_botocore(
    model_id: str, operation: str, action: str
) -> None:
    source = f"/model/{encode_model_id(SONNET)}/{action}"
    path = downgrade_path(source, operation, model_id)
    assert path == _boto3_path(operation, model_id)
    route = match("POST", path)
    assert (route.operation, route.model_id) == (operation, model_id)


def test_downgrade_path_accepts_a_literal_colon_and_slash_in_the_source() -> None:
    source = "/model/arn:aws:bedrock:us-east-1:1:inference-profile/us.anthropic.x:0/converse"
    assert downgrade_path(source, "Converse", HAIKU) == f"/model/{encode_model_id(HAIKU)}/converse"


@pytest.mark.parametrize(
    ("path", "operation"),
    [
        ("/model/x/converse", "InvokeModel"),
        ("/model//converse", "Converse"),
        ("/guardrail/g/version/1/apply", "Converse"),
        ("/model/x/count-tokens", "CountTokens"),
    ],
)
def test_downgrade_path_rejects_paths_that_are_not_the_operation(path: str, operation: str) -> None:
    with pytest.raises(ValueError):
        downgrade_path(path, operation, HAIKU)


def test_served_model_headers_mark_the_degradation() -> None:
    assert served_model_headers(HAIKU, "downgrade") == {
        "x-sluice-served-model": HAIKU,
        "x-sluice-degraded": "downgrade",
    }
    with pytest.raises(ValueError):
        served_model_headers(HAIKU, "haiku")


def _native(**fields: Any) -> bytes:
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 1024, "messages": []}
    return json.dumps(body | fields).encode()


def _converse(**fields: Any) -> bytes:
    return json.dumps({"messages": _messages()} | fields).encode()


_IMAGE_NATIVE = [{"role": "user", "content": [{"type": "image", "source": {}}]}]
_IMAGE_CONVERSE = [{"role": "user", "content": [{"image": {"format": "png"}}]}]


@pytest.mark.parametrize(
    ("operation", "body", "target", "problem"),
    [
        ("InvokeModel", _native(), HAIKU, None),
        ("InvokeModel", _native(max_tokens=4096), HAIKU, None),
        ("InvokeModel", _native(max_tokens=8192), HAIKU, "max_tokens 8192 exceeds the 4096"),
        ("InvokeModel", _native(max_tokens=8192), HAIKU_35, None),
        ("InvokeModel", _native(max_tokens=8192), "opaque-provisioned-id", None),
        ("InvokeModel", _native(thinking={"type": "enabled"}), HAIKU, "thinking"),
        ("InvokeModel", _native(thinking={"type": "enabled"}), HAIKU_45, None),
        ("InvokeModel", _native(anthropic_beta=["output-128k-2025-02-19"]), HAIKU, "beta"),
        ("InvokeModel", _native(messages=_IMAGE_NATIVE), HAIKU_35, "image"),
        ("InvokeModel", _native(messages=_IMAGE_NATIVE), HAIKU, None),
        ("InvokeModel", _native(), "amazon.nova-lite-v1:0", "a amazon model"),
        ("InvokeModelWithResponseStream", _native(max_tokens=5000), HAIKU, "max_tokens"),
        ("Converse", _converse(), HAIKU, None),
        ("Converse", _converse(), "amazon.nova-lite-v1:0", None),
        ("Converse", _converse(inferenceConfig={"maxTokens": 9000}), HAIKU_35, "maxTokens"),
        (
            "ConverseStream",
            _converse(additionalModelRequestFields={"thinking": {"type": "enabled"}}),
            HAIKU_35,
            "additionalModelRequestFields.thinking",
        ),
        ("Converse", _converse(messages=_IMAGE_CONVERSE), HAIKU_35, "image"),
        ("Converse", b"not json", HAIKU, None),
    ],
)
def test_downgrade_body_problem_names_the_incompatible_field(
    operation: str, body: bytes, target: str, problem: str | None
) -> None:
    found = downgrade_body_problem(operation, body, target)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
