"""Serving overhead: N concurrent streaming clients over HTTP on loopback, against the same engine driven directly.

Both runs use the same LLM, prompts, seeds and lengths (ignore_eos, so every request generates exactly
--max_tokens), and the same closed-loop load: --clients workers, each sending its next request when the previous
one ends, until --requests are done or --time_limit_s passes. Reports requests/s, time to first token p50/p99,
per-token latency (mean gap between streamed tokens after the first) p50/p99 and generated tokens/s for each, and
the ratio HTTP / direct (the server's overhead). After one untimed warm-up run each way, the two alternate
--repeats times and the fastest of each is reported. Prints a table and writes JSON.

    python benchmarks/bench_serving.py                          # SmolLM2-135M-Instruct, 16 clients, 64 requests
    python benchmarks/bench_serving.py --model=random-tiny --clients=4 --requests=8 --max_tokens=8   # smoke run
    python benchmarks/bench_serving.py --peer=llama-server --clients=32 --requests=96 --max_tokens=64 \
        --llama_cpp_bin="$(bash benchmarks/build_llama_cpp.sh | tail -1)"    # also llama.cpp's server, same file
    python benchmarks/bench_serving.py --clients=4 --speculative=8    # our requests drafting by prompt lookup

`--peer=llama-server` runs the same closed-loop load against `llama-server -np CLIENTS` on the same GGUF file (the
default model), alternating with ours, and reports ours / llama-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging as std_logging
import os
import statistics
import sys
import time
from typing import Any

from absl import app, flags

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # common.py, and the package when it is not installed
import common  # noqa: E402  (the benchmarks folder is not a package)
import llama_cpp_tools  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "model",
    None,
    "Model path (default: SmolLM2-135M-Instruct), or random-tiny: a 2-layer random Llama with the SmolLM2 tokenizer.",
)
flags.DEFINE_integer("clients", 16, "Concurrent clients.", lower_bound=1)
flags.DEFINE_integer("requests", 64, "Requests per run (bounded also by --time_limit_s).", lower_bound=1)
flags.DEFINE_integer("max_tokens", 32, "Tokens generated per request.", lower_bound=2)
flags.DEFINE_integer("prompt_words", 24, "Words per prompt (each prompt differs, so the prefix cache cannot help).")
flags.DEFINE_float("time_limit_s", 120.0, "No new request starts after this long, per run.")
flags.DEFINE_integer("repeats", 2, "Timed runs each way, alternating; the fastest of each is reported.", lower_bound=1)
flags.DEFINE_enum(
    "activations",
    "float32",
    ["float32", "int8"],
    "Our matmuls' activations (int8: llama.cpp's arithmetic; LLM(activations=...)).",
)
flags.DEFINE_enum(
    "kv_cache_dtype",
    None,
    ["float32", "bfloat16"],
    "Our KV cache's dtype (LLM(kv_cache_dtype=...); default the model's, float32). llama-server keeps float16.",
)
flags.DEFINE_integer(
    "speculative",
    0,
    "Our requests draft up to this many tokens a step by prompt lookup (LLM(speculative=k), the request's "
    "`speculative`; 0: off). With many clients a step has no draft tokens to share and plans ahead as plain ones do.",
    lower_bound=0,
    upper_bound=8,
)
flags.DEFINE_enum("peer", None, ["llama-server"], "Also run the load against this server on the same GGUF file.")
flags.DEFINE_string("llama_cpp_bin", None, "llama.cpp's tools for --peer (default $NOVALLM_LLAMA_CPP).")
flags.DEFINE_string("output", os.path.join(_HERE, "results", "bench_serving.json"), "Where to write the JSON results.")

WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
    "romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()


def prompts(n: int, words: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words)) + f" {i}" for i in range(n)]


def build_llm(model: str | None):
    from novallm_jax.llm import LLM

    if model != "random-tiny":
        # the warm-up run below compiles the shapes this load uses, not all of them
        return LLM(
            model, activations=FLAGS.activations, speculative=FLAGS.speculative, kv_cache_dtype=FLAGS.kv_cache_dtype
        )
    import jax

    from novallm_jax.config import ModelConfig
    from novallm_jax.engine.engine import EngineConfig, LLMEngine
    from novallm_jax.engine.executor import ExecutorConfig
    from novallm_jax.loading import default_model_path
    from novallm_jax.model import init_params
    from novallm_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_path())
    cfg = ModelConfig(
        model_type="llama",
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        eos_token_ids=tuple(tok.eos_token_ids),
    )
    exec_cfg = ExecutorConfig(
        page_size=8,
        num_pages=512,
        max_model_len=256,
        decode_batch_buckets=(16,),
        prefill_batch_buckets=(4,),
        prefill_len_buckets=(64,),
        page_table_buckets=(32,),
        max_draft_tokens=FLAGS.speculative,
        kv_cache_dtype=FLAGS.kv_cache_dtype,
    )
    engine = LLMEngine(cfg, init_params(cfg, jax.random.key(0)), tok, EngineConfig(executor=exec_cfg))
    return LLM.from_engine(engine, "random-tiny")


class Trace:
    """Timestamps of one request: start, and each time new tokens arrived (with how many)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.arrivals: list[tuple[float, int]] = []

    def tokens(self) -> int:
        return sum(n for _, n in self.arrivals)


async def closed_loop(n_clients: int, n_requests: int, time_limit: float, one) -> tuple[list[Trace], float]:
    """Runs `one(index) -> Trace` from n_clients workers until n_requests are done or time runs out."""
    next_index, traces = 0, []
    t0 = time.perf_counter()

    async def worker():
        nonlocal next_index
        while next_index < n_requests and time.perf_counter() - t0 < time_limit:
            i = next_index
            next_index += 1
            traces.append(await one(i))

    await asyncio.gather(*(worker() for _ in range(n_clients)))
    return traces, time.perf_counter() - t0


def summarize(traces: list[Trace], wall: float) -> dict[str, Any]:
    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else None

    ttft = [t.arrivals[0][0] - t.start for t in traces if t.arrivals]
    per_token = [
        (t.arrivals[-1][0] - t.arrivals[0][0]) / (t.tokens() - t.arrivals[0][1])
        for t in traces
        if t.arrivals and t.tokens() > t.arrivals[0][1]
    ]
    tokens = sum(t.tokens() for t in traces)
    return {
        "requests": len(traces),
        "wall_s": wall,
        "requests_per_s": len(traces) / wall,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1e3 * pct(ttft, 50),
        "ttft_p99_ms": 1e3 * pct(ttft, 99),
        "per_token_p50_ms": 1e3 * pct(per_token, 50),
        "per_token_p99_ms": 1e3 * pct(per_token, 99),
        "per_token_mean_ms": 1e3 * statistics.fmean(per_token) if per_token else None,
    }


async def run_direct(llm, texts: list[str]) -> tuple[list[Trace], float]:
    from novallm_jax.sampling_params import SamplingParams

    async def one(i: int) -> Trace:
        trace = Trace()
        params = SamplingParams(max_tokens=FLAGS.max_tokens, ignore_eos=True, seed=i, speculative=FLAGS.speculative)
        async for out in llm.astream_outputs(llm.encode(texts[i]), params):
            if out.delta_token_ids:
                trace.arrivals.append((time.perf_counter(), len(out.delta_token_ids)))
        return trace

    return await closed_loop(FLAGS.clients, len(texts), FLAGS.time_limit_s, one)


async def run_http(
    url: str, model: str, texts: list[str], per_chunk: bool = False, keep_alive: bool = True, extra: dict | None = None
) -> tuple[list[Trace], float]:
    import httpx

    keep = FLAGS.clients + 4 if keep_alive else 0
    limits = httpx.Limits(max_connections=FLAGS.clients + 4, max_keepalive_connections=keep)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(i: int) -> Trace:
            trace = Trace()
            body = {
                "model": model,
                "prompt": texts[i],
                "max_tokens": FLAGS.max_tokens,
                "ignore_eos": True,
                "seed": i,
                "stream": True,
                "logprobs": 0,
                **(extra or {}),
            }  # logprobs: one entry per token, to count them
            async with client.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    n = _tokens_in(json.loads(line[6:]), per_chunk)
                    if n:
                        trace.arrivals.append((time.perf_counter(), n))
            return trace

        return await closed_loop(FLAGS.clients, len(texts), FLAGS.time_limit_s, one)


def _tokens_in(chunk: dict, per_chunk: bool) -> int:
    """Tokens a streamed completion chunk carries: its logprobs entries (ours); with `per_chunk` (llama-server,
    which streams a token per chunk and no logprobs), one per chunk before the one that finishes."""
    choices = chunk.get("choices") or []
    if not choices:
        return 0
    if per_chunk:
        return int(choices[0].get("finish_reason") is None)
    return len((choices[0].get("logprobs") or {}).get("tokens") or [])


class LlamaServer:
    """`llama-server -np N` on a GGUF file, on a free loopback port, for as long as the block runs."""

    def __init__(self, bin_dir: str, model: str, slots: int, ctx_per_slot: int):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.cmd = [
            os.path.join(bin_dir, "llama-server"),
            "-m",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-np",
            str(slots),
            "-c",
            str(slots * ctx_per_slot),
            "-t",
            str(common.cpu_count()),
            "--no-webui",
        ]
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LlamaServer":
        import subprocess
        import urllib.request

        # its log beside the results: a request it drops shows there, not in our traceback
        self.log = open(os.path.join(os.path.dirname(os.path.abspath(FLAGS.output)), "llama-server.log"), "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited {self.proc.returncode}: {' '.join(self.cmd)}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError("llama-server did not answer /health within 120 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
        self.log.close()


def main(argv) -> None:
    del argv
    from novallm_jax.serving.app import ServerConfig
    from novallm_jax.serving.runner import BackgroundServer

    std_logging.getLogger("httpx").setLevel(std_logging.WARNING)  # one INFO line per request otherwise
    t_start = time.time()
    load_before = common.loadavg()
    llm = build_llm(FLAGS.model)
    texts = prompts(FLAGS.requests, FLAGS.prompt_words)
    warm = prompts(FLAGS.requests, FLAGS.prompt_words + 1)  # other prompts: warm-up leaves no useful prefix cache
    results: dict[str, Any] = {}
    runs = {"direct": lambda ps: run_direct(llm, ps)}
    peer = contextlib.nullcontext()
    if FLAGS.peer == "llama-server":
        bin_dir = llama_cpp_tools.find_bin(FLAGS.llama_cpp_bin)
        if bin_dir is None or FLAGS.model == "random-tiny":
            raise app.UsageError("--peer=llama-server needs --llama_cpp_bin (or $NOVALLM_LLAMA_CPP) and a GGUF model")
        from novallm_jax.loading import default_model_path

        ctx = 2 * (FLAGS.prompt_words * 4 + FLAGS.max_tokens) + 64
        peer = LlamaServer(bin_dir, FLAGS.model or default_model_path(), FLAGS.clients, ctx)
    with BackgroundServer(llm, ServerConfig(max_concurrent=FLAGS.clients + 8)) as srv, peer:
        ours = {"speculative": FLAGS.speculative} if FLAGS.speculative else {}
        runs["http"] = lambda ps: run_http(srv.url, srv.server.model_name, ps, extra=ours)
        if FLAGS.peer:
            # llama-server (cpp-httplib) closes a kept-alive connection after 5 requests or 5 idle seconds, racing
            # the client's next request on it ("Server disconnected without sending a response"): a new one each.
            runs[FLAGS.peer] = lambda ps: run_http(peer.url, "model", ps, per_chunk=True, keep_alive=False)
        # Warm-up: the whole load once each way (compiles every shape it reaches, fills connection pools).
        for run in runs.values():
            asyncio.run(run(warm))
        # Timed: alternate the two --repeats times; keep each one's fastest run (a late compile or a busy
        # neighbour only slows a run down).
        for _ in range(FLAGS.repeats):
            for name, run in runs.items():
                llm.engine.prefix_cache.clear()  # (llama-server's prompts differ per request, as ours)
                r = summarize(*asyncio.run(run(texts)))
                if name not in results or r["tokens_per_s"] > results[name]["tokens_per_s"]:
                    results[name] = r
    leaks = llm.engine.check_leaks()
    drafts = {k: llm.engine.counters[k] for k in ("draft_tokens", "accepted_tokens")}  # over every run, warm-ups too
    llm.close()
    d, h = results["direct"], results["http"]
    ratios = {
        "requests_per_s": h["requests_per_s"] / d["requests_per_s"],
        "tokens_per_s": h["tokens_per_s"] / d["tokens_per_s"],
        "ttft_p50": h["ttft_p50_ms"] / d["ttft_p50_ms"],
        "per_token_p50": h["per_token_p50_ms"] / d["per_token_p50_ms"],
    }
    rows = [
        {
            "run": name,
            **{
                k: r[k]
                for k in (
                    "requests",
                    "requests_per_s",
                    "tokens_per_s",
                    "ttft_p50_ms",
                    "ttft_p99_ms",
                    "per_token_p50_ms",
                    "per_token_p99_ms",
                )
            },
        }
        for name, r in results.items()
    ]
    rows.append(
        {
            "run": "http/direct",
            "requests_per_s": ratios["requests_per_s"],
            "tokens_per_s": ratios["tokens_per_s"],
            "ttft_p50_ms": ratios["ttft_p50"],
            "per_token_p50_ms": ratios["per_token_p50"],
        }
    )
    if FLAGS.peer:
        p = results[FLAGS.peer]
        ratios[f"http_over_{FLAGS.peer}"] = {
            "tokens_per_s": h["tokens_per_s"] / p["tokens_per_s"],
            "ttft_p50": h["ttft_p50_ms"] / p["ttft_p50_ms"],
        }
        rows.append(
            {
                "run": f"http/{FLAGS.peer}",
                "requests_per_s": h["requests_per_s"] / p["requests_per_s"],
                "tokens_per_s": h["tokens_per_s"] / p["tokens_per_s"],
                "ttft_p50_ms": h["ttft_p50_ms"] / p["ttft_p50_ms"],
                "per_token_p50_ms": h["per_token_p50_ms"] / p["per_token_p50_ms"],
            }
        )
    print(
        common.format_table(
            rows,
            [
                "run",
                "requests",
                "requests_per_s",
                "tokens_per_s",
                "ttft_p50_ms",
                "ttft_p99_ms",
                "per_token_p50_ms",
                "per_token_p99_ms",
            ],
        )
    )
    if FLAGS.speculative:
        print(f"drafts (every run, warm-ups too): {drafts['draft_tokens']} drafted, {drafts['accepted_tokens']} kept")
    machine = common.machine_info(("jax", "jaxlib", "fastapi", "uvicorn", "httpx", "numpy"))
    machine.update(loadavg_before=load_before, loadavg_after=common.loadavg())
    common.write_json(
        FLAGS.output,
        {
            "machine": machine,
            "settings": {
                "model": FLAGS.model or "default",
                "activations": FLAGS.activations,
                "kv_cache_dtype": FLAGS.kv_cache_dtype,
                "clients": FLAGS.clients,
                "requests": FLAGS.requests,
                "max_tokens": FLAGS.max_tokens,
                "prompt_words": FLAGS.prompt_words,
                "time_limit_s": FLAGS.time_limit_s,
                "repeats": FLAGS.repeats,
                "peer": FLAGS.peer,
                "speculative": FLAGS.speculative,
            },
            "drafts": drafts,
            "direct": d,
            "http": h,
            **({FLAGS.peer: results[FLAGS.peer]} if FLAGS.peer else {}),
            "ratios": ratios,
            "leaks": leaks,
            "wall_s": time.time() - t_start,
        },
    )


if __name__ == "__main__":
    app.run(main)
