"""Mixtral, Qwen3-MoE and Phi-3 (longrope) through the engine: paged cache, the executor's CPU kernels (the fused
Llama layer off for the experts), preemption and prefix caching, each request giving what it gives alone
(greedy_generate, which test_model_parity checks against transformers)."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from novallm_jax.config import ModelConfig
from novallm_jax.engine.engine import EngineConfig, LLMEngine
from novallm_jax.model import greedy_generate, init_params
from novallm_jax.sampling_params import SamplingParams
from tests.engine_fixtures import EXEC
from tests.hf_models import build_hf_config

FAMILIES = ["mixtral", "qwen3_moe", "phi3"]


@functools.lru_cache(maxsize=None)
def model(family: str):
    """The parity test's tiny config with the SmolLM2 tokenizer's vocabulary; weights large enough that the greedy
    choices (and the experts chosen) depend on the context."""
    cfg = ModelConfig.from_hf({**build_hf_config(family).to_dict(), "vocab_size": 49152})
    params = init_params(cfg, jax.random.key(7))
    params = jax.tree.map(lambda a: a * 10 if a.ndim >= 2 else a, params)
    params["lm_head"] = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return cfg, params


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    from novallm_jax.tokenizer import load_tokenizer

    return load_tokenizer(default_gguf)


def prompt_of(n, seed):
    return np.random.default_rng(seed).integers(3, 49152, n).tolist()


def greedy(n):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_with_preemption_and_prefix_cache_matches_each_alone(family, tokenizer):
    cfg, params = model(family)
    eng = LLMEngine(
        cfg,
        params,
        tokenizer,
        EngineConfig(
            executor=dataclasses.replace(EXEC, num_pages=24), preemption_mode="swap", enable_prefix_caching=True
        ),
    )
    assert not eng.executor.fused_layers or cfg.moe is None
    shared = prompt_of(20, 1)
    # Phi-3: prompts past its original 16 positions (long factors from the start) and one of 10 that crosses there
    # while it generates.
    specs = [(prompt_of(30 + 5 * i, 100 + i), 24) for i in range(4)] + [
        (prompt_of(10, 5), 24),
        (shared + prompt_of(7, 2), 12),
    ]
    reqs = [eng.add_request(p, greedy(m)) for p, m in specs]
    eng.run_until_idle()
    assert eng.counters["preemptions"] > 0
    again = eng.add_request(shared + prompt_of(9, 3), greedy(12))  # the shared prefix's pages come from the cache
    eng.run_until_idle()
    assert again.metrics.cached_prompt_tokens == 16
    specs.append((shared + prompt_of(9, 3), 12))
    refs = greedy_generate(params, cfg, [p for p, _ in specs], 24)
    for req, (_, m), ref in zip(reqs + [again], specs, refs):
        assert req.output_ids == ref[:m]
    assert eng.check_leaks() == []
    eng.prefix_cache.clear()
    assert eng.pool.check_leaks() == []


@pytest.mark.parametrize("ragged", [True, False])
def test_longrope_prompt_in_chunks_takes_the_long_factors_with_its_prompt_len(ragged):
    """A Phi-3 prompt past the original 16 positions, prefilled in chunks of 8: with `prompt_len` its logits are the
    one-call forward's (every token rotated with the long factors, as transformers does); judged by each chunk's
    own end, the first two chunks take the short factors and the logits differ."""
    import jax.numpy as jnp

    from novallm_jax.engine.executor import Executor, ExecutorConfig, PrefillChunk
    from novallm_jax.kv_cache import ContiguousKVCache
    from novallm_jax.model import forward

    cfg, params = model("phi3")
    prompt = prompt_of(40, 9)
    cache = ContiguousKVCache.create(cfg, 1, 40)
    ref = np.asarray(forward(params, jnp.asarray([prompt]), jnp.arange(40)[None], cache, cfg)[0])[0, -1]
    ex = Executor(
        cfg,
        params,
        ExecutorConfig(
            page_size=8,
            num_pages=16,
            max_model_len=64,
            ragged_steps=ragged,
            decode_batch_buckets=(1, 4),
            prefill_batch_buckets=(1,),
            prefill_len_buckets=(8,),
        ),
    )
    for prompt_len, close in ((40, True), (0, False)):
        kv = ex.new_cache()
        for start in range(0, 40, 8):
            chunk = [PrefillChunk(prompt[start : start + 8], start, [1, 2, 3, 4, 5], prompt_len=prompt_len)]
            logits, kv = (ex.ragged_step if ragged else ex.prefill)(kv, chunk)
        got = np.asarray(logits)[0]
        assert (np.abs(got - ref).max() <= 1e-4) == close, np.abs(got - ref).max()


def test_phi3_partial_rotary_is_refused_by_name():
    """Phi-4-mini's partial rotary (a share of each head rotated) is not implemented: refused, never ignored."""
    from novallm_jax.errors import UnsupportedArchitectureError

    base = build_hf_config("phi3").to_dict()
    for c in (
        {**base, "rope_parameters": {**base["rope_parameters"], "partial_rotary_factor": 0.75}},
        {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "partial_rotary_factor": 0.75},
    ):
        with pytest.raises(UnsupportedArchitectureError, match="partial_rotary_factor 0.75"):
            ModelConfig.from_hf(c)


@pytest.mark.parametrize("ragged", [True, False])
def test_a_long_phi3_prompt_prefilled_in_chunks_and_its_prefix_match_each_alone(tokenizer, ragged):
    """Through the engine, a Phi-3 prompt past the original 16 positions is prefilled in chunks of at most 16 tokens
    and still takes the long factors for every token (each row carries its prompt's length); a short prompt that
    shares its first tokens neither serves nor takes those pages (the prefix cache hashes longrope's choice)."""
    cfg, params = model("phi3")
    exec_cfg = dataclasses.replace(EXEC, prefill_len_buckets=(8, 16), token_buckets=(1, 4, 16), ragged_steps=ragged)
    eng = LLMEngine(cfg, params, tokenizer, EngineConfig(executor=exec_cfg, enable_prefix_caching=True))
    shared = prompt_of(16, 9)
    short, long = shared, shared + prompt_of(30, 10)  # 16 tokens: the short factors; 46: the long ones
    first = eng.add_request(short, greedy(6))
    eng.run_until_idle()
    second = eng.add_request(long, greedy(6))
    eng.run_until_idle()
    assert second.metrics.cached_prompt_tokens == 0  # the short prompt's pages were rotated with the short factors
    third = eng.add_request(long[:40] + [7], greedy(6))
    eng.run_until_idle()
    assert third.metrics.cached_prompt_tokens == 40  # a long prompt's pages serve another long prompt
    refs = greedy_generate(params, cfg, [short, long, long[:40] + [7]], 6)
    assert [r.output_ids for r in (first, second, third)] == refs
    assert eng.check_leaks() == []
