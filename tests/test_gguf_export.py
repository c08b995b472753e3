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
from tests.hf_models import build_hf_model, build_superblock_llama, save_hf_model


@pytest.mark.parametrize("family", ["llama2", "llama_linear_rope", "smollm2"])
def test_export_round_trips_through_our_loader(tmp_path, family):
    src = save_hf_model(build_hf_model(family), str(tmp_path / "hf"))
    dst = hf_to_gguf(src, str(tmp_path / "model.gguf"))
    cfg_hf, p_hf = load_model(src, np.float32)
    cfg_gg, p_gg = load_model(dst, np.float32)
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "rope_scaling",
        "tie_word_embeddings",
    ):
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
    back = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="model.gguf", dtype=torch.float32
    ).eval()
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


def test_q4_k_m_picks_llama_cpps_types():
    """llama-quantize's Q4_K_M for a 32-layer Llama: Q6_K attn_v and ffn_down on layers 0-3, 28-31 and every third
    in between from 6, Q6_K output, Q4_K elsewhere; rows that are not whole super-blocks fall back as llama.cpp does."""
    from novallm_jax.loading.gguf_export import tensor_type

    six = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    for part in ("attn_v", "ffn_down", "ffn_down_exps"):
        assert {
            i for i in range(32) if tensor_type("Q4_K_M", f"blk.{i}.{part}.weight", 32, 4096, False) == "Q6_K"
        } == six
    assert {
        tensor_type("Q4_K_M", f"blk.{i}.{p}.weight", 32, 4096, False)
        for i in range(32)
        for p in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")
    } == {"Q4_K"}
    assert tensor_type("Q4_K_M", "output.weight", 32, 4096, False) == "Q6_K"
    assert tensor_type("Q4_K_M", "token_embd.weight", 32, 4096, False) == "Q4_K"
    assert tensor_type("Q4_K_M", "token_embd.weight", 32, 4096, True) == "Q6_K"  # tied: it is the output
    assert tensor_type("Q4_K_M", "blk.0.attn_norm.weight", 32, 4096, False, matmul=False) == "F32"
    assert [tensor_type("Q4_K_M", "blk.5.attn_q.weight", 32, c, False) for c in (96, 100)] == ["Q5_0", "F32"]
    assert tensor_type("Q4_K_M", "output.weight", 32, 96, False) == "Q8_0"
    assert tensor_type("Q6_K", "blk.5.attn_q.weight", 32, 96, False) == "Q8_0"


@pytest.mark.parametrize(
    "quant,rms", [("Q4_K", 0.1), ("Q5_K", 0.05), ("Q6_K", 0.025), ("Q8_0", 0.01), ("F16", 1e-3), ("BF16", 5e-3)]
)
def test_block_formats_write_what_ggufs_reader_decodes_back(tmp_path, quant, rms):
    """Each written tensor reads back with gguf's reader in its type, and gguf's dequantisation gives the weights
    within the format's rounding (relative RMS error)."""
    import gguf
    import gguf.quants
    from safetensors.numpy import load_file

    model = build_superblock_llama(layers=2)
    src = save_hf_model(model, str(tmp_path / "hf"))
    path = hf_to_gguf(src, str(tmp_path / f"model-{quant}.gguf"), quant=quant)
    hf = load_file(os.path.join(src, "model.safetensors"))
    seen = set()
    for t in gguf.GGUFReader(path).tensors:
        if t.name.endswith("norm.weight"):
            assert t.tensor_type.name == "F32"
            continue
        assert t.tensor_type.name == quant, t.name
        seen.add(t.name)
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        name = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}.get(t.name)
        if name is None:
            i, part = t.name.split(".")[1], t.name.split(".")[2]
            name = (
                f"model.layers.{i}."
                + {
                    "attn_q": "self_attn.q_proj",
                    "attn_k": "self_attn.k_proj",
                    "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj",
                    "ffn_gate": "mlp.gate_proj",
                    "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj",
                }[part]
                + ".weight"
            )
        want = hf[name]
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):  # compare without llama.cpp's row permutation
            assert got.shape == want.shape
            got, want = np.sort(got, axis=None), np.sort(want, axis=None)
        err = np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2))
        assert err < rms, (t.name, err)
    assert len(seen) == 2 + 7 * model.config.num_hidden_layers
