"""Each script in examples/ runs as a user would run it (a subprocess, the default model, tiny inputs), within a
time bound (a kill, not a timing assertion), and produces what it says it does."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME_BOUND_S = 300

pytestmark = pytest.mark.slow


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), *args],
        capture_output=True,
        text=True,
        timeout=TIME_BOUND_S,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_batch_generate(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is JAX?\n\nName a planet.\nSay hi.\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    _run("batch_generate.py", str(prompts), str(output), "--max_tokens=6", "--chat", "--batch_size=2")
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["What is JAX?", "Name a planet.", "Say hi."]  # blank lines skipped
    assert all(r["completion"] and 1 <= r["tokens"] <= 6 and r["finish_reason"] in ("stop", "length") for r in rows)


def test_custom_sampling_loop():
    out = _run("custom_sampling_loop.py", "--prompt=The capital of France is", "--max_tokens=8")
    assert out.startswith("The capital of France is") and len(out.strip()) > len("The capital of France is")


def test_custom_sampling_loop_typical_filter():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        from custom_sampling_loop import typical_filter
    finally:
        sys.path.pop(0)
    import jax.numpy as jnp
    import numpy as np

    # p = [0.5, 0.25, 0.125, 0.125]: surprisals 1, 2, 3, 3 bits, entropy 1.75; |surprisal - entropy| = 0.75, 0.25,
    # 1.25, 1.25 ranks token 1 (mass 0.25), then token 0 (0.75), then 2 and 3.
    logits = jnp.log(jnp.array([0.5, 0.25, 0.125, 0.125]))
    kept = lambda typical_p: np.isfinite(np.asarray(typical_filter(logits, typical_p))).tolist()
    assert kept(0.2) == [False, True, False, False]
    assert kept(0.3) == [True, True, False, False]
    assert kept(0.8)[:2] == [True, True] and sum(kept(0.8)) == 3  # one of the tied tokens 2 and 3
    assert sum(kept(1e-6)) == 1  # at least one token survives


def test_async_clients_starting_its_server():
    out = _run("async_clients.py", "--start_server", "--requests=4", "--concurrency=4", "--max_tokens=6")
    assert "4 requests" in out and "tokens/s" in out


def test_fastapi_app():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "examples", "fastapi_app.py"), f"--port={port}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIME_BOUND_S
        while True:
            assert app.poll() is None, app.stderr.read()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the app did not start in time"
            time.sleep(0.5)
        summary = httpx.post(
            f"{base}/summarize",
            json={"text": "JAX is a Python library for arrays.", "max_tokens": 8},
            timeout=TIME_BOUND_S,
        ).json()
        assert summary["summary"] and 1 <= summary["tokens"] <= 8
        streamed = httpx.get(
            f"{base}/stream", params={"prompt": "Once upon a time", "max_tokens": 8}, timeout=TIME_BOUND_S
        )
        assert streamed.status_code == 200 and streamed.text
        assert httpx.post(f"{base}/summarize", json={"text": "x", "max_tokens": 0}).status_code == 422
    finally:
        app.terminate()
        app.wait(timeout=60)
