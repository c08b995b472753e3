"""Every bad checkpoint gives an error that names the tensor or file and what was expected."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from novallm_jax.config import ModelConfig
from novallm_jax.errors import ModelLoadError, TensorError, UnsupportedArchitectureError
from novallm_jax.loading import load_model
from tests.hf_models import build_hf_model, save_hf_model

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_hf_model(build_hf_model("llama2"), str(tmp_path_factory.mktemp("hf")))


def _edited(hf_dir, tmp_path, edit):
    out = tmp_path / "edited"
    shutil.copytree(hf_dir, out)
    tensors = load_file(str(out / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def test_missing_tensor(hf_dir, tmp_path):
    path = _edited(hf_dir, tmp_path, lambda t: t.pop(Q))
    with pytest.raises(
        TensorError,
        match=r"missing tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' "
        r"\(expected shape \(64, 64\)",
    ):
        load_model(path)


def test_unexpected_tensor(hf_dir, tmp_path):
    path = _edited(hf_dir, tmp_path, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(
        TensorError,
        match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight' "
        r"in model\.safetensors",
    ):
        load_model(path)


def test_wrongly_shaped_tensor(hf_dir, tmp_path):
    path = _edited(hf_dir, tmp_path, lambda t: t.update({Q: np.zeros((64, 32), np.float32)}))
    with pytest.raises(
        TensorError,
        match=r"tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' in "
        r"model\.safetensors has shape \(64, 32\), expected \(64, 64\)",
    ):
        load_model(path)


def test_unknown_architecture(hf_dir, tmp_path):
    out = tmp_path / "gptneox"
    shutil.copytree(hf_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        UnsupportedArchitectureError,
        match=r"model_type 'gpt_neox' is not supported; "
        r"supported: llama, mistral, qwen2, qwen3",
    ):
        load_model(str(out))


def test_safetensors_file_that_is_not_one(hf_dir, tmp_path):
    out = tmp_path / "garbage"
    shutil.copytree(hf_dir, out)
    (out / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is not a valid safetensors file"):
        load_model(str(out))


def test_gguf_file_that_is_not_one(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip file, really")
    with pytest.raises(
        ModelLoadError,
        match=r"model\.gguf is not a GGUF file \(starts with b'PK\\x03\\x04', "
        r"expected b'GGUF'\)",
    ):
        load_model(str(path))


def test_gguf_missing_tensor(tmp_path):
    import gguf

    path = str(tmp_path / "partial.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_vocab_size(10)
    w.add_tensor("token_embd.weight", np.zeros((10, 8), np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        TensorError,
        match=r"partial\.gguf is missing tensor 'blk\.0\.attn_(k|norm|output|q|v)\.weight' "
        r"\(expected shape",
    ):
        load_model(path)


def test_missing_path():
    with pytest.raises(ModelLoadError, match=r"model path /nonexistent/model does not exist"):
        load_model("/nonexistent/model")


def test_directory_that_is_no_model(tmp_path):
    with pytest.raises(ModelLoadError, match=r"is neither a GGUF file, a HF model directory"):
        load_model(str(tmp_path))


def test_missing_config_field():
    with pytest.raises(ModelLoadError, match=r"config\.json lacks required field 'hidden_size'"):
        ModelConfig.from_hf({"model_type": "llama", "num_attention_heads": 4})
