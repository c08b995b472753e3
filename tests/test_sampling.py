"""The batched sampler against transformers' logits processors, numpy references and exact expectations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from novallm_jax.sampling import (
    SamplingBatch,
    apply_penalties,
    process_logits,
    sample,
    seed_key_data,
    update_counts,
)
from novallm_jax.sampling_params import SamplingParams

V = 64


def _logits(rows: int, vocab: int = V, seed: int = 0, scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(rows, vocab)) * scale).astype(np.float32)


def _ids(rng: np.random.Generator, n: int, vocab: int = V) -> list[int]:
    return rng.integers(0, vocab, size=n).tolist()


def test_penalties_match_transformers_and_openai_formula():
    rng = np.random.default_rng(1)
    logits = _logits(4)
    prompts = [_ids(rng, 10) for _ in range(4)]
    outputs = [_ids(rng, 12) for _ in range(4)]
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.7, logit_bias={3: 5.0, 9: -100.0, "40": 0.5}),
        SamplingParams(presence_penalty=0.8, frequency_penalty=0.3),
        SamplingParams(repetition_penalty=1.5, presence_penalty=-1.0, frequency_penalty=1.2, logit_bias={7: 2.0}),
    ]
    batch = SamplingBatch.from_params(params, V, prompt_token_ids=prompts, output_token_ids=outputs)
    got = np.asarray(apply_penalties(jnp.asarray(logits), batch))
    for row, p in enumerate(params):
        scores = torch.from_numpy(logits[row : row + 1].copy())
        input_ids = torch.tensor([prompts[row] + outputs[row]])
        bias = p.logit_bias or {}
        if bias:  # single-token sequences: the bias applies at every step, as OpenAI's logit_bias does
            scores = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])(input_ids, scores)
        # Independent numpy reference of the same bias.
        ref = logits[row].astype(np.float64).copy()
        for t, b in bias.items():
            ref[t] += b
        np.testing.assert_allclose(scores.numpy()[0], ref, rtol=1e-6)
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(input_ids, scores)
        # OpenAI: logit - count * frequency - (count > 0) * presence, over output tokens only.
        counts = np.bincount(outputs[row], minlength=V)
        expected = scores.numpy()[0] - counts * p.frequency_penalty - (counts > 0) * p.presence_penalty
        np.testing.assert_allclose(got[row], expected, rtol=1e-6, atol=1e-5)
    assert not np.allclose(got, logits)  # each row was changed


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    eos = 5
    params = [
        SamplingParams(min_tokens=2, stop_token_ids=[11]),
        SamplingParams(min_tokens=2, ignore_eos=True),
        SamplingParams(),
    ]
    batch = SamplingBatch.from_params(params, V, eos_token_ids=[eos])
    logits = jnp.asarray(_logits(3))
    for step in range(3):
        out = np.asarray(apply_penalties(logits, batch))
        banned = np.isneginf(out)
        expect = np.zeros_like(banned)
        if step < 2:
            expect[0, [eos, 11]] = True
        np.testing.assert_array_equal(banned, expect)
        batch = update_counts(batch, jnp.array([1, 1, 1]))


def _hf_filtered(row: np.ndarray, p: SamplingParams) -> np.ndarray:
    scores = torch.from_numpy(row[None].copy())
    warpers = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k > 0:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0:
        warpers.append(MinPLogitsWarper(p.min_p))
    for w in warpers:
        scores = w(None, scores)
    return scores.numpy()[0]


@pytest.mark.parametrize("vocab", [64, 1000])
def test_filters_keep_the_same_tokens_as_transformers_warpers(vocab):
    params = [
        SamplingParams(temperature=0.7),
        SamplingParams(top_k=7),
        SamplingParams(top_p=0.6),
        SamplingParams(top_p=0.97, temperature=1.5),  # deep nucleus: past the partial sort when vocab=1000
        SamplingParams(min_p=0.2),
        SamplingParams(temperature=1.2, top_k=20, top_p=0.8, min_p=0.05),
        SamplingParams(top_k=600, top_p=0.99),  # top-k deeper than the partial sort
        SamplingParams(temperature=0.5, top_k=3, min_p=0.5),
    ]
    logits = _logits(len(params), vocab, seed=vocab, scale=1.0)
    logits[:, :5] += 4.0  # a few strong candidates, as language models have
    batch = SamplingBatch.from_params(params, vocab)
    got = np.asarray(process_logits(jnp.asarray(logits), batch))
    for row, p in enumerate(params):
        ref = _hf_filtered(logits[row], p)
        np.testing.assert_array_equal(np.isfinite(got[row]), np.isfinite(ref), err_msg=str(p))
        kept = np.isfinite(ref)
        np.testing.assert_allclose(got[row][kept], ref[kept], rtol=1e-6)
        if p.top_k or p.top_p < 1 or p.min_p:
            assert 0 < kept.sum() < vocab
    # Rows that fit the partial sort give the same cut alone as next to rows that need the full sort.
    for row in range(len(params)):
        alone = process_logits(jnp.asarray(logits[row : row + 1]), SamplingBatch.from_params([params[row]], vocab))
        np.testing.assert_array_equal(np.asarray(alone)[0], got[row])


def test_greedy_rows_are_argmax_in_mixed_batch_with_one_compile():
    vocab, rows = 77, 6  # a shape no other test uses, so the compile count starts at zero for it
    logits = jnp.asarray(_logits(rows, vocab, seed=3))
    before = sample._cache_size()
    mixes = [
        [SamplingParams(temperature=0)] * rows,
        [SamplingParams(temperature=0), SamplingParams(top_p=0.5, seed=1), None] * 2,
        [SamplingParams(top_k=3, seed=2), SamplingParams(temperature=0, repetition_penalty=1.2)] * 3,
        [SamplingParams(min_p=0.3, seed=4, logit_bias={1: 3.0}), SamplingParams(temperature=0)] * 3,
    ]
    for mix in mixes:
        batch = SamplingBatch.from_params(mix, vocab, prompt_token_ids=[[1, 2, 3]] * rows)
        tokens = np.asarray(sample(logits, batch).tokens)
        processed = np.asarray(apply_penalties(logits, batch))
        for row, p in enumerate(mix):
            if p is None or p.greedy:
                assert tokens[row] == np.argmax(processed[row])
            if p is None or p == SamplingParams(temperature=0):
                assert tokens[row] == np.argmax(np.asarray(logits)[row])
            else:  # a sampled row draws a token its filters keep
                assert np.isfinite(np.asarray(process_logits(logits, batch))[row, tokens[row]])
    assert sample._cache_size() - before == 1


def _run(logits_per_step, batch, slot, steps):
    tokens = []
    for step in range(steps):
        out = sample(logits_per_step(step), batch)
        batch = update_counts(batch, out.tokens)
        tokens.append(int(out.tokens[slot]))
    return tokens


def test_seeded_row_is_batch_invariant():
    vocab, steps = 512, 16
    target = SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.2, presence_penalty=0.5, seed=1234)
    others = [
        SamplingParams(temperature=0),
        SamplingParams(top_k=300, seed=1),  # forces the full-sort path for the whole batch
        SamplingParams(top_p=0.99, temperature=2.0, seed=2),
        SamplingParams(min_p=0.1, seed=3),
        None,
        SamplingParams(frequency_penalty=2.0, seed=1234),  # same seed, different params
        SamplingParams(top_k=5, temperature=0.3),
        SamplingParams(logit_bias={0: 100}, seed=5),
    ]
    prompt = [1, 2, 3, 4]
    target_logits = [_logits(1, vocab, seed=100 + s, scale=3.0)[0] for s in range(steps)]

    alone = SamplingBatch.from_params([target], vocab, prompt_token_ids=[prompt])
    expected = _run(lambda s: jnp.asarray(target_logits[s][None]), alone, 0, steps)
    assert len(set(expected)) > 3  # it really samples

    for slot in (0, 4, 8):
        rows = others[:slot] + [target] + others[slot:]
        batch = SamplingBatch.from_params(rows, vocab, prompt_token_ids=[prompt] * len(rows))

        def logits_at(s, slot=slot, rows=len(rows)):
            x = _logits(rows, vocab, seed=1000 + s, scale=3.0)
            x[slot] = target_logits[s]
            return jnp.asarray(x)

        assert _run(logits_at, batch, slot, steps) == expected, f"slot {slot}"


def test_logprobs_come_from_raw_logits():
    logits = _logits(3, seed=7)
    params = [
        SamplingParams(temperature=0.5, logit_bias={4: 10.0}, repetition_penalty=2.0, seed=1),
        SamplingParams(temperature=0),
        SamplingParams(top_k=2, seed=9),
    ]
    batch = SamplingBatch.from_params(params, V, prompt_token_ids=[[1, 2]] * 3)
    out = sample(jnp.asarray(logits), batch, num_top_logprobs=5)
    raw = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
    tokens = np.asarray(out.tokens)
    np.testing.assert_allclose(np.asarray(out.logprobs), raw[np.arange(3), tokens], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.top_ids), np.argsort(-raw, axis=-1)[:, :5])
    np.testing.assert_allclose(np.asarray(out.top_logprobs), -np.sort(-raw, axis=-1)[:, :5], rtol=1e-5)
    assert sample(jnp.asarray(logits), batch).top_ids.shape == (3, 0)


def test_seed_key_matches_jax_random_key():
    for seed in (0, 1, 12345, 2**32 - 1):
        np.testing.assert_array_equal(seed_key_data(seed), np.asarray(jax.random.key_data(jax.random.key(seed))))
    assert not np.array_equal(seed_key_data(2**32), seed_key_data(0))
    np.testing.assert_array_equal(seed_key_data(-1), [0xFFFFFFFF, 0xFFFFFFFF])


def _assert_same(a: SamplingBatch, b: SamplingBatch) -> None:
    for field in dataclasses.fields(SamplingBatch):
        np.testing.assert_array_equal(
            np.asarray(getattr(a, field.name)), np.asarray(getattr(b, field.name)), field.name
        )


def test_update_counts_set_row_and_clear_row():
    rng = np.random.default_rng(5)
    p = [SamplingParams(seed=i, repetition_penalty=1.1, logit_bias={i: 1.0}, min_tokens=1) for i in range(4)]
    batch = SamplingBatch.from_params(p, V, eos_token_ids=[0])
    history = [[], [], [], []]
    for _ in range(5):
        tokens = rng.integers(-1, V, size=4)  # -1: the slot produced no token this step
        batch = update_counts(batch, jnp.asarray(tokens))
        for row, t in enumerate(tokens):
            if t >= 0:
                history[row].append(int(t))
    # Counts and steps equal a batch rebuilt from the generated tokens (a resumed request).
    _assert_same(batch, SamplingBatch.from_params(p, V, output_token_ids=history, eos_token_ids=[0]))

    new = SamplingParams(top_k=3, presence_penalty=1.0, seed=77)
    batch = batch.set_row(2, new, prompt_token_ids=[9, 9, 10], output_token_ids=[4], eos_token_ids=[0])
    expected_params, expected_out = p[:2] + [new] + p[3:], history[:2] + [[4]] + history[3:]
    prompts = [None, None, [9, 9, 10], None]
    expected = SamplingBatch.from_params(
        expected_params, V, prompt_token_ids=prompts, output_token_ids=expected_out, eos_token_ids=[0]
    )
    _assert_same(batch, expected)

    batch = batch.clear_row(1)
    expected_params[1], expected_out[1] = None, []
    _assert_same(
        batch,
        SamplingBatch.from_params(
            expected_params, V, prompt_token_ids=prompts, output_token_ids=expected_out, eos_token_ids=[0]
        ),
    )
