"""llama.cpp's sources from the llama-cpp-python 0.3.36 sdist, fetched once into the cache the benchmarks share.

The layout is `${NOVALLM_CACHE_DIR:-~/.cache/novallm-jax}/llama.cpp/llama_cpp_python-0.3.36/` (what
benchmarks/build_llama_cpp.sh builds from). A missing sdist is fetched with pip; tests that need it fail, never skip,
when it cannot be had.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile

import pytest

VERSION = "0.3.36"


def cache_dir() -> str:
    root = os.environ.get("NOVALLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "novallm-jax")
    return os.path.join(root, "llama.cpp")


def sdist_dir() -> str:
    """The extracted sdist; downloads and extracts it first if it is not there yet."""
    target = os.path.join(cache_dir(), f"llama_cpp_python-{VERSION}")
    if os.path.isdir(os.path.join(target, "vendor", "llama.cpp")):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".fetch.") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"llama-cpp-python=={VERSION}",
            "-d",
            tmp,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archive = os.path.join(tmp, f"llama_cpp_python-{VERSION}.tar.gz")
        if done.returncode != 0 or not os.path.isfile(archive):
            pytest.fail(
                f"cannot fetch the llama-cpp-python {VERSION} sdist (llama.cpp's tokenizer vectors and chat "
                f"templates) into {cache_dir()}: `{' '.join(cmd)}` said: {done.stderr.strip()[-2000:]} -- "
                "give this machine PyPI access, or extract that sdist there by hand"
            )
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        # A rename is atomic: a concurrent run sees no tree or a whole one; if another run won the race, keep its.
        try:
            os.rename(os.path.join(tmp, f"llama_cpp_python-{VERSION}"), target)
        except OSError:
            if not os.path.isdir(os.path.join(target, "vendor", "llama.cpp")):
                raise
    return target


def llama_cpp_dir() -> str:
    return os.path.join(sdist_dir(), "vendor", "llama.cpp")


def read_vocab_tests(gguf_path: str) -> list[tuple[str, list[int]]]:
    """(text, ids) pairs of `<gguf>.inp` / `<gguf>.out`, read as llama.cpp's tests/test-tokenizer-0.cpp reads them."""
    with open(gguf_path + ".inp", encoding="utf-8", newline="") as f:
        raw = f.read()
    with open(gguf_path + ".out", encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    sep = "\n__ggml_vocab_test__\n"
    texts, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(sep)
    if lines and lines[-1] == "":  # the newline that ends the file
        lines.pop()
    assert len(texts) == len(lines), f"{gguf_path}: {len(texts)} inputs but {len(lines)} outputs"
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]
