"""Small random-weight transformers models, one per supported family, saved in HF layout for the loaders."""

from __future__ import annotations

import os

import torch
import transformers

_BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = {
    "llama2": ("LlamaConfig", dict(rope_theta=10000.0)),
    "llama3_rope": (
        "LlamaConfig",
        dict(
            num_key_value_heads=1,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "llama_linear_rope": ("LlamaConfig", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "mistral": ("MistralConfig", dict(sliding_window=8, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),
    "smollm2": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    # Gemma: windows of 4 tokens, shorter than most test prompts; small soft caps, so that tanh bends.
    "gemma2": (
        "Gemma2Config",
        dict(
            head_dim=16,
            num_hidden_layers=3,
            query_pre_attn_scalar=24,
            sliding_window=4,
            attn_logit_softcapping=0.5,
            final_logit_softcapping=1.5,
            initializer_range=0.1,
        ),
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(
            head_dim=16,
            num_hidden_layers=3,
            query_pre_attn_scalar=32,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            initializer_range=0.1,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            },
        ),
    ),
    "gemma4_text": (
        "Gemma4TextConfig",
        dict(
            head_dim=16,
            global_head_dim=32,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            num_hidden_layers=5,
            num_kv_shared_layers=2,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=256,
            sliding_window=4,
            use_double_wide_mlp=True,
            final_logit_softcapping=3.0,
            initializer_range=0.1,
            layer_types=[
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "sliding_attention",
                "full_attention",
            ],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 10000.0},
            },
        ),
    ),
    # Gemma 4 with its mixture-of-experts block beside each layer's MLP: 4 experts, top-2.
    "gemma4_moe": (
        "Gemma4TextConfig",
        dict(
            head_dim=16,
            global_head_dim=32,
            hidden_size_per_layer_input=0,
            num_hidden_layers=3,
            sliding_window=4,
            final_logit_softcapping=3.0,
            initializer_range=0.1,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=32,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
    ),
    # Mixture of experts: 8 experts, top-3 (Mixtral, whose weights are always renormalised) and top-2 without
    # renormalisation beside a dense layer (Qwen3-MoE).
    "mixtral": (
        "MixtralConfig",
        dict(num_local_experts=8, num_experts_per_tok=3, intermediate_size=32, initializer_range=0.1),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            mlp_only_layers=[1],
            norm_topk_prob=False,
            head_dim=16,
            initializer_range=0.1,
        ),
    ),
    # Phi-3 with longrope: 20 of the prompts' tokens and most generations reach past the original 16 positions.
    "phi3": (
        "Phi3Config",
        dict(
            original_max_position_embeddings=16,
            rope_parameters=dict(
                rope_type="longrope",
                rope_theta=10000.0,
                original_max_position_embeddings=16,
                short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0],
            ),
        ),
    ),
}


def build_hf_config(family: str):
    cls_name, extra = FAMILIES[family]
    return getattr(transformers, cls_name)(**{**_BASE, **extra})


def build_hf_model(family: str, seed: int = 0):
    config = build_hf_config(family)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if family.startswith("gemma"):
        _randomize_norms(model)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


def save_hf_model(model, directory: str, max_shard_size: str | None = None) -> str:
    os.makedirs(directory, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return directory


def _randomize_norms(model) -> None:
    """Norm weights and layer scalars off their initial constants, so that the test sees (1 + w) against w."""
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "norm" in name or name.endswith(("router.scale", "per_expert_scale")):
                t.add_(0.2 * torch.randn_like(t))
        for name, t in model.named_buffers():
            if name.endswith("layer_scalar"):
                t.copy_(0.5 + torch.rand_like(t))


def build_superblock_llama(layers: int = 8, seed: int = 0):
    """A random Llama whose weight rows are whole 256-weight super-blocks (hidden 256, 4 heads of 64, FFN 512), as
    GGUF K-quants need; untied, so token_embd and output are separate tensors."""
    config = transformers.LlamaConfig(
        **{
            **_BASE,
            "vocab_size": 300,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": layers,
            "head_dim": 64,
            "tie_word_embeddings": False,
        }
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def build_superblock_moe(family: str, layers: int = 2, seed: int = 0):
    """A random Mixtral or Qwen3-MoE whose weight rows (experts' included) are whole 256-weight super-blocks (hidden
    256, 4 experts of 256, top-2), as GGUF K-quants need."""
    config = build_hf_config(family)
    size = "intermediate_size" if family == "mixtral" else "moe_intermediate_size"
    experts = "num_local_experts" if family == "mixtral" else "num_experts"
    for key, value in {
        "hidden_size": 256,
        "head_dim": 64,
        size: 256,
        experts: 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": layers,
        "vocab_size": 300,
        "tie_word_embeddings": False,
    }.items():
        setattr(config, key, value)
    if family == "qwen3_moe":
        config.mlp_only_layers = []
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def build_gemma3_multimodal(seed: int = 0):
    """A tiny `gemma3` (Gemma3ForConditionalGeneration): the gemma3_text family's text tower and a small vision tower."""
    vision = transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = transformers.Gemma3Config(
        text_config=build_hf_config("gemma3_text").to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        image_token_index=255,
        boi_token_index=253,
        eoi_token_index=254,
    )
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    _randomize_norms(model)
    return model
