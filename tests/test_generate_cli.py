"""`novallm-generate` end to end on the default model, and its one-line errors."""

import json
import subprocess
import sys

import pytest

QUESTION = "What is the capital of France?"


def generate(*flags, cache_dir=None, check=True):
    cmd = [sys.executable, "-m", "novallm_jax.generate", *flags]
    if cache_dir is not None:
        cmd.append(f"--compile_cache_dir={cache_dir}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla"))


def test_default_model_answers_paris(cache_dir):
    proc = generate("--prompt", QUESTION, "--max_new_tokens=48", cache_dir=cache_dir)
    assert "Paris" in proc.stdout
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith("prompt tokens: ") and "generated tokens: " in summary and "decode: " in summary


def test_stream_prints_the_same_text_for_a_fixed_seed(cache_dir):
    flags = ["--prompt", "Write one sentence about the sea.", "--max_new_tokens=24", "--temperature=0.8", "--seed=3"]
    plain = generate(*flags, cache_dir=cache_dir).stdout
    streamed = generate(*flags, "--stream", cache_dir=cache_dir).stdout
    assert streamed == plain and plain.strip()


def test_prompts_file_runs_as_a_batch(cache_dir, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("What is the capital of France?\nName a color.\n")
    out = generate("--prompts_file", str(path), "--max_new_tokens=16", cache_dir=cache_dir).stdout
    assert out.count("=== [") == 2 and "Paris" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt", "hi", "--model", "/no/such/model"], "model path /no/such/model does not exist"),
        (["--prompt", "   "], "the prompt is empty"),
        (
            ["--prompt", "hi", "--weights=float", "--activations=int8"],
            "activations='int8' needs matmul weights in GGUF block codes: a Q4_0/1/K, Q5_0/1/K, Q6_K or Q8_0 GGUF model with "
            "weights='auto' or 'quantized'",
        ),
    ],
)
def test_errors_are_one_line(flags, message):
    proc = generate(*flags, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == f"novallm-generate: error: {message}"
    assert "Traceback" not in proc.stderr


def test_unsupported_architecture_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoX"]}))
    proc = generate("--prompt", "hi", "--model", str(tmp_path), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    from novallm_jax.config import SUPPORTED_MODEL_TYPES

    assert proc.stderr.strip().splitlines()[-1] == (
        f"novallm-generate: error: model_type 'gpt_neox' is not supported; supported: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def test_kv_pool_is_sized_to_the_prompts():
    """Each prompt (their count rounded up to a power of two) can reach the whole context, and no pool exceeds the
    engine's default."""
    from novallm_jax.engine.executor import ExecutorConfig
    from novallm_jax.generate import _engine_config

    per_seq, default = ExecutorConfig().max_pages_per_seq, ExecutorConfig().num_pages
    assert [_engine_config(n).executor.num_pages for n in (1, 2, 3, 4, 5)] == [1 + per_seq * k for k in (1, 2, 4, 4, 8)]
    assert _engine_config(1000).executor.num_pages == default
