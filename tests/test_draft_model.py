"""Speculative decoding with a draft model: greedy outputs equal plain decoding, sampled ones follow the target.

The same model as its own draft tests the plumbing (its draft K/V must be right for every draft to be accepted);
a small random model with the target's vocabulary is a deliberately poor draft (almost every draft rejected).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from novallm_jax.engine.engine import EngineConfig, LLMEngine
from novallm_jax.errors import InvalidRequestError
from novallm_jax.kv_cache import ContiguousKVCache
from novallm_jax.model import forward, init_params
from novallm_jax.sampling_params import SamplingParams
from tests.engine_fixtures import EXEC, TINY, skip_without_ragged_steps, tiny_params

POOR = dataclasses.replace(TINY, num_layers=1, hidden_size=32, intermediate_size=64, head_dim=8)


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    from novallm_jax.tokenizer import load_tokenizer

    return load_tokenizer(default_gguf)


def _engine(tokenizer, cfg, params, draft=None, max_queue=4096, **exec_over):
    config = EngineConfig(executor=dataclasses.replace(EXEC, **exec_over), max_queue=max_queue)
    return LLMEngine(cfg, params, tokenizer, config, draft=draft)


def _run(eng, specs):
    reqs = [eng.add_request(p, sp) for p, sp in specs]
    eng.run_until_idle()
    assert eng.check_leaks() == []
    assert eng.drafter is None or eng.drafter.requests() == set()
    return [r.output_ids for r in reqs]


@pytest.mark.parametrize("ragged_steps", [None, False])
def test_greedy_outputs_equal_plain_decoding(tokenizer, ragged_steps):
    """Rows drafting 1..8 tokens beside a plain row, prompts sharing prefix-cache pages, a pool small enough to
    preempt: every output is the plain engine's over 64 tokens, with the target as its own draft (every draft
    accepted) and with a poor draft (rejections, rejected pages returned); the target in ragged steps, and in padded
    ones (`Executor.verify`), the draft in ragged steps of its own."""
    skip_without_ragged_steps()
    small = dict(decode_batch_buckets=(1, 2, 4, 8, 16), num_pages=40, draft_step_tokens=128, ragged_steps=ragged_steps)
    rng = np.random.default_rng(1)
    base = rng.integers(3, TINY.vocab_size, 16).tolist()
    prompts = [base + rng.integers(3, TINY.vocab_size, 3 + i).tolist() for i in range(9)]
    greedy = lambda k: SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, speculative=k)
    want = _run(_engine(tokenizer, TINY, tiny_params(), **small), [(p, greedy(0)) for p in prompts])
    poor = (POOR, init_params(POOR, jax.random.key(7)))
    for draft in ((TINY, tiny_params()), poor):
        eng = _engine(tokenizer, TINY, tiny_params(), draft, max_draft_tokens=8, **small)
        assert _run(eng, [(p, greedy(k)) for k, p in enumerate(prompts)]) == want
        c = eng.counters
        assert c["preemptions"] > 0 and c["draft_tokens"] > 0
        if draft is poor:
            assert c["accepted_tokens"] < c["draft_tokens"] / 4
        else:
            assert c["accepted_tokens"] == c["draft_tokens"]  # the draft's K/V was right at every step


def test_sampling_follows_the_target_with_a_poor_draft(tokenizer):
    """20,000 requests at temperature 0.8 on a tiny-vocab target, 3 tokens each, drafting with a poor draft model
    (drafts drawn from its q, verified by min(1, p/q) and residual draws): the tokens are chi-square tested against
    the target's exact sequential distribution, and the acceptance rate against the rule's sum min(p, q)."""
    skip_without_ragged_steps()
    v, n, temperature = 8, 20000, 0.8
    cfg = dataclasses.replace(TINY, vocab_size=v)
    params = jax.tree.map(lambda a: a * 3 if a.ndim == 2 else a, init_params(cfg, jax.random.key(3)))
    # A deliberately poor draft: its output head is the target's with every token's column moved 3 tokens on, so it
    # puts its mass where the target does not, and most of its drafts (drawn from its own q) are rejected.
    draft_params = {**params, "lm_head": jnp.roll(params["lm_head"], 3, axis=1)}
    draft = (cfg, draft_params)
    buckets = dict(decode_batch_buckets=(1, 4, 16, 64), token_buckets=(4, 16, 64, 256), num_pages=200)
    buckets["draft_step_tokens"] = 256  # every row drafts, 64 at a time
    eng = _engine(tokenizer, cfg, params, draft, max_queue=n, max_draft_tokens=2, **buckets)
    prompt = [1, 5, 3, 6]
    sp = lambda i: SamplingParams(temperature=temperature, seed=i, max_tokens=3, ignore_eos=True, speculative=2)
    got = np.array(_run(eng, [(prompt, sp(i)) for i in range(n)]))
    c = eng.counters

    # The target's exact distribution of (x1, x2, x3), from full forwards over every context.
    def probs(contexts, weights=params):
        t = jnp.asarray(contexts)
        pos = jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape)
        logits, _ = forward(weights, t, pos, ContiguousKVCache.create(cfg, len(contexts), t.shape[1]), cfg)
        return np.asarray(jax.nn.softmax(logits[:, -1] / temperature))

    p1 = probs([prompt])[0]
    p2 = probs([prompt + [a] for a in range(v)])
    p3 = probs([prompt + [a, b] for a in range(v) for b in range(v)]).reshape(v, v, v)
    # Each request drafts once (its second token), drawn from the draft's q; the rule keeps it with probability
    # sum_x min(p(x), q(x)) given the first token: the acceptance rate is that, within 4 sigma.
    q2 = probs([prompt + [a] for a in range(v)], draft_params)
    accept = float(np.sum(p1 * np.minimum(p2, q2).sum(axis=-1)))
    assert c["draft_tokens"] == n and accept < 0.7  # a third or more rejected: the residual draws are tested too
    assert abs(c["accepted_tokens"] / n - accept) < 4 * np.sqrt(accept * (1 - accept) / n)
    joint = (p1[:, None, None] * p2[:, :, None] * p3).reshape(-1).astype(np.float64)
    expected = joint / joint.sum() * n
    observed = np.bincount(got[:, 0] * v * v + got[:, 1] * v + got[:, 2], minlength=v**3)
    keep = expected > 5  # chi-square needs populated cells; the rest are pooled
    f_obs = np.append(observed[keep], observed[~keep].sum())
    f_exp = np.append(expected[keep], expected[~keep].sum())
    assert chisquare(f_obs, f_exp).pvalue > 1e-3


def test_a_draft_must_share_the_vocabulary(tokenizer):
    other = dataclasses.replace(POOR, vocab_size=1000)
    with pytest.raises(InvalidRequestError, match="vocabulary") as e:
        _engine(tokenizer, TINY, tiny_params(), (other, init_params(other, jax.random.key(0))), max_draft_tokens=2)
    assert e.value.param == "draft_model"
