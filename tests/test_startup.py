"""The warm start loads every step function from the persistent compilation cache; other versions and corrupt entries
miss it cleanly."""

import json
import os
import subprocess
import sys

import pytest

_CHILD = r"""
import json, sys
from novallm_jax import LLM, SamplingParams
from novallm_jax.startup import CompileStats, recent_phases
stats = CompileStats()
with LLM() as llm:
    text = llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0))[0].text
print("RESULT " + json.dumps({"text": text, "xla": stats.as_dict(), "phases": [p for p, _ in recent_phases()]}))
"""


def _start(cache_home: str) -> tuple[dict, str]:
    env = dict(os.environ, XDG_CACHE_HOME=cache_home)
    env.pop("NOVALLM_KERNEL_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.split(" ", 1)[1]), proc.stderr


@pytest.mark.slow
def test_second_start_compiles_nothing_and_a_corrupt_cache_is_rebuilt(tmp_path):
    cold, _ = _start(str(tmp_path))
    assert cold["xla"]["cache_misses"] > 0 and cold["xla"]["cache_hits"] == 0
    assert {
        "weights: read and pack",
        "tokenizer",
        "engine: executor and KV pool",
        "native kernels: build or load",
    } <= set(cold["phases"])

    warm, _ = _start(str(tmp_path))  # weights now come from the packed cache: fewer programs, none compiled
    assert warm["xla"]["cache_misses"] == 0 and 0 < warm["xla"]["cache_hits"] <= cold["xla"]["cache_misses"]
    assert warm["text"] == cold["text"]

    entries = [
        os.path.join(root, f)
        for root, _, files in os.walk(tmp_path / "novallm-jax" / "xla")
        for f in files
        if f.endswith("-cache")
    ]
    assert entries
    for path in entries:  # every entry truncated: each must be recompiled, not loaded, and the answer unchanged
        with open(path, "r+b") as f:
            f.truncate(max(1, os.path.getsize(path) // 3))
    rebuilt, log = _start(str(tmp_path))
    assert rebuilt["text"] == cold["text"]
    assert rebuilt["xla"]["cache_hits"] == 0 and rebuilt["xla"]["cache_misses"] == warm["xla"]["cache_hits"]
    assert log.count("is unreadable") == len(entries)  # each named in a warning, removed, then written anew

    again, _ = _start(str(tmp_path))  # ... and wrote them anew
    assert again["xla"]["cache_misses"] == 0


def test_the_compile_cache_directory_changes_with_jax_and_jaxlib(monkeypatch, tmp_path):
    import jax
    import jaxlib

    from novallm_jax.engine.executor import default_compilation_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    here = default_compilation_cache_dir()
    assert here.startswith(str(tmp_path)) and jax.__version__ in here and jaxlib.__version__ in here
    monkeypatch.setattr(jax, "__version__", "0.0.1")
    assert default_compilation_cache_dir() != here
    monkeypatch.setattr(jax, "__version__", here.split("jax-")[1].split("-")[0])
    monkeypatch.setattr(jaxlib, "__version__", "0.0.1")
    assert default_compilation_cache_dir() != here
