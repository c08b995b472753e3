"""GGUF export: our loader and transformers' GGUF reader both get back exactly the checkpoint that was exported."""

import os

import numpy as np
import pytest
import torch
import transformers

import jax

from novallm_jax.errors import UnsupportedArchitectureError
from novallm_jax.loading import load_model
from novallm_jax.loading.gguf_export import hf_to_gguf, placeholder_vocab
from tests.hf_models import build_hf_model, save_hf_model


@pytest.mark.parametrize("family", ["llama2", "llama_linear_rope", "smollm2"])
def test_export_round_trips_through_our_loader(tmp_path, family):
    src = save_hf_model(build_hf_model(family), str(tmp_path / "hf"))
    dst = hf_to_gguf(src, str(tmp_path / "model.gguf"))
    cfg_hf, p_hf = load_model(src, np.float32)
    cfg_gg, p_gg = load_model(dst, np.float32)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "rope_scaling", "tie_word_embeddings"):
        assert getattr(cfg_gg, field) == getattr(cfg_hf, field), field
    for field in ("rms_norm_eps", "rope_theta"):  # GGUF stores them as float32
        assert getattr(cfg_gg, field) == pytest.approx(getattr(cfg_hf, field), rel=1e-7), field
    flat_hf, tree_hf = jax.tree.flatten_with_path(p_hf)
    flat_gg, tree_gg = jax.tree.flatten_with_path(p_gg)
    assert tree_hf == tree_gg
    for (path, a), (_, b) in zip(flat_hf, flat_gg):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_transformers_reads_the_export_as_the_same_model(tmp_path):
    """An independent reader: transformers' own GGUF loader undoes the Q/K permutation to the original logits."""
    model = build_hf_model("llama2")
    src = save_hf_model(model, str(tmp_path / "hf"))
    hf_to_gguf(src, str(tmp_path / "model.gguf"))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf",
                                                             dtype=torch.float32).eval()
    tokens = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 7, 64]])
    with torch.no_grad():
        want, got = model(tokens).logits, back(tokens).logits
    assert torch.allclose(want, got, atol=1e-5), (want - got).abs().max()


@pytest.mark.parametrize("family", ["qwen2", "mistral", "llama3_rope"])
def test_export_refuses_what_the_llama_architecture_cannot_hold(tmp_path, family):
    src = save_hf_model(build_hf_model(family), str(tmp_path / "hf"))
    with pytest.raises(UnsupportedArchitectureError, match="GGUF export"):
        hf_to_gguf(src, str(tmp_path / "model.gguf"))
    assert not os.path.exists(tmp_path / "model.gguf")


def test_placeholder_vocab_has_specials_bytes_and_unique_pieces():
    tokens, scores, types = placeholder_vocab(300)
    assert len(tokens) == len(scores) == len(types) == 300
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3 + 0x0A] == "<0x0A>"
    assert len(set(tokens)) == 300
    small, _, _ = placeholder_vocab(256)  # too small for the byte pieces
    assert len(set(small)) == 256 and "<0x0A>" not in small
    with pytest.raises(ValueError, match="at least 3"):
        placeholder_vocab(2)
