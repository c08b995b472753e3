"""Gemma 2/3/4 tensor names (HF and GGUF), shapes, and their params (see model_gemma.py for the layout)."""

from __future__ import annotations

from novallm_jax.config import ModelConfig

_HF_LAYER = {
    "attn_norm": "input_layernorm.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
    "mlp_norm": "pre_feedforward_layernorm.weight",
    "post_mlp_norm": "post_feedforward_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
    "layer_scalar": "layer_scalar",
    "ple_gate": "per_layer_input_gate.weight",
    "ple_proj": "per_layer_projection.weight",
    "ple_norm": "post_per_layer_input_norm.weight",
    "router": "router.proj.weight",
    "router_scale": "router.scale",
    "expert_scale": "router.per_expert_scale",
    "experts_gate_up": "experts.gate_up_proj",
    "experts_down": "experts.down_proj",
    "pre_moe_norm": "pre_feedforward_layernorm_2.weight",
    "post_mlp_norm_1": "post_feedforward_layernorm_1.weight",
    "post_moe_norm": "post_feedforward_layernorm_2.weight",
}
_HF_GLOBAL = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "embed_per_layer": "model.embed_tokens_per_layer.weight",
    "ple_model_proj": "model.per_layer_model_projection.weight",
    "ple_proj_norm": "model.per_layer_projection_norm.weight",
}
GGUF_LAYER = {
    "attn_norm": "attn_norm.weight",
    "post_attn_norm": "post_attention_norm.weight",
    "mlp_norm": "ffn_norm.weight",
    "post_mlp_norm": "post_ffw_norm.weight",
    "q": "attn_q.weight",
    "k": "attn_k.weight",
    "v": "attn_v.weight",
    "o": "attn_output.weight",
    "q_norm": "attn_q_norm.weight",
    "k_norm": "attn_k_norm.weight",
    "gate": "ffn_gate.weight",
    "up": "ffn_up.weight",
    "down": "ffn_down.weight",
    "layer_scalar": "layer_output_scale.weight",
    "ple_gate": "inp_gate.weight",
    "ple_proj": "proj.weight",
    "ple_norm": "post_norm.weight",
    "router": "ffn_gate_inp.weight",
    "router_scale": "ffn_gate_inp.scale",
    "expert_scale": "ffn_down_exps.scale",
    "experts_gate_up": "ffn_gate_up_exps.weight",
    "experts_down": "ffn_down_exps.weight",
    "pre_moe_norm": "pre_ffw_norm_2.weight",
    "post_mlp_norm_1": "post_ffw_norm_1.weight",
    "post_moe_norm": "post_ffw_norm_2.weight",
}
# Gemma 4's expert block: stacked [E, ...] tensors and vectors (`scale`s are not norms: no offset).
EXPERT_PARTS = (
    "router",
    "router_scale",
    "expert_scale",
    "experts_gate_up",
    "experts_down",
    "pre_moe_norm",
    "post_mlp_norm_1",
    "post_moe_norm",
)
GGUF_GLOBAL = {
    "embed": "token_embd.weight",
    "final_norm": "output_norm.weight",
    "lm_head": "output.weight",
    "embed_per_layer": "per_layer_token_embd.weight",
    "ple_model_proj": "per_layer_model_proj.weight",
    "ple_proj_norm": "per_layer_proj_norm.weight",
}
# HF multimodal Gemma 3 keeps the text model under one of these prefixes (the Hub's checkpoints and transformers'
# save_pretrained use the first), beside vision tensors this text decoder ignores.
MULTIMODAL_TEXT_PREFIXES = {
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
    "model.language_model.": "model.",
}
MULTIMODAL_IGNORED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def gemma_hf_names(i: int | None, part: str) -> str:
    return _HF_GLOBAL[part] if i is None else f"model.layers.{i}.{_HF_LAYER[part]}"


def gemma_gguf_names(i: int | None, part: str) -> str:
    return GGUF_GLOBAL[part] if i is None else f"blk.{i}.{GGUF_LAYER[part]}"


def gemma_layer_parts(cfg: ModelConfig, i: int) -> list[str]:
    """The logical tensors layer i has."""
    from novallm_jax.model_gemma import layer_widths

    g = cfg.gemma
    _, k, v, _ = layer_widths(cfg, i)
    parts = ["attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm", "q", "o", "gate", "up", "down"]
    parts += ["k"] * bool(k) + ["v"] * bool(v)
    if cfg.qk_norm:
        parts += ["q_norm"] + ["k_norm"] * bool(k)
    if g.version >= 4:
        parts.append("layer_scalar")
        if g.per_layer_input_size:
            parts += ["ple_gate", "ple_proj", "ple_norm"]
    if g.num_experts:
        parts += list(EXPERT_PARTS)
    return parts


def gemma_tensor_shapes(cfg: ModelConfig, name=gemma_hf_names) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Gemma checkpoint with its shape ([out, in] for linears), named by `name`."""
    from novallm_jax.model_gemma import layer_widths

    g, d = cfg.gemma, cfg.hidden_size
    shapes = {name(None, "embed"): (cfg.vocab_size, d), name(None, "final_norm"): (d,)}
    if not cfg.tie_word_embeddings:
        shapes[name(None, "lm_head")] = (cfg.vocab_size, d)
    if g.per_layer_input_size:
        lp = cfg.num_layers * g.per_layer_input_size
        shapes.update(
            {
                name(None, "embed_per_layer"): (g.per_layer_vocab, lp),
                name(None, "ple_model_proj"): (lp, d),
                name(None, "ple_proj_norm"): (g.per_layer_input_size,),
            }
        )
    for i in range(cfg.num_layers):
        q, k, v, f = layer_widths(cfg, i)
        hd, p = cfg.layer_head_dim(i), g.per_layer_input_size
        full = {
            "attn_norm": (d,),
            "post_attn_norm": (d,),
            "mlp_norm": (d,),
            "post_mlp_norm": (d,),
            "q": (q, d),
            "k": (k, d),
            "v": (v, d),
            "o": (d, q),
            "q_norm": (hd,),
            "k_norm": (hd,),
            "gate": (f, d),
            "up": (f, d),
            "down": (d, f),
            "layer_scalar": (1,),
            "ple_gate": (p, d),
            "ple_proj": (d, p),
            "ple_norm": (d,),
            "router": (g.num_experts, d),
            "router_scale": (d,),
            "expert_scale": (g.num_experts,),
            "experts_gate_up": (g.num_experts, 2 * g.moe_size, d),
            "experts_down": (g.num_experts, d, g.moe_size),
            "pre_moe_norm": (d,),
            "post_mlp_norm_1": (d,),
            "post_moe_norm": (d,),
        }
        for part in gemma_layer_parts(cfg, i):
            shapes[name(i, part)] = full[part]
    return shapes


def assemble_gemma(cfg: ModelConfig, get, name, put, matmul_weight, params: dict, progress) -> dict:
    """Fills `params` (embed, final_norm and lm_head already there) with Gemma's layers and per-layer embeddings."""
    g = cfg.gemma
    if g.per_layer_input_size:
        params["embed_per_layer"] = put(get(name(None, "embed_per_layer")))
        params["ple_model_proj"] = matmul_weight([get(name(None, "ple_model_proj"))])
        params["ple_proj_norm"] = put(get(name(None, "ple_proj_norm")))
    for i in progress(range(cfg.num_layers)):
        parts = gemma_layer_parts(cfg, i)
        w = lambda part: get(name(i, part))
        layer = {
            "wqkv": matmul_weight([w(x) for x in ("q", "k", "v") if x in parts]),
            "wo": matmul_weight([w("o")]),
            "w_gate_up": matmul_weight([w("gate"), w("up")]),
            "w_down": matmul_weight([w("down")]),
        }
        for part in ("ple_gate", "ple_proj"):
            if part in parts:
                layer[part] = matmul_weight([w(part)])
        for part in parts:
            if "norm" in part or part in ("layer_scalar", "router_scale", "expert_scale"):
                layer[part] = put(w(part))
        if g.num_experts:
            from novallm_jax.loading.moe import assemble_experts

            layer["router"] = put(_dense(w("router")).T)
            layer.update(assemble_experts([w("experts_gate_up")], w("experts_down"), g.num_experts, put))
        params["layers"].append(layer)
    return params


def _dense(a):
    return a.dequantize() if hasattr(a, "dequantize") else a
