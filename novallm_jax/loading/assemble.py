"""Turns checkpoint tensors (torch layout, `[out, in]`) into the params pytree (`[in, out]`, fused q/k/v and gate/up).

A getter may return a GGUF weight in its own block codes (`BlockQuant`): matmul weights then stay in those codes as
a `native.QuantLinear`, and everything else (the embedding table, norms) is dequantised."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from novallm_jax.config import ModelConfig
from novallm_jax.kernels import native
from novallm_jax.loading.gguf_quant import BlockQuant, HalfWeight
from novallm_jax.loading.host_slices import HostSlices, concat_columns

TensorGetter = Callable[[str], "np.ndarray | BlockQuant"]
NameFn = Callable[[int | None, str], str]


_ON_HOST = contextvars.ContextVar("novallm_load_on_host", default=None)


@contextlib.contextmanager
def on_host(mesh=None) -> Iterator[None]:
    """Within it, loaders leave the params in host memory (numpy, or `host_slices` read only where a device asks)
    instead of on the default device: for a mesh, where each device then receives only its shard of each weight
    (`sharding.place`), so no device ever holds the whole model. A loader that restores shards itself (orbax)
    places them on `mesh` as `sharding.param_specs` lays them out, each host reading only its devices' shards."""
    token = _ON_HOST.set((mesh,))
    try:
        yield
    finally:
        _ON_HOST.reset(token)


def loading_on_host() -> bool:
    return _ON_HOST.get() is not None


def loading_mesh():
    """The mesh of the enclosing `on_host(mesh)`, or None."""
    held = _ON_HOST.get()
    return held[0] if held else None


def to_device(a, dtype):
    """`a` cast to `dtype`, on the default device, or in host memory inside `on_host()` (still unread for a
    `HostSlices` tensor)."""
    if loading_on_host():
        return a.astype(dtype) if isinstance(a, HostSlices) else np.asarray(a, dtype)
    return jax.device_put(jnp.asarray(a, dtype))


def assemble_params(cfg: ModelConfig, get: TensorGetter, name: NameFn, dtype, desc: str = "weights") -> dict:
    """Builds params layer by layer, so at most one layer's float32 tensors sit in host memory at a time."""

    def put(a):
        return to_device(a.dequantize() if isinstance(a, (BlockQuant, HalfWeight)) else a, dtype)

    def matmul_weight(parts: list) -> jax.Array | native.QuantLinear:
        """[out, in] tensors -> one [in, sum(out)] weight, kept in block codes when every part has them (codes of
        different kinds are brought to a common one, see `BlockQuant.concat_rows`)."""
        coded = [isinstance(p, BlockQuant) for p in parts]
        if all(coded):
            return native.QuantLinear.from_blocks(BlockQuant.concat_rows(parts))
        if all(isinstance(p, HalfWeight) for p in parts) and len({p.bf16 for p in parts}) == 1:
            return native.HalfLinear.from_bits(np.concatenate([p.bits for p in parts]), parts[0].bf16)
        if any(coded) or any(isinstance(p, HalfWeight) for p in parts):
            logging.warning(
                "a matmul weight's parts in block codes or 16 bits are widened to %s beside parts that "
                "are not (shapes %s)",
                np.dtype(dtype).name,
                [tuple(p.shape) for p in parts],
            )
        dense = [p.dequantize() if isinstance(p, (BlockQuant, HalfWeight)) else p for p in parts]
        return put(concat_columns([p.T for p in dense]))

    embed = get(name(None, "embed"))
    params = {"embed": put(embed), "final_norm": put(get(name(None, "final_norm"))), "layers": []}
    params["lm_head"] = matmul_weight([embed if cfg.tie_word_embeddings else get(name(None, "lm_head"))])
    del embed
    progress = lambda layers: tqdm(layers, desc=f"loading {desc}", unit="layer", leave=False)
    if cfg.gemma is not None:
        from novallm_jax.loading.gemma import assemble_gemma

        return assemble_gemma(cfg, get, name, put, matmul_weight, params, progress)
    for i in progress(range(cfg.num_layers)):
        w = lambda part: get(name(i, part))
        layer = {
            "attn_norm": put(w("attn_norm")),
            "wqkv": matmul_weight([w("q"), w("k"), w("v")]),
            "wo": matmul_weight([w("o")]),
            "mlp_norm": put(w("mlp_norm")),
        }
        if cfg.moe is not None and cfg.moe.sparse_layers[i]:
            from novallm_jax.loading.moe import assemble_moe_layer

            layer.update(assemble_moe_layer(cfg, get, name, i, put))
        else:
            layer.update(w_gate_up=matmul_weight([w("gate"), w("up")]), w_down=matmul_weight([w("down")]))
        if cfg.attention_bias:
            layer["bqkv"] = put(np.concatenate([w("q_bias"), w("k_bias"), w("v_bias")]))
        if cfg.qk_norm:
            layer["q_norm"] = put(w("q_norm"))
            layer["k_norm"] = put(w("k_norm"))
        params["layers"].append(layer)
    return params
