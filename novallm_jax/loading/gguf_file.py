"""Loads a GGUF file: metadata to `ModelConfig`; tensors dequantised by the `gguf` package to the compute dtype, or,
with `keep_quantized`, matmul weights of a `gguf_quant.SUPPORTED` type kept in their block codes, and F16 / BF16 ones
in 16 bits."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from absl import logging

from novallm_jax.config import ModelConfig
from novallm_jax.errors import ModelLoadError, TensorError
from novallm_jax.loading.assemble import assemble_params, loading_on_host
from novallm_jax.loading.gemma import GGUF_GLOBAL, GGUF_LAYER, gemma_gguf_names, gemma_tensor_shapes
from novallm_jax.loading.gguf_quant import BlockQuant, HalfWeight, decode_blocks, half_bits
from novallm_jax.loading.gguf_readers import FastReader, reader_for
from novallm_jax.loading.host_slices import FileTensor
from novallm_jax.loading.moe import GGUF_LAYER as MOE_GGUF_LAYER

GGUF_MAGIC = b"GGUF"

_LAYER_NAMES = {
    "attn_norm": "attn_norm.weight",
    "mlp_norm": "ffn_norm.weight",
    "q": "attn_q.weight",
    "k": "attn_k.weight",
    "v": "attn_v.weight",
    "o": "attn_output.weight",
    "q_bias": "attn_q.bias",
    "k_bias": "attn_k.bias",
    "v_bias": "attn_v.bias",
    "q_norm": "attn_q_norm.weight",
    "k_norm": "attn_k_norm.weight",
    "gate": "ffn_gate.weight",
    "up": "ffn_up.weight",
    "down": "ffn_down.weight",
}
_GLOBAL_NAMES = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}


def gguf_names(i: int | None, part: str) -> str:
    return _GLOBAL_NAMES[part] if i is None else f"blk.{i}.{_LAYER_NAMES[part]}"


def open_gguf(path: str):
    """Opens a GGUF file with the `gguf` package, with a clear error if the file is not GGUF."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        return reader_for(path, FastReader)
    except Exception as e:  # the reader raises bare ValueErrors/struct errors on truncated files
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from None


def gguf_metadata(reader) -> dict[str, Any]:
    """The file's key/value metadata as plain Python values."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # a field of a type this gguf version cannot decode is not one we need
            continue
    return meta


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's reordering of Q/K rows for adjacent-pair RoPE, back to HF's rotate-half layout."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str, dtype, keep_quantized: bool = False) -> tuple[ModelConfig, dict]:
    """(config, params); `keep_quantized`: matmul weights stay in their GGUF block codes or 16 bits
    (`native.QuantLinear`, `native.HalfLinear`, for
    the native CPU kernels, which compute in float32 with the same values)."""
    from gguf.quants import dequantize

    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    cfg = ModelConfig.from_gguf_metadata(gguf_metadata(reader), set(tensors))
    arch = reader.fields["general.architecture"].contents()
    names = gguf_names
    if cfg.moe is not None:
        from novallm_jax.loading.moe import is_moe_part, moe_gguf_name

        names = lambda i, part: moe_gguf_name(i, part) if is_moe_part(part) else gguf_names(i, part)
    if cfg.gemma is not None:
        cfg = gemma_gguf_config(cfg, tensors)
        names = gemma_gguf_names
    if cfg.model_type == "phi3":
        from novallm_jax.loading.phi3 import phi3_gguf_config

        cfg = phi3_gguf_config(cfg, gguf_metadata(reader), tensors)
    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise TensorError(
            f"GGUF {path} is missing tensor {missing[0]!r} (expected shape {expected[missing[0]]}; "
            f"{len(missing)} missing in all)"
        )
    unexpected = sorted(n for n in set(tensors) - set(expected) if n != "rope_freqs.weight")
    if unexpected:
        raise TensorError(f"GGUF {path} has unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")

    def permuted_heads(name: str) -> int | None:
        """The head count of a Q/K weight whose rows llama.cpp reordered (see `_unpermute`), else None."""
        if arch != "llama" or not name.endswith(("attn_q.weight", "attn_k.weight")):
            return None
        return cfg.num_heads if name.endswith("attn_q.weight") else cfg.num_kv_heads

    roles: dict[str, list[str]] = {}  # GGUF type -> how each of its tensors is kept (see `kept_line`)
    # For a mesh (weights on the host), matmul weights are read slice by slice as each device takes its shard.
    lazy = loading_on_host() and not keep_quantized

    def note(t, coded: bool) -> None:
        """Notes how tensor `t` is kept: "codes" or "dense" for a matmul weight (any tensor of 2 or more dimensions
        that is not the embedding table), "table" for the embedding table (gathered, so dequantised; its codes kept
        too when it is also the tied output), "vector" for norms and biases."""
        how = roles.setdefault(t.tensor_type.name, [])
        if t.name == _GLOBAL_NAMES["embed"]:
            how.append("table")
            if not cfg.tie_word_embeddings:
                return
        how.append("codes" if coded else "dense" if len(t.shape) > 1 else "vector")

    def get(name: str) -> np.ndarray | BlockQuant | HalfWeight:
        t = tensors[name]
        if keep_quantized and name.endswith(_EXPERT_TENSORS) and len(t.shape) == 3:
            # An expert stack [E, out, in] stays in codes as one [E * out, in] weight (see loading/moe.py).
            shape = tuple(int(s) for s in reversed(t.shape))
            bq = decode_blocks(t.data, t.tensor_type.name, (shape[0] * shape[1], shape[2]))
            bq = bq if shape == expected[name] else None
            note(t, bq is not None)
            if bq is not None:
                return bq
        if keep_quantized and name.endswith(_MATMUL_TENSORS):
            shape = tuple(int(s) for s in reversed(t.shape))
            kept = (decode_blocks, half_bits)[t.tensor_type.name in ("F16", "BF16")]
            bq = kept(t.data, t.tensor_type.name, shape) if shape == expected[name] else None
            note(t, bq is not None)
            if bq is not None:
                heads = permuted_heads(name)
                return bq if heads is None else bq.take_rows(_unpermute(np.arange(shape[0]), heads))
        if not keep_quantized or not name.endswith(_MATMUL_TENSORS + _EXPERT_TENSORS):
            note(t, False)
        if lazy and name.endswith(_MATMUL_TENSORS) and len(t.shape) == 2:
            return _file_tensor(t, expected[name], permuted_heads(name), path)
        try:
            a = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelLoadError(
                f"tensor {name!r} in {path} uses {t.tensor_type.name}, which the installed gguf "
                f"package cannot dequantise"
            ) from None
        a = np.asarray(a, np.float32)
        if a.shape != expected[name]:
            raise TensorError(f"tensor {name!r} in {path} has shape {a.shape}, expected {expected[name]}")
        if cfg.gemma is not None and cfg.gemma.norm_offset and name.endswith("norm.weight"):
            a = a - np.float32(cfg.gemma.norm_offset)  # llama.cpp stores Gemma 2/3 norms as 1 + w
        heads = permuted_heads(name)
        return a if heads is None else _unpermute(a, heads)

    logging.info("loading %s (%s, %d layers)", path, arch, cfg.num_layers)
    if cfg.model_type == "phi3":
        from novallm_jax.loading.phi3 import GGUF_FUSED, unfused_getter

        get = unfused_getter(cfg, get, names, lambda i, part: f"blk.{i}.{GGUF_FUSED[part]}")
    params = assemble_params(cfg, get, names, dtype, desc=os.path.basename(path))
    for type_name, how in sorted(roles.items()):
        line, widened = kept_line(type_name, how, np.dtype(dtype).name)
        (logging.warning if widened and keep_quantized else logging.info)("%s", line)
    return cfg, params


def _file_tensor(t, shape: tuple[int, int], heads: int | None, path: str) -> FileTensor:
    """A 2-D GGUF tensor ([out, in] rows of blocks) read in slices: only the rows asked for and, of each, the blocks
    that hold the columns asked for, dequantised to float32 (rows in HF's order where llama.cpp permuted them)."""
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    block, type_size = GGML_QUANT_SIZES[t.tensor_type]
    data = t.data
    coded = data.dtype == np.uint8  # rows of block bytes; F32/F16 tensors hold their values
    unit = type_size if coded else 1  # bytes (or values) per `block` columns
    stored = (data.shape[0], data.shape[-1] // unit * block) if data.ndim == 2 else tuple(data.shape)
    if stored != tuple(shape):
        raise TensorError(f"tensor {t.name!r} in {path} has shape {stored}, expected {shape}")
    rows = np.arange(shape[0]) if heads is None else _unpermute(np.arange(shape[0]), heads)

    def read(index) -> np.ndarray:
        r, c = index
        b0, b1 = c.start // block, -(-c.stop // block)
        part = data[rows[r], b0 * unit : b1 * unit]
        try:
            a = dequantize(part, t.tensor_type) if coded else part
        except NotImplementedError:
            raise ModelLoadError(
                f"tensor {t.name!r} in {path} uses {t.tensor_type.name}, which the installed "
                f"gguf package cannot dequantise"
            ) from None
        return np.asarray(a, np.float32)[:, c.start - b0 * block : c.stop - b0 * block]

    return FileTensor(shape, np.float32, read)


def kept_line(type_name: str, roles: list[str], dtype: str) -> tuple[str, bool]:
    """The load's log line for one GGUF tensor type, e.g. "Q4_K: 120 tensors kept in codes (exact)", from how each
    of its tensors is kept ("codes", "dense", "table", "vector"; see `load_gguf`), and whether a matmul weight of a
    block type was dequantised (what a Q4_K_M file must not do silently)."""
    count = {r: roles.count(r) for r in ("codes", "dense", "table", "vector")}
    same = type_name == {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(dtype)
    exact = type_name in ("F32", "F16", "BF16") and dtype == "float32"
    phrases = []
    if count["codes"]:
        phrases.append(f"{count['codes']} tensors kept in " + ("16 bits" if exact else "codes") + " (exact)")
    if count["dense"]:
        phrases.append(
            f"{count['dense']} matmul weights "
            + (f"in {dtype}" if same else f"widened to {dtype} (exact)" if exact else f"dequantised to {dtype}")
        )
    if count["table"]:
        phrases.append("the embedding table" + ("" if same else f" as {dtype} (its rows are gathered)"))
    if count["vector"]:
        phrases.append(f"{count['vector']} norms" + ("" if same else f" as {dtype}"))
    return f"{type_name}: {', '.join(phrases)}", bool(count["dense"]) and not exact


_MATMUL_TENSORS = tuple(_LAYER_NAMES[p] for p in ("q", "k", "v", "o", "gate", "up", "down")) + (
    _GLOBAL_NAMES["embed"],
    _GLOBAL_NAMES["lm_head"],
    GGUF_LAYER["ple_gate"],
    GGUF_LAYER["ple_proj"],
    "attn_qkv.weight",
    GGUF_GLOBAL["ple_model_proj"],
)

_EXPERT_TENSORS = tuple(MOE_GGUF_LAYER[k] for k in ("gate", "up", "down")) + (GGUF_LAYER["experts_gate_up"],)


def gemma_gguf_config(cfg: ModelConfig, tensors: dict) -> ModelConfig:
    """What a Gemma 4 file says in tensors rather than metadata: the per-layer embeddings' vocabulary, and the share
    of a global head that RoPE rotates (`rope_freqs`: factor 1 for a rotated pair, 1e30 for one left alone)."""
    import dataclasses

    g = cfg.gemma
    if g.version < 4:
        return cfg
    if "per_layer_token_embd.weight" in tensors:
        g = dataclasses.replace(g, per_layer_vocab=int(tensors["per_layer_token_embd.weight"].shape[-1]))
    if "rope_freqs.weight" in tensors:
        factors = np.asarray(tensors["rope_freqs.weight"].data, np.float32)
        g = dataclasses.replace(g, full_rotary_fraction=float((factors == 1.0).sum()) / factors.size)
    return dataclasses.replace(cfg, gemma=g)


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in numpy order ([out, in]), as the gguf package returns them."""
    from novallm_jax.loading.hf import hf_names, hf_tensor_shapes

    if cfg.gemma is not None:
        return gemma_tensor_shapes(cfg, gemma_gguf_names)

    hf = hf_tensor_shapes(cfg)
    out = {gguf_names(None, p): hf[hf_names(None, p)] for p in ("embed", "final_norm")}
    if not cfg.tie_word_embeddings:
        out[gguf_names(None, "lm_head")] = hf[hf_names(None, "lm_head")]
    for i in range(cfg.num_layers):
        for part in _LAYER_NAMES:
            if hf_names(i, part) in hf:
                out[gguf_names(i, part)] = hf[hf_names(i, part)]
        if cfg.moe is not None and cfg.moe.sparse_layers[i]:
            from novallm_jax.loading.moe import moe_gguf_shapes

            out.update(moe_gguf_shapes(cfg, i))
    if cfg.model_type == "phi3":
        from novallm_jax.loading.phi3 import gguf_shapes

        out.update(gguf_shapes(cfg))
    return out
