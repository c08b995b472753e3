"""Chat templates render exactly as transformers' apply_chat_template does."""

from __future__ import annotations

import os

import pytest

from novallm_jax.errors import InvalidRequestError
from novallm_jax.tokenizer import ChatTemplateError, load_tokenizer
from test_tokenizer import mistral_spm_path, smollm2_gguf_path

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 日本語 with 👩‍👩‍👧?\nTwo lines."},
]

# Exercises what transformers' environment adds: raise_exception, tojson, loopcontrols, namespace,
# bos/eos variables, extra kwargs, and trim_blocks/lstrip_blocks whitespace handling.
FEATURE_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(count=0) %}
{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}
    {% if loop.index > max_turns %}{% break %}{% endif %}
    {% if m['role'] == 'system' %}{% continue %}{% endif %}
    {% set ns.count = ns.count + 1 %}
[{{ m['role'] }}] {{ m['content'] | tojson }}{{ eos_token }}
{% endfor %}
turns={{ ns.count }}{% if add_generation_prompt %} <assistant>{% endif %}
"""


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return load_tokenizer(path), ref


def _ref_ids(ref, messages, **kwargs):
    out = ref.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("n_turns", [1, 3])
def test_smollm2_template_matches_transformers(pair, system, add_generation_prompt, n_turns):
    ours, ref = pair
    messages = ([SYSTEM] if system else []) + TURNS[:n_turns]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text.count("<|im_start|>") == (len(messages) + (not system) + add_generation_prompt)
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == _ref_ids(ref, messages, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("max_turns", [2, 10])
def test_environment_features_match_transformers(pair, add_generation_prompt, max_turns):
    ours, ref = pair
    messages = [SYSTEM] + TURNS
    kwargs = dict(chat_template=FEATURE_TEMPLATE, add_generation_prompt=add_generation_prompt, max_turns=max_turns)
    text = ours.apply_chat_template(messages, **kwargs)
    assert text == ref.apply_chat_template(messages, tokenize=False, **kwargs)
    assert '"And 日本語 with 👩‍👩‍👧?\\nTwo lines."' in text or max_turns == 2


def test_strftime_now_is_available(pair):
    ours, _ = pair
    import datetime

    year = ours.apply_chat_template([], chat_template="{{ strftime_now('%Y') }}")
    assert int(year) in (datetime.date.today().year, datetime.date.today().year + 1)


def test_raise_exception_becomes_invalid_request(pair):
    ours, ref = pair
    messages = [{"role": "tool", "content": "x"}]
    with pytest.raises(InvalidRequestError, match="bad role tool"):
        ours.apply_chat_template(messages, chat_template=FEATURE_TEMPLATE, max_turns=3)
    with pytest.raises(Exception, match="bad role tool"):
        ref.apply_chat_template(messages, chat_template=FEATURE_TEMPLATE, max_turns=3, tokenize=False)


def test_sandbox_blocks_python_internals(pair):
    ours, _ = pair
    with pytest.raises(InvalidRequestError):
        ours.apply_chat_template([], chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")


def test_missing_template_is_a_clear_error():
    tok = load_tokenizer(mistral_spm_path())
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_malformed_messages(pair):
    ours, _ = pair
    with pytest.raises(InvalidRequestError, match="messages"):
        ours.apply_chat_template("hello")
    with pytest.raises(InvalidRequestError, match="role"):
        ours.apply_chat_template([{"content": "no role"}])
