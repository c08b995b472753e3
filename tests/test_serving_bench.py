"""Smoke test of benchmarks/bench_serving.py: a tiny run exits 0 and writes the figures it promises, consistently.

No speed is asserted (that belongs to the benchmark); only that each figure is there, positive, and that the
counts add up: every request generated exactly --max_tokens tokens, in both runs, and nothing leaked.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_run_writes_consistent_json(tmp_path):
    output = tmp_path / "out.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_serving.py"), "--model=random-tiny",
           "--clients=2", "--requests=4", "--max_tokens=4", "--time_limit_s=60", f"--output={output}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(output.read_text())
    assert res["leaks"] == []
    for run in ("direct", "http"):
        r = res[run]
        assert r["requests"] == 4 and r["generated_tokens"] == 4 * 4
        for key in ("requests_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "per_token_p50_ms"):
            assert r[key] > 0, (run, key)
        assert r["ttft_p99_ms"] >= r["ttft_p50_ms"]
    assert res["ratios"]["tokens_per_s"] == res["http"]["tokens_per_s"] / res["direct"]["tokens_per_s"]
    assert "http/direct" in proc.stdout
