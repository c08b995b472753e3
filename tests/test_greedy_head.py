"""The greedy head (`native.ArgmaxHead`): a greedy row's token from an int8 copy of the LM head and the few exact
panels its bounds leave, the same token as the argmax of the full logits."""

from __future__ import annotations

import dataclasses

import gguf
import gguf.quants
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from novallm_jax.kernels import native
from novallm_jax.loading.gguf_quant import decode_blocks
from novallm_jax.sampling_params import SamplingParams
from tests import engine_fixtures
from tests.engine_fixtures import make_engine, skip_without_ragged_steps

pytestmark = pytest.mark.skipif(not native.available(), reason="the greedy head is a native CPU kernel")


def _head(kind: str, w: np.ndarray):
    """w [n, K] as the head of a `kind` file: float32 panels, float16 / bfloat16 bits, or block codes."""
    if kind == "F32":
        return native.PackedLinear.from_dense(w.T)
    if kind.startswith("Q"):
        raw = gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, kind))
        return native.QuantLinear.from_blocks(decode_blocks(raw, kind, w.shape))
    dtype = np.float16 if kind == "F16" else ml_dtypes.bfloat16
    return native.HalfLinear.from_bits(w.astype(dtype).view(np.uint16), kind == "BF16")


def _full_argmax(head, x):
    return np.asarray(jnp.argmax(jax.jit(lambda x: head.apply(x))(x), axis=-1))


def _greedy(head):
    greedy = native.ArgmaxHead.of(head)
    if isinstance(head, native.QuantLinear):  # the int8-dot layout: x rounded to int8, integer dot products
        if not native.int8_dot_available():
            pytest.skip("a block-coded head's approximation runs the int8-dot kernels (AVX2)")
        assert greedy.approx_kind == native._kind(head.with_int8_activations())
    else:  # an int8 copy
        assert greedy.approx_kind == -1 and greedy.codes.dtype == jnp.int8
    return greedy


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0"])
def test_argmax_equals_the_full_logits_argmax(kind):
    """Random rows, 1-8 at a time, against a head with tied columns (the first of equal logits wins), columns one
    rounding apart, a zero column and a vocabulary that is not a whole number of panels."""
    rng = np.random.default_rng(0)
    n, k = 1000, 64
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[700] = w[300]  # exact ties
    w[500] = w[200]
    w[500, 0] = np.nextafter(w[200, 0], np.float32(np.inf), dtype=np.float32)  # near ties
    w[999] = 0
    head = _head(kind, w)
    argmax = jax.jit(_greedy(head).argmax)
    for m in range(1, native.ARGMAX_ROWS + 1):
        for trial in range(40):
            x = rng.standard_normal((m, k)).astype(np.float32) * rng.choice([1e-3, 1.0, 30.0])
            if trial % 4 == 1:
                x[0] = 8 * np.asarray(head.apply(jnp.eye(k)))[:, 300]  # aims at the tie
            if trial % 4 == 2:
                x[-1] = 8 * np.asarray(head.apply(jnp.eye(k)))[:, 500]  # at the near tie
            if trial % 4 == 3:
                x[:] = 0  # every logit equal: column 0
            x = jnp.asarray(x)
            np.testing.assert_array_equal(np.asarray(argmax(x)), _full_argmax(head, x), err_msg=f"m={m} {trial}")


@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
def test_non_finite_rows_pick_what_argmax_picks(kind):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((300, 32)).astype(np.float32)
    head = _head(kind, w)
    greedy = _greedy(head)
    x = rng.standard_normal((4, 32)).astype(np.float32)
    x[1, 3] = np.nan
    x[2, 5] = np.inf
    x[3, 7] = -np.inf
    x = jnp.asarray(x)
    np.testing.assert_array_equal(np.asarray(jax.jit(greedy.argmax)(x)), _full_argmax(head, x))


def test_bounds_hold_and_heads_that_gain_nothing_have_no_copy():
    """|x . w_r - s_r (x . q_r)| <= |x| bound_r for the int8 copy, whose codes fit int8; a block-coded head's
    bounds are its columns' norms; heads with offsets, in int8-dot layouts, of XLA's dots or not finite get
    none."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((400, 96)) * rng.uniform(0.01, 10, (400, 1))).astype(np.float32)
    greedy = native.ArgmaxHead.of(native.PackedLinear.from_dense(w.T))
    codes = native.unpack(np.asarray(greedy.codes), 400).astype(np.float64)  # [K, n]
    scales = np.asarray(greedy.scales, np.float64)[:400]
    x = rng.standard_normal((50, 96))
    err = np.abs(x @ w.T.astype(np.float64) - (x @ codes) * scales)
    assert (err <= np.linalg.norm(x, axis=1, keepdims=True) * np.asarray(greedy.bounds)[:400]).all()
    assert np.abs(codes).max() <= 127
    bad = w.copy()
    bad[3, 4] = np.inf
    assert native.ArgmaxHead.of(native.PackedLinear.from_dense(bad.T)) is None
    if native.int8_dot_available():
        q8 = _head("Q8_0", w)
        norms = np.linalg.norm(q8.to_dense().astype(np.float64), axis=0)
        bounds = np.asarray(native.ArgmaxHead.of(q8).bounds)[:400]
        assert (bounds >= norms).all() and np.allclose(bounds, norms, rtol=1e-5)
    q41 = _head("Q4_1", w)  # offsets (m): the int8-dot bound does not cover them
    assert native.ArgmaxHead.of(q41) is None
    assert native.ArgmaxHead.of(_head("Q8_0", w).with_int8_activations()) is None  # int8 activations: nothing to gain
    assert native.ArgmaxHead.of(jnp.asarray(w.T)) is None  # XLA's dots: no native head


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    from novallm_jax.tokenizer import load_tokenizer

    return load_tokenizer(default_gguf)


def _generate(engine, prompts, params):
    reqs = [engine.add_request(p, params[i]) for i, p in enumerate(prompts)]
    engine.run_until_idle()
    return [list(r.output_ids) for r in reqs]


@pytest.mark.parametrize("ragged", [True, False])
def test_engine_greedy_tokens_are_those_of_the_full_logits(tokenizer, monkeypatch, ragged):
    """64 greedy tokens a request, alone, three together, and beside a sampled row (whose steps compute the
    logits), with the greedy head and without, in ragged and in decode steps: the same tokens; the greedy head
    served the all-greedy steps, and every page went back."""
    skip_without_ragged_steps()
    from novallm_jax.engine import core

    calls = []
    spy = core.sample_slots_argmax
    monkeypatch.setattr(core, "sample_slots_argmax", lambda *a: calls.append(1) or spy(*a))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, engine_fixtures.TINY.vocab_size, n).tolist() for n in (5, 17, 30, 9)]
    greedy = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=64, temperature=0.8, seed=5, ignore_eos=True)
    outputs = {}
    for on in (True, False):
        engine = make_engine(tokenizer, greedy_head=on, ragged_steps=ragged)
        assert engine.executor.argmax_rows == (native.ARGMAX_ROWS if on else 0)
        outputs[on] = [_generate(engine, prompts[:1], [greedy])[0], *_generate(engine, prompts[:3], [greedy] * 3)]
        outputs[on, "mixed"] = _generate(engine, prompts, [greedy] * 3 + [sampled])
        assert engine.check_leaks() == []
        if on:
            assert len(calls) >= 2 * 63  # alone and three together: every step after the first token
            calls.clear()
    assert outputs[True] == outputs[False]
    assert outputs[True, "mixed"] == outputs[False, "mixed"]
    assert outputs[True, "mixed"][:3] == outputs[True][1:]
    assert not calls  # the test's last engine had no greedy head


def test_argmax_fits_counts_the_logits_rows():
    skip_without_ragged_steps()
    from novallm_jax.engine.executor import Executor, PrefillChunk

    ex = Executor(engine_fixtures.TINY, engine_fixtures.tiny_params(), engine_fixtures.EXEC)
    one = PrefillChunk([5], 3, [1])
    assert ex.argmax_rows == native.ARGMAX_ROWS
    assert ex.argmax_fits([one] * 4) and ex.argmax_fits([one] * 16)  # 16 tokens and logits rows (EXEC.token_buckets)
    # 64 tokens, but at most a decode batch of logits rows (16)
    assert ex.argmax_fits([PrefillChunk(list(range(40)), 0, [1, 2, 3, 4, 5])])
    for ragged in (None, False):
        wide = Executor(
            engine_fixtures.TINY,
            engine_fixtures.tiny_params(),
            dataclasses.replace(engine_fixtures.EXEC, decode_batch_buckets=(1, 4, 16, 32), ragged_steps=ragged),
        )
        assert wide.argmax_fits([one] * 16) and not wide.argmax_fits([one] * 17)  # 32 logits rows
    off = Executor(
        engine_fixtures.TINY,
        engine_fixtures.tiny_params(),
        dataclasses.replace(engine_fixtures.EXEC, greedy_head=False),
    )
    assert off.argmax_rows == 0 and not off.argmax_fits([one])


def test_drafted_greedy_rows_verify_through_the_greedy_head(tokenizer, monkeypatch):
    """A greedy request drafting up to 8 tokens (from an oracle that knows plain decoding's output and spoils every
    third draft's last token): its verifying steps take their argmax from the greedy head, and its tokens equal plain
    decoding's without the head."""
    skip_without_ragged_steps()
    from novallm_jax.engine import core, speculative

    rows = []
    spy = core.sample_slots_argmax
    monkeypatch.setattr(core, "sample_slots_argmax", lambda tokens, *a: rows.append(tokens.shape[0]) or spy(tokens, *a))
    prompt = list(range(5, 29))
    plain = make_engine(tokenizer, greedy_head=False)
    want = _generate(plain, [prompt], [SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)])[0]
    calls = []

    def oracle(tokens, k, **_):
        done = len(tokens) - len(prompt)
        draft = list(want[done : done + k])
        calls.append(1)
        if draft and len(calls) % 3 == 0:
            draft[-1] = (draft[-1] + 1) % engine_fixtures.TINY.vocab_size
        return -1, tuple(draft)

    monkeypatch.setattr(speculative, "lookup", oracle)
    monkeypatch.setattr(speculative, "may_find", lambda tokens: True)
    # a token bucket of 9: steps verifying 8 drafted tokens, 9 logits rows
    engine = make_engine(
        tokenizer,
        max_draft_tokens=8,
        draft_step_tokens=9,
        decode_batch_buckets=(1, 2, 4, 8, 16),
        token_buckets=(1, 4, 9, 16, 64, 128, 256, 512),
    )
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, speculative=8)
    assert _generate(engine, [prompt], [params]) == [want]
    assert engine.counters["draft_tokens"] > engine.counters["accepted_tokens"] > 0
    assert max(rows) == 9  # the verifying steps went through the greedy head
    assert engine.check_leaks() == []
