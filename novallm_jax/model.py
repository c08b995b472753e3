"""The Llama-family decoder as pure functions of a params pytree.

One implementation covers Llama 2/3.x, Mistral (sliding window), Qwen2 (q/k/v biases), Qwen3 (q/k RMSNorm) and SmolLM2
(tied embeddings), with GQA/MQA. Weights are stored in the layout the matmul wants, `[in, out]`; q/k/v and gate/up are
fused. Layers are a Python list (unrolled under `jit`): on XLA:CPU this decodes ~2.7x faster than `lax.scan`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from novallm_jax.config import LongRopeTables, ModelConfig, rope_inv_freqs
from novallm_jax.kernels import native
from novallm_jax.kv_cache import ContiguousKVCache, PagedKVCache, with_layer

Params = dict[str, Any]
KVCache = ContiguousKVCache | PagedKVCache
_MASKED = -1e30  # finite, so a fully masked (padding) query yields uniform weights instead of NaN


def param_shapes(cfg: ModelConfig, dtype=jnp.float32) -> Params:
    """The params pytree as `jax.ShapeDtypeStruct`s: one description for init, loading checks and restore."""
    if cfg.gemma is not None:
        from novallm_jax.model_gemma import gemma_param_shapes  # model_gemma builds on this module's functions

        return gemma_param_shapes(cfg, dtype)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv = cfg.q_size + 2 * cfg.kv_size
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
    layer = {
        "attn_norm": s(d),
        "wqkv": s(d, qkv),
        "wo": s(cfg.q_size, d),
        "mlp_norm": s(d),
        "w_gate_up": s(d, 2 * f),
        "w_down": s(f, d),
    }
    if cfg.attention_bias:
        layer["bqkv"] = s(qkv)
    if cfg.qk_norm:
        layer["q_norm"] = s(hd)
        layer["k_norm"] = s(hd)
    layers = [dict(layer) for _ in range(cfg.num_layers)]
    if cfg.moe is not None:
        from novallm_jax.moe import moe_layer_shapes

        for i, sparse in enumerate(cfg.moe.sparse_layers):
            if sparse:
                del layers[i]["w_gate_up"], layers[i]["w_down"]
                layers[i].update(moe_layer_shapes(cfg, dtype))
    return {
        "embed": s(cfg.vocab_size, d),
        "layers": layers,
        "final_norm": s(d),
        # Kept even when tied: `h @ embed.T` makes XLA:CPU transpose the table on every call.
        "lm_head": s(d, cfg.vocab_size),
    }


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random params (normal, std 0.02; norms at 1), e.g. for tests and benchmarks."""
    shapes = param_shapes(cfg, dtype)
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    out = []
    norm_one = 0.0 if cfg.gemma is not None and cfg.gemma.norm_offset else 1.0  # Gemma 2/3 norms scale by 1 + w
    for (path, sds), k in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if "norm" in name or "layer_scalar" in name:
            out.append(jnp.full(sds.shape, norm_one, dtype))
        else:
            out.append((0.02 * jax.random.normal(k, sds.shape, jnp.float32)).astype(dtype))
    params = jax.tree.unflatten(treedef, out)
    if cfg.tie_word_embeddings:
        params["lm_head"] = params["embed"].T
    return params


def _precision(dtype):
    # float32 weights mean float32 arithmetic: XLA:GPU would otherwise run float32 dots as TF32 (~1e-3 relative
    # error). XLA:CPU always computes float32 exactly, and half-precision dots keep their default.
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def linear(x: jax.Array, w: jax.Array | native.PackedLinear | native.QuantLinear) -> jax.Array:
    """x [..., K] @ w [K, N]; a `PackedLinear` or `QuantLinear` (CPU, see kernels/native.py) runs the native kernel."""
    if isinstance(w, native.NATIVE_LINEAR):
        return w.apply(x)
    return jnp.matmul(x, w, precision=_precision(w.dtype))


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def rope_tables_per_kind(positions, inv_freqs, xp=jnp, extents=None) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """`rope_tables` for each table of `rope_inv_freqs(cfg)` (layer i uses entry `cfg.layer_rope(i)`)."""
    return tuple(rope_tables(positions, inv, xp, extents) for inv in inv_freqs)


def rope_tables(positions, inv_freq: np.ndarray | LongRopeTables, xp=jnp, extents=None) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, 1, hd] of each position's rotation angles (rotate-half layout), shared by every layer.

    `xp=np` computes them on the host: the executor passes them to its jitted steps, because computed inside, XLA:CPU
    fuses cos and sin into each layer's rope and recomputes them for every query head of every layer (3.7-5.8 ms of
    a 32-row SmolLM2 decode step in a profile, 0.5 ms with host tables); an optimization barrier does not stop it.

    longrope (`LongRopeTables`): row b takes the long frequencies when its sequence reaches past the original length,
    `extents[b]` [B] positions in all (default: its last position + 1), as transformers decides per forward call
    from the largest position id; cos and sin are scaled by the attention factor.
    """
    scale = 1.0
    if isinstance(inv_freq, LongRopeTables):
        if extents is None:
            extents = positions.max(axis=1) + 1
        long = (extents > inv_freq.original)[:, None, None]
        scale = inv_freq.scale
        inv_freq = xp.where(long, xp.asarray(inv_freq.long, np.float32), xp.asarray(inv_freq.short, np.float32))
    freqs = positions.astype(np.float32)[..., None] * xp.asarray(inv_freq, np.float32)  # [B, T, hd/2]
    emb = xp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    if scale != 1.0:
        return xp.cos(emb) * np.float32(scale), xp.sin(emb) * np.float32(scale)
    return xp.cos(emb), xp.sin(emb)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, heads, hd] by the angles of `rope_tables`, in the rotate-half layout of HF checkpoints."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def attention(q, keys, values, positions, cfg: ModelConfig, layer: int = 0) -> jax.Array:
    """Causal GQA attention of q [B, T, H, hd] over keys/values [B, S, KV, hd], key j being at position j, with
    layer `layer`'s window, the config's scale and (Gemma 2) soft-capping of the scores."""
    b, t, h, hd = q.shape
    kv = keys.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd)
    # A bfloat16 cache under a float32 model: its keys and values are widened, the arithmetic stays float32.
    precision = _precision(jnp.promote_types(q.dtype, keys.dtype))
    scores = (
        jnp.einsum("btkgd,bskd->bkgts", q, keys, preferred_element_type=jnp.float32, precision=precision)
        * cfg.attention_scale
    )
    if cfg.attn_softcap:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    key_pos = jnp.arange(keys.shape[1])
    qpos = positions[:, None, None, :, None]
    allowed = key_pos <= qpos
    window = cfg.layer_window(layer)
    if window:
        allowed &= key_pos > qpos - window
    scores = jnp.where(allowed, scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(jnp.promote_types(q.dtype, values.dtype))
    out = jnp.einsum("bkgts,bskd->btkgd", probs, values, precision=precision)
    return out.reshape(b, t, h * hd)


def attend(q, k, v, positions, cache: KVCache, layer: int, cfg: ModelConfig, page_table):
    """Writes layer `layer`'s k, v [B, T, KV, hd] to the cache and attends q over its keys: (attn [B, T, H*hd],
    cache). A layer that reads another's K/V (`cfg.layer_kv_source`) writes nothing (k, v are ignored). `page_table`:
    [B, W], or (full, window, window_start) for a cache with a WINDOW group (see `PagedKVCache`)."""
    src = cfg.layer_kv_source(layer)
    if isinstance(cache, PagedKVCache):
        page_table, positions = cache.view(src, page_table, positions)
    # The native kernel reads keys in place and only the causal ones; XLA's path gathers every row's pages first.
    if isinstance(cache, PagedKVCache) and cache.native_attention:
        if src == layer:
            cache, k_pages, v_pages = cache.write(layer, k, v, positions, page_table)
        else:
            k_pages, v_pages = cache.k[src], cache.v[src]
        attn = native.paged_attention(
            q, k_pages, v_pages, page_table, positions, cfg.layer_window(layer), scale=cfg.attention_scale
        )
    else:
        if src == layer:
            cache, keys, values = cache.update(layer, k, v, positions, page_table)
        else:
            keys, values = cache.read(src, page_table)
        attn = attention(q, keys, values, positions, cfg, layer)
    return attn, cache


def decoder_layer(p: Params, x, positions, cache: KVCache, layer: int, cfg: ModelConfig, rope_cs, page_table):
    rope_cs = rope_cs[cfg.layer_rope(layer)]
    if isinstance(cache, PagedKVCache) and cache.fused_layers:
        x, k_l, v_l = native.decoder_layer(p, x, cache.k[layer], cache.v[layer], page_table, positions, rope_cs, cfg)
        return x, with_layer(cache, layer, k_l, v_l)
    b, t, _ = x.shape
    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    qkv = linear(h, p["wqkv"])
    if cfg.attention_bias:
        qkv = qkv + p["bqkv"]
    q, k, v = split_columns(qkv, cfg, [cfg.q_size, cfg.q_size + cfg.kv_size])
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    q, k = rope(q, *rope_cs), rope(k, *rope_cs)
    attn, cache = attend(q, k, v, positions, cache, layer, cfg, page_table)
    x = x + linear(attn.astype(x.dtype), p["wo"])
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    if "router" in p:  # mixture of experts (moe.py)
        from novallm_jax.moe import moe_mlp

        return x + moe_mlp(p, h, cfg), cache
    gate, up = split_columns(linear(h, p["w_gate_up"]), cfg, [cfg.intermediate_size])
    x = x + linear(jax.nn.silu(gate) * up, p["w_down"])
    return x, cache


def split_columns(y: jax.Array, cfg: ModelConfig, at: Sequence[int]) -> list[jax.Array]:
    """Splits the output y [..., N] of a fused matmul at columns `at` (of the checkpoint's layout), with its columns
    laid out per shard (`cfg.model_shards`): each part [..., n] with its units in the checkpoint's order."""
    g = cfg.model_shards
    if g == 1:
        return jnp.split(y, at, axis=-1)
    parts = jnp.split(y.reshape(*y.shape[:-1], g, y.shape[-1] // g), [a // g for a in at], axis=-1)
    return [part.reshape(*y.shape[:-1], -1) for part in parts]


def forward(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    cfg: ModelConfig,
    page_table: jax.Array | None = None,
    logits_index: jax.Array | None = None,
    logits_rows: jax.Array | None = None,
    rope_cs: tuple[jax.Array, jax.Array] | None = None,
    hidden: bool = False,
    argmax: bool = False,
):
    """Runs the decoder over tokens [B, T] at positions [B, T] (negative = padding) and updates the cache.

    Returns (logits, cache): logits [B, T, V]; or [B, V] at `logits_index` [B] when given (the last real token of each
    row, say), which skips the vocabulary projection of every other position; or [R, V] at the flat positions
    `logits_rows` [R] (row b's token t is b * T + t): a ragged step's (T = 1, its rows the tokens of several
    sequences), or a padded step's whose rows verify drafted tokens.
    `rope_cs`: `rope_tables_per_kind(positions, rope_inv_freqs(cfg))` when computed elsewhere (the executor computes
    them on the host). `hidden`: returns (logits, cache, states) with the final hidden states [B, T, D] of every
    position after the final norm (what the LM head reads; embeddings pool them). `argmax`: the logits' argmax over
    the vocabulary (int32) in their place, which an `native.ArgmaxHead` finds without computing them all.
    """
    if rope_cs is None:
        rope_cs = rope_tables_per_kind(positions, rope_inv_freqs(cfg))
    if cfg.gemma is not None:
        from novallm_jax.model_gemma import gemma_forward  # model_gemma builds on this module's functions

        return gemma_forward(
            params, tokens, positions, cache, cfg, page_table, logits_index, logits_rows, rope_cs, hidden, argmax
        )
    x = params["embed"][tokens]
    for i, p in enumerate(params["layers"]):
        x, cache = decoder_layer(p, x, positions, cache, i, cfg, rope_cs, page_table)
    norm = lambda h: rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    return final_outputs(x, norm, params["lm_head"], cache, logits_index, logits_rows, hidden, argmax=argmax)


def final_outputs(x, norm, head, cache, logits_index, logits_rows, hidden: bool, softcap=None, argmax=False):
    """`forward`'s results from the last layer's output x: the logits of the selected rows (with `argmax`, their
    argmax, int32), the cache, and with `hidden` every position's normed state (the norm is per position, so the
    selected rows' come from it)."""
    states = norm(x) if hidden else None
    h = (
        norm(select_rows(x, logits_index, logits_rows))
        if states is None
        else select_rows(states, logits_index, logits_rows)
    )
    if argmax and not softcap and h.ndim == 2 and greedy_head_rows(head) >= h.shape[0]:
        logits = head.argmax(h)
    else:
        logits = lm_head(h, head)
        if softcap:
            logits = jnp.tanh(logits / softcap) * softcap
        if argmax:
            logits = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return (logits, cache, states) if hidden else (logits, cache)


def greedy_head_rows(head) -> int:
    """The most rows whose argmax `head` gives without their logits (a `native.ArgmaxHead`), else 0."""
    return native.ARGMAX_ROWS if isinstance(head, native.ArgmaxHead) else 0


def select_rows(x, logits_index, logits_rows):
    """The hidden states [B, T, D] whose logits `forward` returns (see its docstring)."""
    if logits_rows is not None:  # flat positions: row b's token t is b * T + t
        return x.reshape(-1, x.shape[-1])[logits_rows]
    if logits_index is not None:
        return jnp.take_along_axis(x, logits_index[:, None, None], axis=1)[:, 0]
    return x


def lm_head(x, head) -> jax.Array:
    """Float32 logits of the final hidden states x."""
    if isinstance(head, native.ArgmaxHead):
        head = head.exact
    if isinstance(head, native.NATIVE_LINEAR):
        return linear(x, head)
    return jnp.dot(x, head, preferred_element_type=jnp.float32, precision=_precision(head.dtype))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def forward_jit(params, tokens, positions, cache, cfg, page_table=None, logits_index=None):
    """`forward` jitted, with the cache donated (updated in place)."""
    return forward(params, tokens, positions, cache, cfg, page_table, logits_index)


def ragged_batch(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pads prompts into (tokens [B, T], positions [B, T] with -1 on padding, lengths [B])."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    t = int(lengths.max())
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    positions = np.full((len(prompts), t), -1, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
        positions[i, : len(p)] = np.arange(len(p))
    return tokens, positions, lengths


def greedy_generate(
    params: Params, cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int, max_len: int | None = None
) -> list[list[int]]:
    """Greedy decoding with a contiguous cache: the reference path for tests and a minimal research API.

    Generates exactly `max_new_tokens` per prompt (no early stop), so it compares token for token with
    transformers' `generate(do_sample=False, min_new_tokens=max_new_tokens)`.
    """
    tokens, positions, lengths = ragged_batch(prompts)
    max_len = max_len or int(lengths.max()) + max_new_tokens
    dtype = params["embed"].dtype
    cache = ContiguousKVCache.create(cfg, len(prompts), max_len, dtype)
    logits, cache = forward_jit(params, tokens, positions, cache, cfg, logits_index=jnp.asarray(lengths - 1))
    out = []
    pos = jnp.asarray(lengths)
    for _ in range(max_new_tokens):
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        out.append(nxt)
        logits, cache = forward_jit(params, nxt[:, None], pos[:, None], cache, cfg, logits_index=jnp.zeros_like(pos))
        pos = pos + 1
    return np.stack([np.asarray(o) for o in out], axis=1).tolist() if out else [[] for _ in prompts]
