"""llama.cpp's own tools as a benchmark baseline: `llama-bench` for decode and prefill, `llama-quantize` for the
other formats of the same weights.

The tools come from a llama.cpp build (`benchmarks/build_llama_cpp.sh`), found through `--llama_cpp_bin` or the
`NOVALLM_LLAMA_CPP` environment variable. llama-bench times its own tokens, so a round's figure excludes the process
start and the model load, as ours excludes our compile.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

ENV = "NOVALLM_LLAMA_CPP"
TOOLS = ("llama-bench", "llama-quantize")


def find_bin(flag_value: str | None) -> str | None:
    """The directory holding llama.cpp's tools: the flag's, else $NOVALLM_LLAMA_CPP's; None when neither is set.

    Raises ValueError when a directory is named but lacks a tool, so a mistyped path is not silently skipped.
    """
    path = flag_value or os.environ.get(ENV)
    if not path:
        return None
    missing = [t for t in TOOLS if not os.access(os.path.join(path, t), os.X_OK)]
    if missing:
        raise ValueError(
            f"--llama_cpp_bin / ${ENV}={path!r} lacks {', '.join(missing)}; "
            "build them with benchmarks/build_llama_cpp.sh"
        )
    return path


def quantize(bin_dir: str, src: str, dst: str, kind: str) -> str:
    """Writes `src` re-quantised to `kind` (F32, F16, Q8_0, Q4_K_M, ...) as llama.cpp users would make it."""
    if not os.path.exists(dst):
        _run([os.path.join(bin_dir, "llama-quantize"), "--allow-requantize", src, dst, kind])
    return dst


def bench(bin_dir: str, gguf: str, threads: int, n_gen: int = 0, n_prompt: int = 0, repeats: int = 1) -> dict:
    """One llama-bench run: {"decode_tok_s": [...], "prefill_tok_s": [...]} with a sample per repeat.

    tg (decode) generates `n_gen` tokens at batch 1 after an empty context; pp (prefill) evaluates `n_prompt` tokens.
    """
    cmd = [
        os.path.join(bin_dir, "llama-bench"),
        "-m",
        gguf,
        "-t",
        str(threads),
        "-r",
        str(repeats),
        "-o",
        "json",
        "-p",
        str(n_prompt),
        "-n",
        str(n_gen),
    ]
    out: dict[str, Any] = {"decode_tok_s": [], "prefill_tok_s": []}
    for test in json.loads(_run(cmd)):
        if test.get("n_gen"):
            out["decode_tok_s"] += list(test["samples_ts"])
        elif test.get("n_prompt"):
            out["prefill_tok_s"] += list(test["samples_ts"])
    return out


def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{os.path.basename(cmd[0])} exited {res.returncode}: {' | '.join(tail)}")
    return res.stdout
