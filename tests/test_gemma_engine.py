"""Gemma 2/3/4 through the engine: paged cache, the executor's CPU kernels, preemption and prefix caching, each request
giving what it gives alone (greedy_generate, which test_model_parity checks against transformers)."""

import dataclasses
import functools
import json
import math

import jax
import numpy as np
import pytest

from novallm_jax.config import ModelConfig
from novallm_jax.amp import MemoryPool
from novallm_jax.engine.engine import EngineConfig, LLMEngine
from novallm_jax.engine.plan import StepPlan
from novallm_jax.engine.prefix_cache import PrefixCache, page_hashes
from novallm_jax.kv_cache import NULL_PAGE
from novallm_jax.model import greedy_generate, init_params
from novallm_jax.sampling_params import SamplingParams
from tests.engine_fixtures import EXEC, skip_without_ragged_steps
from tests.hf_models import build_hf_config

GEMMAS = ["gemma2", "gemma3_text", "gemma4_text", "gemma4_moe"]


@functools.lru_cache(maxsize=None)
def gemma_model(family: str, window: int | None = None):
    """The parity test's tiny config with the SmolLM2 tokenizer's vocabulary (and `window`, if given, as its sliding
    window); random weights large enough that the greedy choices depend on the whole (windowed) context."""
    over = {} if window is None else {"sliding_window": window}
    cfg = ModelConfig.from_hf(
        {**build_hf_config(family).to_dict(), "vocab_size": 49152, "vocab_size_per_layer_input": 49152, **over}
    )
    params = init_params(cfg, jax.random.key(7))
    params = jax.tree.map(
        lambda a: a * 10 if a.ndim == 2 else a + 0.3 * np.sin(np.arange(a.size)).reshape(a.shape), params
    )
    params["lm_head"] = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return cfg, params


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    from novallm_jax.tokenizer import load_tokenizer

    return load_tokenizer(default_gguf)


def engine_for(family, tokenizer, window=None, **exec_over):
    cfg, params = gemma_model(family, window)
    return LLMEngine(
        cfg,
        params,
        tokenizer,
        EngineConfig(
            executor=dataclasses.replace(EXEC, **exec_over), preemption_mode="swap", enable_prefix_caching=True
        ),
    )


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

    old = dict(
        model_type="gemma3_text",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=1e6,
        rope_local_base_freq=1e4,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        sliding_window=512,
        query_pre_attn_scalar=16,
    )
    cfg = ModelConfig.from_hf(old)
    hf = transformers.Gemma3TextConfig(**{k: v for k, v in old.items() if k != "model_type"})
    assert cfg.gemma.layer_types == tuple(hf.layer_types)
    model = transformers.Gemma3ForCausalLM(hf)
    full, local = rope_inv_freqs(cfg)
    rot = model.model.rotary_emb
    np.testing.assert_allclose(full, rot.full_attention_inv_freq.numpy(), rtol=1e-6)
    np.testing.assert_allclose(local, rot.sliding_attention_inv_freq.numpy(), rtol=1e-6)


SMALL_PAGES = dict(page_size=4, max_model_len=128, page_table_buckets=None)  # pages of 4 tokens, tables of 4-32


def _held(pool, owner) -> int:
    return pool.stats().arenas[0].pages_per_owner.get(owner, 0)


@pytest.mark.parametrize("native", [None, False], ids=["native-ragged", "xla-padded"])
def test_gemma3_sliding_layer_pages_return_to_the_pool_once_behind_the_window(tokenizer, native):
    """A long Gemma 3 generation (window 8, pages of 4 tokens, 20-token prompts + 76 tokens: 12 windows): each
    request holds at most window / page_size + 1 pages of the sliding layers' group while its global pages grow with
    its length; the pages it held earlier went back to the pool; outputs as the reference decode and as the engine
    that keeps every page; the plans, window tables included, round-trip through JSON; nothing leaks. On the native
    kernels (ragged steps) and on XLA's attention (padded steps, which gathers the window table's pages only)."""
    if native is None:
        skip_without_ragged_steps()
    window, ps, new = 8, 4, 76
    cfg, params = gemma_model("gemma3_text", window)
    eng = engine_for("gemma3_text", tokenizer, window, **SMALL_PAGES, num_pages=96, native_kernels=native)
    assert eng.window_pool is not None and eng.executor.window == window
    assert eng.executor.ragged == (native is None)
    if native is False:  # the sliding layers' table spans what the window and a chunk reach, not the whole length
        assert eng.executor.window_table_width == math.ceil((window - 1 + 64) / ps) + 1 < 128 // ps
    plans = []
    schedule = eng.scheduler.schedule
    eng.scheduler.schedule = lambda: plans.append(schedule()) or plans[-1]
    prompts = [prompt_of(20, 11), prompt_of(23, 12)]
    reqs = [eng.add_request(p, greedy(new)) for p in prompts]
    first_pages, most_window = {}, 0
    while eng.has_work():
        eng.step()
        for r in reqs:
            if r.finished or r.num_computed <= len(r.prompt):  # decoding rows only: a prompt chunk needs its pages
                continue
            first_pages.setdefault(r.id, r.window_pages[0])
            assert _held(eng.window_pool, r.id) <= math.ceil((window - 1) / ps) + 1 == window // ps + 1
            most_window = max(most_window, _held(eng.window_pool, r.id))
            # Its global pages cover its whole length.
            assert _held(eng.pool, r.id) == math.ceil(r.num_computed / ps)
            if r.num_computed > 4 * window:  # the first window page is back in the pool, its entry the null page
                assert r.window_pages[0] == NULL_PAGE
                heap = eng.window_pool.router.default.heap
                assert r.id not in heap.owners(first_pages[r.id])
    assert most_window == window // ps + 1
    full_pages = [math.ceil((len(p) + new - 1) / ps) for p in prompts]  # the last token is never fed back
    assert eng.counters["window_pages_recycled"] >= sum(n - most_window for n in full_pages)
    assert max(a for r in reqs for a in [len(r.window_pages)]) == 0  # finished: nothing held
    refs = greedy_generate(params, cfg, prompts, new)
    assert [r.output_ids for r in reqs] == refs
    assert eng.check_leaks() == []
    eng.prefix_cache.clear()
    assert eng.pool.check_leaks() == [] and eng.window_pool.check_leaks() == []
    assert eng.window_pool.stats().arenas[0].owned == 0

    # The plans carry both page tables and serialise.
    rows = [r for p in plans for c in p.calls for r in c.rows]
    assert any(r.window_first > 0 for r in rows)
    assert all(StepPlan.from_dict(json.loads(json.dumps(p.to_dict()))) == p for p in plans)

    if native is False:
        return
    # The engine that keeps every page of every layer draws the same tokens.
    keep = engine_for("gemma3_text", tokenizer, window, **SMALL_PAGES, num_pages=96, window_kv_group=False)
    assert keep.window_pool is None
    again = [keep.add_request(p, greedy(new)) for p in prompts]
    keep.run_until_idle()
    assert [r.output_ids for r in again] == refs and keep.check_leaks() == []


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_gemma3_window_pages_through_preemption_and_the_prefix_cache(tokenizer, mode):
    """Requests preempted deep into generation (their first window pages already back in the pool) resume exactly;
    a prompt sharing a cached prefix reuses it with the window pages before the match point."""
    window = 8
    cfg, params = gemma_model("gemma3_text", window)
    eng = engine_for("gemma3_text", tokenizer, window, **SMALL_PAGES, num_pages=40)
    eng.scheduler.preemption_mode = mode
    behind = []  # per preemption: the victim's window pages already back in the pool
    preempt = eng.scheduler._preempt
    eng.scheduler._preempt = lambda r: behind.append(r.window_pages.count(NULL_PAGE)) or preempt(r)
    shared = prompt_of(16, 21)
    specs = [(prompt_of(18 + i, 30 + i), 44) for i in range(4)]
    reqs = [eng.add_request(p, greedy(m)) for p, m in specs]
    eng.run_until_idle()
    assert eng.counters["preemptions"] > 0 and max(behind) > 0
    for suffix in (prompt_of(5, 22), prompt_of(7, 23)):  # the second finds the first's 4 pages cached
        specs.append((shared + suffix, 20))
        reqs.append(eng.add_request(shared + suffix, greedy(20)))
        eng.run_until_idle()
    assert reqs[-1].metrics.cached_prompt_tokens == 16
    refs = greedy_generate(params, cfg, [p for p, _ in specs], 44)
    for req, (_, m), ref in zip(reqs, specs, refs):
        assert req.output_ids == ref[:m]
    assert eng.counters["window_pages_recycled"] > 0
    assert eng.check_leaks() == []
    eng.prefix_cache.clear()
    assert eng.pool.check_leaks() == [] and eng.window_pool.check_leaks() == []


def test_prefix_cache_matches_less_when_the_window_before_the_match_is_gone():
    """The rule: m cached pages are reused only if the window pages from (m * page_size - window + 1) // page_size
    to m are cached too; else fewer pages, down to none."""
    pool, window_pool = MemoryPool(num_pages=16), MemoryPool(num_pages=16)
    cache = PrefixCache(pool, 4, window_pool, window=8)
    hashes = page_hashes(list(range(20)), 4, 5)
    pages, window_pages = pool.allocate("a", 5), window_pool.allocate("a", 5)
    # Page 4's window page went back to the pool before the cache saw it (0 and 1 too).
    window_pool.free("a", [window_pages[i] for i in (0, 1, 4)])
    cached = [NULL_PAGE, NULL_PAGE, window_pages[2], window_pages[3], NULL_PAGE]
    cache.insert("a", hashes, pages, cached)
    got, got_window = cache.match("b", hashes)
    # 5 pages would need window pages 3 and 4; 4 pages need 2 and 3: reused.
    assert got == pages[:4] and got_window == [NULL_PAGE, NULL_PAGE] + window_pages[2:4]
    assert sorted(window_pool.pages_of("b")) == sorted(window_pages[2:4])
    cache.evict_window(5)  # "b" still holds them: nothing to evict
    assert cache.window_pages() == set(window_pages[2:4])
    pool.free_all("b"), window_pool.free_all("b"), pool.free_all("a"), window_pool.free_all("a")
    assert cache.evict_window(1) == 1  # the least recently used: page 2's
    assert cache.match("c", hashes) == ([], [])  # page 2's window page is gone: m = 4 and 3 fail, as do 2 and 1
    cache.clear()
    assert pool.check_leaks() == [] and window_pool.check_leaks() == []
