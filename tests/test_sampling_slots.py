"""`sample_slots` (the engine's sampler over running rows only) against `sample` + `update_counts` on the full batch.

The reference samples the chosen slots' rows as a batch of their own with `sample`, which the other sampling tests
check against exact distributions and transformers; `update_counts` on the whole slot batch gives the state to
expect. Tokens, logprobs and every field of the advanced state must agree exactly, step after step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from novallm_jax.sampling import SamplingBatch, plain_greedy, sample, sample_slots, sample_slots_greedy, update_counts
from novallm_jax.sampling_params import SamplingParams as P

V = 1024
NUM_SLOTS = 8
ROWS = 4  # the row bucket of every call below: one compile per num_top_logprobs
EOS = (2,)
SLOT_PARAMS = {
    0: P(temperature=0.0, seed=10),
    1: P(temperature=0.9, seed=11, logprobs=0),
    2: P(top_k=20, top_p=0.8, seed=12),
    3: P(
        temperature=0.7,
        repetition_penalty=1.3,
        frequency_penalty=0.4,
        presence_penalty=0.2,
        logit_bias={5: 3.0, 9: -100.0},
        seed=13,
    ),
    4: P(min_tokens=3, stop_token_ids=[7], min_p=0.1, seed=14, logprobs=3),
    5: P(temperature=0.0, presence_penalty=1.5, seed=15),
    7: P(temperature=1.2, top_k=5, seed=2**40 + 3),
}  # slot 6 stays empty; every seed is fixed, so that two batches built from these agree


def _logits(rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, V)).astype(np.float32) * 2.0
    x[:, rng.integers(0, V, 6)] += 6.0  # a few strong candidates, some of them penalized or banned tokens
    x[:, [2, 5, 7, 9]] += 4.0
    return x


def _batch() -> SamplingBatch:
    rng = np.random.default_rng(1)
    params = [SLOT_PARAMS.get(i) for i in range(NUM_SLOTS)]
    prompts = [rng.integers(0, V, 12).tolist() for _ in range(NUM_SLOTS)]
    outputs = [[5, 5, 30] if i == 3 else None for i in range(NUM_SLOTS)]  # slot 3 resumes with 3 tokens
    return SamplingBatch.from_params(params, V, prompt_token_ids=prompts, output_token_ids=outputs, eos_token_ids=EOS)


def _rows(batch: SamplingBatch, slots: list[int]) -> SamplingBatch:
    return jax.tree.map(lambda a: a[np.asarray(slots)], batch)


# (slots of the call's rows, -1 = padding; num_top_logprobs)
STEPS = [
    ([3, 0, 4, -1], 0),
    ([7, 2, 1, 5], 0),
    ([4, 3, -1, -1], 20),
    ([0, 5, 2, 7], 0),  # no row wants logprobs: they are not computed
    ([1, 4, 3, 0], 20),
    ([3, 2, 4, 7], 0),
]


def test_sample_slots_matches_sample_and_update_counts_step_by_step():
    batch, ref = _batch(), _batch()
    for step, (slots, n_top) in enumerate(STEPS):
        logits = _logits(ROWS, step)
        valid = [i for i, s in enumerate(slots) if s >= 0]
        live = [slots[i] for i in valid]
        out, batch = sample_slots(jnp.asarray(logits), jnp.asarray(slots, jnp.int32), batch, num_top_logprobs=n_top)
        # Padding rows take the empty slot 6 in the reference, so that it has one shape (and compile) too.
        want = sample(jnp.asarray(logits), _rows(ref, [s if s >= 0 else 6 for s in slots]), num_top_logprobs=n_top)
        want = jax.tree.map(lambda a: np.asarray(a)[valid], want)
        tokens = np.asarray(out.tokens)[valid]
        np.testing.assert_array_equal(tokens, want.tokens, err_msg=f"step {step}")
        asked = any(SLOT_PARAMS[s].logprobs is not None for s in live)
        # Raw log-softmax in float64 (summation order may move float32 results by an ulp).
        raw = logits[valid].astype(np.float64)
        raw = raw - raw.max(-1, keepdims=True)
        raw = raw - np.log(np.exp(raw).sum(-1, keepdims=True))
        if n_top or asked:
            np.testing.assert_allclose(np.asarray(out.logprobs)[valid], raw[np.arange(len(valid)), tokens], rtol=1e-5)
        else:
            np.testing.assert_array_equal(np.asarray(out.logprobs), 0.0)
        np.testing.assert_array_equal(np.asarray(out.top_ids)[valid], want.top_ids)
        np.testing.assert_allclose(np.asarray(out.top_logprobs)[valid], -np.sort(-raw, -1)[:, :n_top], rtol=1e-5)
        placed = np.full(NUM_SLOTS, -1, np.int32)
        placed[live] = tokens
        ref = update_counts(ref, jnp.asarray(placed))
        for name in ref.__dataclass_fields__:
            np.testing.assert_array_equal(
                np.asarray(getattr(batch, name)), np.asarray(getattr(ref, name)), err_msg=f"{name} after step {step}"
            )
    # The draws were real: penalties and bans acted (slot 3's bias of -100 bans token 9; slot 4 saw no stop token
    # before its third token).
    assert int(ref.output_counts[3, 9]) == 0 and int(ref.steps[4]) == 4


def test_padding_rows_change_nothing_and_mixes_share_one_compile():
    batch = _batch()
    before = {name: np.asarray(getattr(batch, name)) for name in batch.__dataclass_fields__}
    compiled = sample_slots._cache_size()
    _, batch = sample_slots(jnp.asarray(_logits(ROWS, 9)), jnp.full(ROWS, -1, jnp.int32), batch)
    for name, value in before.items():
        np.testing.assert_array_equal(np.asarray(getattr(batch, name)), value, err_msg=name)
    for slots in ([0, 1, 2, 3], [5, 4, -1, 7], [3, -1, -1, -1], [1, 2, 7, 6]):  # any mix of parameters
        _, batch = sample_slots(jnp.asarray(_logits(ROWS, 10)), jnp.asarray(slots, jnp.int32), batch)
    assert sample_slots._cache_size() - compiled <= 1  # 0 when another test compiled this shape first


def test_flags_follow_the_parameters():
    batch = SamplingBatch.from_params(
        [
            None,
            P(),
            P(logit_bias={3: 0.0}),
            P(logit_bias={3: -1.0}),
            P(repetition_penalty=1.1),
            P(frequency_penalty=-0.5),
            P(presence_penalty=0.1),
            P(logprobs=0),
            P(min_tokens=4, logprobs=2),
        ],
        V,
    )
    np.testing.assert_array_equal(np.asarray(batch.penalized), [0, 0, 0, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(batch.wants_logprobs), [0, 0, 0, 0, 0, 0, 0, 1, 1])
    cleared = batch.set_row(4, P()).clear_row(8)
    np.testing.assert_array_equal(np.asarray(cleared.penalized), [0, 0, 0, 1, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(cleared.wants_logprobs), [0, 0, 0, 0, 0, 0, 0, 1, 0])


def test_update_rows_sets_and_clears_as_set_row_and_clear_row_do():
    """One call for a step's slot updates: rows set and cleared in order, a later row for a slot winning."""
    params = [P(temperature=0.7, seed=1), P(repetition_penalty=1.2, logprobs=1, seed=2), None, P(min_tokens=2, seed=3)]
    fresh = lambda: SamplingBatch.from_params([P(top_k=5, seed=9)] * 6, V)
    want = fresh().set_row(1, params[0], prompt_token_ids=[3, 4], output_token_ids=[7], eos_token_ids=[2])
    want = want.set_row(3, params[3], prompt_token_ids=[5], eos_token_ids=[2]).clear_row(4)
    rows = [(3, params[1], [1], []), (1, params[0], [3, 4], [7]), (4, params[2], [], []), (3, params[3], [5], [])]
    got = fresh().update_rows(rows, eos_token_ids=[2])
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    same = fresh()
    for a, b in zip(jax.tree.leaves(fresh()), jax.tree.leaves(same.update_rows([], pad_to=4))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # padding rows only: nothing changes


def test_rejects_bad_num_top_logprobs():
    with pytest.raises(ValueError, match="num_top_logprobs"):
        sample_slots(jnp.zeros((1, V)), jnp.zeros(1, jnp.int32), _batch(), num_top_logprobs=21)


def test_greedy_rows_sampler_equals_the_general_one():
    """`sample_slots_greedy` on `plain_greedy` rows: the tokens, outputs and state `sample_slots` gives, step after step;
    the parameters that need the general sampler are not plain greedy."""
    plain = [P(temperature=0.0, seed=3), P(temperature=1e-6, seed=4, top_k=3), P(temperature=0.0, stop=["x"], seed=5)]
    assert all(plain_greedy(p) for p in plain)
    assert not any(plain_greedy(SLOT_PARAMS[s]) for s in (1, 2, 3, 4, 5, 7))
    assert not plain_greedy(P(temperature=0.0, logprobs=0)) and not plain_greedy(P(temperature=0.0, min_tokens=1))
    assert not plain_greedy(P(temperature=0.0, logit_bias={3: 1.0}))
    params = [plain[i % 3] if i in (0, 2, 5) else None for i in range(NUM_SLOTS)]
    outputs = [[5, 9] if i == 2 else None for i in range(NUM_SLOTS)]
    general = SamplingBatch.from_params(params, V, output_token_ids=outputs, eos_token_ids=EOS)
    greedy = SamplingBatch.from_params(params, V, output_token_ids=outputs, eos_token_ids=EOS)
    for step, slots in enumerate(([2, 0, -1, 5], [5, -1, -1, -1], [0, 2, 5, -1])):
        logits = jnp.asarray(_logits(ROWS, 100 + step))
        want, general = sample_slots(logits, np.asarray(slots, np.int32), general, num_top_logprobs=0)
        got, greedy = sample_slots_greedy(logits, np.asarray(slots, np.int32), greedy)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(greedy), jax.tree.leaves(general)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
