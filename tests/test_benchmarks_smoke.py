"""Smoke test of benchmarks/bench_decode.py: a --quick run on a tiny random Llama exits 0 and writes the JSON it promises.

No timing is asserted (timing belongs to the benchmark itself); only that each figure is there and is a positive number.
"""

import json
import os
import subprocess
import sys

import pytest

from novallm_jax.kernels import native
from novallm_jax.loading import quantized_by_default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    config, output = tmp / "tiny.json", tmp / "out.json"
    config.write_text(json.dumps(TINY))
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "bench_decode.py"),
        "--quick",
        f"--models=random:{config}",
        "--batches=1,2",
        "--bandwidth_gib=0.02",
        f"--output={output}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(output.read_text())


def positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_quick_run_writes_expected_json(quick_run):
    _, res = quick_run
    assert {"machine", "settings", "bandwidth_gb_s", "models", "wall_s"} <= res.keys()
    m = res["machine"]
    assert m["cpu_count"] >= 1 and m["versions"]["jax"] and m["versions"]["torch"]
    assert "loadavg_before" in m and "loadavg_after" in m
    bw = res["bandwidth_gb_s"]
    assert all(positive(bw[k]) for k in ("jax_sum", "jax_matvec", "numpy_copy"))
    # The best of every sample: the three measures before and after the models, and the probes around batch 1.
    assert len(bw["samples"]) == 2 and bw["probes"] and all(positive(p) for p in bw["probes"])
    assert bw["roofline"] == max(bw["jax_sum"], bw["jax_matvec"], bw["numpy_copy"], *bw["probes"])
    assert res["settings"]["batches"] == [1, 2]

    (entry,) = res["models"]
    assert entry["config"]["hidden_size"] == TINY["hidden_size"]
    assert entry["config"]["num_layers"] == TINY["num_hidden_layers"]
    for engine in ("ours", "transformers"):
        assert set(entry[engine]["decode"]) == {"1", "2"}
        for rate in list(entry[engine]["decode"].values()) + [entry[engine]["prefill"]]:
            assert positive(rate["tok_s"]) and positive(rate["step_ms"])
            assert rate["tok_s"] >= rate["tok_s_median"]  # best of the repeats
    assert set(entry["ratios"]["transformers"]) == {"decode_b1", "decode_b2", "prefill"}
    assert "llama_cpp" in entry
    # Batch 1 of ours and transformers in alternating rounds, each after a probe.
    rounds = res["settings"]["interleave_rounds"]
    for engine in ("ours", "transformers"):
        r = entry["interleaved"][engine]
        assert len(r["tok_s"]) == len(r["bandwidth_gb_s"]) == rounds
        assert all(positive(x) for x in r["tok_s"] + r["bandwidth_gb_s"]) and positive(r["roofline_fraction_median"])
    assert positive(entry["interleaved"]["ours"]["over_transformers_median"])
    assert positive(entry["ours"]["decode"]["1"]["roofline_fraction_local"])


def test_roofline_counts_every_weight_but_the_embedding(quick_run):
    _, res = quick_run
    (entry,) = res["models"]
    d, f, v, layers = TINY["hidden_size"], TINY["intermediate_size"], TINY["vocab_size"], TINY["num_hidden_layers"]
    kv = d // TINY["num_attention_heads"] * TINY["num_key_value_heads"]
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * f + 2 * d
    expected = 4 * (layers * per_layer + d + d * v)  # float32; final norm and lm_head, no embedding table
    assert entry["weight_bytes_per_token"] == expected
    roof = res["bandwidth_gb_s"]["roofline"] * 1e9 / expected
    assert entry["roofline_tok_s"] == pytest.approx(roof)
    # Ours reads the greedy head's int8 copy (codes, and a float32 scale and bound a column) for the LM head.
    read = expected - 4 * d * v + v * (d + 8) if native.available() else expected
    assert entry["ours"]["weight_bytes_read"] == read
    fraction = entry["ours"]["decode"]["1"]["tok_s"] / roof * read / expected
    assert entry["batch1_roofline_fraction"] == pytest.approx(fraction)


def test_quick_run_prints_a_table(quick_run):
    proc, res = quick_run
    assert "% roofline" in proc.stdout and "decode b2" in proc.stdout
    assert "llama.cpp" in proc.stdout or "llama_cpp" in proc.stdout


@pytest.mark.skipif(not quantized_by_default("float32"), reason="block codes run only in the native CPU kernels")
def test_quick_run_on_a_quantised_gguf_times_our_block_codes(tmp_path):
    from novallm_jax.loading.gguf_export import hf_to_gguf
    from tests.hf_models import build_hf_model, save_hf_model

    src = save_hf_model(build_hf_model("llama2"), str(tmp_path / "hf"))
    path, output = hf_to_gguf(src, str(tmp_path / "tiny-q4_1.gguf"), quant="Q4_1"), tmp_path / "out.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "bench_decode.py"),
        "--quick",
        f"--models={path}",
        "--batches=1,2",
        "--bandwidth_gib=0.02",
        "--notransformers",
        "--noxla_dots",
        "--nollama_cpp",
        f"--output={output}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (entry,) = json.loads(output.read_text())["models"]
    assert set(entry["ours_quant"]["decode"]) == {"1", "2"}
    assert all(positive(r["tok_s"]) for r in entry["ours_quant"]["decode"].values())
    # 4-bit codes + float32 d and m per 32 weights: 0.75 bytes per weight, against 4 for ours.
    assert entry["quant"]["weight_bytes_per_token"] < entry["weight_bytes_per_token"] / 3
    assert entry["quant"]["batch1_roofline_fraction"] > 0
    assert "ours_quant" in proc.stdout
    if native.int8_dot_available():  # the same codes with int8 activations
        assert set(entry["ours_int8"]["decode"]) == {"1", "2"} and positive(entry["ours_int8"]["prefill"]["tok_s"])
        assert entry["quant"]["batch1_roofline_fraction_int8"] > 0 and "ours_int8" in proc.stdout


_FAKE_BENCH = r"""#!/usr/bin/env python3
# Stands in for llama.cpp's llama-bench: prints its JSON layout (-o json), one test per -p/-n, -r samples each.
import json, sys
a = sys.argv[1:]
arg = lambda k: a[a.index(k) + 1]
assert arg("-o") == "json" and arg("-t") and open(arg("-m"), "rb").read(4) == b"GGUF"
tests = []
for key, rate in (("-p", 500.0), ("-n", 50.0)):
    n = int(arg(key))
    if n:
        samples = [rate + i for i in range(int(arg("-r")))]
        tests.append({"model_filename": arg("-m"), "n_prompt": n if key == "-p" else 0,
                      "n_gen": n if key == "-n" else 0, "avg_ts": sum(samples) / len(samples),
                      "samples_ns": [1e9 * n / s for s in samples], "samples_ts": samples})
print(json.dumps(tests, indent=2))
"""
_FAKE_QUANTIZE = r"""#!/usr/bin/env python3
import shutil, sys
assert sys.argv[1] == "--allow-requantize"
shutil.copyfile(sys.argv[2], sys.argv[3])
"""


def _real_or_fake_llama_cpp(tmp_path) -> tuple[str, bool]:
    """$NOVALLM_LLAMA_CPP when a developer has built llama.cpp there, else stand-ins that print llama-bench's JSON."""
    real = os.environ.get("NOVALLM_LLAMA_CPP")
    if real:
        return real, True
    fake = tmp_path / "llama-bin"
    fake.mkdir()
    for name, text in (("llama-bench", _FAKE_BENCH), ("llama-quantize", _FAKE_QUANTIZE)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    return str(fake), False


def test_llama_cpp_tools_run_beside_ours_in_the_interleaved_rounds(tmp_path):
    from novallm_jax.loading.gguf_export import hf_to_gguf
    from tests.hf_models import build_hf_model, save_hf_model

    bin_dir, real = _real_or_fake_llama_cpp(tmp_path)
    src = save_hf_model(build_hf_model("llama2"), str(tmp_path / "hf"))
    path, output = hf_to_gguf(src, str(tmp_path / "tiny.gguf")), tmp_path / "out.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "bench_decode.py"),
        "--quick",
        f"--models={path}@Q8_0",
        "--batches=1",
        "--bandwidth_gib=0.02",
        "--notransformers",
        "--noxla_dots",
        f"--llama_cpp_bin={bin_dir}",
        f"--output={output}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (entry,) = json.loads(output.read_text())["models"]
    assert entry["name"] == f"{path}@Q8_0" and entry["gguf"].endswith(".Q8_0.gguf")
    lc = entry["llama_cpp"]
    assert lc["tool"] == "llama-bench" and positive(lc["decode"]["1"]["tok_s"]) and positive(lc["prefill"]["tok_s"])
    if not real:  # the stand-in's samples (--quick: 2 repeats): the best and the median of them
        assert (lc["decode"]["1"]["tok_s"], lc["decode"]["1"]["tok_s_median"]) == (51.0, 50.5)
        assert lc["prefill"]["tok_s"] == 501.0
    rounds = json.loads(output.read_text())["settings"]["interleave_rounds"]
    assert len(entry["interleaved"]["llama_cpp"]["tok_s"]) == rounds
    assert positive(entry["interleaved"]["ours"]["over_llama_cpp_median"])
    assert set(entry["ratios"]["llama_cpp"]) == {"decode_b1", "prefill"}
    assert "ours / llama.cpp" in proc.stdout and "ours/llama.cpp" in proc.stdout


def test_a_named_llama_cpp_dir_without_its_tools_is_an_error(tmp_path):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "bench_decode.py"),
        "--quick",
        "--models=smollm2",
        f"--llama_cpp_bin={tmp_path}",
        f"--output={tmp_path / 'out.json'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "lacks llama-bench, llama-quantize" in proc.stderr
