"""The sampler draws from the exact distribution: 20,000 draws against a numpy reference (chi-square)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from novallm_jax.sampling import SamplingBatch, sample
from novallm_jax.sampling_params import SamplingParams

DRAWS = 20_000
VOCAB = 24
LOGITS = np.random.default_rng(1234).normal(size=VOCAB).astype(np.float32) * 1.5


def reference_distribution(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Textbook definitions, in float64: temperature, top-k, top-p (smallest prefix with mass >= p), min-p."""
    z = logits.astype(np.float64) / p.temperature
    keep = np.ones_like(z, dtype=bool)
    if p.top_k > 0:
        keep[np.argsort(-z)[p.top_k :]] = False
    if p.top_p < 1:
        probs = np.where(keep, np.exp(z - z.max()), 0.0)
        probs /= probs.sum()
        order = np.argsort(-probs)
        mass_above = np.cumsum(probs[order]) - probs[order]
        keep[order[mass_above >= p.top_p]] = False
    if p.min_p > 0:
        probs = np.where(keep, np.exp(z - z.max()), 0.0)
        keep &= probs >= p.min_p * probs.max()
    out = np.where(keep, np.exp(z - z.max()), 0.0)
    return out / out.sum()


def draw(p: SamplingParams, vary: str) -> np.ndarray:
    """DRAWS tokens in one call: one row per seed (step 0), or one seed over steps 0..DRAWS-1."""
    if vary == "seed":
        batch = SamplingBatch.from_params([dataclasses.replace(p, seed=s) for s in range(DRAWS)], VOCAB)
    else:
        batch = SamplingBatch.from_params([dataclasses.replace(p, seed=99)] * DRAWS, VOCAB)
        batch = batch.replace(steps=jnp.arange(DRAWS, dtype=jnp.int32))
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (DRAWS, VOCAB))
    return np.asarray(sample(logits, batch).tokens)


@pytest.mark.parametrize(
    "params, vary",
    [
        (SamplingParams(temperature=0.7), "seed"),
        (SamplingParams(temperature=1.0), "step"),
        (SamplingParams(top_k=5), "seed"),
        (SamplingParams(top_p=0.8), "seed"),
        (SamplingParams(min_p=0.1), "step"),
        (SamplingParams(temperature=1.3, top_k=12, top_p=0.9, min_p=0.05), "step"),
    ],
    ids=["temperature", "temperature-steps", "top_k", "top_p", "min_p", "combined"],
)
def test_draws_match_exact_distribution(params, vary):
    expected = reference_distribution(LOGITS, params)
    kept = expected > 0
    filtering = params.top_k > 0 or params.top_p < 1 or params.min_p > 0
    assert kept.sum() > 1 and (kept.sum() < VOCAB) == filtering  # the filters under test do remove tokens
    counts = np.bincount(draw(params, vary), minlength=VOCAB)
    assert counts[~kept].sum() == 0, "drew a token the filters remove"
    obs, exp = counts[kept], expected[kept] * DRAWS
    # Merge bins expected below 5 into one, as the chi-square approximation needs.
    small = exp < 5
    if small.any():
        obs = np.append(obs[~small], obs[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
    result = chisquare(obs, exp)
    assert result.pvalue > 1e-3, (counts, expected * DRAWS, result)
