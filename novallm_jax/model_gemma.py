"""Gemma 2, 3 and 4 (text) as pure functions, built on model.py's linear, RoPE, attention and cache steps.

What differs from Llama, as transformers' modeling_gemma2/3/4.py compute it:
- RMSNorm in float32, times (1 + w) for Gemma 2/3 (w for Gemma 4), then cast; norms before and after attention and
  the MLP; Gemma 3/4 RMSNorm q and k per head (Gemma 4 also v, without a weight);
- the embedding times sqrt(hidden) in the model dtype; GeGLU with tanh-approximated GELU;
- attention scaled by query_pre_attn_scalar ** -0.5 (Gemma 4: 1), soft-capped scores (Gemma 2), soft-capped logits;
- sliding and global layers, each kind with its window and its RoPE table (`ModelConfig.layer_*`);
- Gemma 4: global layers with their own head size and K/V heads, keys as values there (`k_eq_v`), the last layers
  reading an earlier layer's K/V, per-layer embeddings (PLE) mixed in after each layer, a per-layer output scalar,
  and (enable_moe_block) a mixture of GeGLU experts beside each layer's MLP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from novallm_jax.config import ModelConfig
from novallm_jax.model import Params, attend, final_outputs, linear, rope, split_columns
from novallm_jax.moe import mix_experts


def gemma_norm(x: jax.Array, w: jax.Array | None, eps: float, offset: float) -> jax.Array:
    """Gemma's RMSNorm: in float32, times (offset + w) (no weight: times 1), cast back to x's dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if w is not None:
        xf = xf * (offset + w.astype(jnp.float32))
    return xf.astype(x.dtype)


def layer_widths(cfg: ModelConfig, i: int) -> tuple[int, int, int, int]:
    """(q, k, v, ffn) widths of layer i's projections; k and v are 0 where the layer has none (K/V sharing, and
    v where the keys are the values)."""
    g = cfg.gemma
    hd, kv = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
    shared = cfg.layer_kv_source(i) != i
    k = 0 if shared else kv * hd
    v = 0 if shared or (g.k_eq_v and g.layer_types[i] == "full_attention") else kv * hd
    ffn = cfg.intermediate_size * (2 if g.double_wide_mlp and i >= g.first_shared_layer() else 1)
    return cfg.num_heads * hd, k, v, ffn


def gemma_param_shapes(cfg: ModelConfig, dtype) -> Params:
    g, d = cfg.gemma, cfg.hidden_size
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
    layers = []
    for i in range(cfg.num_layers):
        q, k, v, f = layer_widths(cfg, i)
        hd = cfg.layer_head_dim(i)
        layer = {
            "attn_norm": s(d),
            "wqkv": s(d, q + k + v),
            "wo": s(q, d),
            "post_attn_norm": s(d),
            "mlp_norm": s(d),
            "w_gate_up": s(d, 2 * f),
            "w_down": s(f, d),
            "post_mlp_norm": s(d),
        }
        if cfg.qk_norm:
            layer["q_norm"] = s(hd)
            if k:
                layer["k_norm"] = s(hd)
        if g.num_experts:
            e, m = g.num_experts, g.moe_size
            layer.update(
                router=s(d, e),
                router_scale=s(d),
                expert_scale=s(e),
                experts_gate_up=s(e, d, 2 * m),
                experts_down=s(e, m, d),
                pre_moe_norm=s(d),
                post_mlp_norm_1=s(d),
                post_moe_norm=s(d),
            )
        if g.version >= 4:
            layer["layer_scalar"] = s(1)
            if g.per_layer_input_size:
                p = g.per_layer_input_size
                layer.update(ple_gate=s(d, p), ple_proj=s(p, d), ple_norm=s(d))
        layers.append(layer)
    params = {"embed": s(cfg.vocab_size, d), "layers": layers, "final_norm": s(d), "lm_head": s(d, cfg.vocab_size)}
    if g.per_layer_input_size:
        lp = cfg.num_layers * g.per_layer_input_size
        params.update(
            embed_per_layer=s(g.per_layer_vocab, lp), ple_model_proj=s(d, lp), ple_proj_norm=s(g.per_layer_input_size)
        )
    return params


def _gelu(x):
    return jax.nn.gelu(x, approximate=True)


def _scaled(a: jax.Array, scale: float) -> jax.Array:
    """a times a constant rounded to a's dtype first, as transformers' scaled embeddings do."""
    return a * jnp.asarray(np.float32(scale), a.dtype)


def per_layer_inputs(params: Params, tokens, x, cfg: ModelConfig) -> jax.Array:
    """Gemma 4's per-layer embeddings [B, T, L, P]: a token's own table row mixed with a projection of its embedding."""
    g = cfg.gemma
    p, n = g.per_layer_input_size, cfg.num_layers
    tok = _scaled(params["embed_per_layer"][tokens], p**0.5).reshape(*tokens.shape, n, p)
    proj = _scaled(linear(x, params["ple_model_proj"]), cfg.hidden_size**-0.5).reshape(*tokens.shape, n, p)
    proj = gemma_norm(proj, params["ple_proj_norm"], cfg.rms_norm_eps, g.norm_offset)
    return _scaled(proj + tok, 2.0**-0.5)


def gemma_layer(
    p: Params, x, positions, cache, layer: int, cfg: ModelConfig, rope_cs, page_table, per_layer_input=None
):
    g, eps = cfg.gemma, cfg.rms_norm_eps
    norm = lambda a, name: gemma_norm(a, p[name], eps, g.norm_offset)
    cos, sin = rope_cs[cfg.layer_rope(layer)]
    b, t, _ = x.shape
    q_w, k_w, v_w, _ = layer_widths(cfg, layer)
    hd = cfg.layer_head_dim(layer)
    qkv = linear(norm(x, "attn_norm"), p["wqkv"])
    q, k_cols, v_cols = split_columns(qkv, cfg, [q_w, q_w + k_w])  # k/v empty where the layer has none
    q = q.reshape(b, t, cfg.num_heads, hd)
    if cfg.qk_norm:
        q = norm(q, "q_norm")
    q = rope(q, cos, sin)
    k = v = None
    if k_w:  # else the layer reads an earlier layer's K/V
        k = k_cols.reshape(b, t, -1, hd)
        v = v_cols.reshape(b, t, -1, hd) if v_w else k
        if cfg.qk_norm:
            k = norm(k, "k_norm")
        k = rope(k, cos, sin)
        if g.version >= 4:
            v = gemma_norm(v, None, eps, 0.0)
    attn, cache = attend(q, k, v, positions, cache, layer, cfg, page_table)
    x = x + norm(linear(attn.astype(x.dtype), p["wo"]), "post_attn_norm")
    gate_up = linear(norm(x, "mlp_norm"), p["w_gate_up"])
    gate, up = split_columns(gate_up, cfg, [gate_up.shape[-1] // 2])
    mlp = linear(_gelu(gate) * up, p["w_down"])
    if g.num_experts:
        mlp = norm(mlp, "post_mlp_norm_1") + norm(gemma_experts(p, x, cfg), "post_moe_norm")
    x = x + norm(mlp, "post_mlp_norm")
    if per_layer_input is not None:
        h = _gelu(linear(x, p["ple_gate"])) * per_layer_input
        x = x + norm(linear(h, p["ple_proj"]), "ple_norm")
    if "layer_scalar" in p:
        x = x * p["layer_scalar"].astype(x.dtype)
    return x, cache


def gemma_experts(p: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Gemma 4's expert block on the layer's input x [B, T, D]: routed on x RMS-normalised, times a learned scale
    and hidden ** -1/2; softmax, top-k, renormalised, times each chosen expert's own scale; the experts see x through
    their own norm."""
    g, eps = cfg.gemma, cfg.rms_norm_eps
    xf = x.reshape(-1, x.shape[-1])
    r = gemma_norm(xf, None, eps, 0.0) * p["router_scale"] * np.float32(cfg.hidden_size**-0.5)
    probs = jax.nn.softmax(linear(r, p["router"]).astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, g.top_k_experts)
    weights = weights / weights.sum(axis=-1, keepdims=True) * p["expert_scale"].astype(jnp.float32)[experts]
    h = gemma_norm(xf, p["pre_moe_norm"], eps, g.norm_offset)
    return mix_experts(p, h, weights.astype(x.dtype), experts, g.num_experts, _gelu, cfg.model_shards).reshape(x.shape)


def gemma_forward(
    params: Params,
    tokens,
    positions,
    cache,
    cfg: ModelConfig,
    page_table,
    logits_index,
    logits_rows,
    rope_cs,
    hidden,
    argmax=False,
):
    """`model.forward` for Gemma (same arguments and results)."""
    g = cfg.gemma
    x = _scaled(params["embed"][tokens], cfg.hidden_size**0.5)
    pli = per_layer_inputs(params, tokens, x, cfg) if g.per_layer_input_size else None
    for i, p in enumerate(params["layers"]):
        x, cache = gemma_layer(
            p, x, positions, cache, i, cfg, rope_cs, page_table, None if pli is None else pli[:, :, i]
        )
    norm = lambda h: gemma_norm(h, params["final_norm"], cfg.rms_norm_eps, g.norm_offset)
    return final_outputs(x, norm, params["lm_head"], cache, logits_index, logits_rows, hidden, g.final_softcap, argmax)
