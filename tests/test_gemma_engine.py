"""Gemma 2/3/4 through the engine: paged cache, the executor's CPU kernels, preemption and prefix caching, each request
giving what it gives alone (greedy_generate, which test_model_parity checks against transformers)."""

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

GEMMAS = ["gemma2", "gemma3_text", "gemma4_text", "gemma4_moe"]


@functools.lru_cache(maxsize=None)
def gemma_model(family: str):
    """The parity test's tiny config with the SmolLM2 tokenizer's vocabulary; random weights large enough that the
    greedy choices depend on the whole (windowed) context."""
    cfg = ModelConfig.from_hf({**build_hf_config(family).to_dict(), "vocab_size": 49152,
                               "vocab_size_per_layer_input": 49152})
    params = init_params(cfg, jax.random.key(7))
    params = jax.tree.map(lambda a: a * 10 if a.ndim == 2 else a + 0.3 * np.sin(np.arange(a.size)).reshape(a.shape),
                          params)
    params["lm_head"] = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return cfg, params


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    from novallm_jax.tokenizer import load_tokenizer

    return load_tokenizer(default_gguf)


def engine_for(family, tokenizer, **exec_over):
    cfg, params = gemma_model(family)
    return LLMEngine(cfg, params, tokenizer, EngineConfig(executor=dataclasses.replace(EXEC, **exec_over),
                                                          preemption_mode="swap", enable_prefix_caching=True))


def prompt_of(n, seed):
    return np.random.default_rng(seed).integers(3, 49152, n).tolist()


def greedy(n):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("family", GEMMAS)
def test_gemma_engine_with_preemption_and_prefix_cache_matches_each_alone(family, tokenizer):
    cfg, params = gemma_model(family)
    eng = engine_for(family, tokenizer, num_pages=24)  # 23 usable pages of 8 tokens: preemption
    shared = prompt_of(20, 1)
    specs = [(prompt_of(30 + 5 * i, 100 + i), 24) for i in range(5)] + [(shared + prompt_of(7, 2), 12)]
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


def test_gemma_windows_are_shorter_than_the_prompts():
    for family in GEMMAS:
        cfg, _ = gemma_model(family)
        windows = {cfg.layer_window(i) for i in range(cfg.num_layers)}
        assert windows == {4, None}, family  # sliding and global layers, the window well inside every prompt


def test_gemma4_kv_sharing_layers_hold_no_pages_of_their_own():
    from novallm_jax.kv_cache import PagedKVCache

    cfg, _ = gemma_model("gemma4_text")
    cache = PagedKVCache.create(cfg, num_pages=8, page_size=4)
    sources = [cfg.layer_kv_source(i) for i in range(cfg.num_layers)]
    assert sources == [0, 1, 2, 2, 1]  # the last two layers read layer 2's (sliding) and layer 1's (global) K/V
    for i, src in enumerate(sources):
        want = (8, 4, cfg.layer_kv_heads(i), cfg.layer_head_dim(i)) if src == i else (8, 4, 0, cfg.layer_head_dim(i))
        assert cache.k[i].shape == cache.v[i].shape == want
    assert cache.k[1].shape[2:] == (1, 32) and cache.k[0].shape[2:] == (2, 16)  # global layers' own heads


def test_gemma3_config_in_the_older_layout_reads_as_transformers_reads_it():
    """rope_theta, rope_local_base_freq and rope_scaling at the top level (as Gemma 3 4B-27B's config.json has them,
    no layer_types): the same layer kinds and RoPE frequencies as transformers derives."""
    import transformers

    from novallm_jax.config import rope_inv_freqs

    old = dict(model_type="gemma3_text", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6, rope_local_base_freq=1e4,
               rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window=512, query_pre_attn_scalar=16)
    cfg = ModelConfig.from_hf(old)
    hf = transformers.Gemma3TextConfig(**{k: v for k, v in old.items() if k != "model_type"})
    assert cfg.gemma.layer_types == tuple(hf.layer_types)
    model = transformers.Gemma3ForCausalLM(hf)
    full, local = rope_inv_freqs(cfg)
    rot = model.model.rotary_emb
    np.testing.assert_allclose(full, rot.full_attention_inv_freq.numpy(), rtol=1e-6)
    np.testing.assert_allclose(local, rot.sliding_attention_inv_freq.numpy(), rtol=1e-6)
