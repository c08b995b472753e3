"""Embedding requests through the engine's steps: batched with generation requests, in pages of the pool, through
preemption and the prefix cache. Their embeddings equal the prefill-only forward's (which tests/test_embeddings.py
holds to transformers), the generation requests beside them give the outputs they give alone, and no page is left
behind."""

from __future__ import annotations

import numpy as np
import pytest

from novallm_jax.embeddings import hidden_states
from novallm_jax.engine.request import FinishReason
from novallm_jax.errors import InvalidRequestError
from novallm_jax.sampling_params import SamplingParams
from tests.engine_fixtures import TINY, make_engine, tiny_params

COMMON = list(range(100, 116))  # two full pages of 8 tokens: prefix-cache hits for the prompts that start with it
GENERATE = [COMMON + [200 + i] * (3 + i) for i in range(4)]
EMBED = [
    ("mean", [300 + (7 * i) % 500 for i in range(70)]),  # longer than the largest chunk: pooled over several steps
    ("last", COMMON + [401, 402, 403]),  # its first two pages come from the prefix cache
    ("mean", COMMON + [404, 405]),  # every token's state is needed: it computes the cached pages again
    ("last", [7]),
    ("mean", COMMON),
]
PARAMS = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    from novallm_jax.tokenizer import load_tokenizer

    return load_tokenizer(default_gguf)


def _reference() -> np.ndarray:
    states = hidden_states(tiny_params(), TINY, [ids for _, ids in EMBED])
    return np.stack([s[-1] if how == "last" else s.mean(axis=0) for (how, _), s in zip(EMBED, states)])


@pytest.mark.parametrize(("ragged", "preemption"), [(True, "recompute"), (False, "swap")])
def test_embedding_requests_batched_with_generation(tokenizer, ragged, preemption):
    alone = make_engine(tokenizer, ragged_steps=ragged)
    want = [alone.add_request(p, PARAMS) for p in GENERATE]
    alone.run_until_idle()
    alone.close()

    # 16 pages of 8 tokens (one is the null page) for requests that need up to 6 and 9 each: some are preempted.
    engine = make_engine(tokenizer, num_pages=16, preemption_mode=preemption, ragged_steps=ragged)
    warm = engine.add_request(COMMON + [499], PARAMS)  # fills the prefix cache with COMMON's pages
    engine.run_until_idle()
    prefilled = engine.counters["prefill_tokens"]
    gen = [engine.add_request(p, PARAMS) for p in GENERATE[:2]]
    emb = [engine.add_request(ids, pooling=how) for how, ids in EMBED]
    gen += [engine.add_request(p, PARAMS) for p in GENERATE[2:]]
    outs = {r.id: [] for r in emb}
    while engine.has_work():
        for out in engine.step():
            if out.request_id in outs:
                outs[out.request_id].append(out)

    assert [r.output_ids for r in gen] == [r.output_ids for r in want]
    assert warm.finish_reason is FinishReason.LENGTH
    got = []
    for r in emb:
        (out,) = outs[r.id]  # one output, the final one
        assert out.finished and out.finish_reason is FinishReason.STOP and out.token_ids == []
        assert out.embedding.dtype == np.float32 and out.embedding.shape == (TINY.hidden_size,)
        got.append(out.embedding)
    np.testing.assert_allclose(np.stack(got), _reference(), rtol=1e-4, atol=1e-4)
    # The embedding prompts ran in the steps: all their tokens but the cached pages of the "last" one (mean pooling
    # recomputes them); more if a preempted one ran again.
    embedded = sum(len(ids) for _, ids in EMBED) - len(COMMON)
    assert engine.counters["prefill_tokens"] - prefilled >= embedded + sum(map(len, GENERATE)) - 4 * len(COMMON)
    assert any(r.metrics.preemptions for r in emb) and any(r.metrics.preemptions for r in gen)
    assert [r.metrics.cached_prompt_tokens for r in emb[1:3]] == [len(COMMON), 0]
    assert engine.check_leaks() == [] and all(s is None for s in engine.slots)
    engine.close()


def test_embedding_requests_are_checked(tokenizer):
    engine = make_engine(tokenizer, max_model_len=64)
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request([1, 2], pooling="max")
    assert info.value.param == "pooling"
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request([1] * 65, pooling="last")
    assert info.value.param == "prompt"
    r = engine.add_request([1] * 64, pooling="last")  # the whole context: nothing is generated after it
    engine.run_until_idle()
    assert r.embedding is not None and engine.check_leaks() == []
    engine.close()


def test_many_inputs_go_in_waves_the_queue_holds(tokenizer):
    from novallm_jax.llm import LLM

    ids = [[5 + i, 6, 7 + 3 * i] for i in range(9)]
    with LLM.from_engine(make_engine(tokenizer, max_queue=4)) as llm:  # waves of 2 requests
        got = llm.embed(ids, pooling="mean", normalize=False)
        assert llm.engine.check_leaks() == []
    want = np.stack([s.mean(axis=0) for s in hidden_states(tiny_params(), TINY, ids)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
