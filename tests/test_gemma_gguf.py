"""Gemma 2/3/4 written as GGUF by our writer and read back: the same logits and greedy tokens as transformers on the
original checkpoint, and `novallm-generate` runs on each file."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from novallm_jax.kv_cache import ContiguousKVCache
from novallm_jax.loading import load_model
from novallm_jax.loading.gguf_export import hf_to_gguf
from novallm_jax.model import forward, ragged_batch
from tests.hf_models import build_hf_model, save_hf_model
from tests.test_model_parity import PROMPTS, assert_logits_and_greedy_match


@pytest.fixture(scope="module", params=["gemma2", "gemma3_text", "gemma4_text", "gemma4_moe"])
def gguf_model(request, tmp_path_factory):
    hf = build_hf_model(request.param)
    path = save_hf_model(hf, str(tmp_path_factory.mktemp(request.param)))
    dst = hf_to_gguf(path, os.path.join(path, "model.gguf"))
    return hf, dst


def test_gguf_logits_and_greedy_tokens_match_transformers(gguf_model):
    hf, dst = gguf_model
    cfg, params = load_model(dst, dtype=jnp.float32)
    assert cfg.gemma is not None
    assert_logits_and_greedy_match(hf, cfg, params)


def test_novallm_generate_runs_on_the_gguf(gguf_model):
    _, dst = gguf_model
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "novallm_jax.generate",
            "--model",
            dst,
            "--prompt",
            "t1 t2 t3",
            "--max_new_tokens=6",
            "--nochat",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith("prompt tokens: ") and "generated tokens: 6" in summary


def test_unsupported_gguf_architecture_is_one_line(tmp_path):
    import gguf

    path = str(tmp_path / "falcon.gguf")
    w = gguf.GGUFWriter(path, "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    proc = subprocess.run(
        [sys.executable, "-m", "novallm_jax.generate", "--model", path, "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("novallm-generate: error: GGUF architecture 'falcon' is not supported; supported: ")
    assert all(arch in last for arch in ("llama", "gemma2", "gemma3", "gemma4"))


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "gemma4_text", "gemma4_moe"])
def test_q8_0_gemma_runs_on_its_block_codes(tmp_path, family):
    """A Q8_0 Gemma file: matmul weights (Gemma 4's expert stacks too) stay in their codes (native kernels) and give
    the dequantised load's logits (Gemma 2/3 to the bit; Gemma 4's narrow per-layer-embedding matmuls and its
    experts, which XLA runs in float, sum in another order)."""
    from novallm_jax.kernels import native

    path = save_hf_model(build_hf_model(family), str(tmp_path))
    dst = hf_to_gguf(path, os.path.join(path, "q8.gguf"), quant="Q8_0")
    cfg, codes = load_model(dst, dtype=jnp.float32, keep_quantized=True)
    _, dense = load_model(dst, dtype=jnp.float32, keep_quantized=False)
    assert isinstance(codes["layers"][0]["wqkv"], native.QuantLinear)
    if cfg.gemma.num_experts:
        assert isinstance(codes["layers"][0]["experts_gate_up"], native.ExpertQuantLinear)
        np.testing.assert_array_equal(
            codes["layers"][1]["experts_down"].to_dense(), np.asarray(dense["layers"][1]["experts_down"])
        )
    tokens, positions, _ = ragged_batch(PROMPTS)
    out = []
    for params in (native.pack_params(codes), dense):
        cache = ContiguousKVCache.create(cfg, len(PROMPTS), tokens.shape[1])
        out.append(np.asarray(forward(params, jnp.asarray(tokens), jnp.asarray(positions), cache, cfg)[0]))
    assert np.abs(out[0] - out[1]).max() <= (1e-4 if family.startswith("gemma4") else 0.0)
