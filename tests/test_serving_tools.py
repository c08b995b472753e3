"""Tool calling through the REST API and the official openai client: tool_choice "required" and a named function
always give calls whose arguments validate against the function's parameters (random schemas, temperature 1.0,
streaming and not); "auto" and "none"; the SDK's `LLM.chat(tools=...)` reads the same calls; 400s name the field."""

from __future__ import annotations

import functools
import json
import random

import httpx
import jsonschema
import openai
import pytest

from novallm_jax.sampling_params import SamplingParams
from novallm_jax.serving.app import ServerConfig
from novallm_jax.serving.runner import BackgroundServer
from novallm_jax.llm import LLM
from tests.engine_fixtures import make_engine
from tests.test_serving_support import ENGINE, MODEL, is_openai_error, shared_tokenizer, wait_idle
from tests.test_structured import _object_schema

TIMEOUT = 120.0
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def _tools(rng: random.Random, n: int) -> list[dict]:
    return [
        {
            "type": "function",
            "function": {"name": f"fn_{i}", "description": f"tool {i}", "parameters": _object_schema(rng)},
        }
        for i in range(n)
    ]


@functools.lru_cache(maxsize=None)
def tools_llm() -> LLM:
    """The serving tests' tiny model with a 1024-token context: tools listed in the prompt take a few hundred."""
    engine = make_engine(
        shared_tokenizer(),
        enable_prefix_caching=False,
        **{**ENGINE, "page_table_buckets": (128,), "max_model_len": 1024},
    )
    return LLM.from_engine(engine, MODEL)


@pytest.fixture(scope="module")
def server():
    llm = tools_llm()
    with BackgroundServer(llm, ServerConfig()) as srv:
        yield srv
    wait_idle(llm)
    assert llm.engine.check_leaks() == []


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def _streamed(stream) -> tuple[str, list[dict], str]:
    """Content, tool calls (assembled from their deltas as OpenAI's clients do) and finish reason of a stream."""
    content, calls, reason = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or ():
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = d.id or call["id"]
            call["name"] += (d.function.name or "") if d.function else ""
            call["arguments"] += (d.function.arguments or "") if d.function else ""
        reason = choice.finish_reason or reason
    return content, [calls[k] for k in sorted(calls)], reason


def test_required_and_named_calls_always_validate(client):
    rng = random.Random(20)
    for i in range(8):
        tools = _tools(rng, 3)
        by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        named = i % 2 == 1
        choice = {"type": "function", "function": {"name": "fn_1"}} if named else "required"
        kwargs = dict(
            model=MODEL,
            messages=MESSAGES,
            tools=tools,
            tool_choice=choice,
            temperature=1.0,
            seed=i,
            max_tokens=300,
            parallel_tool_calls=i % 4 < 2,
        )
        if i < 4:
            r = client.chat.completions.create(**kwargs)
            msg, reason = r.choices[0].message, r.choices[0].finish_reason
            calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls]
            assert r.choices[0].message.content is None
        else:
            content, calls, reason = _streamed(client.chat.completions.create(**kwargs, stream=True))
            assert content == ""
        assert reason == "tool_calls" and calls
        if named:
            assert [c["name"] for c in calls] == ["fn_1"]
        if not kwargs["parallel_tool_calls"]:
            assert len(calls) == 1
        for call in calls:
            assert call["id"].startswith("call_")
            jsonschema.validate(json.loads(call["arguments"]), by_name[call["name"]])


def test_auto_parses_calls_the_model_writes_and_none_renders_no_tools(client, server):
    """The tiny random model writes no calls on its own: force the text of one with a regex, and see it parsed
    (the hermes syntax: this tokenizer's template knows no tools, so they are rendered Qwen-2.5-style)."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    regex = r'Sure\.<tool_call>\{"name": "get_weather", "arguments": \{"city": "Paris"\}\}</tool_call>'
    for stream in (False, True):
        kwargs = dict(
            model=MODEL,
            messages=MESSAGES,
            tools=tools,
            tool_choice="auto",
            max_tokens=100,
            extra_body={"guided_regex": regex},
        )
        if stream:
            content, calls, reason = _streamed(client.chat.completions.create(**kwargs, stream=True))
        else:
            r = client.chat.completions.create(**kwargs)
            content, reason = r.choices[0].message.content, r.choices[0].finish_reason
            calls = [
                {"name": c.function.name, "arguments": c.function.arguments} for c in r.choices[0].message.tool_calls
            ]
        assert content == "Sure." and reason == "tool_calls"
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]
    # "none": the same text comes back as content, and the prompt holds no tools.
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        tools=tools,
        tool_choice="none",
        max_tokens=100,
        extra_body={"guided_regex": regex},
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    with_tools = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": MESSAGES}).json()["count"]
    assert r.usage.prompt_tokens == with_tools


def test_sdk_chat_reads_the_same_calls():
    llm = tools_llm()
    rng = random.Random(3)
    tools = _tools(rng, 2)
    result = llm.chat(
        MESSAGES,
        SamplingParams(temperature=1.0, seed=5, max_tokens=300),
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "fn_0"}},
    )
    (call,) = result.outputs[0].tool_calls
    assert call.name == "fn_0" and result.outputs[0].text == ""
    jsonschema.validate(json.loads(call.arguments), tools[0]["function"]["parameters"])
    # A tool round trip goes back through the template: the assistant's call and the tool's result.
    follow = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    ids, rendering = llm.render_chat(follow, tools=tools)
    text = llm.tokenizer.decode(ids)
    assert f'"name": "fn_0", "arguments": {call.arguments}' in text and '<tool_response>\n{"temp": 21}' in text
    assert llm.chat(follow, SamplingParams(max_tokens=5, temperature=0.0), tools=tools).outputs[0].token_ids
    wait_idle(llm)
    assert llm.engine.check_leaks() == []


@pytest.mark.parametrize(
    "body,param",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
            "tools[0].function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"description": "\ud800"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f b"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "always"}, "tool_choice"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
                        ],
                    },
                    {"role": "user", "content": "hi"},
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
    ],
)
def test_bad_tool_fields_are_400s_naming_the_field(server, body, param):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        timeout=TIMEOUT,
        headers={"Content-Type": "application/json"},
        content=json.dumps({"model": MODEL, "messages": MESSAGES, **body}),
    )  # \ud800 as JSON's escape
    assert r.status_code == 400, r.text
    assert is_openai_error(r.json()) and r.json()["error"]["param"].startswith(param), r.json()


@pytest.mark.slow
def test_weather_round_trip_with_the_default_model():
    """SmolLM2-135M-Instruct, through the server and the openai client. Its template reads no `tools`, so they are
    rendered Qwen-2.5-style (hermes). Asked with "auto", this 135M model answers in prose rather than calling, so the
    first turn uses "required" (one call); the tool's result goes back through the template and the model answers
    with text ("auto", no further call)."""
    from novallm_jax import LLM as DefaultLLM

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Get the current weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "description": "The city name"}},
                    "required": ["city"],
                },
            },
        }
    ]
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    with DefaultLLM() as llm, BackgroundServer(llm, ServerConfig()) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
        first = client.chat.completions.create(
            model=llm.name,
            messages=messages,
            tools=tools,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=0.0,
            max_tokens=60,
        )
        (call,) = first.choices[0].message.tool_calls
        assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        result = json.dumps({"city": "Paris", "temperature_c": 21, "sky": "sunny"})
        follow = messages + [
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": result},
        ]
        final = client.chat.completions.create(
            model=llm.name, messages=follow, tools=tools, tool_choice="auto", temperature=0.0, max_tokens=60
        )
        assert final.choices[0].finish_reason in ("stop", "length") and not final.choices[0].message.tool_calls
        assert final.choices[0].message.content.strip()
        assert final.usage.prompt_tokens > first.usage.prompt_tokens + len(llm.encode(result)) // 2
        wait_idle(llm)
        assert llm.engine.check_leaks() == []
