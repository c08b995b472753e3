"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE) as a pure function, the hook `model.decoder_layer` calls for layers
with a `router`.

Routing as transformers' modeling_mixtral.py / modeling_qwen3_moe.py compute it: router logits, softmax in float32,
top-k, the k weights renormalised to sum to 1 (Mixtral always, Qwen3-MoE when `norm_topk_prob`), then each token's
expert outputs weighted and summed in ascending expert order. Expert weights are stacked [E, in, out].

The expert FFNs run over the (token, expert) assignments only, never every expert for every token:
- fewer assignments than experts (a batch-1 decode step, say): each assignment's expert weights are gathered, so
  the step reads the active experts' bytes only;
- expert weights in GGUF block codes (`native.ExpertQuantLinear`): one native CPU kernel call per weight, which
  groups the assignments by expert and reads each active expert's codes once;
- otherwise the assignments are sorted by expert and run as grouped matmuls: `jax.lax.ragged_dot` on GPU/TPU,
  which lower it to a grouped kernel. XLA:CPU (jax 0.10) lowers ragged_dot to a masked dense dot over every group
  (measured: 32 groups of 8 rows x 512 x 512, 251 ms against 1.7 ms for one 256-row dot), so on CPU each expert's
  run is padded to whole blocks of rows and a loop runs one matmul per block with its expert's weights
  (`_blocked_ffn`; 8 experts of 1024 x 1024, top-2: 32 tokens 104 ms against ragged_dot's 314 ms, 256 tokens 99
  against 804 ms).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from novallm_jax.config import ModelConfig
from novallm_jax.kernels import native


def moe_layer_shapes(cfg: ModelConfig, dtype) -> dict:
    """The params of a layer's experts: router [D, E], gate/up [E, D, 2F] (gate then up), down [E, F, D]."""
    m, d = cfg.moe, cfg.hidden_size
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
    return {
        "router": s(d, m.num_experts),
        "experts_gate_up": s(m.num_experts, d, 2 * m.expert_size),
        "experts_down": s(m.num_experts, m.expert_size, d),
    }


def route(x: jax.Array, router: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(weights [N, k] in x's dtype, experts [N, k]) of tokens x [N, D]."""
    m = cfg.moe
    logits = jnp.dot(x, router, precision=_precision(router.dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, m.top_k)
    if m.norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights.astype(x.dtype), experts


def moe_mlp(p: dict, h: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The experts' output [B, T, D] for the normalised hidden states h [B, T, D]."""
    x = h.reshape(-1, h.shape[-1])
    weights, experts = route(x, p["router"], cfg)
    return mix_experts(p, x, weights, experts, cfg.moe.num_experts, jax.nn.silu, cfg.model_shards).reshape(h.shape)


def mix_experts(
    p: dict, x: jax.Array, weights: jax.Array, experts: jax.Array, num_experts: int, act, shards: int = 1
) -> jax.Array:
    """Tokens x [N, D] through their experts [N, k] (gated FFNs `act(gate) * up` of p's `experts_gate_up` and
    `experts_down`), weighted by `weights` [N, k] and summed: [N, D]. `shards`: the gate/up columns are grouped per
    tensor-parallel shard (`ModelConfig.model_shards`, sharding.py)."""
    n, k = experts.shape
    flat = experts.reshape(-1)  # assignment a = token a // k, its (a % k)-th expert
    tokens = jnp.arange(n * k) // k
    if isinstance(p["experts_gate_up"], native.ExpertQuantLinear):
        y = _coded_ffn(x[tokens], flat, p, act, shards)
    elif n * k < num_experts:
        y = _gathered_ffn(x[tokens], flat, p, act, shards)
    elif jax.default_backend() == "cpu":
        y = _blocked_ffn(x, tokens, flat, p, num_experts, act, shards)
    else:
        y = _grouped_ffn(x, tokens, flat, p, num_experts, act, shards)
    y = y.reshape(n, k, -1) * weights[..., None]
    # transformers adds each token's expert outputs to zeros in ascending expert order.
    order = jnp.argsort(experts, axis=-1)
    y = jnp.take_along_axis(y, order[..., None], axis=1)
    out = jnp.zeros_like(x)
    for j in range(k):
        out = out + y[:, j]
    return out


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _glu(gate_up: jax.Array, act, shards: int = 1) -> jax.Array:
    """act(gate) * up of gate_up [..., 2F], gate then up (within each of `shards` column groups)."""
    lead = gate_up.shape[:-1]
    gate, up = jnp.split(gate_up.reshape(*lead, shards, -1), 2, axis=-1)
    return (act(gate) * up).reshape(*lead, -1)


def _gathered_ffn(xa: jax.Array, experts: jax.Array, p: dict, act, shards: int = 1) -> jax.Array:
    """Expert FFN of each assignment (rows xa [A, D], experts [A]) through its own gathered weights."""
    prec = _precision(p["experts_down"].dtype)
    h = jnp.einsum("ad,adf->af", xa, p["experts_gate_up"][experts], precision=prec)
    return jnp.einsum("af,afd->ad", _glu(h, act, shards), p["experts_down"][experts], precision=prec)


def _coded_ffn(xa: jax.Array, experts: jax.Array, p: dict, act, shards: int = 1) -> jax.Array:
    """`_gathered_ffn` with expert weights in GGUF block codes, on the native CPU kernel: it groups the assignments
    by expert itself and reads each active expert's codes once."""
    h = p["experts_gate_up"].apply(xa, experts)
    return p["experts_down"].apply(_glu(h, act, shards), experts)


def _grouped_ffn(
    x: jax.Array, tokens: jax.Array, experts: jax.Array, p: dict, num_experts: int, act, shards: int = 1
) -> jax.Array:
    """Expert FFN of each assignment, the assignments sorted by expert and run as one grouped matmul per weight."""
    prec = _precision(p["experts_down"].dtype)
    order = jnp.argsort(experts, stable=True)
    sizes = jnp.bincount(experts, length=num_experts).astype(jnp.int32)
    xs = x[tokens[order]]
    h = jax.lax.ragged_dot(xs, p["experts_gate_up"], sizes, precision=prec)
    ys = jax.lax.ragged_dot(_glu(h, act, shards), p["experts_down"], sizes, precision=prec)
    return jnp.zeros_like(ys).at[order].set(ys)


def _blocked_ffn(
    x: jax.Array, tokens: jax.Array, experts: jax.Array, p: dict, num_experts: int, act, shards: int = 1
) -> jax.Array:
    """`_grouped_ffn` as XLA:CPU can run it: the assignments sorted by expert, each expert's run padded to whole
    blocks of rows, and a loop over the blocks, each one matmul with its expert's weights (read once per block; the
    blocks past the last run are skipped). FLOPs and reads follow the routed tokens, not the number of experts."""
    a = experts.shape[0]
    block = 8 if a <= 256 else 32
    blocks = -(-(a + num_experts * (block - 1)) // block)  # enough for every run padded
    order = jnp.argsort(experts, stable=True)
    sorted_e = experts[order]
    sizes = jnp.bincount(experts, length=num_experts)
    padded = -(-sizes // block) * block
    ends = jnp.cumsum(padded)
    slot = (ends - padded)[sorted_e] + jnp.arange(a) - (jnp.cumsum(sizes) - sizes)[sorted_e]  # sorted -> its row
    rows = jnp.zeros(blocks * block, jnp.int32).at[slot].set(tokens[order].astype(jnp.int32))
    first = jnp.arange(blocks) * block
    block_expert = jnp.minimum(jnp.searchsorted(ends, first, side="right"), num_experts - 1)
    used = first < ends[-1]
    prec = _precision(p["experts_down"].dtype)
    xb = x[rows].reshape(blocks, block, -1)

    def run(args):
        xblk, e, live = args

        def ffn(_):
            h = jnp.dot(xblk, p["experts_gate_up"][e], precision=prec)
            return jnp.dot(_glu(h, act, shards), p["experts_down"][e], precision=prec)

        return jax.lax.cond(live, ffn, lambda _: jnp.zeros_like(xblk), None)

    yb = jax.lax.map(run, (xb, block_expert, used)).reshape(blocks * block, -1)
    return jnp.zeros((a, x.shape[-1]), x.dtype).at[order].set(yb[slot])
