"""Orbax round trip through `novallm-convert`: params restore bit-identically and give identical logits."""

import jax
import jax.numpy as jnp
import numpy as np

from novallm_jax.convert import convert
from novallm_jax.kv_cache import ContiguousKVCache
from novallm_jax.loading import load_model
from novallm_jax.model import forward, ragged_batch
from tests.hf_models import build_hf_model, save_hf_model


def test_orbax_round_trip_is_bit_identical(tmp_path):
    src = save_hf_model(build_hf_model("qwen3"), str(tmp_path / "hf"))
    cfg, params = load_model(src, dtype=jnp.float32)
    out = convert(src, str(tmp_path / "orbax"))
    cfg2, params2 = load_model(out)
    assert cfg2 == cfg
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    tokens, positions, _ = ragged_batch([[3, 4, 5, 6], [9, 8]])
    run = lambda p: np.asarray(
        forward(p, jnp.asarray(tokens), jnp.asarray(positions), ContiguousKVCache.create(cfg, 2, 4), cfg)[0]
    )
    np.testing.assert_array_equal(run(params), run(params2))


def test_restore_does_not_need_the_source(tmp_path):
    import shutil

    src = save_hf_model(build_hf_model("smollm2"), str(tmp_path / "hf"))
    _, params = load_model(src, dtype=jnp.float32)
    out = convert(src, str(tmp_path / "orbax"))
    shutil.rmtree(src)
    _, restored = load_model(out)
    np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(restored["embed"]))


def test_presets_match_the_models_they_name(default_gguf):
    from novallm_jax.config import ModelConfig
    from novallm_jax.loading.gguf_file import gguf_metadata, open_gguf

    reader = open_gguf(default_gguf)
    from_gguf = ModelConfig.from_gguf_metadata(gguf_metadata(reader), {t.name for t in reader.tensors})
    preset = ModelConfig.from_preset("smollm2-135m")
    assert preset.num_params() == from_gguf.num_params() == 134_515_008
    for field in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "rope_theta",
        "tie_word_embeddings",
    ):
        assert getattr(preset, field) == getattr(from_gguf, field), field
    assert ModelConfig.from_preset("llama3.2-1b").rope_scaling.rope_type == "llama3"


def test_convert_cli_turns_the_default_gguf_into_a_standalone_checkpoint(default_gguf, tmp_path):
    import subprocess
    import sys

    from novallm_jax.tokenizer import load_tokenizer

    out = tmp_path / "smollm2"
    proc = subprocess.run(
        [sys.executable, "-m", "novallm_jax.convert", f"--model={default_gguf}", f"--output={out}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg, params = load_model(default_gguf, dtype=jnp.float32)
    cfg2, params2 = load_model(str(out))
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    text = "Converted checkpoints keep their tokenizer: héllo 你好 🎉"
    src, conv = load_tokenizer(default_gguf), load_tokenizer(str(out))
    assert conv.encode(text) == src.encode(text) and conv.eos_token_ids == src.eos_token_ids
    messages = [{"role": "user", "content": "hi"}]
    assert conv.apply_chat_template(messages, add_generation_prompt=True) == src.apply_chat_template(
        messages, add_generation_prompt=True
    )
    again = subprocess.run(
        [sys.executable, "-m", "novallm_jax.convert", f"--model={default_gguf}", f"--output={out}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 1
    assert (
        again.stderr.strip().splitlines()[-1]
        == f"novallm-convert: error: output directory {out} exists and is not empty"
    )
