"""Smoke test of benchmarks/bench_speculative.py: a --quick run on the default model exits 0 and writes the JSON it
promises, with both modes generating the same tokens (greedy) and the decode-only rates beside the whole requests'.

No timing is asserted (timing belongs to the benchmark itself); only that each figure is there and is a positive number.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_writes_both_rates_and_equal_greedy_outputs(tmp_path):
    output = tmp_path / "out.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_speculative.py"), "--quick", f"--output={output}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decode ratio" in proc.stdout
    tasks = json.loads(output.read_text())["tasks"]
    assert set(tasks) == {"copy", "free", "prose"}
    for task in tasks.values():
        for key in ("tok_s_median", "decode_tok_s_median"):
            assert all(v > 0 for v in task[key].values()) and set(task[key]) == {"plain", "speculative"}
        assert task["ratio"] > 0 and task["decode_ratio"] > 0
        # greedy: speculative runs emit exactly the plain runs' tokens, so every run has the same count
        counts = {run[1] for runs in task["runs"].values() for run in runs}
        assert counts == {task["tokens"]}
        for seconds, _, drafted, accepted, decode_seconds in task["runs"]["speculative"]:
            assert 0 < decode_seconds < seconds and 0 <= accepted <= drafted
    assert tasks["copy"]["acceptance_rate"] > 0  # the copy task's answer repeats its prompt
