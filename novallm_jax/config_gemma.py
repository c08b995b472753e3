"""What Gemma 2, 3 and 4 (text) add to a Llama-family config: `GemmaSpec`, and reading it from HF and GGUF metadata.

`ModelConfig.gemma` holds a `GemmaSpec` for these families (None otherwise); the per-layer questions (window, head
size, RoPE table, K/V source) are answered by `ModelConfig.layer_*` so that the model, the cache and the executor ask
them the same way for every family.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from novallm_jax.errors import ModelLoadError, UnsupportedArchitectureError

SLIDING, FULL = "sliding_attention", "full_attention"
# HF model_type -> Gemma generation. `gemma3` is the multimodal wrapper: its `text_config` is a `gemma3_text`.
GEMMA_MODEL_TYPES = {"gemma2": 2, "gemma3_text": 3, "gemma3": 3, "gemma4_text": 4}
GEMMA_GGUF_ARCHS = {"gemma2": "gemma2", "gemma3": "gemma3_text", "gemma4": "gemma4_text"}


@dataclasses.dataclass(frozen=True)
class GemmaSpec:
    """Gemma's departures from Llama. Hashable: part of the static `ModelConfig`."""

    version: int  # 2, 3 or 4
    layer_types: tuple[str, ...]  # per layer: SLIDING or FULL
    sliding_window: int | None  # of the SLIDING layers
    local_rope_theta: float  # RoPE base of the SLIDING layers (FULL layers: ModelConfig.rope_theta/rope_scaling)
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power; None: scale 1 (Gemma 4)
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    # Gemma 4 ---------------------------------------------------------------------------------------------
    full_head_dim: int | None = None  # head size of the FULL layers (None: ModelConfig.head_dim)
    full_kv_heads: int | None = None  # their K/V heads (None: ModelConfig.num_kv_heads)
    full_rotary_fraction: float = 1.0  # "proportional" RoPE of FULL layers: the rotated share of each head
    k_eq_v: bool = False  # FULL layers have no v_proj: values are the keys' projection (before k_norm and RoPE)
    num_kv_shared_layers: int = 0  # the last n layers reuse the K/V of the last earlier layer of their kind
    per_layer_input_size: int = 0  # per-layer embeddings (PLE) width; 0: none
    per_layer_vocab: int = 0
    double_wide_mlp: bool = False  # K/V-sharing layers have an MLP twice as wide
    # Gemma 4's mixture-of-experts block (enable_moe_block): in every layer, beside the dense MLP, `num_experts`
    # GeGLU experts of width `moe_size`, `top_k_experts` per token (model_gemma.gemma_experts).
    num_experts: int = 0
    top_k_experts: int = 0
    moe_size: int = 0

    @property
    def norm_offset(self) -> float:
        """RMSNorm multiplies by (offset + w): Gemma 2 and 3 store w - 1, Gemma 4 stores w."""
        return 0.0 if self.version >= 4 else 1.0

    def first_shared_layer(self) -> int:
        return len(self.layer_types) - self.num_kv_shared_layers

    def kv_source(self, i: int) -> int:
        """The layer whose K/V layer i attends over: itself, or for a K/V-sharing layer (Gemma 4) the last layer of
        the same kind before the shared ones."""
        first = self.first_shared_layer()
        if i < first:
            return i
        kind = self.layer_types[i]
        for j in range(first - 1, -1, -1):
            if self.layer_types[j] == kind:
                return j
        raise ModelLoadError(f"layer {i} shares the K/V of an earlier {kind} layer, but none precedes layer {first}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GemmaSpec":
        return cls(**{**d, "layer_types": tuple(d["layer_types"])})


def gemma_text_config(c: Mapping[str, Any]) -> Mapping[str, Any]:
    """The text model's config of a `gemma3` (multimodal) config.json; other configs as they are."""
    if c.get("model_type") == "gemma3" and isinstance(c.get("text_config"), Mapping):
        return {
            **c["text_config"],
            "model_type": "gemma3_text",
            "tie_word_embeddings": c.get("tie_word_embeddings", c["text_config"].get("tie_word_embeddings", True)),
        }
    return c


def _rope_params(c: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    params = c.get("rope_parameters") or {}
    if kind in params:
        return params[kind] or {}
    return params if "rope_theta" in params or "rope_type" in params else {}


def gemma_fields_from_hf(c: Mapping[str, Any], version: int, num_layers: int) -> dict[str, Any]:
    """ModelConfig fields of a Gemma `config.json` (the text config): `gemma`, and the FULL layers' RoPE."""
    layer_types = c.get("layer_types")
    if layer_types is None:  # what transformers derives for a config that does not list them
        pattern = 2 if version == 2 else int(c.get("sliding_window_pattern", 6))
        layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    if version >= 4 and layer_types[-1] != FULL:
        layer_types = list(layer_types[:-1]) + [FULL]  # transformers forces it too
    # Gemma 4's "vision" makes only image tokens attend both ways: text stays causal.
    if c.get("use_bidirectional_attention") not in (None, False, "vision"):
        raise UnsupportedArchitectureError(
            f"use_bidirectional_attention={c['use_bidirectional_attention']!r} is not supported (a causal decoder only)"
        )
    act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UnsupportedArchitectureError(f"hidden_activation {act!r} is not supported; supported: gelu_pytorch_tanh")
    full = _rope_params(c, FULL) if version >= 3 else _rope_params(c, "")
    if not full and c.get("rope_scaling"):  # config.json files written before rope_parameters (Gemma 3 4B-27B)
        full = dict(c["rope_scaling"])
    local = _rope_params(c, SLIDING) if version >= 3 else full
    if local.get("rope_type", "default") != "default":
        raise UnsupportedArchitectureError(f"rope scaling {local['rope_type']!r} on sliding layers is not supported")
    full_theta = full.get("rope_theta", c.get("rope_theta", 1e6 if version >= 3 else 10000.0))
    local_theta = local.get("rope_theta", c.get("rope_local_base_freq", 10000.0 if version >= 3 else full_theta))
    fraction, full_scaling = 1.0, full
    if full.get("rope_type") == "proportional":
        fraction = float(full.get("partial_rotary_factor", 1.0))
        full_scaling = {"rope_type": "linear", "factor": full["factor"]} if full.get("factor", 1.0) != 1.0 else None
    window = c.get("sliding_window")
    spec = dict(
        version=version,
        layer_types=tuple(layer_types),
        sliding_window=int(window) if window else None,
        local_rope_theta=float(local_theta),
        final_softcap=_float(c.get("final_logit_softcapping")),
        # Gemma 3 configs carry attn_logit_softcapping, but its attention does not apply it.
        attn_softcap=_float(c.get("attn_logit_softcapping")) if version == 2 else None,
        query_pre_attn_scalar=_float(c.get("query_pre_attn_scalar", 256)) if version < 4 else None,
    )
    if version >= 4:
        per_layer = c.get("per_layer_config") or {}
        full_layer = (
            next((per_layer.get(str(i), per_layer.get(i)) for i, t in enumerate(layer_types) if t == FULL), None) or {}
        )
        spec.update(
            full_head_dim=full_layer.get("head_dim") or c.get("global_head_dim"),
            full_kv_heads=full_layer.get("num_key_value_heads")
            or (c.get("num_global_key_value_heads") if c.get("attention_k_eq_v") else None),
            full_rotary_fraction=fraction,
            k_eq_v=bool(c.get("attention_k_eq_v", False)),
            num_kv_shared_layers=int(c.get("num_kv_shared_layers") or 0),
            per_layer_input_size=int(c.get("hidden_size_per_layer_input") or 0),
            per_layer_vocab=int(c.get("vocab_size_per_layer_input") or c["vocab_size"]),
            double_wide_mlp=bool(c.get("use_double_wide_mlp", False)),
        )
        if c.get("enable_moe_block"):
            spec.update(
                num_experts=int(c["num_experts"]),
                top_k_experts=int(c["top_k_experts"]),
                moe_size=int(c["moe_intermediate_size"]),
            )
    return {
        "gemma": GemmaSpec(**spec),
        "rope_theta": float(full_theta),
        "rope_scaling": full_scaling or None,
        "tie_word_embeddings": bool(c.get("tie_word_embeddings", True)),
        "qk_norm": version >= 3,
    }


def _float(v) -> float | None:
    return None if v is None else float(v)


def gemma_fields_from_gguf(meta: Mapping[str, Any], arch: str, tensor_names: set[str]) -> dict[str, Any]:
    """ModelConfig fields of a Gemma GGUF file, read as llama.cpp reads them (its keys; its attention scale unless
    the file has `attention.scale`)."""

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    version = {"gemma2": 2, "gemma3": 3, "gemma4": 4}[arch]
    layers = int(get("block_count"))
    pattern = get("attention.sliding_window_pattern")
    window = get("attention.sliding_window")
    if isinstance(pattern, (list, tuple)):
        types = tuple(SLIDING if p else FULL for p in pattern)
    else:  # llama.cpp's set_swa_pattern: every n-th layer is global
        n = int(pattern or (2 if version == 2 else 6))
        types = tuple(SLIDING if (i % n) < n - 1 else FULL for i in range(layers))
    if not window:
        types = (FULL,) * layers
    heads, hidden = int(get("attention.head_count")), int(get("embedding_length"))
    head_dim = int(get("attention.key_length_swa") or get("attention.key_length") or hidden // heads)
    scale = get("attention.scale")
    if version < 4:
        big = layers == (46 if version == 2 else 62)  # llama.cpp's 27B rule
        qpas = 1.0 / float(scale) ** 2 if scale else float(hidden // heads if big else head_dim)
    kv = get("attention.head_count_kv")
    kv_per_layer = list(kv) if isinstance(kv, (list, tuple)) else [int(kv or heads)] * layers
    full = next((i for i, t in enumerate(types) if t == FULL), None)
    theta = float(get("rope.freq_base", 10000.0))
    spec = dict(
        version=version,
        layer_types=types,
        sliding_window=int(window) if window else None,
        local_rope_theta=float(get("rope.freq_base_swa", theta if version == 2 else 10000.0)),
        final_softcap=_float(get("final_logit_softcapping")),
        attn_softcap=_float(get("attn_logit_softcapping")) if version == 2 else None,
        query_pre_attn_scalar=qpas if version < 4 else None,
    )
    fields = {
        "model_type": GEMMA_GGUF_ARCHS[arch],
        "head_dim": head_dim,
        "num_kv_heads": int(kv_per_layer[0]),
        "qk_norm": version >= 3,
        "rope_theta": theta,
    }
    if version >= 4:
        ff = get("feed_forward_length")
        first_shared = layers - int(get("attention.shared_kv_layers") or 0)
        full_hd = int(get("attention.key_length") or head_dim)
        # The rotated share of a global head (rope_freqs) and the per-layer vocabulary are tensors' business: the
        # loader fills them in (gguf_file.gemma_gguf_config).
        spec.update(
            full_head_dim=full_hd,
            full_kv_heads=int(kv_per_layer[full]) if full is not None else None,
            k_eq_v=full is not None and f"blk.{full}.attn_v.weight" not in tensor_names,
            num_kv_shared_layers=layers - first_shared,
            per_layer_input_size=int(get("embedding_length_per_layer_input") or 0),
            double_wide_mlp=isinstance(ff, (list, tuple)) and ff[-1] != ff[0],
        )
        if get("expert_count"):
            spec.update(
                num_experts=int(get("expert_count")),
                top_k_experts=int(get("expert_used_count")),
                moe_size=int(get("expert_feed_forward_length")),
            )
        fields["intermediate_size"] = int(ff[0] if isinstance(ff, (list, tuple)) else ff)
    fields["gemma"] = GemmaSpec(**spec)
    return fields
