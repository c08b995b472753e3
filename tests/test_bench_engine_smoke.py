"""Smoke test of benchmarks/bench_engine.py: a --quick run (tiny random model) exits 0 and writes the JSON it promises.

No timing is asserted; only that each figure is there, and the exact counts the workload fixes (useful tokens, every
request complete, nothing leaked, no compile during a timed run).
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_engine")
    output = tmp / "out.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "bench_engine.py"),
        "--quick",
        f"--output={output}",
        f"--compile_cache_dir={tmp / 'xla'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(output.read_text())


def positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_quick_run_writes_expected_json(quick_run):
    _, res = quick_run
    assert {
        "machine",
        "settings",
        "model",
        "engine_config",
        "warmup",
        "engine",
        "transformers",
        "ratios",
        "agreement",
        "concurrency",
        "engine_poisson",
        "leaks",
        "wall_s",
        "phase_s",
    } <= res.keys()
    s = res["settings"]
    assert s["model"] == "quick" and s["num_requests"] == 8
    for run in ("engine", "engine_poisson"):
        r = res[run]
        assert r["requests"] == s["num_requests"] and r["complete"] and r["finish_reasons"] == ["length"]
        assert r["useful_tokens"] == r["generated_tokens"]
        assert s["num_requests"] * s["min_output"] <= r["useful_tokens"] <= s["num_requests"] * s["max_output"]
        assert r["compiles_during_run"] == 0 and r["leaks"] == []
        assert positive(r["tok_s"]) and r["tok_s"] == pytest.approx(r["useful_tokens"] / r["wall_s"])
        assert 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p99"] <= r["latency_s"]["p99"]
    hf = res["transformers"]
    assert hf["useful_tokens"] == res["engine"]["useful_tokens"]  # the same workload
    assert hf["computed_tokens"] >= hf["useful_tokens"] and positive(hf["tok_s"])
    assert res["ratios"]["tok_s"] == pytest.approx(res["engine"]["tok_s"] / hf["tok_s"])
    assert res["agreement"]["of"] == s["num_requests"]
    assert res["warmup"]["compile_count"] == res["warmup"]["step_shapes"]
    assert res["leaks"] == []


def test_concurrency_and_profile(quick_run):
    _, res = quick_run
    s, c = res["settings"], res["concurrency"]
    assert c["concurrent"]["useful_tokens"] == s["concurrency"] * s["conc_output"] and c["concurrent"]["complete"]
    assert positive(c["batch1"]["decode_tok_s"]) and c["batch1"]["complete"]
    assert c["ratio_end_to_end"] == pytest.approx(c["concurrent"]["tok_s"] / c["batch1"]["decode_tok_s"])
    assert f"decode only, {s['concurrency']} rows" in c["concurrent"]["profile"]["by_kind"]
    # Alternating rounds; the one reported in full is the one with the median ratio.
    assert len(c["rounds"]) == s["conc_rounds"] == 2
    assert c["ratio_decode"] in [r["ratio_decode"] for r in c["rounds"]]
    prof = res["engine"]["profile"]
    assert prof["model_share"] + prof["sampler_share"] + prof["host_share"] == pytest.approx(1.0)
    assert 0 < prof["model_s"] < prof["step_s"] and prof["sampler_s"] > 0
    assert "with prefill" in prof["by_kind"] and prof["model_ms_by_shape"]
    # Each request's first token comes from its prefill, every later one from a decode row (no preemption here).
    kinds = prof["by_kind"]
    decode_rows = sum(kinds[k]["decode_rows_mean"] * kinds[k]["steps"] for k in ("with prefill", "decode only"))
    assert decode_rows == pytest.approx(res["engine"]["useful_tokens"] - s["num_requests"])
    assert kinds["with prefill"]["steps"] + kinds["decode only"]["steps"] == prof["steps"]


def test_quick_run_prints_tables(quick_run):
    proc, _ = quick_run
    for text in ("ours (continuous)", "transformers (static b4)", "TTFT p50", "engine step profile", "ms_sampler"):
        assert text in proc.stdout
