"""Turns checkpoint tensors (torch layout, `[out, in]`) into the params pytree (`[in, out]`, fused q/k/v and gate/up)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from novallm_jax.config import ModelConfig

TensorGetter = Callable[[str], np.ndarray]
NameFn = Callable[[int | None, str], str]


def assemble_params(cfg: ModelConfig, get: TensorGetter, name: NameFn, dtype, desc: str = "weights") -> dict:
    """Builds params layer by layer, so at most one layer's float32 tensors sit in host memory at a time."""
    put = lambda a: jax.device_put(jnp.asarray(a, dtype))
    embed = get(name(None, "embed"))
    params = {"embed": put(embed), "final_norm": put(get(name(None, "final_norm"))), "layers": []}
    params["lm_head"] = put((embed if cfg.tie_word_embeddings else get(name(None, "lm_head"))).T)
    del embed
    for i in tqdm(range(cfg.num_layers), desc=f"loading {desc}", unit="layer", leave=False):
        w = lambda part: get(name(i, part))
        layer = {
            "attn_norm": put(w("attn_norm")),
            "wqkv": put(np.concatenate([w("q").T, w("k").T, w("v").T], axis=1)),
            "wo": put(w("o").T),
            "mlp_norm": put(w("mlp_norm")),
            "w_gate_up": put(np.concatenate([w("gate").T, w("up").T], axis=1)),
            "w_down": put(w("down").T),
        }
        if cfg.attention_bias:
            layer["bqkv"] = put(np.concatenate([w("q_bias"), w("k_bias"), w("v_bias")]))
        if cfg.qk_norm:
            layer["q_norm"] = put(w("q_norm"))
            layer["k_norm"] = put(w("k_norm"))
        params["layers"].append(layer)
    return params
