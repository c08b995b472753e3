"""Mixture-of-experts tensors (Mixtral, Qwen3-MoE): names in HF checkpoints and GGUF files, shapes, and their params.

Logical parts: `moe_router` [E, D], and per expert j `moe_gate.j`, `moe_up.j` [F, D], `moe_down.j` [D, F] (torch
layout). A GGUF file stores each as one stacked tensor [E, ...], whatever j is asked for.
"""

from __future__ import annotations

import numpy as np
from absl import logging

from novallm_jax.config import ModelConfig
from novallm_jax.loading.gguf_quant import BlockQuant

_HF = {
    "mixtral": {
        "router": "block_sparse_moe.gate.weight",
        "gate": "block_sparse_moe.experts.{j}.w1.weight",
        "up": "block_sparse_moe.experts.{j}.w3.weight",
        "down": "block_sparse_moe.experts.{j}.w2.weight",
    },
    "qwen3_moe": {
        "router": "mlp.gate.weight",
        "gate": "mlp.experts.{j}.gate_proj.weight",
        "up": "mlp.experts.{j}.up_proj.weight",
        "down": "mlp.experts.{j}.down_proj.weight",
    },
}
GGUF_LAYER = {
    "router": "ffn_gate_inp.weight",
    "gate": "ffn_gate_exps.weight",
    "up": "ffn_up_exps.weight",
    "down": "ffn_down_exps.weight",
}


def is_moe_part(part: str) -> bool:
    return part.startswith("moe_")


def _split(part: str) -> tuple[str, str]:
    kind, _, j = part[len("moe_") :].partition(".")
    return kind, j


def moe_hf_name(cfg: ModelConfig, i: int, part: str) -> str:
    kind, j = _split(part)
    return f"model.layers.{i}." + _HF[cfg.model_type][kind].format(j=j)


def moe_gguf_name(i: int, part: str) -> str:
    return f"blk.{i}.{GGUF_LAYER[_split(part)[0]]}"


def moe_hf_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    m, d = cfg.moe, cfg.hidden_size
    shapes = {moe_hf_name(cfg, i, "moe_router"): (m.num_experts, d)}
    for j in range(m.num_experts):
        shapes[moe_hf_name(cfg, i, f"moe_gate.{j}")] = (m.expert_size, d)
        shapes[moe_hf_name(cfg, i, f"moe_up.{j}")] = (m.expert_size, d)
        shapes[moe_hf_name(cfg, i, f"moe_down.{j}")] = (d, m.expert_size)
    return shapes


def moe_gguf_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    m, d, f = cfg.moe, cfg.hidden_size, cfg.moe.expert_size
    return {
        moe_gguf_name(i, "moe_router"): (m.num_experts, d),
        moe_gguf_name(i, "moe_gate"): (m.num_experts, f, d),
        moe_gguf_name(i, "moe_up"): (m.num_experts, f, d),
        moe_gguf_name(i, "moe_down"): (m.num_experts, d, f),
    }


def stacked_experts(get, name, i: int, kind: str, num_experts: int, first=None) -> np.ndarray:
    """[E, out, in] of an expert weight: the file's stacked tensor, or each expert's stacked."""
    first = get(name(i, f"moe_{kind}.0")) if first is None else first
    if first.ndim == 3:
        return first
    return np.stack([first] + [get(name(i, f"moe_{kind}.{j}")) for j in range(1, num_experts)])


def assemble_moe_layer(cfg: ModelConfig, get, name, i: int, put) -> dict:
    """A sparse layer's router and experts in the params layout (see moe.moe_layer_shapes)."""
    e = cfg.moe.num_experts
    dense = lambda a: a.dequantize() if hasattr(a, "dequantize") else a
    router = put(np.asarray(dense(get(name(i, "moe_router")))).T)
    first = {kind: get(name(i, f"moe_{kind}.0")) for kind in ("gate", "up", "down")}
    if not any(isinstance(a, BlockQuant) for a in first.values()):  # an HF directory: per-expert tensors
        first = {kind: stacked_experts(get, name, i, kind, e, first=a) for kind, a in first.items()}
    return {"router": router, **assemble_experts([first["gate"], first["up"]], first["down"], e, put)}


def assemble_experts(gate_up: list, down, num_experts: int, put) -> dict:
    """`experts_gate_up` [E, D, 2F] and `experts_down` [E, F, D] params from stacked expert tensors: `gate_up` the
    gate then the up parts ([E, F, D] each, or one [E, 2F, D]), `down` [E, D, F]. Stacks that a GGUF getter returns
    in block codes (a `BlockQuant` of [E * out, in]) stay in them as `native.ExpertQuantLinear` when all do."""
    parts = [*gate_up, down]
    coded = [isinstance(a, BlockQuant) for a in parts]
    if all(coded):
        return _coded_experts(gate_up, down, num_experts)
    if any(coded):
        logging.warning("expert weights in block codes beside ones that are not are widened to float32")
    stack = lambda a: (
        a.dequantize().reshape(num_experts, -1, a.shape[1]) if isinstance(a, BlockQuant) else np.asarray(a, np.float32)
    )
    gu = np.concatenate([stack(a) for a in gate_up], axis=1)  # [E, 2F, D]
    return {"experts_gate_up": put(gu.transpose(0, 2, 1)), "experts_down": put(stack(down).transpose(0, 2, 1))}


def _coded_experts(gate_up: list, down, num_experts: int) -> dict:
    """The experts' params from [E * out, in] block codes: per expert, its gate and up rows as one weight."""
    from novallm_jax.kernels import native

    def rows(bq, j):
        r = bq.shape[0] // num_experts
        return bq.take_rows(slice(j * r, (j + 1) * r))

    fused = [
        native.QuantLinear.from_blocks(BlockQuant.concat_rows([rows(a, j) for a in gate_up]))
        for j in range(num_experts)
    ]
    down_ = [native.QuantLinear.from_blocks(rows(down, j)) for j in range(num_experts)]
    return {
        "experts_gate_up": native.ExpertQuantLinear.from_experts(fused),
        "experts_down": native.ExpertQuantLinear.from_experts(down_),
    }


def write_moe(w, cfg: ModelConfig, get, add, permute) -> None:
    """A Mixtral (GGUF arch `llama`, Q/K rows permuted) or Qwen3-MoE (`qwen3moe`) checkpoint's expert metadata and
    tensors, as llama.cpp's converter writes them (each expert weight stacked [E, out, in])."""
    from novallm_jax.loading.gguf_file import gguf_names
    from novallm_jax.loading.hf import hf_names

    m, arch = cfg.moe, w.arch
    w.add_expert_count(m.num_experts)
    w.add_expert_used_count(m.top_k)
    w.add_bool(f"{arch}.expert_weights_norm", m.norm_topk_prob)
    if arch != "llama":
        w.add_expert_feed_forward_length(m.expert_size)
    name = lambda i, part: moe_hf_name(cfg, i, part) if is_moe_part(part) else hf_names(i, part)
    add(gguf_names(None, "embed"), get(hf_names(None, "embed")))
    add(gguf_names(None, "final_norm"), get(hf_names(None, "final_norm")), matmul=False)
    if not cfg.tie_word_embeddings:
        add(gguf_names(None, "lm_head"), get(hf_names(None, "lm_head")))
    for i in range(cfg.num_layers):
        parts = ["attn_norm", "q", "k", "v", "o", "mlp_norm"] + ["q_norm", "k_norm"] * cfg.qk_norm
        for part in parts + ([] if m.sparse_layers[i] else ["gate", "up", "down"]):
            a = get(hf_names(i, part))
            if arch == "llama" and part in ("q", "k"):
                a = permute(a, cfg.num_heads if part == "q" else cfg.num_kv_heads)
            add(gguf_names(i, part), a, matmul="norm" not in part)
        if m.sparse_layers[i]:
            add(moe_gguf_name(i, "moe_router"), get(name(i, "moe_router")), matmul=False)
            for kind in ("gate", "up", "down"):
                add(moe_gguf_name(i, f"moe_{kind}"), stacked_experts(get, name, i, kind, m.num_experts))
