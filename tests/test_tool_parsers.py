"""Tool-call parsers on the text the real chat templates (llama.cpp's models/templates/) write for an assistant's
calls: each family's parser, chosen from its template, reads back the calls the template rendered; the stream
splitter sends the same content and calls chunk by chunk."""

from __future__ import annotations

import copy
import json
import os

import pytest
from llama_cpp_sdist import llama_cpp_dir

from novallm_jax.errors import InvalidRequestError
from novallm_jax.tokenization.chat_template import render_chat_template
from novallm_jax.tool_calls import ToolRequest, ToolStream, prepare_chat
from novallm_jax.tool_parsers import get_parser, parser_for_template

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "required": ["city"],
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "opts": {"type": "object"}},
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "Local time", "parameters": {"type": "object"}},
    },
]
ARGS = [
    {"city": 'Paris, "FR" ünï', "days": 3, "opts": {"x": [1, 2.5, True, "a,b"], "y": None, "z": {"k": "}"}}},
    {"city": "Rome"},
]
CALLS = [
    {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": ARGS[0]}},
    {"id": "bcdefghij", "type": "function", "function": {"name": "get_time", "arguments": ARGS[1]}},
]
# Template -> (parser it selects, how many calls one assistant message may hold).
TEMPLATES = {
    "Qwen-Qwen2.5-7B-Instruct": ("hermes", 2),
    "Qwen-Qwen3-0.6B": ("hermes", 2),
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": ("hermes", 2),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ("hermes", 2),
    "meta-llama-Llama-3.1-8B-Instruct": ("llama3_json", 1),
    "meta-llama-Llama-3.2-3B-Instruct": ("llama3_json", 1),
    "meta-llama-Llama-3.3-70B-Instruct": ("llama3_json", 1),
    "mistralai-Mistral-Nemo-Instruct-2407": ("mistral", 2),
    "Mistral-Small-3.2-24B-Instruct-2506": ("mistral", 2),
    "unsloth-mistral-Devstral-Small-2507": ("mistral", 2),
    "mistralai-Ministral-3-14B-Reasoning-2512": ("mistral", 2),
    "google-gemma-4-31B-it": ("gemma4", 2),
}
# What ends an assistant turn in these templates: the engine stops on these, so they are never in an answer's text.
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "</s>", "<|tool_response>", "<turn|>")
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}


def _template(name: str) -> str:
    with open(os.path.join(llama_cpp_dir(), "models", "templates", f"{name}.jinja"), encoding="utf-8") as f:
        return f.read()


def _answer(template: str, calls: list[dict]) -> str:
    """The assistant turn the template writes for `calls`, as the model would generate it."""
    user = [{"role": "user", "content": "Weather?"}]
    prompt = render_chat_template(template, copy.deepcopy(user), add_generation_prompt=True, tools=TOOLS, **SPECIAL)
    full = render_chat_template(
        template,
        copy.deepcopy(user) + [{"role": "assistant", "content": "", "tool_calls": copy.deepcopy(calls)}],
        tools=TOOLS,
        **SPECIAL,
    )
    head = "<|turn>model\n"  # Gemma 4 writes a call turn without the generation prompt's empty thought
    answer = full[len(prompt) :] if full.startswith(prompt) else full[full.rindex(head) + len(head) :]
    for marker in END_MARKERS:
        answer = answer.split(marker)[0]
    return answer.strip()


@pytest.mark.parametrize("name", TEMPLATES)
def test_parser_reads_back_the_calls_its_template_writes(name):
    template = _template(name)
    expected_parser, most = TEMPLATES[name]
    parser = parser_for_template(template)
    assert parser.name == expected_parser
    calls = CALLS[:most]
    content, parsed = parser.parse(_answer(template, calls))
    assert content is None
    assert [c.name for c in parsed] == [c["function"]["name"] for c in calls]
    assert [json.loads(c.arguments) for c in parsed] == ARGS[:most]
    assert len({c.id for c in parsed}) == len(parsed)
    if expected_parser == "mistral":  # Mistral's templates refuse other ids
        assert all(len(c.id) == 9 and c.id.isalnum() for c in parsed)


@pytest.mark.parametrize(
    "name",
    [
        "Qwen-Qwen2.5-7B-Instruct",
        "meta-llama-Llama-3.1-8B-Instruct",
        "Mistral-Small-3.2-24B-Instruct-2506",
        "google-gemma-4-31B-it",
    ],
)
def test_stream_splitter_sends_content_then_the_same_calls(name):
    template = _template(name)
    parser = parser_for_template(template)
    most = TEMPLATES[name][1]
    lead = "" if parser.name == "llama3_json" else "Let me check. "  # Llama's JSON calls stand alone
    answer = lead + _answer(template, CALLS[:most])
    tools = ToolRequest.check(TOOLS)
    for step in (1, 3, 7):
        splitter, sent = ToolStream(tools, parser), ""
        for i in range(0, len(answer), step):
            sent += splitter.push(answer[i : i + step])
        tail, calls = splitter.finish()
        assert (sent + tail).strip() == lead.strip()
        assert [json.loads(c.arguments) for c in calls] == ARGS[:most]


def test_text_without_calls_is_all_content_and_streams_whole():
    tools = ToolRequest.check(TOOLS)
    for name in ("hermes", "llama3_json", "mistral", "gemma4", "pythonic"):
        parser = get_parser(name)
        for text in (
            "It is sunny in Paris.",
            "<tool_call>{not json}</tool_call>",
            "[TOOL_CALLS]oops",
            "a < b and c [d]",
        ):
            content, calls = tools.parse(text, parser)
            if not calls:
                assert content == text
                splitter = ToolStream(tools, parser)
                sent = "".join(splitter.push(ch) for ch in text)
                assert sent + splitter.finish()[0] == text


def test_pythonic_calls_as_gemma_3_writes_them():
    parser = get_parser("pythonic")
    content, calls = parser.parse('```tool_code\nget_weather(city="Paris", days=3, opts={"x": [1, True]})\n```')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 3, "opts": {"x": [1, True]}})
    ]
    _, calls = parser.parse('[get_weather(city="Rome"), get_time()]')
    assert [c.name for c in calls] == ["get_weather", "get_time"]


def test_template_without_tools_gets_them_hermes_style():
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"  # reads no `tools`
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]
    rendering = prepare_chat(messages, template, ToolRequest.check(TOOLS))
    text = render_chat_template(template, rendering.messages, **rendering.template_kwargs)
    assert rendering.parser.name == "hermes"
    assert text.startswith("<|system|># Tools") and '"name": "get_weather"' in text.split("</tools>")[1]
    assert '<|assistant|><tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|user|><tool_response>\n21 C\n</tool_response>" in text


@pytest.mark.parametrize(
    "tools,choice,param",
    [
        (None, "required", "tool_choice"),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        (TOOLS, "sometimes", "tool_choice"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
            None,
            "tools[0].function.parameters",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"\ud800": {}}}}}],
            None,
            "tools[0].function.parameters",
        ),
        ([{"type": "function", "function": {"name": "bad name!"}}], None, "tools[0].function.name"),
        (TOOLS + TOOLS[:1], None, "tools[2].function.name"),
        ([{"type": "retrieval"}], None, "tools[0]"),
    ],
)
def test_bad_tools_and_tool_choice_name_the_field(tools, choice, param):
    with pytest.raises(InvalidRequestError) as info:
        ToolRequest.check(tools, choice)
    assert info.value.param == param


def test_required_and_named_choices_build_schemas_from_the_parameters():
    named = ToolRequest.check(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    # No arguments beyond the listed ones, unless the schema says otherwise (OpenAI's strict mode).
    assert json.loads(named.structured().json) == {**TOOLS[0]["function"]["parameters"], "additionalProperties": False}
    required = json.loads(ToolRequest.check(TOOLS, "required", parallel_tool_calls=False).structured().json)
    assert required["minItems"] == 1 and required["maxItems"] == 1
    assert [o["properties"]["name"]["const"] for o in required["items"]["anyOf"]] == ["get_weather", "get_time"]
    assert ToolRequest.check(TOOLS, "auto").structured() is None
