"""Small random-weight transformers models, one per supported family, saved in HF layout for the loaders."""

from __future__ import annotations

import os

import torch
import transformers

_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)

FAMILIES = {
    "llama2": ("LlamaConfig", dict(rope_theta=10000.0)),
    "llama3_rope": ("LlamaConfig", dict(num_key_value_heads=1, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "llama_linear_rope": ("LlamaConfig", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "mistral": ("MistralConfig", dict(sliding_window=8, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),
    "smollm2": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=1)),
}


def build_hf_model(family: str, seed: int = 0):
    cls_name, extra = FAMILIES[family]
    config = getattr(transformers, cls_name)(**{**_BASE, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


def save_hf_model(model, directory: str, max_shard_size: str | None = None) -> str:
    os.makedirs(directory, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return directory
