"""Paged KV cache and executor: equality with the contiguous reference, donation, bounded compiles."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from novallm_jax.config import ModelConfig
from novallm_jax.engine.executor import Executor, ExecutorConfig, PrefillChunk
from novallm_jax.kv_cache import ContiguousKVCache, PagedKVCache
from novallm_jax.model import forward, forward_jit, init_params, ragged_batch

PAGE = 8
PROMPTS = [[(7 * i + 3) % 200 + 1 for i in range(n)] for n in (5, 37, 18, 60)]


def tiny_config(**kw) -> ModelConfig:
    base = dict(
        model_type="llama",
        vocab_size=211,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
    )
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module", params=["llama", "mistral_window"])
def model(request):
    cfg = tiny_config(
        sliding_window=12 if request.param == "mistral_window" else None,
        model_type="mistral" if request.param == "mistral_window" else "llama",
    )
    return cfg, init_params(cfg, jax.random.key(0))


def scattered_page_tables(lengths, width, num_pages, seed=0):
    """Gives each sequence `width` distinct, shuffled pages (never page 0), so pages are not contiguous."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(1, num_pages))[: len(lengths) * width]
    return ids.reshape(len(lengths), width).astype(np.int32)


def test_paged_forward_equals_contiguous_for_ragged_batch(model):
    cfg, params = model
    tokens, positions, _ = ragged_batch(PROMPTS)
    ref, _ = forward(params, tokens, positions, ContiguousKVCache.create(cfg, 4, tokens.shape[1]), cfg)
    width = -(-tokens.shape[1] // PAGE)
    table = scattered_page_tables(PROMPTS, width, 64)
    got, _ = forward(params, tokens, positions, PagedKVCache.create(cfg, 64, PAGE), cfg, page_table=table)
    for i, p in enumerate(PROMPTS):
        assert np.abs(np.asarray(got)[i, : len(p)] - np.asarray(ref)[i, : len(p)]).max() <= 1e-5


def reference_decode(cfg, params, steps):
    """Contiguous-cache prefill + greedy decode; returns the per-step logits of each row."""
    tokens, positions, lengths = ragged_batch(PROMPTS)
    cache = ContiguousKVCache.create(cfg, len(PROMPTS), int(lengths.max()) + steps + 1)
    logits, cache = forward_jit(params, tokens, positions, cache, cfg, logits_index=jnp.asarray(lengths - 1))
    out, pos = [np.asarray(logits)], jnp.asarray(lengths)
    for _ in range(steps):
        nxt = jnp.argmax(logits, -1).astype(jnp.int32)
        logits, cache = forward_jit(params, nxt[:, None], pos[:, None], cache, cfg, logits_index=jnp.zeros_like(pos))
        out.append(np.asarray(logits))
        pos = pos + 1
    return out


def test_chunked_prefill_and_64_decode_steps_equal_contiguous(model):
    cfg, params = model
    steps = 64
    ref = reference_decode(cfg, params, steps)
    ecfg = ExecutorConfig(
        page_size=PAGE,
        num_pages=96,
        max_model_len=128,
        decode_batch_buckets=(4,),
        prefill_batch_buckets=(1, 4),
        prefill_len_buckets=(16,),
    )
    ex = Executor(cfg, params, ecfg)
    cache = ex.new_cache()
    tables = scattered_page_tables(PROMPTS, ecfg.max_pages_per_seq, ecfg.num_pages, seed=1)
    # Chunked prefill: prompts longer than the 16-token bucket go in several chunks, all rows at once.
    last_logits = [None] * len(PROMPTS)
    done = [0] * len(PROMPTS)
    while any(d < len(p) for d, p in zip(done, PROMPTS)):
        active = [i for i, p in enumerate(PROMPTS) if done[i] < len(p)]
        chunks = [PrefillChunk(PROMPTS[i][done[i] : done[i] + 16], done[i], tables[i]) for i in active]
        logits, cache = ex.prefill(cache, chunks)
        for j, i in enumerate(active):
            done[i] += len(chunks[j].tokens)
            last_logits[i] = np.asarray(logits[j])
    np.testing.assert_allclose(np.stack(last_logits), ref[0], atol=1e-5, rtol=0)
    pos = [len(p) for p in PROMPTS]
    for step in range(steps):
        nxt = ref[step].argmax(-1).tolist()
        logits, cache = ex.decode(cache, nxt, pos, tables)
        assert np.abs(np.asarray(logits) - ref[step + 1]).max() <= 1e-5, f"decode step {step}"
        pos = [p + 1 for p in pos]


def test_decode_donates_the_cache_in_place(model):
    cfg, params = model
    ex = Executor(
        cfg,
        params,
        ExecutorConfig(
            page_size=PAGE, num_pages=16, max_model_len=64, decode_batch_buckets=(2,), prefill_len_buckets=(16,)
        ),
    )
    cache = ex.new_cache()
    _, cache = ex.decode(cache, [1, 2], [0, 0], [[1], [2]])  # compile first
    before = [a.unsafe_buffer_pointer() for a in cache.k + cache.v]
    old = cache
    _, cache = ex.decode(cache, [3, 4], [1, 1], [[1], [2]])
    assert all(a.is_deleted() for a in old.k + old.v)
    assert [a.unsafe_buffer_pointer() for a in cache.k + cache.v] == before


def test_padded_logits_keep_the_bucket_rows(model):
    cfg, params = model
    ex = Executor(
        cfg,
        params,
        ExecutorConfig(
            page_size=PAGE,
            num_pages=16,
            max_model_len=64,
            decode_batch_buckets=(4,),
            prefill_batch_buckets=(2,),
            prefill_len_buckets=(16,),
        ),
    )
    cache = ex.new_cache()
    chunk = [PrefillChunk([5, 6, 7], 0, [1])]
    exact, cache = ex.prefill(cache, chunk)
    padded, cache = ex.prefill(cache, chunk, padded=True)
    assert exact.shape[0] == 1 and padded.shape[0] == 2
    np.testing.assert_array_equal(np.asarray(padded[:1]), np.asarray(exact))
    exact, cache = ex.decode(cache, [8, 9, 10], [3, 3, 3], [[1], [2], [3]])
    padded, cache = ex.decode(cache, [8, 9, 10], [3, 3, 3], [[1], [2], [3]], padded=True)
    assert exact.shape[0] == 3 and padded.shape[0] == 4
    np.testing.assert_array_equal(np.asarray(padded[:3]), np.asarray(exact))


def test_decode_rows_take_their_tokens_from_the_device(model):
    """Rows marked from_slot read last_tokens[slot] (an async engine's sampled tokens) instead of host tokens."""
    cfg, params = model
    ex = Executor(
        cfg,
        params,
        ExecutorConfig(
            page_size=PAGE, num_pages=16, max_model_len=64, decode_batch_buckets=(4,), prefill_len_buckets=(16,)
        ),
    )
    cache = ex.new_cache()
    _, cache = ex.prefill(cache, [PrefillChunk([5, 6, 7], 0, [1]), PrefillChunk([4, 3], 0, [2])])
    last = jnp.asarray([9, 0, 8, 0], jnp.int32)  # slot 2 drew 8, slot 0 drew 9
    host, cache = ex.decode(cache, [8, 9], [3, 2], [[1], [2]])
    fed, cache = ex.decode(cache, [0, 0], [3, 2], [[1], [2]], from_slots=[2, 0], last_tokens=last)
    np.testing.assert_array_equal(np.asarray(fed), np.asarray(host))
    with pytest.raises(ValueError, match=r"last_tokens has shape \(3,\); steps take \(4,\)"):
        ex.decode(cache, [0], [3], [[1]], from_slots=[0], last_tokens=last[:3])
    if ex.ragged:
        rows = [PrefillChunk([1, 2], 3, [1]), PrefillChunk([9], 2, [2])]
        host, cache = ex.ragged_step(cache, rows)
        rows[1] = PrefillChunk([0], 2, [2], from_slot=0)
        fed, cache = ex.ragged_step(cache, rows, last)
        np.testing.assert_array_equal(np.asarray(fed), np.asarray(host))


def test_ragged_steps_equal_contiguous(model):
    """Prompt chunks cut anywhere and decode rows, mixed in ragged steps, against the contiguous reference."""
    cfg, params = model
    ex = Executor(
        cfg,
        params,
        ExecutorConfig(
            page_size=PAGE, num_pages=64, max_model_len=96, decode_batch_buckets=(1, 4), prefill_len_buckets=(16, 32)
        ),
    )
    if not ex.ragged:
        pytest.skip("ragged steps need the native paged attention")
    extra = [[11, 12, 13], [21, 22, 23], [31, 32, 33], [41, 42, 43]]  # tokens decoded after each prompt
    seqs = [p + e for p, e in zip(PROMPTS, extra)]
    tokens, positions, _ = ragged_batch(seqs)
    ref, _ = forward(params, tokens, positions, ContiguousKVCache.create(cfg, 4, tokens.shape[1]), cfg)
    ref = np.asarray(ref)
    tables = scattered_page_tables(seqs, 12, 64).tolist()
    cuts = [[5], [20, 37], [7, 18], [2, 33, 60]]  # chunk ends of each prompt, one chunk per step
    done = [0] * 4
    cache = ex.new_cache()
    for step in range(6):
        batch, who = [], []
        for i, ends in enumerate(cuts):
            if step < len(ends):
                batch.append(PrefillChunk(seqs[i][done[i] : ends[step]], done[i], tables[i]))
            elif step - len(ends) < len(extra[i]):  # decode the next extra token
                batch.append(PrefillChunk([seqs[i][done[i]]], done[i], tables[i]))
            else:
                continue
            done[i] += len(batch[-1].tokens)
            who.append(i)
        logits, cache = ex.ragged_step(cache, batch[::-1])  # any order of rows
        logits = np.asarray(logits)
        for row, i in enumerate(who[::-1]):
            assert np.abs(logits[row] - ref[i, done[i] - 1]).max() <= 1e-5, (step, i)
    assert done == [len(s) for s in seqs]


def test_verify_steps_return_every_drafted_positions_logits(model):
    """Padded decode rows verifying drafts (`Executor.verify`, speculative decoding off ragged steps): after each
    prompt, rows of 1-5 tokens (one fed from the device), each returning its tokens' logits, row after row, against
    the contiguous reference."""
    cfg, params = model
    e = ExecutorConfig(
        page_size=PAGE,
        num_pages=64,
        max_model_len=96,
        decode_batch_buckets=(4,),
        prefill_batch_buckets=(4,),
        prefill_len_buckets=(64,),
        ragged_steps=False,
        max_draft_tokens=4,
    )
    ex = Executor(cfg, params, e)
    extra = [[11], [21, 22, 23], [31, 32, 33, 34, 35], [41, 42]]  # each row's last token, then its drafts
    seqs = [p + x for p, x in zip(PROMPTS, extra)]
    tokens, positions, _ = ragged_batch(seqs)
    ref, _ = forward(params, tokens, positions, ContiguousKVCache.create(cfg, 4, tokens.shape[1]), cfg)
    ref = np.asarray(ref)
    tables = scattered_page_tables(seqs, 12, 64).tolist()
    cache = ex.warmup(ex.new_cache())
    warm = ex.compile_count
    greedy = len(e.page_table_buckets) if ex.argmax_rows else 0  # the greedy head's decode steps, one per width
    assert warm == len(ex.warmup_shapes()) == len(ex.step_shapes()) + len(ex.verify_shapes()) + greedy
    _, cache = ex.prefill(cache, [PrefillChunk(p, 0, t) for p, t in zip(PROMPTS, tables)])
    rows = [PrefillChunk(x, len(p), t, logits=len(x)) for p, x, t in zip(PROMPTS, extra, tables)]
    rows[0] = PrefillChunk([0], len(PROMPTS[0]), tables[0], from_slot=2)  # its token: the sampler's for slot 2
    last = jnp.asarray([0, 0, extra[0][0], 0], jnp.int32)
    logits, cache = ex.verify(cache, rows[::-1], last)  # any order of rows
    assert logits.shape == (4 * 5, cfg.vocab_size) and ex.compile_count == warm
    at, logits = 0, np.asarray(logits)
    for i in range(3, -1, -1):
        for j in range(len(extra[i])):
            assert np.abs(logits[at] - ref[i, len(PROMPTS[i]) + j]).max() <= 1e-5, (i, j)
            at += 1
    with pytest.raises(ValueError, match="rows of 1 to 5 tokens"):
        ex.verify(cache, [PrefillChunk([1] * 6, 0, tables[0])])


@pytest.mark.parametrize("ragged", [False, True])
def test_100_requests_compile_nothing_beyond_warmup(ragged):
    cfg = tiny_config()
    params = init_params(cfg, jax.random.key(0))
    ecfg = ExecutorConfig(
        page_size=PAGE,
        num_pages=64,
        max_model_len=96,
        decode_batch_buckets=(1, 4),
        prefill_batch_buckets=(1,),
        prefill_len_buckets=(16, 32),
        ragged_steps=None if ragged else False,
    )  # None: ragged where the native kernels run
    ex = Executor(cfg, params, ecfg)
    if ragged and not ex.ragged:
        pytest.skip("ragged steps need the native paged attention")
    cache = ex.warmup(ex.new_cache())
    warm = ex.compile_count
    assert warm == len(ex.warmup_shapes())
    rng = np.random.default_rng(0)
    table = list(range(1, ecfg.max_pages_per_seq + 1))
    for _ in range(100):
        n = int(rng.integers(1, 70))
        prompt = rng.integers(1, cfg.vocab_size, n).tolist()
        batch = int(rng.integers(1, 5))
        if ragged:  # the prompt in pieces of any length, beside 0-3 decode rows
            cuts = sorted({0, n, *rng.integers(1, n + 1, 2).tolist()})
            for a, b in zip(cuts, cuts[1:]):
                rows = [PrefillChunk([1], n, table)] * int(rng.integers(0, 4))
                _, cache = ex.ragged_step(cache, [PrefillChunk(prompt[a:b], a, table)] + rows)
            continue
        for start in range(0, n, ecfg.max_chunk):
            _, cache = ex.prefill(cache, [PrefillChunk(prompt[start : start + ecfg.max_chunk], start, table)])
        _, cache = ex.decode(cache, [1] * batch, [n] * batch, [table] * batch)
    assert ex.compile_count == warm


def test_persistent_compilation_cache_skips_compiles_on_second_start(tmp_path):
    script = textwrap.dedent(f"""
        import jax
        from novallm_jax.engine.executor import Executor, ExecutorConfig, enable_compilation_cache
        from novallm_jax.model import init_params
        from tests.test_paged_executor import tiny_config
        enable_compilation_cache({str(tmp_path)!r})
        hits = []
        jax.monitoring.register_event_listener(
            lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
        cfg = tiny_config()
        ex = Executor(cfg, init_params(cfg, jax.random.key(0)), ExecutorConfig(
            page_size=8, num_pages=16, max_model_len=32, decode_batch_buckets=(1, 2), prefill_len_buckets=(16,)))
        ex.warmup(ex.new_cache())
        print("SHAPES", len(ex.step_shapes()), "HITS", len(hits))
    """)
    runs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    first, second = ([int(x) for x in r.split()[1::2]] for r in (r.strip().splitlines()[-1] for r in runs))
    assert first[1] == 0
    assert second[1] >= second[0]  # every step shape came from the cache
