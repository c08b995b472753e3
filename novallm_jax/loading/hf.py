"""Loads a HF model directory: `config.json` + `model.safetensors` (or a sharded `model.safetensors.index.json`)."""

from __future__ import annotations

import json
import os

import numpy as np
from absl import logging
from safetensors import safe_open

from novallm_jax.config import ModelConfig
from novallm_jax.errors import ModelLoadError, TensorError
from novallm_jax.loading.assemble import assemble_params, loading_on_host
from novallm_jax.loading.host_slices import FileTensor
from novallm_jax.loading.gemma import MULTIMODAL_IGNORED, MULTIMODAL_TEXT_PREFIXES, gemma_hf_names, gemma_tensor_shapes

# Buffers some checkpoints carry that hold no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF checkpoint of this config must hold, with its shape ([out, in] for linears)."""
    if cfg.gemma is not None:
        return gemma_tensor_shapes(cfg)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (cfg.q_size, d),
                p + "self_attn.k_proj.weight": (cfg.kv_size, d),
                p + "self_attn.v_proj.weight": (cfg.kv_size, d),
                p + "self_attn.o_proj.weight": (d, cfg.q_size),
            }
        )
        if cfg.model_type == "phi3":  # q/k/v and gate/up fused in the checkpoint
            from novallm_jax.loading.phi3 import HF_FUSED, fused_shapes

            for n in ("q", "k", "v"):
                del shapes[p + f"self_attn.{n}_proj.weight"]
            shapes.update({p + HF_FUSED[part]: shape for part, shape in fused_shapes(cfg).items()})
            shapes[p + "mlp.down_proj.weight"] = (d, f)
        elif cfg.moe is not None and cfg.moe.sparse_layers[i]:
            from novallm_jax.loading.moe import moe_hf_shapes

            shapes.update(moe_hf_shapes(cfg, i))
        else:
            shapes.update(
                {
                    p + "mlp.gate_proj.weight": (f, d),
                    p + "mlp.up_proj.weight": (f, d),
                    p + "mlp.down_proj.weight": (d, f),
                }
            )
        if cfg.attention_bias:
            for n, size in (("q", cfg.q_size), ("k", cfg.kv_size), ("v", cfg.kv_size)):
                shapes[p + f"self_attn.{n}_proj.bias"] = (size,)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
    return shapes


def _shard_files(model_dir: str) -> dict[str, str]:
    """Maps each tensor name to the safetensors file that holds it."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({e})") from None
        return {name: os.path.join(model_dir, fn) for name, fn in weight_map.items()}
    if not os.path.exists(single):
        raise ModelLoadError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")
    try:
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header.
        raise ModelLoadError(f"{single} is not a valid safetensors file: {e}") from None


def load_hf(model_dir: str, dtype) -> tuple[ModelConfig, dict]:
    """Reads config and weights tensor by tensor, checks every name and shape, returns (config, params)."""
    cfg = ModelConfig.from_hf(model_dir)
    expected = hf_tensor_shapes(cfg)
    files, stored = _text_model_files(_shard_files(model_dir))
    names = {n for n in files if not n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        names.discard("lm_head.weight")  # some tied checkpoints store the copy too
    missing = sorted(set(expected) - names)
    if missing:
        raise TensorError(
            f"checkpoint in {model_dir} is missing tensor {missing[0]!r} "
            f"(expected shape {expected[missing[0]]}; {len(missing)} missing in all)"
        )
    unexpected = sorted(names - set(expected))
    if unexpected:
        raise TensorError(
            f"checkpoint in {model_dir} has unexpected tensor {unexpected[0]!r} "
            f"in {os.path.basename(files[unexpected[0]])} ({len(unexpected)} unexpected in all); "
            f"is config.json ({cfg.model_type}) the right one for these weights?"
        )

    handles = {}
    # For a mesh (weights on the host), tensors are read slice by slice as each device takes its shard.
    lazy = loading_on_host()

    def get(name: str) -> np.ndarray | FileTensor:
        fn = files[name]
        if fn not in handles:
            if not os.path.exists(fn):
                raise ModelLoadError(f"shard {fn} named in the index is missing")
            try:
                handles[fn] = safe_open(fn, framework="numpy" if lazy else "flax")
            except Exception as e:
                raise ModelLoadError(f"{fn} is not a valid safetensors file: {e}") from None
        stored_name = stored.get(name, name)
        part = handles[fn].get_slice(stored_name) if lazy else handles[fn].get_tensor(stored_name)
        shape = tuple(part.get_shape() if lazy else part.shape)
        if shape != expected[name]:
            raise TensorError(f"tensor {name!r} in {os.path.basename(fn)} has shape {shape}, expected {expected[name]}")
        if lazy:
            return FileTensor(shape, np.float32, lambda index: part[index].astype(np.float32))
        return np.asarray(part.astype(np.float32))

    logging.info("loading %s (%s, %d layers)", model_dir, cfg.model_type, cfg.num_layers)
    names_of = hf_names if cfg.gemma is None else gemma_hf_names
    if cfg.moe is not None:
        names_of = _moe_names(cfg)
    if cfg.model_type == "phi3":
        from novallm_jax.loading.phi3 import HF_FUSED, unfused_getter

        get = unfused_getter(cfg, get, hf_names, lambda i, part: f"model.layers.{i}.{HF_FUSED[part]}")
    return cfg, assemble_params(cfg, get, names_of, dtype, desc=os.path.basename(model_dir.rstrip("/")))


def _text_model_files(files: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """A multimodal checkpoint's text model under the text-only names, its vision tensors left out: (name -> file,
    name -> the name stored in the file where they differ)."""
    stored = {
        new + n[len(old) :]: n for n in files for old, new in MULTIMODAL_TEXT_PREFIXES.items() if n.startswith(old)
    }
    if not stored:
        return files, {}
    kept = {n: fn for n, fn in files.items() if not n.startswith(MULTIMODAL_IGNORED + tuple(MULTIMODAL_TEXT_PREFIXES))}
    return {**kept, **{n: files[s] for n, s in stored.items()}}, stored


def hf_names(i: int | None, part: str) -> str:
    """HF tensor name of a logical weight (`i` is the layer, None for globals)."""
    if i is None:
        return {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}[
            part
        ]
    return (
        f"model.layers.{i}."
        + {
            "attn_norm": "input_layernorm.weight",
            "mlp_norm": "post_attention_layernorm.weight",
            "q": "self_attn.q_proj.weight",
            "k": "self_attn.k_proj.weight",
            "v": "self_attn.v_proj.weight",
            "o": "self_attn.o_proj.weight",
            "q_bias": "self_attn.q_proj.bias",
            "k_bias": "self_attn.k_proj.bias",
            "v_bias": "self_attn.v_proj.bias",
            "q_norm": "self_attn.q_norm.weight",
            "k_norm": "self_attn.k_norm.weight",
            "gate": "mlp.gate_proj.weight",
            "up": "mlp.up_proj.weight",
            "down": "mlp.down_proj.weight",
        }[part]
    )


def _moe_names(cfg: ModelConfig):
    from novallm_jax.loading.moe import is_moe_part, moe_hf_name

    return lambda i, part: moe_hf_name(cfg, i, part) if is_moe_part(part) else hf_names(i, part)
