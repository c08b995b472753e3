"""The expert MLP's two paths (gathered weights for few tokens, grouped matmuls for many) against a per-token loop in
numpy, and what a batch-1 step reads: the active experts' weights only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from novallm_jax.config import ModelConfig
from novallm_jax.config_moe import MoeSpec
from novallm_jax.moe import moe_layer_shapes, moe_mlp

E, D, F = 8, 32, 24


def cfg_of(top_k, norm):
    return ModelConfig(
        model_type="mixtral",
        vocab_size=64,
        hidden_size=D,
        intermediate_size=F,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        moe=MoeSpec(E, top_k, F, norm, (True,)),
    )


def params_of(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {
        k: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32) for k, s in moe_layer_shapes(cfg, jnp.float32).items()
    }


def reference(p, x, cfg):
    """transformers' loop: softmax, top-k, (renormalise), each token's experts added in ascending expert order."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    out = np.zeros_like(x, np.float64)
    for t, row in enumerate(np.asarray(x, np.float64)):
        logits = row @ p["router"]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[: cfg.moe.top_k]
        w = probs[top] / (probs[top].sum() if cfg.moe.norm_topk_prob else 1.0)
        for e, we in sorted(zip(top, w)):
            gate, up = np.split(row @ p["experts_gate_up"][e], 2)
            out[t] += we * ((gate / (1 + np.exp(-gate)) * up) @ p["experts_down"][e])
    return out


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 40])  # 1-3 tokens: gathered weights (top-2: < 8 assignments)
@pytest.mark.parametrize("top_k,norm", [(2, False), (3, True)])
def test_expert_mlp_matches_per_token_loop(tokens, top_k, norm):
    cfg = cfg_of(top_k, norm)
    p = params_of(cfg)
    x = np.random.default_rng(tokens).normal(0, 1, (1, tokens, D)).astype(np.float32)
    got = np.asarray(jax.jit(moe_mlp, static_argnums=2)(p, jnp.asarray(x), cfg))[0]
    np.testing.assert_allclose(got, reference(p, x[0], cfg), rtol=1e-5, atol=1e-5)


def test_batch_one_step_reads_only_the_active_experts():
    """One token's step touches the stacked expert weights only through gathers of its k experts (and the timing
    of the compiled step, see benchmarks, follows the active bytes)."""
    cfg = cfg_of(2, False)
    p = params_of(cfg)
    jaxpr = jax.make_jaxpr(moe_mlp, static_argnums=2)(p, jnp.zeros((1, 1, D)), cfg).jaxpr
    leaves = jax.tree_util.tree_leaves_with_path(p)
    names = [jax.tree_util.keystr(k) for k, _ in leaves]
    stacks = [v for v, n in zip(jaxpr.invars, names) if "experts" in n]
    uses = [eqn for eqn in _all_eqns(jaxpr) if any(v is s for v in eqn.invars for s in stacks)]
    assert [e.primitive.name for e in uses] == ["gather", "gather"]
    assert {tuple(e.outvars[0].aval.shape) for e in uses} == {(2, D, 2 * F), (2, F, D)}  # k = 2 experts each


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in eqn.params.values():
            if hasattr(sub, "jaxpr"):  # a closed jaxpr (pjit, custom_jvp ...)
                yield from _all_eqns(sub.jaxpr)


@pytest.mark.parametrize("tokens", [5, 40, 200])  # 200 x 2 assignments: blocks of 32 rows
def test_the_three_ffn_paths_agree(tokens):
    """Gathered weights, grouped matmuls (ragged_dot, for GPU/TPU) and CPU's blocked runs give the same outputs per
    assignment, including experts that get no token."""
    from novallm_jax.moe import _blocked_ffn, _gathered_ffn, _grouped_ffn

    cfg = cfg_of(2, False)
    p = params_of(cfg)
    x = jnp.asarray(np.random.default_rng(tokens).normal(0, 1, (tokens, D)), jnp.float32)
    experts = jnp.asarray(np.random.default_rng(1).choice([0, 2, 3, 7], 2 * tokens), jnp.int32)
    rows = jnp.arange(2 * tokens) // 2
    want = np.asarray(_gathered_ffn(x[rows], experts, p, jax.nn.silu))
    # atol: float32 rounding of sums of unit-sized terms in another order (on a GPU the paths differ by up to 2.4e-6).
    np.testing.assert_allclose(
        np.asarray(_grouped_ffn(x, rows, experts, p, E, jax.nn.silu)), want, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(_blocked_ffn(x, rows, experts, p, E, jax.nn.silu)), want, rtol=1e-5, atol=1e-5
    )


def test_many_tokens_take_a_grouped_path():
    """No whole-stack dense dot: on CPU, blocked runs (a loop of dots with one expert's weights each); elsewhere
    ragged_dot."""
    cfg = cfg_of(2, False)
    jaxpr = jax.make_jaxpr(moe_mlp, static_argnums=2)(params_of(cfg), jnp.zeros((1, 4, D)), cfg).jaxpr
    names = [e.primitive.name for e in _all_eqns(jaxpr)]
    if jax.default_backend() == "cpu":
        assert "scan" in names and not any("ragged" in n for n in names)
    else:
        assert names.count("ragged_dot_general") == 2


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in eqn.params.values():
            if hasattr(sub, "jaxpr"):  # a closed jaxpr (pjit, custom_jvp ...)
                yield from _all_eqns(sub.jaxpr)
