"""Decode step time of one random Llama written by our GGUF writer in several types and loaded as the native
kernels keep them: float32 panels, F16 / BF16 in 16 bits, Q4_K_M in codes (exact, and with int8 activations).

Each kind is timed in interleaved rounds (the machine may be shared): batch 1 and batch B decode steps through the
executor, the median and best of the rounds, and the ratio to float32's median in the same run.

    python benchmarks/bench_weight_kinds.py                   # hidden 1024, FFN 2816, 8 layers; batches 1 and 8
    python benchmarks/bench_weight_kinds.py --quick           # smoke run
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from absl import app, flags

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # common.py, and the package when it is not installed
import common  # noqa: E402  (the benchmarks folder is not a package)

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "kinds", ["F32", "F16", "BF16", "Q4_K_M", "Q4_K_M-int8"], "Weight kinds (writer quant, -int8: int8 activations)."
)
flags.DEFINE_integer("hidden", 1024, "Hidden size (a multiple of 256 for the K-quants).")
flags.DEFINE_integer("ffn", 2816, "FFN width (a multiple of 256).")
flags.DEFINE_integer("layers", 8, "Decoder layers.")
flags.DEFINE_integer("batch", 8, "The larger batch (batch 1 is always timed).")
flags.DEFINE_integer("rounds", 4, "Interleaved rounds; the median and best are reported.")
flags.DEFINE_integer("steps", 20, "Decode steps per round.")
flags.DEFINE_bool("quick", False, "Smoke run: hidden 256, FFN 512, 2 layers, 2 rounds of 3 steps.")
flags.DEFINE_string("output", os.path.join(_HERE, "results", "bench_weight_kinds.json"), "Where to write the JSON.")


def _model_dir(workdir: str) -> str:
    import torch
    import transformers

    from tests.hf_models import save_hf_model

    config = transformers.LlamaConfig(
        vocab_size=8192,
        hidden_size=FLAGS.hidden,
        intermediate_size=FLAGS.ffn,
        num_hidden_layers=FLAGS.layers,
        num_attention_heads=FLAGS.hidden // 64,
        num_key_value_heads=max(1, FLAGS.hidden // 256),
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return save_hf_model(model, os.path.join(workdir, "hf"))


def main(argv):
    del argv
    import jax
    import numpy as np

    from novallm_jax.engine.executor import Executor, ExecutorConfig
    from novallm_jax.loading import load_model, with_activations
    from novallm_jax.loading.gguf_export import hf_to_gguf

    if FLAGS.quick:
        FLAGS.hidden, FLAGS.ffn, FLAGS.layers, FLAGS.rounds, FLAGS.steps = 256, 512, 2, 2, 3
    workdir = tempfile.mkdtemp()
    src = _model_dir(workdir)
    executors, rows = {}, []
    for kind in FLAGS.kinds:
        quant = kind.removesuffix("-int8")
        path = hf_to_gguf(src, os.path.join(workdir, f"{kind}.gguf"), quant=None if quant == "F32" else quant)
        cfg, params = load_model(path, np.float32, keep_quantized=True)
        if kind.endswith("-int8"):
            params = with_activations(params, "int8")
        ex = Executor(cfg, params, ExecutorConfig(page_size=16, num_pages=1 + 16 * FLAGS.batch, max_model_len=256))
        matmul = sum(x.nbytes for x in jax.tree.leaves(ex.params)) - ex.params["embed"].nbytes
        executors[kind] = [ex, ex.new_cache()]
        rows.append(
            {"kind": kind, "matmul MiB": matmul / 2**20, "fused": ex.fused_layers, "times": {1: [], FLAGS.batch: []}}
        )
    tables = [list(range(1 + 16 * b, 17 + 16 * b)) for b in range(FLAGS.batch)]
    for _ in range(FLAGS.rounds):
        for row in rows:
            ex, cache = executors[row["kind"]]
            for bs in row["times"]:
                for i in range(3):  # warm-up (and compile)
                    out, cache = ex.decode(cache, [5] * bs, [i] * bs, tables[:bs])
                    np.asarray(out)
                start = time.perf_counter()
                for i in range(FLAGS.steps):
                    out, cache = ex.decode(cache, [5] * bs, [3 + i] * bs, tables[:bs])
                    np.asarray(out)
                row["times"][bs].append((time.perf_counter() - start) / FLAGS.steps * 1e3)
            executors[row["kind"]][1] = cache
    base = {bs: float(np.median(t)) for bs, t in rows[0]["times"].items()}
    for row in rows:
        for bs, t in row["times"].items():
            row[f"b{bs} ms"] = float(np.median(t))
            row[f"b{bs} best"] = float(min(t))
            row[f"b{bs} / {rows[0]['kind']}"] = float(np.median(t)) / base[bs]
    b = FLAGS.batch
    print(
        common.format_table(
            rows,
            [
                "kind",
                "matmul MiB",
                "fused",
                "b1 ms",
                "b1 best",
                f"b1 / {rows[0]['kind']}",
                f"b{b} ms",
                f"b{b} best",
                f"b{b} / {rows[0]['kind']}",
            ],
        )
    )
    common.write_json(
        FLAGS.output,
        {
            "machine": common.machine_info(),
            "settings": {
                k: getattr(FLAGS, k) for k in ("kinds", "hidden", "ffn", "layers", "batch", "rounds", "steps")
            },
            "rows": rows,
        },
    )


if __name__ == "__main__":
    app.run(main)
