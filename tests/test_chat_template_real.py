"""Real chat templates (llama.cpp's models/templates/*.jinja) render exactly as transformers renders them."""

from __future__ import annotations

import copy
import os

import pytest
from llama_cpp_sdist import llama_cpp_dir

from novallm_jax.errors import InvalidRequestError
from novallm_jax.tokenizer import load_tokenizer, render_chat_template

TEMPLATES = ["google-gemma-2-2b-it", "google-gemma-4-31B-it", "microsoft-Phi-3.5-mini-instruct", "Qwen-Qwen3-0.6B"]
SPECIAL = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": 'Weather <now> & "later" in a city, ünïcode',
            "parameters": {
                "type": "object",
                "required": ["city"],
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
            },
        },
    }
]
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello there!"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi <b>&</b> 日本語"}],
    "multi_turn": [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\nTwo lines."},
    ],
    "alternating": [
        {"role": "user", "content": "A"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "C"},
        {"role": "assistant", "content": "D"},
    ],
    "tool_calls": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}
            ],
        },
        {"role": "tool", "name": "get_weather", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21C."},
        {"role": "user", "content": "Thanks"},
    ],
    # transformers copies `thinking` / `reasoning` into `reasoning_content`, which Qwen3's template reads.
    "reasoning": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "thinking": "hmm"}],
}
CASES = [
    (t, c, gen, extra)
    for t in TEMPLATES
    for c in CONVERSATIONS
    for gen in (False, True)
    for extra in ({}, {"tools": TOOLS}, {"enable_thinking": False})
]


def _template(name: str) -> str:
    with open(os.path.join(llama_cpp_dir(), "models", "templates", f"{name}.jinja"), encoding="utf-8") as f:
        return f.read()


def _transformers(template: str, messages: list[dict], add_generation_prompt: bool, **kwargs) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        [copy.deepcopy(messages)], chat_template=template, add_generation_prompt=add_generation_prompt, **kwargs
    )
    return rendered[0]


@pytest.mark.parametrize(
    "name,conversation,add_generation_prompt,extra",
    CASES,
    ids=[f"{t}-{c}-gen{int(g)}-{'-'.join(e) or 'plain'}" for t, c, g, e in CASES],
)
def test_renders_as_transformers(name, conversation, add_generation_prompt, extra):
    template, messages = _template(name), CONVERSATIONS[conversation]
    try:
        expected = _transformers(template, messages, add_generation_prompt, **SPECIAL, **extra)
    except Exception as e:  # the template refuses this conversation (Gemma 2: no system role, strict alternation)
        with pytest.raises(InvalidRequestError, match="chat template") as info:
            render_chat_template(
                template,
                copy.deepcopy(messages),
                add_generation_prompt=add_generation_prompt,
                special_tokens=SPECIAL,
                **extra,
            )
        assert str(e) in str(info.value)
        return
    ours = render_chat_template(
        template, copy.deepcopy(messages), add_generation_prompt=add_generation_prompt, special_tokens=SPECIAL, **extra
    )
    assert ours == expected


def test_cases_render_text():
    """Most cases render (so the comparison above is not all refusals), and every template renders some."""
    rendered = set()
    for name, conversation, gen, extra in CASES:
        try:
            _transformers(_template(name), CONVERSATIONS[conversation], gen, **SPECIAL, **extra)
            rendered.add(name)
        except Exception:
            continue
    assert rendered == set(TEMPLATES)


def test_gguf_vocabulary_template_through_the_tokenizer():
    """Phi-3's GGUF carries its template; apply_chat_template (with the file's own bos/eos) equals transformers'."""
    tok = load_tokenizer(os.path.join(llama_cpp_dir(), "models", "ggml-vocab-phi-3.gguf"))
    messages = CONVERSATIONS["multi_turn"]
    expected = _transformers(
        tok.chat_template, messages, True, **{k: v for k, v in tok.special_tokens_map.items() if v is not None}
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == expected
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # The turn markers are single special ids (the text after each loses its newline: llama.cpp's Phi-3 rstrip).
    end, user = tok.token_to_id("<|end|>"), tok.token_to_id("<|user|>")
    assert ids[0] == tok.bos_token_id and ids.count(end) == 3 and ids.count(user) == 2
    assert tok.decode(ids).replace(" ", "").replace("\n", "") == expected.replace(" ", "").replace("\n", "")


def test_template_type_error_is_a_request_error():
    """Phi-3's template concatenates content: a None content is the caller's error (HTTP 400), not a crash."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]
    with pytest.raises(TypeError):
        _transformers(_template("microsoft-Phi-3.5-mini-instruct"), messages, False)
    with pytest.raises(InvalidRequestError, match="chat template failed on the messages: TypeError"):
        render_chat_template(_template("microsoft-Phi-3.5-mini-instruct"), messages)
