"""What a mixture-of-experts decoder (Mixtral, Qwen3-MoE) adds to a Llama-family config: `MoeSpec`, from HF and GGUF.

`ModelConfig.moe` holds a `MoeSpec` for these families (None otherwise). The math is in moe.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from novallm_jax.errors import UnsupportedArchitectureError

MOE_MODEL_TYPES = ("mixtral", "qwen3_moe")
MOE_GGUF_ARCHS = ("qwen3moe",)  # Mixtral is GGUF arch `llama` with `llama.expert_count`


@dataclasses.dataclass(frozen=True)
class MoeSpec:
    """Hashable: part of the static `ModelConfig`."""

    num_experts: int
    top_k: int
    expert_size: int  # each expert's FFN width
    norm_topk_prob: bool  # the top-k routing weights renormalised to sum to 1 (Mixtral: always)
    sparse_layers: tuple[bool, ...]  # per layer: experts (True) or the dense MLP of `intermediate_size`

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MoeSpec":
        return cls(**{**d, "sparse_layers": tuple(d["sparse_layers"])})


def moe_fields_from_hf(c: Mapping[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
    """ModelConfig fields of a Mixtral or Qwen3-MoE `config.json`, read as transformers' modeling files do."""
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitectureError(f"hidden_act {act!r} is not supported for {model_type}; supported: silu")
    if model_type == "mixtral":
        spec = MoeSpec(
            int(c["num_local_experts"]),
            int(c["num_experts_per_tok"]),
            int(c["intermediate_size"]),
            True,
            (True,) * num_layers,
        )
        return {"moe": spec}
    experts = int(c.get("num_experts") or c.get("num_local_experts") or 0)
    step = int(c.get("decoder_sparse_step", 1) or 1)
    dense = set(c.get("mlp_only_layers") or ())
    sparse = tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(num_layers))
    spec = MoeSpec(
        experts,
        int(c["num_experts_per_tok"]),
        int(c["moe_intermediate_size"]),
        bool(c.get("norm_topk_prob", False)),
        sparse,
    )
    return {"moe": spec, "qk_norm": True}


def moe_fields_from_gguf(meta: Mapping[str, Any], arch: str, num_layers: int, tensor_names) -> dict[str, Any]:
    """`moe` of a GGUF file with `{arch}.expert_count` (llama.cpp's keys), else {}. A layer without a router
    (`ffn_gate_inp`) keeps a dense MLP (Qwen3-MoE's mlp_only_layers)."""
    count = meta.get(f"{arch}.expert_count")
    if not count:
        return {}
    ff = meta.get(f"{arch}.expert_feed_forward_length") or meta.get(f"{arch}.feed_forward_length")
    norm = meta.get(f"{arch}.expert_weights_norm")
    # llama.cpp renormalises the top-k weights of both unless the file says otherwise.
    sparse = tuple(f"blk.{i}.ffn_gate_inp.weight" in tensor_names for i in range(num_layers))
    spec = MoeSpec(
        int(count), int(meta[f"{arch}.expert_used_count"]), int(ff), True if norm is None else bool(norm), sparse
    )
    return {"moe": spec, "model_type": "mixtral" if arch == "llama" else "qwen3_moe"}
