"""`ModelConfig`: the static description of a decoder, from a HF `config.json`, GGUF metadata or a preset."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

from novallm_jax.config_gemma import (
    GEMMA_GGUF_ARCHS,
    GEMMA_MODEL_TYPES,
    GemmaSpec,
    gemma_fields_from_hf,
    gemma_fields_from_gguf,
    gemma_text_config,
)
from novallm_jax.config_moe import MOE_GGUF_ARCHS, MOE_MODEL_TYPES, MoeSpec, moe_fields_from_gguf, moe_fields_from_hf
from novallm_jax.errors import ModelLoadError, UnsupportedArchitectureError

# HF `model_type` values this decoder implements, and what each family adds to plain Llama.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3") + tuple(GEMMA_MODEL_TYPES) + MOE_MODEL_TYPES
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "qwen3", "phi3") + tuple(GEMMA_GGUF_ARCHS) + MOE_GGUF_ARCHS
# Presets live in the repository's top-level `configs/models/` (HF `config.json` format).
_PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (`rope_scaling` in HF configs); hashable so the config stays static under `jit`."""

    rope_type: str = "default"  # "default" | "linear" | "llama3" | "longrope"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # longrope (Phi-3): per-pair divisors of the frequencies for sequences up to / past the original length, and
    # the factor cos and sin are multiplied by (both sets).
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the shapes and the math of a Llama-family decoder.

    Frozen and hashable: it is passed to jitted functions as a static argument.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    qk_norm: bool = False  # RMSNorm of q and k over head_dim (Qwen3)
    sliding_window: int | None = None  # Mistral
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    gemma: GemmaSpec | None = None  # Gemma 2/3/4 (config_gemma.py)
    moe: MoeSpec | None = None  # Mixtral, Qwen3-MoE (config_moe.py)
    # Tensor-parallel shards the fused q/k/v and gate/up columns are laid out for: each shard's columns are
    # contiguous (its q, k, v heads; its gate, up units), so a column split over the mesh's `model` axis gives every
    # device whole heads (sharding.py). 1: the checkpoint's layout.
    model_shards: int = 1

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    # --- per layer: what differs between the layers of one model (Gemma's sliding and global layers) ---------------

    def layer_window(self, i: int) -> int | None:
        """Layer i's sliding window (a query sees the keys at positions > its own minus the window), or None."""
        g = self.gemma
        if g is None:
            return self.sliding_window
        return g.sliding_window if g.layer_types[i] == "sliding_attention" else None

    def layer_is_sliding(self, i: int) -> bool:
        return self.layer_window(i) is not None

    def layer_head_dim(self, i: int) -> int:
        g = self.gemma
        return g.full_head_dim if g and g.full_head_dim and g.layer_types[i] == "full_attention" else self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        g = self.gemma
        return g.full_kv_heads if g and g.full_kv_heads and g.layer_types[i] == "full_attention" else self.num_kv_heads

    def layer_kv_source(self, i: int) -> int:
        """The layer whose cached K/V layer i attends over (itself but for Gemma 4's K/V-sharing layers)."""
        return i if self.gemma is None else self.gemma.kv_source(i)

    def layer_rope(self, i: int) -> int:
        """Index of layer i's RoPE table in `rope_inv_freqs(cfg)` (one per kind of layer)."""
        return 1 if self.gemma is not None and self.gemma.layer_types[i] == "sliding_attention" else 0

    @property
    def attention_scale(self) -> float:
        g = self.gemma
        if g is None:
            return self.head_dim**-0.5
        return 1.0 if g.query_pre_attn_scalar is None else g.query_pre_attn_scalar**-0.5

    @property
    def attn_softcap(self) -> float | None:
        return None if self.gemma is None else self.gemma.attn_softcap

    def num_params(self) -> int:
        """Parameter count as stored (the tied lm_head counted once)."""
        d, f = self.hidden_size, self.intermediate_size
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            attn += 2 * self.head_dim
        layer = attn + 3 * d * f + (4 if self.gemma else 2) * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        experts = 0
        if self.moe is not None:  # sparse layers: a router and E expert FFNs instead of the dense MLP
            m = self.moe
            experts = sum(m.sparse_layers) * (d * m.num_experts + 3 * d * m.expert_size * m.num_experts - 3 * d * f)
        return self.vocab_size * d + self.num_layers * layer + d + head + experts

    # --- constructors ------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> "ModelConfig":
        """From a HF `config.json` (a path, a directory holding one, or the parsed dict)."""
        if not isinstance(config, Mapping):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            try:
                with open(path) as f:
                    config = json.load(f)
            except FileNotFoundError:
                raise ModelLoadError(f"no config.json at {path}") from None
            except json.JSONDecodeError as e:
                raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
        c = dict(gemma_text_config(config))
        model_type = c.get("model_type")
        if model_type is None:
            arch = (c.get("architectures") or ["?"])[0]
            raise UnsupportedArchitectureError(f"config has no model_type (architectures: {arch})")
        if model_type not in SUPPORTED_MODEL_TYPES:  # before reading fields other families may name differently
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            num_heads = int(c["num_attention_heads"])
            hidden = int(c["hidden_size"])
            eos = c.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
            window = c.get("sliding_window") if model_type in ("mistral", "mixtral", "phi3") else None
            if model_type == "qwen2" and c.get("use_sliding_window"):
                window = c.get("sliding_window")
            extra = {}
            if model_type in GEMMA_MODEL_TYPES:
                extra = gemma_fields_from_hf(c, GEMMA_MODEL_TYPES[model_type], int(c["num_hidden_layers"]))
                extra["rope_scaling"] = _rope_scaling(extra["rope_scaling"])
            if model_type in MOE_MODEL_TYPES:
                extra = moe_fields_from_hf(c, model_type, int(c["num_hidden_layers"]))
            fields = dict(
                model_type=model_type,
                vocab_size=int(c["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(c["intermediate_size"]),
                num_layers=int(c["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(c.get("num_key_value_heads") or num_heads),
                head_dim=int(c.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_theta(c)),
                rope_scaling=_rope_scaling(c.get("rope_scaling") or c.get("rope_parameters"), c),
                max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
                attention_bias=model_type == "qwen2" or bool(c.get("attention_bias", False)),
                qk_norm=model_type in ("qwen3", "qwen3_moe"),
                sliding_window=int(window) if window else None,
                bos_token_id=c.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
            return cls(**{**fields, **extra})
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks required field {e.args[0]!r}") from None

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], tensor_names: set[str]) -> "ModelConfig":
        """From the key/value metadata of a GGUF file (`general.architecture` = llama, qwen2, qwen3)."""
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHS:
            raise UnsupportedArchitectureError(
                f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_ARCHS)}"
            )

        def get(key, default=None):
            return meta.get(f"{arch}.{key}", default)

        num_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        head_dim = int(get("attention.key_length") or hidden // num_heads)
        vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        scaling = None
        if get("rope.scaling.type") == "linear":
            scaling = RopeScaling("linear", factor=float(get("rope.scaling.factor")))
        eos = meta.get("tokenizer.ggml.eos_token_id")
        extra = gemma_fields_from_gguf(meta, arch, tensor_names) if arch in GEMMA_GGUF_ARCHS else {}
        extra.update(moe_fields_from_gguf(meta, arch, int(get("block_count")), tensor_names))
        fields = dict(
            model_type="llama" if arch == "llama" else arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(_first(get("feed_forward_length"))),
            num_layers=int(get("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(_first(get("attention.head_count_kv")) or num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            sliding_window=None,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
        )
        return cls(**{**fields, **extra})

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        """From a preset in `configs/models/` by name (e.g. "smollm2-135m"), or from a path to such a JSON file."""
        if os.path.isfile(name):
            return cls.from_hf(name)
        path = os.path.join(_PRESET_DIR, f"{name}.json")
        if not os.path.exists(path):
            known = sorted(f[:-5] for f in os.listdir(_PRESET_DIR) if f.endswith(".json"))
            raise ModelLoadError(f"unknown preset {name!r}; known presets: {', '.join(known)}")
        return cls.from_hf(path)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            rs = dict(d["rope_scaling"])
            rs.update({k: tuple(rs.get(k) or ()) for k in ("short_factor", "long_factor")})
            d["rope_scaling"] = RopeScaling(**rs)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        if d.get("gemma") is not None:
            d["gemma"] = GemmaSpec.from_dict(d["gemma"])
        if d.get("moe") is not None:
            d["moe"] = MoeSpec.from_dict(d["moe"])
        return cls(**d)


def _first(v):
    """A per-layer GGUF array's first entry (Gemma 4 stores some fields per layer); a scalar as it is."""
    return v[0] if isinstance(v, (list, tuple)) else v


def _rope_theta(c: Mapping[str, Any]) -> float:
    params = c.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_theta" in params:
        return params["rope_theta"]
    return c.get("rope_theta", 10000.0)


def _rope_scaling(rs: Mapping[str, Any] | None, c: Mapping[str, Any] | None = None) -> RopeScaling | None:
    """`rope_scaling` / `rope_parameters` of a config.json `c` (whose other fields longrope reads)."""
    top = (c or {}).get("partial_rotary_factor") if (c or {}).get("model_type") == "phi3" else None  # Phi-4-mini
    partial = (rs or {}).get("partial_rotary_factor", top)
    if float(partial or 1.0) != 1.0:
        raise UnsupportedArchitectureError(
            f"partial_rotary_factor {partial} is not supported (only 1: every pair of a head rotates)"
        )
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in ("su", "yarn") and c is not None and c.get("model_type") == "phi3":
        kind = "longrope"  # as Phi3Config reads its older configs
    if kind == "default":
        return None
    if kind == "longrope":
        return _longrope(rs, c or {})
    if kind not in ("linear", "llama3"):
        raise UnsupportedArchitectureError(
            f"rope_scaling type {kind!r} is not supported; supported: linear, llama3, longrope"
        )
    return RopeScaling(
        rope_type=kind,
        factor=float(rs.get("factor", 1.0)),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
    )


def _longrope(rs: Mapping[str, Any], c: Mapping[str, Any]) -> RopeScaling:
    """LongRoPE as transformers' `_compute_longrope_parameters` reads it: the attention factor from `factor`, or
    from max_position_embeddings / original_max_position_embeddings (Phi-3's configs)."""
    orig = rs.get("original_max_position_embeddings") or c.get("original_max_position_embeddings")
    if not orig:
        raise ModelLoadError("longrope rope scaling lacks original_max_position_embeddings")
    orig = int(orig)
    factor = rs.get("factor")
    if factor is None:
        factor = int(c.get("max_position_embeddings", orig)) / orig
    attention = rs.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return RopeScaling(
        "longrope",
        factor=float(factor),
        original_max_position_embeddings=orig,
        short_factor=tuple(float(f) for f in rs["short_factor"]),
        long_factor=tuple(float(f) for f in rs["long_factor"]),
        attention_factor=float(attention),
    )


@dataclasses.dataclass(frozen=True)
class LongRopeTables:
    """longrope's two frequency sets: a sequence uses `long` when it reaches past `original` positions (see
    `model.rope_tables`), and cos and sin are scaled by `scale`."""

    short: Any
    long: Any
    original: int
    scale: float


def rope_inv_freqs(cfg: ModelConfig) -> tuple:
    """One `rope_inv_freq` table per kind of layer (see `ModelConfig.layer_rope`): the global layers' (all layers'
    but Gemma's), then for Gemma the sliding layers' (their own base, no scaling)."""
    import numpy as np

    g = cfg.gemma
    if g is None:
        return (rope_inv_freq(cfg),)
    full = next((i for i, t in enumerate(g.layer_types) if t == "full_attention"), 0)
    hd = cfg.layer_head_dim(full)
    local = 1.0 / (g.local_rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    return rope_inv_freq(cfg, hd, g.full_rotary_fraction), local


def rope_inv_freq(cfg: ModelConfig, head_dim: int | None = None, rotary_fraction: float = 1.0):
    """Per-pair inverse frequencies (numpy, float64), with `rope_scaling` applied as transformers does.

    `rotary_fraction` < 1 ("proportional" RoPE, Gemma 4): only that share of the pairs rotate, at the frequencies
    of the full head size; the rest get frequency 0."""
    import numpy as np

    hd = head_dim or cfg.head_dim
    rotated = int(rotary_fraction * hd // 2)
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, 2 * rotated, 2, dtype=np.float64) / hd))
    inv = np.concatenate([inv, np.zeros(hd // 2 - rotated)])
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    if rs.rope_type == "longrope":
        # transformers: 1 / (factor * base ** (2i / d)), in float32 for the base powers as there.
        base = np.float32(cfg.rope_theta) ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd)
        per = lambda f: (1.0 / (np.asarray(f, np.float32) * base)).astype(np.float64)
        return LongRopeTables(
            per(rs.short_factor), per(rs.long_factor), rs.original_max_position_embeddings, rs.attention_factor
        )
    if rs.rope_type == "linear":
        return inv / rs.factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)
