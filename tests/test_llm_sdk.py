"""The Python SDK end to end: a tiny model saved as an orbax checkpoint with the real SmolLM2 tokenizer beside it."""

import asyncio
import threading

import pytest

from novallm_jax.engine.engine import EngineConfig
from novallm_jax.errors import InvalidRequestError, NovaLLMError
from novallm_jax.llm import LLM
from novallm_jax.loading.checkpoint import save_checkpoint
from novallm_jax.model import greedy_generate
from novallm_jax.sampling_params import SamplingParams
from tests.engine_fixtures import EXEC, TINY, tiny_params

SAMPLED = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_gguf):
    from novallm_jax.tokenizer import load_tokenizer

    d = str(tmp_path_factory.mktemp("tiny"))
    save_checkpoint(d, TINY, tiny_params())
    load_tokenizer(default_gguf).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def llm(model_dir):
    # float32 as the references are (on a GPU the platform default would be bfloat16).
    with LLM(model_dir, dtype="float32", engine_config=EngineConfig(executor=EXEC)) as llm:
        yield llm
        assert llm.engine.check_leaks() == []


def test_generate_batch_matches_reference(llm):
    prompts = ["Hello there", "The quick brown fox jumps over the lazy dog", "1 2 3"]
    results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    ids = [llm.tokenizer.encode(p) for p in prompts]
    refs = greedy_generate(tiny_params(), TINY, ids, 10)
    for prompt, r, ref in zip(prompts, results, refs):
        assert r.prompt == prompt and r.prompt_token_ids == llm.tokenizer.encode(prompt)
        assert r.outputs[0].token_ids == ref
        assert r.text == llm.tokenizer.decode(ref, skip_special_tokens=True)
        assert r.outputs[0].finish_reason.value == "length"


def test_stream_equals_generate(llm):
    whole = llm.generate("Once upon a time", SAMPLED)[0].text
    pieces = list(llm.stream("Once upon a time", SAMPLED))
    assert "".join(pieces) == whole and len(pieces) > 1


def test_chat_uses_the_template(llm):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    ids = llm.tokenizer.encode(
        llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False
    )
    assert llm.chat(messages, SAMPLED).text == llm.generate([ids], SAMPLED)[0].text
    assert "".join(llm.stream_chat(messages, SAMPLED)) == llm.chat(messages, SAMPLED).text


def test_n_completions_follow_child_seeds(llm):
    params = SamplingParams(temperature=1.0, seed=100, max_tokens=8, ignore_eos=True, n=3)
    result = llm.generate("Tell me a story", params)[0]
    assert [o.index for o in result.outputs] == [0, 1, 2]
    for i, out in enumerate(result.outputs):
        single = llm.generate("Tell me a story", params.for_child(i))[0].outputs[0]
        assert out.token_ids == single.token_ids
    assert len({tuple(o.token_ids) for o in result.outputs}) > 1


def test_async_variants_equal_sync(llm):
    async def run():
        texts = await llm.agenerate(["Hi", "Bye"], SAMPLED)
        streamed = [piece async for piece in llm.astream("Hi", SAMPLED)]
        chat = await llm.achat([{"role": "user", "content": "Hi"}], SAMPLED)
        return [t.text for t in texts], "".join(streamed), chat.text

    texts, streamed, chat = asyncio.run(run())
    assert texts == [r.text for r in llm.generate(["Hi", "Bye"], SAMPLED)]
    assert streamed == texts[0]
    assert chat == llm.chat([{"role": "user", "content": "Hi"}], SAMPLED).text


def test_breaking_off_a_stream_cancels_the_request(llm):
    stream = llm.stream("Count with me", SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    next(stream)
    stream.close()
    llm.engine.run_until_idle()  # the background loop may still be finishing a step
    assert llm.engine.check_leaks() == []


def test_bad_input_is_rejected_and_the_llm_keeps_working(llm):
    with pytest.raises(InvalidRequestError, match="the prompt is empty"):
        llm.generate("", SAMPLED)
    with pytest.raises(InvalidRequestError, match="messages must not be empty"):
        llm.chat([], SAMPLED)
    with pytest.raises(InvalidRequestError, match="temperature"):
        llm.generate("ok", SamplingParams(temperature=-1))
    # Lone surrogates (JSON's "\ud800") have no UTF-8 form: refused, naming the argument, before the tokenizer.
    for call, param in (
        (lambda: llm.generate(["ok", "\ud800 hi"], SAMPLED), "prompt"),
        (lambda: llm.chat([{"role": "user", "content": "hi \udfff"}], SAMPLED), "messages[0].content"),
        (
            lambda: llm.chat([{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]),
            "messages[0].content[0]",
        ),
        (lambda: llm.generate("ok", SamplingParams(stop=["\ud800"])), "stop"),
    ):
        with pytest.raises(InvalidRequestError, match="lone UTF-16 surrogate") as info:
            call()
        assert info.value.param == param
    assert llm.generate("ok", SAMPLED)[0].text == llm.generate("ok", SAMPLED)[0].text


def test_close_leaves_no_thread(model_dir):
    before = {t.name for t in threading.enumerate()}
    llm = LLM(model_dir, engine_config=EngineConfig(executor=EXEC))
    assert "novallm-engine" in {t.name for t in threading.enumerate()}
    assert llm.generate("x", SAMPLED)[0].outputs[0].token_ids
    llm.close()
    assert {t.name for t in threading.enumerate()} == before
    with pytest.raises(NovaLLMError, match="closed"):
        llm.generate("x", SAMPLED)
    llm.close()  # idempotent


def test_llm_with_a_bfloat16_kv_cache(default_gguf):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM("unused", kv_cache_dtype="float16")
    with LLM(default_gguf, kv_cache_dtype="bfloat16", engine_config=EngineConfig(executor=EXEC)) as llm:
        assert all(k.dtype.name == "bfloat16" for k in llm.engine.pool.storage.k)
        out = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=8))[0]
        assert "Paris" in out.text
        assert llm.engine.check_leaks() == []
