"""Writes a transformers Llama-family checkpoint as a GGUF file that llama.cpp and our GGUF loader read: float32,
float16, bfloat16, or the matmul weights in a block format (Q4_0/1, Q5_0/1, Q8_0, Q4_K, Q5_K, Q6_K, or llama.cpp's
Q4_K_M mix).

Used to run llama.cpp on exactly our weights (e.g. the random benchmark models, which have no GGUF of their own).
"""

from __future__ import annotations

import os

import numpy as np
from absl import logging
from safetensors import safe_open
from tqdm.auto import tqdm

from novallm_jax.config import ModelConfig
from novallm_jax.errors import UnsupportedArchitectureError
from novallm_jax.loading.gguf_file import gguf_names
from novallm_jax.loading.gguf_kquants import QUANTIZERS
from novallm_jax.loading.hf import _shard_files, hf_names

# SentencePiece piece types, as llama.cpp reads `tokenizer.ggml.token_type`.
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's rotate-half Q/K row order to llama.cpp's adjacent pairs (the inverse of the loader's `_unpermute`)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def placeholder_vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary for a model without a tokenizer: three specials, the 256 byte pieces where
    they fit, then `▁tN` pieces."""
    if size < 3:
        raise ValueError(f"a placeholder vocabulary needs at least 3 entries (unk, bos, eos), the model has {size}")
    tokens, types = ["<unk>", "<s>", "</s>"], [_UNKNOWN, _CONTROL, _CONTROL]
    if size >= 3 + 256:
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        types += [_BYTE] * 256
    rest = size - len(tokens)
    tokens += [f"\u2581t{i}" for i in range(rest)]
    types += [_NORMAL] * rest
    return tokens, [0.0] * (size - rest) + [-float(i) for i in range(rest)], types


def _check_supported(cfg: ModelConfig) -> None:
    problems = []
    if cfg.model_type not in ("llama", "mistral", "mixtral", "qwen3_moe", "phi3"):
        problems.append(f"model_type {cfg.model_type!r}")
    if cfg.sliding_window and cfg.model_type != "phi3":
        problems.append("a sliding window")
    if cfg.attention_bias or (cfg.qk_norm and cfg.model_type != "qwen3_moe"):
        problems.append("attention biases / q-k norms")
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type not in (
        "linear",
        "longrope" if cfg.model_type == "phi3" else "linear",
    ):
        problems.append(f"{cfg.rope_scaling.rope_type} rope scaling")
    if problems:
        raise UnsupportedArchitectureError(
            f"GGUF export covers the llama architecture without extras; this model has {', '.join(problems)}"
        )


QUANTS = (None, "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M")
_FILE_TYPES = {None: "ALL_F32", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S"}
# llama.cpp's fallback for rows that are not whole 256-weight super-blocks (llama-quant.cpp, tensor_type_fallback).
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama-quant.cpp's use_more_bits: the layers whose attn_v and ffn_down a Q4_K_M file keeps in Q6_K."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(quant: str | None, name: str, n_layers: int, cols: int, tied: bool, matmul: bool = True) -> str:
    """The GGUF type of tensor `name` (rows of `cols` weights; `tied`: token_embd is also the output) for a `quant`
    setting, as llama-quantize chooses it for a Llama model; tensors that are not matmul weights stay float32."""
    if quant is None or not matmul:
        return "F32"
    kind = quant
    if quant == "Q4_K_M":
        kind = "Q4_K"
        output = name == "output.weight" or (tied and name == "token_embd.weight")
        if output:
            kind = "Q6_K" if cols % 256 == 0 else "Q8_0"
        elif name.endswith(("attn_v.weight", "ffn_down.weight", "ffn_down_exps.weight")) and _more_bits(
            int(name.split(".")[1]), n_layers
        ):
            kind = "Q6_K"
    if kind in _FALLBACK and cols % 256:
        kind = _FALLBACK[kind]
    # Rows that are not whole 32-weight blocks stay float32 (llama.cpp would write float16).
    return "F32" if kind not in ("F16", "BF16") and cols % 32 else kind


def hf_to_gguf(model_dir: str, dst: str, quant: str | None = None) -> str:
    """Writes the safetensors checkpoint in `model_dir` to `dst` as a llama GGUF; returns `dst`.

    Float32, or with `quant` (one of `QUANTS`) the matmul weights and the embedding table in that type: F16, BF16,
    a block format (quantised by the `gguf` package where it can, else by `gguf_kquants`), or "Q4_K_M": llama.cpp's
    mix (`tensor_type`). Norms stay float32. The tokenizer is not converted: the file gets a placeholder vocabulary
    of the model's size, which is enough for running token ids (benchmarks, logit comparisons), not for text.
    """
    import gguf
    import gguf.quants

    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {', '.join(map(repr, QUANTS))}, not {quant!r}")
    written: dict[str, int] = {}

    def add(name: str, a: np.ndarray, matmul: bool = True) -> None:
        kind = tensor_type(quant, name, cfg.num_layers, a.shape[-1], cfg.tie_word_embeddings, matmul)
        written[kind] = written.get(kind, 0) + 1
        if kind == "F32":
            return w.add_tensor(name, a)
        if kind == "F16":
            return w.add_tensor(name, a.astype(np.float16))
        qtype = gguf.GGMLQuantizationType[kind]
        try:
            raw = gguf.quants.quantize(a, qtype)
        except NotImplementedError:
            raw = QUANTIZERS[kind](a)
        w.add_tensor(name, raw, raw_dtype=qtype)

    cfg = ModelConfig.from_hf(model_dir)
    if cfg.gemma is None:
        _check_supported(cfg)
    files = _shard_files(model_dir)
    handles: dict[str, object] = {}

    def get(name: str) -> np.ndarray:
        if files[name] not in handles:
            handles[files[name]] = safe_open(files[name], framework="numpy")
        return np.ascontiguousarray(handles[files[name]].get_tensor(name), np.float32)

    arch = {2: "gemma2", 3: "gemma3", 4: "gemma4"}[cfg.gemma.version] if cfg.gemma else "llama"
    if cfg.model_type in ("qwen3_moe", "phi3"):
        arch = {"qwen3_moe": "qwen3moe"}.get(cfg.model_type, cfg.model_type)
    w = gguf.GGUFWriter(dst, arch)
    w.add_name(os.path.basename(model_dir.rstrip("/")))
    w.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES.get(quant, f"MOSTLY_{quant}")))
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling.factor)
    w.add_vocab_size(cfg.vocab_size)
    tokens, scores, types = placeholder_vocab(cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    if cfg.gemma is not None:
        _write_gemma(w, cfg, get, add)
    elif cfg.moe is not None:
        from novallm_jax.loading.moe import write_moe

        write_moe(w, cfg, get, add, _permute)
    elif cfg.model_type == "phi3":
        from novallm_jax.loading.phi3 import write_phi3

        write_phi3(w, cfg, get, add)
    else:
        _write_llama_tensors(cfg, get, add)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    logging.info(
        "wrote %s (%d layers, %s: %s)",
        dst,
        cfg.num_layers,
        quant or "float32",
        ", ".join(f"{n} {k}" for k, n in sorted(written.items())),
    )
    return dst


def _write_llama_tensors(cfg: ModelConfig, get, add) -> None:
    add(gguf_names(None, "embed"), get(hf_names(None, "embed")))
    add(gguf_names(None, "final_norm"), get(hf_names(None, "final_norm")), matmul=False)
    if not cfg.tie_word_embeddings:
        add(gguf_names(None, "lm_head"), get(hf_names(None, "lm_head")))
    for i in tqdm(range(cfg.num_layers), desc="writing GGUF", unit="layer", leave=False):
        for part in ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down"):
            a = get(hf_names(i, part))
            if part in ("q", "k"):
                a = _permute(a, cfg.num_heads if part == "q" else cfg.num_kv_heads)
            add(gguf_names(i, part), a, matmul="norm" not in part)


def _write_gemma(w, cfg: ModelConfig, get, add) -> None:
    """Gemma's metadata and tensors as llama.cpp's converter writes them (norms as 1 + w for Gemma 2/3, the layer
    pattern as a per-layer flag), plus `attention.scale` (llama.cpp derives it from the model size instead)."""
    import gguf

    from novallm_jax.loading.gemma import gemma_gguf_names, gemma_hf_names, gemma_layer_parts
    from novallm_jax.model_gemma import layer_widths

    g = cfg.gemma
    sliding = [t == "sliding_attention" for t in g.layer_types]
    arch = w.arch
    if g.sliding_window:
        w.add_sliding_window(g.sliding_window)
    w.add_sliding_window_pattern(sliding)
    w.add_float32(f"{arch}.rope.freq_base_swa", g.local_rope_theta)
    w.add_float32(f"{arch}.attention.scale", cfg.attention_scale)
    if g.attn_softcap:
        w.add_attn_logit_softcapping(g.attn_softcap)
    if g.final_softcap:
        w.add_final_logit_softcapping(g.final_softcap)
    if g.version >= 4:
        full = [i for i, s in enumerate(sliding) if not s]
        w.add_shared_kv_layers(g.num_kv_shared_layers)
        w.add_embedding_length_per_layer_input(g.per_layer_input_size)
        w.add_key_length_swa(cfg.head_dim)
        w.add_value_length_swa(cfg.head_dim)
        if full:  # the global head size replaces the sliding one written before
            w.kv_data[0].pop(gguf.Keys.Attention.KEY_LENGTH.format(arch=arch))
            w.kv_data[0].pop(gguf.Keys.Attention.VALUE_LENGTH.format(arch=arch))
            w.add_key_length(cfg.layer_head_dim(full[0]))
            w.add_value_length(cfg.layer_head_dim(full[0]))
        w.kv_data[0].pop(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch))
        w.add_head_count_kv([cfg.layer_kv_heads(i) for i in range(cfg.num_layers)])
        if g.double_wide_mlp:
            w.kv_data[0].pop(gguf.Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch))
            w.add_feed_forward_length([layer_widths(cfg, i)[3] for i in range(cfg.num_layers)])
        if full:
            hd = cfg.layer_head_dim(full[0])
            rotated = int(g.full_rotary_fraction * hd // 2)
            add("rope_freqs.weight", np.array([1.0] * rotated + [1e30] * (hd // 2 - rotated), np.float32), matmul=False)
    shift = np.float32(g.norm_offset)
    for part in ("embed", "final_norm", "lm_head", "embed_per_layer", "ple_model_proj", "ple_proj_norm"):
        if (part == "lm_head" and cfg.tie_word_embeddings) or (
            part not in ("embed", "final_norm", "lm_head") and not g.per_layer_input_size
        ):
            continue
        a = get(gemma_hf_names(None, part))
        add(gemma_gguf_names(None, part), a + shift if part.endswith("norm") else a, matmul="norm" not in part)
    if g.num_experts:
        w.add_expert_count(g.num_experts)
        w.add_expert_used_count(g.top_k_experts)
        w.add_expert_feed_forward_length(g.moe_size)
    vectors = ("layer_scalar", "router", "router_scale", "expert_scale")  # the router stays float32, as llama.cpp's
    for i in tqdm(range(cfg.num_layers), desc="writing GGUF", unit="layer", leave=False):
        for part in gemma_layer_parts(cfg, i):
            a = get(gemma_hf_names(i, part))
            norm = part.endswith("norm")
            add(gemma_gguf_names(i, part), a + shift if norm else a, matmul=not norm and part not in vectors)
