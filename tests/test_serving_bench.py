"""Smoke test of benchmarks/bench_serving.py: a tiny run exits 0 and writes the figures it promises, consistently.

No speed is asserted (that belongs to the benchmark); only that each figure is there, positive, and that the
counts add up: every request generated exactly --max_tokens tokens, in both runs, and nothing leaked.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("speculative", [0, 4])
def test_tiny_run_writes_consistent_json(tmp_path, speculative):
    """With --speculative our requests draft by prompt lookup (the counts are the same: drafts change no output)."""
    output = tmp_path / "out.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "bench_serving.py"),
        "--model=random-tiny",
        "--clients=2",
        "--requests=4",
        "--max_tokens=4",
        "--time_limit_s=60",
        f"--speculative={speculative}",
        f"--output={output}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(output.read_text())
    assert res["leaks"] == [] and res["settings"]["speculative"] == speculative
    assert 0 <= res["drafts"]["accepted_tokens"] <= res["drafts"]["draft_tokens"]
    assert speculative or res["drafts"]["draft_tokens"] == 0
    for run in ("direct", "http"):
        r = res[run]
        assert r["requests"] == 4 and r["generated_tokens"] == 4 * 4
        for key in ("requests_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "per_token_p50_ms"):
            assert r[key] > 0, (run, key)
        assert r["ttft_p99_ms"] >= r["ttft_p50_ms"]
    assert res["ratios"]["tokens_per_s"] == res["http"]["tokens_per_s"] / res["direct"]["tokens_per_s"]
    assert "http/direct" in proc.stdout


_FAKE_LLAMA_SERVER = r"""#!/usr/bin/env python3
# Stands in for llama.cpp's llama-server: /health, and /v1/completions streaming one token per chunk as it does.
import http.server, json, sys
a = sys.argv[1:]
arg = lambda k: a[a.index(k) + 1]
assert int(arg("-np")) >= 1 and int(arg("-c")) >= 1 and open(arg("-m"), "rb").read(4) == b"GGUF"


class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b'{"status":"ok"}'
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        chunks = [{"text": f" t{i}", "finish_reason": None} for i in range(req["max_tokens"])]
        for c in chunks + [{"text": "", "finish_reason": "length"}]:
            choice = {"index": 0, "logprobs": None, **c}
            self.wfile.write(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True


http.server.ThreadingHTTPServer((arg("--host"), int(arg("--port"))), H).serve_forever()
"""


def test_peer_llama_server_gets_the_same_load(tmp_path):
    """--peer=llama-server: the same closed loop against llama.cpp's server (a stand-in here, printing its stream
    layout; the real one where $NOVALLM_LLAMA_CPP names a build), one token per streamed chunk."""
    bin_dir = os.environ.get("NOVALLM_LLAMA_CPP")
    if not bin_dir:
        bin_dir = tmp_path / "llama-bin"
        bin_dir.mkdir()
        for name, text in (("llama-server", _FAKE_LLAMA_SERVER), ("llama-bench", ""), ("llama-quantize", "")):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
    output = tmp_path / "out.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "bench_serving.py"),
        "--peer=llama-server",
        f"--llama_cpp_bin={bin_dir}",
        "--clients=2",
        "--requests=4",
        "--max_tokens=4",
        "--repeats=1",
        "--time_limit_s=60",
        f"--output={output}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(output.read_text())
    peer = res["llama-server"]
    assert peer["requests"] == 4 and peer["generated_tokens"] == 4 * 4 and peer["ttft_p50_ms"] > 0
    r = res["ratios"]["http_over_llama-server"]
    assert r["tokens_per_s"] == res["http"]["tokens_per_s"] / peer["tokens_per_s"]
    assert "http/llama-server" in proc.stdout
