"""The sampler's sort-free selection and its whole-batch fast paths against float64 sort-based references.

V=16384 gives 256 selection chunks, so the candidate set (64 chunks) is a real subset and both the candidate
and the whole-vocabulary searches run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from novallm_jax import sampling
from novallm_jax.sampling import SamplingBatch, sample
from novallm_jax.sampling_params import SamplingParams

V = 16384


def _reference_threshold(row: np.ndarray, top_k: int, top_p: float) -> float:
    """Sort-based, float64: the k-th largest logit; then the smallest logit whose mass strictly above is < top_p."""
    z = np.sort(row.astype(np.float64))[::-1]
    kth = z[top_k - 1] if 0 < top_k < len(z) else -np.inf
    if top_p >= 1:
        return kth
    survives = z >= kth
    w = np.where(survives, np.exp(z - z[0]), 0.0)
    mass_above = np.cumsum(w) - w
    kept = int(np.sum(survives & (mass_above < top_p * w.sum())))
    return max(kth, z[kept - 1])


def _logits(kind: str, rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, V)).astype(np.float32)
    if kind == "peaked":
        x = x * 2.0
        x[:, rng.integers(0, V, 20)] += 10.0
    elif kind == "flat":
        x = x * 0.3
    elif kind == "tied":  # few distinct values, as bf16 or quantized logits have
        x = np.round(x * 2.0) / 2.0
    elif kind == "masked":  # -inf entries (bans, filters) and a -0.0
        x = x * 2.0
        x[:, rng.integers(0, V, 3000)] = -np.inf
        x[:, 7] = -0.0
    return x


ROWS = [
    (0, 0.9),
    (1, 1.0),
    (5, 1.0),
    (50, 1.0),
    (64, 1.0),
    (65, 1.0),
    (300, 1.0),
    (0, 0.5),
    (0, 0.99),
    (50, 0.9),
    (300, 0.95),
    (0, 0.999),
]


_threshold = jax.jit(sampling._top_k_top_p_threshold)
# float32 sums differ from float64 ones by ~1e-6 of the total: where the top-p cut lies that close to a token's
# boundary, the reference allows either side.
_MASS_TOLERANCE = 1e-5


@pytest.mark.parametrize("kind", ["peaked", "flat", "tied", "masked"])
def test_threshold_equals_sort_based_reference(kind):
    x = _logits(kind, len(ROWS), seed=["peaked", "flat", "tied", "masked"].index(kind))
    top_k = jnp.array([k for k, _ in ROWS], jnp.int32)
    top_p = jnp.array([p for _, p in ROWS], jnp.float32)
    got = np.asarray(_threshold(jnp.asarray(x), top_k, top_p, jnp.ones(len(ROWS), bool)))
    for row, (k, p) in enumerate(ROWS):
        p = float(np.float32(p))
        if p >= 1:
            assert got[row] == _reference_threshold(x[row], k, p), (kind, k)
        else:  # a larger top_p cuts deeper: a lower threshold
            hi = _reference_threshold(x[row], k, p * (1 - _MASS_TOLERANCE))
            lo = _reference_threshold(x[row], k, min(p * (1 + _MASS_TOLERANCE), 1 - 1e-9))
            assert lo <= got[row] <= hi and got[row] in x[row], (kind, k, p, got[row], lo, hi)
    # Each row gets the same threshold alone as next to rows that take the whole-vocabulary search.
    for row in (0, 2, 6, 9):
        order = np.roll(np.arange(len(ROWS)), -row)
        again = _threshold(jnp.asarray(x[order]), top_k[order], top_p[order], jnp.ones(len(ROWS), bool))
        assert float(again[0]) == got[row]
        inactive = _threshold(jnp.asarray(x), top_k, top_p, jnp.arange(len(ROWS)) == row)
        assert float(inactive[row]) == got[row] and np.all(np.isneginf(np.delete(np.asarray(inactive), row)))


def test_key_is_monotone_and_round_trips():
    tiny = np.finfo(np.float32).tiny
    values = np.array([-np.inf, -3e38, -1.0, -tiny, -0.0, 0.0, tiny, 1.0, 3e38, np.inf], np.float32)
    keys = np.asarray(sampling._key(jnp.asarray(values)))
    distinct = [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert np.all(np.diff(keys[distinct]) > 0) and keys[4] == keys[5] == 0
    np.testing.assert_array_equal(np.asarray(sampling._from_key(jnp.asarray(keys)))[distinct], values[distinct])


def test_top_k_cut_at_zero_keeps_every_zero():
    # Cuts at 0: the search compares with bounds near -0.0 and denormals, which XLA:CPU flushes to zero.
    x = np.array([[-1.0, 0.0, -0.0, 2.0, -2.0, 0.0, 1.0, -1e-40, 3.0] + [-5.0] * 119], np.float32)
    flushed = np.where(np.abs(x) < np.finfo(np.float32).tiny, 0.0, x)  # -1e-40 counts as a zero
    for k in (4, 5, 6, 7):  # 3 positives, then 4 zeros
        got = _threshold(jnp.asarray(x), jnp.array([k], jnp.int32), jnp.ones(1), jnp.ones(1, bool))
        assert float(got[0]) == _reference_threshold(flushed[0], k, 1.0) == 0.0


@pytest.mark.parametrize("vocab", [64, 1000, V])
def test_argmax_matches_jnp_argmax(vocab):
    rng = np.random.default_rng(vocab)
    x = rng.normal(size=(6, vocab)).astype(np.float32)
    x[1] = np.round(x[1])  # ties: the first maximum wins
    x[2] = -np.inf
    x[3, vocab // 2] = x[3, -1] = 50.0
    x[4, -1] = 99.0  # in the padded last chunk when vocab % 64
    got = np.asarray(sampling._argmax(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))


def test_top_logprobs_from_candidate_chunks_match_full_top_k():
    x = _logits("tied", 4, seed=3)
    batch = SamplingBatch.from_params([SamplingParams(temperature=0)] * 4, V)
    out = sample(jnp.asarray(x), batch, num_top_logprobs=20)
    raw = jax.nn.log_softmax(jnp.asarray(x), axis=-1)
    ref_vals, ref_ids = jax.lax.top_k(raw, 20)
    np.testing.assert_array_equal(np.asarray(out.top_ids), np.asarray(ref_ids))  # ties broken by token id
    np.testing.assert_array_equal(np.asarray(out.top_logprobs), np.asarray(ref_vals))
    np.testing.assert_array_equal(np.asarray(out.logprobs), np.asarray(raw)[np.arange(4), np.argmax(x, -1)])


def _tokens(params, x, prompts=None):
    batch = SamplingBatch.from_params(params, V, prompt_token_ids=prompts)
    return np.asarray(sample(jnp.asarray(x), batch).tokens)


def test_fast_paths_give_the_general_path_tokens():
    x = _logits("peaked", 6, seed=11)
    greedy = [SamplingParams(temperature=0)] * 5
    sampled = SamplingParams(top_p=0.9, seed=4)
    penalized = SamplingParams(temperature=0, repetition_penalty=1.3)
    all_greedy = _tokens(greedy + [None], x)  # argmax only
    np.testing.assert_array_equal(all_greedy, np.argmax(x, axis=-1))
    with_draw = _tokens(greedy + [sampled], x)  # the draw branch runs for the batch
    with_penalty = _tokens(greedy + [penalized], x, prompts=[None] * 5 + [[1, 2, 3]])  # penalties run
    np.testing.assert_array_equal(with_draw[:5], all_greedy[:5])
    np.testing.assert_array_equal(with_penalty[:5], all_greedy[:5])
    # A sampled row draws the same token whether or not the batch needs penalties or the full-vocabulary search.
    flat = _logits("flat", 1, seed=12)[0]
    x2 = np.stack([x[5], flat, x[0]])
    alone = _tokens([sampled], x[5:6])[0]
    mixed = _tokens([sampled, SamplingParams(top_p=0.95, seed=1), penalized], x2, prompts=[None, None, [4, 5]])
    assert mixed[0] == alone
