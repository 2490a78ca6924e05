"""Tool use end to end: real SDK clients → Sluice → the simulator, and back with the result.

Each test runs a client's whole tool loop: the model asks for a tool (``stopReason: tool_use``),
the client answers with a tool result, the model answers in text.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from proxy.simulator.tools import sample_input
from tests.support.processes import Simulator, Sluice, bedrock_client

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1},
            "note": {"type": "string"},
        },
        "required": ["city", "unit", "days"],
    },
}
STOCK = {
    "name": "check_stock",
    "description": "Copies of a manga volume in stock",
    "schema": {"type": "object", "properties": {"isbn": {"type": "string"}}},
}


def _converse_tools(choice: dict[str, Any] | None = None) -> dict[str, Any]:
    tools = [
        {
            "toolSpec": {
                "name": t["name"],
                "description": t["description"],
                "inputSchema": {"json": t["schema"]},
            }
        }
        for t in (WEATHER, STOCK)
    ]
    return {"tools": tools, **({"toolChoice": choice} if choice else {})}


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sluice]:
    p = Sluice(tmp_path_factory.mktemp("tools"), upstream=simulator.url)
    yield p
    p.stop()


def _ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"text": text}]}]


def test_converse_tool_use_round_trip_through_boto3(proxy: Sluice, sim: Simulator) -> None:
    client = bedrock_client(proxy.url)
    messages = _ask("東京の天気は? [[sim:tool=get_weather]]")
    reply = client.converse(modelId=HAIKU, messages=messages, toolConfig=_converse_tools())
    assert reply["stopReason"] == "tool_use"
    content = reply["output"]["message"]["content"]
    assert content[0]["text"]
    use = content[1]["toolUse"]
    assert use["name"] == "get_weather" and use["toolUseId"].startswith("tooluse_")
    assert use["input"] == {"city": "東京", "unit": "celsius", "days": 1}
    assert reply["usage"]["outputTokens"] > 5

    messages += [
        reply["output"]["message"],
        {
            "role": "user",
            "content": [
                {
                    "toolResult": {
                        "toolUseId": use["toolUseId"],
                        "content": [{"json": {"forecast": "晴れ"}}],
                    }
                }
            ],
        },
    ]
    final = client.converse(modelId=HAIKU, messages=messages, toolConfig=_converse_tools())
    assert final["stopReason"] == "end_turn"
    assert [set(b) for b in final["output"]["message"]["content"]] == [{"text"}]
    assert sim.stats()["models"][HAIKU]["requests"] == 2


def test_converse_stream_sends_tool_use_start_and_input_fragments(proxy: Sluice) -> None:
    client = bedrock_client(proxy.url)
    reply = client.converse_stream(
        modelId=HAIKU, messages=_ask("在庫は?"), toolConfig=_converse_tools({"any": {}})
    )
    events = list(reply["stream"])
    starts = [e["contentBlockStart"] for e in events if "contentBlockStart" in e]
    assert starts == [
        {
            "start": {
                "toolUse": {
                    "toolUseId": starts[0]["start"]["toolUse"]["toolUseId"],
                    "name": "get_weather",
                }
            },
            "contentBlockIndex": 1,
        }
    ]
    fragments = [
        e["contentBlockDelta"]["delta"]["toolUse"]["input"]
        for e in events
        if "toolUse" in e.get("contentBlockDelta", {}).get("delta", {})
    ]
    assert len(fragments) > 1
    assert json.loads("".join(fragments)) == {"city": "東京", "unit": "celsius", "days": 1}
    stop = next(e["messageStop"] for e in events if "messageStop" in e)
    assert stop["stopReason"] == "tool_use"
    assert events[-1]["metadata"]["usage"]["outputTokens"] > 5


def test_invoke_model_answers_tool_use_blocks(proxy: Sluice) -> None:
    body = {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "stock? [[sim:tool=check_stock]]"}],
        "tools": [{"name": t["name"], "input_schema": t["schema"]} for t in (WEATHER, STOCK)],
    }
    raw = bedrock_client(proxy.url).invoke_model(modelId=HAIKU, body=json.dumps(body))
    doc = json.loads(raw["body"].read())
    assert doc["stop_reason"] == "tool_use"
    assert doc["content"][1] == {
        "type": "tool_use",
        "id": doc["content"][1]["id"],
        "name": "check_stock",
        "input": {"isbn": "東京"},
    }


def test_a_tool_result_for_an_unknown_call_is_a_validation_exception(proxy: Sluice) -> None:
    messages = [
        *_ask("hi"),
        {"role": "assistant", "content": [{"text": "ok"}]},
        {
            "role": "user",
            "content": [{"toolResult": {"toolUseId": "tooluse_nope", "content": [{"text": "x"}]}}],
        },
    ]
    with pytest.raises(ClientError) as info:
        bedrock_client(proxy.url).converse(
            modelId=HAIKU, messages=messages, toolConfig=_converse_tools()
        )
    assert info.value.response["Error"]["Code"] == "ValidationException"
    assert "tooluse_nope" in info.value.response["Error"]["Message"]


def test_anthropic_bedrock_tool_use_round_trip(proxy: Sluice) -> None:
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.AnthropicBedrock(
        base_url=proxy.url, aws_access_key="AKIDCLIENT", aws_secret_key="s", aws_region="us-east-1"
    )
    tools = [
        {"name": t["name"], "description": t["description"], "input_schema": t["schema"]}
        for t in (WEATHER, STOCK)
    ]
    messages: list[dict[str, Any]] = [{"role": "user", "content": "天気 [[sim:tool=*]]"}]
    first = client.messages.create(model=HAIKU, max_tokens=200, tools=tools, messages=messages)
    assert first.stop_reason == "tool_use"
    use = next(b for b in first.content if b.type == "tool_use")
    assert use.name == "get_weather" and use.input["unit"] == "celsius"

    with client.messages.stream(
        model=HAIKU,
        max_tokens=200,
        tools=tools,
        messages=messages,
        tool_choice={"type": "tool", "name": "check_stock"},
    ) as stream:
        streamed = stream.get_final_message()
    assert [b.type for b in streamed.content] == ["text", "tool_use"]
    assert streamed.content[1].input == {"isbn": "東京"}

    messages += [
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "晴れ"}],
        },
    ]
    final = client.messages.create(model=HAIKU, max_tokens=200, tools=tools, messages=messages)
    assert final.stop_reason == "end_turn" and final.content[0].type == "text"


def test_sample_input_follows_refs_unions_and_bounds() -> None:
    schema = {
        "type": "object",
        "properties": {
            "item": {"$ref": "#/$defs/Item"},
            "maybe": {"anyOf": [{"type": "null"}, {"type": "number", "exclusiveMinimum": 2}]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "ok": {"type": "boolean"},
        },
        "$defs": {"Item": {"type": "object", "properties": {"n": {"type": "integer"}}}},
    }
    assert sample_input(schema) == {"item": {"n": 1}, "maybe": 3.0, "tags": ["東京"], "ok": True}


def test_langchain_bind_tools_returns_a_real_tool_call(proxy: Sluice) -> None:
    langchain_aws = pytest.importorskip("langchain_aws")
    from langchain_core.messages import HumanMessage, ToolMessage

    chat = langchain_aws.ChatBedrockConverse(
        model=HAIKU,
        endpoint_url=proxy.url,
        region_name="us-east-1",
        aws_access_key_id="AKIDCLIENT",
        aws_secret_access_key="s",
        max_tokens=200,
    )
    tool = {
        "name": WEATHER["name"],
        "description": WEATHER["description"],
        "parameters": WEATHER["schema"],
    }
    messages: list[Any] = [HumanMessage("東京の天気は? [[sim:tool=get_weather]]")]
    asked = chat.bind_tools([tool]).invoke(messages)
    assert asked.tool_calls[0]["name"] == "get_weather"
    assert asked.tool_calls[0]["args"] == {"city": "東京", "unit": "celsius", "days": 1}

    chunks = list(chat.bind_tools([tool]).stream(messages))  # ConverseStream, fragments joined
    streamed = functools.reduce(operator.add, chunks)
    assert streamed.tool_calls[0]["args"] == asked.tool_calls[0]["args"]

    messages += [asked, ToolMessage("晴れ", tool_call_id=asked.tool_calls[0]["id"])]
    final = chat.bind_tools([tool]).invoke(messages)
    assert not final.tool_calls and final.text


# litellm's own pydantic models warn when built; nothing to do with Sluice.
@pytest.mark.filterwarnings("ignore:Item.*ReadOnly:UserWarning")
@pytest.mark.slow  # importing litellm takes ~3.5 s
def test_litellm_tool_call_round_trip(proxy: Sluice, monkeypatch: pytest.MonkeyPatch) -> None:
    # The packaged model-cost map: importing litellm must not reach for the network.
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = pytest.importorskip("litellm")
    tools = [
        {
            "type": "function",
            "function": {
                "name": t["name"],
                "description": t["description"],
                "parameters": t["schema"],
            },
        }
        for t in (WEATHER, STOCK)
    ]
    auth = {
        "aws_access_key_id": "AKIDCLIENT",
        "aws_secret_access_key": "s",
        "aws_region_name": "us-east-1",
        "aws_bedrock_runtime_endpoint": proxy.url,
    }
    messages: list[dict[str, Any]] = [{"role": "user", "content": "在庫 [[sim:tool=check_stock]]"}]
    first = litellm.completion(
        model=f"bedrock/converse/{HAIKU}", messages=messages, tools=tools, **auth
    )
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "check_stock"
    assert json.loads(call.function.arguments) == {"isbn": "東京"}

    messages += [
        first.choices[0].message.model_dump(),
        {"role": "tool", "tool_call_id": call.id, "content": "3 copies"},
    ]
    final = litellm.completion(
        model=f"bedrock/converse/{HAIKU}", messages=messages, tools=tools, **auth
    )
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content
