"""Phi-3 checkpoints: q/k/v and gate/up fused in one weight each (HF `qkv_proj`, `gate_up_proj`; GGUF `attn_qkv`,
`ffn_up`), read as the separate parts `assemble_params` asks for; GGUF's longrope factors and metadata."""

from __future__ import annotations

import dataclasses

import numpy as np

from novallm_jax.config import ModelConfig, RopeScaling

# logical part -> (the fused part, which share of its rows: 0 = q or gate, 1 = k or up, 2 = v)
_FUSED = {"q": ("qkv", 0), "k": ("qkv", 1), "v": ("qkv", 2), "gate": ("gate_up", 0), "up": ("gate_up", 1)}
HF_FUSED = {"qkv": "self_attn.qkv_proj.weight", "gate_up": "mlp.gate_up_proj.weight"}
GGUF_FUSED = {"qkv": "attn_qkv.weight", "gate_up": "ffn_up.weight"}
GGUF_ROPE = ("rope_factors_long.weight", "rope_factors_short.weight")


def _rows(cfg: ModelConfig, fused: str, share: int) -> tuple[int, int]:
    if fused == "qkv":
        bounds = (0, cfg.q_size, cfg.q_size + cfg.kv_size, cfg.q_size + 2 * cfg.kv_size)
    else:
        bounds = (0, cfg.intermediate_size, 2 * cfg.intermediate_size)
    return bounds[share], bounds[share + 1]


def fused_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    d = cfg.hidden_size
    return {"qkv": (cfg.q_size + 2 * cfg.kv_size, d), "gate_up": (2 * cfg.intermediate_size, d)}


def unfused_getter(cfg: ModelConfig, get, name, fused_name):
    """A getter over `get` (tensor name -> array or BlockQuant) that also answers the names `name(i, part)` of q/k/v
    and gate/up with rows of layer i's fused weight, named `fused_name(i, "qkv" | "gate_up")`."""
    wanted = {
        name(i, part): (i, fused, share) for i in range(cfg.num_layers) for part, (fused, share) in _FUSED.items()
    }

    def unfused(n: str):
        if n not in wanted:
            return get(n)
        i, fused, share = wanted[n]
        start, end = _rows(cfg, fused, share)
        a = get(fused_name(i, fused))
        return a.take_rows(np.arange(start, end)) if hasattr(a, "take_rows") else a[start:end]

    return unfused


def write_phi3(w, cfg: ModelConfig, get, add) -> None:
    """Phi-3's GGUF metadata and tensors as llama.cpp's converter writes them: arch phi3, the fused attn_qkv and
    ffn_up (gate then up), and for longrope the two factor sets as tensors with the original context length and the
    attention factor as metadata. Q/K rows stay in HF's order (llama.cpp rotates phi3 NeoX-style)."""
    from novallm_jax.loading.gguf_file import gguf_names
    from novallm_jax.loading.hf import hf_names

    rs = cfg.rope_scaling
    w.add_sliding_window(cfg.sliding_window or 0)
    if rs is not None:
        w.add_rope_scaling_orig_ctx_len(rs.original_max_position_embeddings)
        w.add_rope_scaling_attn_factors(rs.attention_factor)
        add(GGUF_ROPE[0], np.asarray(rs.long_factor, np.float32), matmul=False)
        add(GGUF_ROPE[1], np.asarray(rs.short_factor, np.float32), matmul=False)
    add(gguf_names(None, "embed"), get(hf_names(None, "embed")))
    add(gguf_names(None, "final_norm"), get(hf_names(None, "final_norm")), matmul=False)
    if not cfg.tie_word_embeddings:
        add(gguf_names(None, "lm_head"), get(hf_names(None, "lm_head")))
    for i in range(cfg.num_layers):
        for part in ("attn_norm", "o", "mlp_norm", "down"):
            add(gguf_names(i, part), get(hf_names(i, part)), matmul="norm" not in part)
        for part in ("qkv", "gate_up"):
            add(f"blk.{i}.{GGUF_FUSED[part]}", get(f"model.layers.{i}.{HF_FUSED[part]}"))


def phi3_gguf_config(cfg: ModelConfig, meta, tensors: dict) -> ModelConfig:
    """What a phi3 GGUF file says beyond the common keys: its sliding window, and longrope (the factor tensors, the
    original context length and attention factor)."""
    window = meta.get("phi3.attention.sliding_window")
    scaling = None
    if GGUF_ROPE[0] in tensors:
        factors = [tuple(float(f) for f in np.asarray(tensors[n].data, np.float32)) for n in GGUF_ROPE]
        orig = int(meta["phi3.rope.scaling.original_context_length"])
        attn = float(meta.get("phi3.rope.scaling.attn_factor", 1.0))
        scaling = RopeScaling(
            "longrope",
            factor=cfg.max_position_embeddings / orig,
            original_max_position_embeddings=orig,
            long_factor=factors[0],
            short_factor=factors[1],
            attention_factor=attn,
        )
    return dataclasses.replace(cfg, sliding_window=int(window) if window else None, rope_scaling=scaling)


def gguf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The fused weights and longrope factors of a phi3 GGUF file (numpy order)."""
    out = {
        f"blk.{i}.{GGUF_FUSED[part]}": shape for i in range(cfg.num_layers) for part, shape in fused_shapes(cfg).items()
    }
    if cfg.rope_scaling is not None:
        out.update({n: (cfg.head_dim // 2,) for n in GGUF_ROPE})
    return out
