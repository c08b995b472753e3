"""Mixtral, Qwen3-MoE and Phi-3 written as GGUF by our writer (ffn_gate_inp and stacked ffn_*_exps tensors, Mixtral
as llama.cpp writes it: arch `llama` with expert_count; Phi-3's fused attn_qkv and ffn_up, rope_factors_long/short)
and read back: the same logits and greedy tokens as transformers
on the original checkpoint; `novallm-generate` runs. (transformers 5.24 reads neither back: Mixtral's form is not
one of its GGUF architectures, and for qwen3moe it ignores expert_feed_forward_length, so the experts' shapes do not
match; its phi3 reader has no longrope.)"""

import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from novallm_jax.loading import load_model
from novallm_jax.loading.gguf_export import hf_to_gguf
from novallm_jax.loading.gguf_file import gguf_metadata, open_gguf
from tests.hf_models import build_hf_model, save_hf_model
from tests.test_model_parity import assert_logits_and_greedy_match


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe", "phi3"])
def gguf_model(request, tmp_path_factory):
    hf = build_hf_model(request.param)
    path = save_hf_model(hf, str(tmp_path_factory.mktemp(request.param)))
    dst = hf_to_gguf(path, os.path.join(path, "model.gguf"))
    return request.param, hf, dst


def test_gguf_has_llama_cpp_tensors(gguf_model):
    family, hf, dst = gguf_model
    reader = open_gguf(dst)
    meta = gguf_metadata(reader)
    shapes = {t.name: tuple(int(s) for s in reversed(t.shape)) for t in reader.tensors}
    if family == "phi3":
        assert meta["general.architecture"] == "phi3" and meta["phi3.rope.scaling.original_context_length"] == 16
        assert shapes["rope_factors_long.weight"] == (8,) and shapes["blk.0.attn_qkv.weight"] == (128, 64)
        assert shapes["blk.0.ffn_up.weight"] == (256, 64) and "blk.0.ffn_gate.weight" not in shapes
        return
    arch = {"mixtral": "llama", "qwen3_moe": "qwen3moe"}[family]
    assert meta["general.architecture"] == arch and meta[f"{arch}.expert_count"] == 8
    f = hf.config.intermediate_size if family == "mixtral" else hf.config.moe_intermediate_size
    assert shapes["blk.0.ffn_gate_inp.weight"] == (8, 64)
    assert shapes["blk.0.ffn_up_exps.weight"] == (8, f, 64) and shapes["blk.0.ffn_down_exps.weight"] == (8, 64, f)


def test_gguf_logits_and_greedy_tokens_match_transformers(gguf_model):
    _, hf, dst = gguf_model
    cfg, params = load_model(dst, dtype=jnp.float32)
    assert cfg.moe is not None or cfg.rope_scaling.rope_type == "longrope"
    assert_logits_and_greedy_match(hf, cfg, params)


def test_novallm_generate_runs_on_the_gguf(gguf_model):
    _, _, dst = gguf_model
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
