"""A tiny random model with the real SmolLM2 tokenizer, and engines over it, for engine and SDK tests."""

from __future__ import annotations

import dataclasses
import functools

import jax
import pytest

from novallm_jax.config import ModelConfig
from novallm_jax.engine.engine import EngineConfig, LLMEngine
from novallm_jax.engine.executor import ExecutorConfig
from novallm_jax.kernels import native
from novallm_jax.model import init_params


def skip_without_ragged_steps() -> None:
    """Ragged steps, and speculative decoding with them, run on the native paged attention: XLA:CPU only."""
    if jax.default_backend() != "cpu" or not native.available():
        pytest.skip("ragged steps need the native paged attention (XLA:CPU custom calls)")


TINY = ModelConfig(
    model_type="llama",
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    eos_token_ids=(2,),
)

EXEC = ExecutorConfig(
    page_size=8,
    num_pages=256,
    max_model_len=256,
    decode_batch_buckets=(1, 4, 16),
    prefill_batch_buckets=(1, 4),
    prefill_len_buckets=(16, 64),
)


@functools.lru_cache(maxsize=None)
def tiny_params():
    # Larger weights than init_params' default make the random model's choices depend strongly on context.
    params = init_params(TINY, jax.random.key(42))
    return jax.tree.map(lambda a: a * 10 if a.ndim == 2 else a, params)


def make_engine(tokenizer, **overrides) -> LLMEngine:
    exec_over = {k: overrides.pop(k) for k in list(overrides) if k in {f.name for f in dataclasses.fields(EXEC)}}
    config = EngineConfig(executor=dataclasses.replace(EXEC, **exec_over), **overrides)
    return LLMEngine(TINY, tiny_params(), tokenizer, config)
