"""Start-up time of each entry point, in fresh processes, cold (empty caches) and warm, beside llama.cpp's start.

Entry points: `novallm-generate` (wall time to the first streamed text and to exit), the SDK (`import`, `LLM()`,
the first token; with the phases `novallm_jax.startup` times and the XLA compiles and cache loads it counts), and
`novallm-serve` (until /health answers, then until a streamed request's first token). llama.cpp's `llama-cli -st`
and `llama-server` run on the same GGUF file when `--llama_cpp_bin` (or $NOVALLM_LLAMA_CPP) names its tools.

Cold: a fresh cache directory per entry point ($XDG_CACHE_HOME: the XLA compilation cache, the packed weights, and
kernels compiled at run time), with the native kernels pip built at install; and one more cold SDK start that
ignores those and compiles the kernels itself (`--cold_kernel_build`). Warm: that directory again. The rounds
alternate the entry points, and figures are medians.

    python benchmarks/bench_startup.py                   # default model, 3 warm rounds
    python benchmarks/bench_startup.py --llama_cpp_bin="$(bash benchmarks/build_llama_cpp.sh | tail -1)"
"""

from __future__ import annotations

import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from absl import app, flags

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import common  # noqa: E402
import llama_cpp_tools  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "GGUF file (default: the default model).")
flags.DEFINE_string("prompt", "What is the capital of France?", "The prompt of every entry point.")
flags.DEFINE_integer("max_new_tokens", 16, "Tokens `novallm-generate` and `llama-cli` generate.")
flags.DEFINE_integer("rounds", 3, "Warm rounds (after one cold start of each entry point).", lower_bound=1)
flags.DEFINE_list("entries", ["generate", "sdk", "serve"], "Our entry points to time.")
flags.DEFINE_string("llama_cpp_bin", None, "llama.cpp's tools (llama-cli, llama-server); default $NOVALLM_LLAMA_CPP.")
flags.DEFINE_bool(
    "cold_kernel_build",
    True,
    "Also a cold SDK start that ignores the kernels pip built at install (NOVALLM_INSTALLED_KERNELS=0): it compiles "
    "them, as a machine whose CPU, compiler or jaxlib differs from the install's does.",
)
flags.DEFINE_integer("timeout", 300, "Seconds before one start counts as failed.")
flags.DEFINE_string("output", os.path.join(_HERE, "results", "bench_startup.json"), "Where to write the JSON results.")

_SDK_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import jax
t_jax = time.perf_counter()
from novallm_jax import LLM, SamplingParams
from novallm_jax.startup import CompileStats, recent_phases
t_import = time.perf_counter()
stats = CompileStats()
llm = LLM(sys.argv[1])
t_llm = time.perf_counter()
first = None
for out in llm.stream_outputs(sys.argv[2], SamplingParams(max_tokens=int(sys.argv[3]), temperature=0)):
    first = first or time.perf_counter()  # the step that drew the first token
t_end = time.perf_counter()
llm.close()
print("STARTUP_JSON " + json.dumps({
    "import_jax_s": t_jax - t0, "import_novallm_s": t_import - t_jax, "llm_s": t_llm - t_import,
    "first_token_s": first - t_llm, "to_first_token_s": first - t0, "total_s": t_end - t0,
    "phases": recent_phases(), "xla": stats.as_dict()}))
"""


_SDK_BUILD = "sdk, kernels compiled"  # the cold SDK start without the kernels built at install


def _env(cache_dir: str) -> dict[str, str]:
    env = dict(os.environ, XDG_CACHE_HOME=cache_dir, TOKENIZERS_PARALLELISM="false")
    env.pop("NOVALLM_KERNEL_CACHE", None)  # the kernels too must come from `cache_dir`
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_output(cmd: list[str], env: dict, timeout: float) -> dict[str, float]:
    """Wall seconds until the process writes its first byte of stdout (for `novallm-generate --stream`, the first
    token's text), and until it exits."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    first = None
    try:
        while proc.stdout.read(1):
            first = first or time.perf_counter() - t0
        proc.wait(timeout=timeout)
    finally:
        proc.kill()
    if proc.returncode:
        raise RuntimeError(f"{os.path.basename(cmd[0])} exited {proc.returncode}")
    return {"to_first_token_s": first, "total_s": time.perf_counter() - t0}


def run_generate(model: str, env: dict) -> dict[str, float]:
    return _first_output(
        [
            "novallm-generate",
            f"--model={model}",
            f"--prompt={FLAGS.prompt}",
            "--stream",
            f"--max_new_tokens={FLAGS.max_new_tokens}",
            "--temperature=0",
        ],
        env,
        FLAGS.timeout,
    )


def run_sdk(model: str, env: dict) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-c", _SDK_CHILD, model, FLAGS.prompt, str(FLAGS.max_new_tokens)],
        capture_output=True,
        text=True,
        env=env,
        timeout=FLAGS.timeout,
    )
    line = next((x for x in res.stdout.splitlines() if x.startswith("STARTUP_JSON ")), None)
    if line is None:
        raise RuntimeError(f"the SDK child failed: {res.stderr.strip()[-500:]}")
    return json.loads(line.split(" ", 1)[1])


def _serve_timing(cmd: list[str], port: int, env: dict, request: dict, path: str) -> dict[str, float]:
    """Seconds until GET /health answers 200, then until the first streamed chunk of `request` arrives."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env
    )
    try:
        health = None
        while health is None:
            if proc.poll() is not None:
                raise RuntimeError(f"{os.path.basename(cmd[0])} exited {proc.returncode} before /health")
            if time.perf_counter() - t0 > FLAGS.timeout:
                raise RuntimeError("no /health within the timeout")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        health = time.perf_counter() - t0
            except OSError:
                time.sleep(0.02)
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}",
            data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=FLAGS.timeout) as r:
            for line in r:
                if line.startswith(b"data: {"):  # the first chunk: its token is out
                    break
        return {"to_health_s": health, "to_first_token_s": time.perf_counter() - t0}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_serve(model: str, env: dict) -> dict[str, float]:
    port = _free_port()
    return _serve_timing(
        ["novallm-serve", f"--model={model}", f"--port={port}", "--served_model_name=bench"],
        port,
        env,
        {
            "model": "bench",
            "prompt": FLAGS.prompt,
            "max_tokens": FLAGS.max_new_tokens,
            "stream": True,
            "temperature": 0,
        },
        "/v1/completions",
    )


def run_llama_cli(bin_dir: str, model: str, env: dict) -> dict[str, float]:
    """Wall seconds until llama-cli exits (it writes to stdout before its first token, so only the total compares).

    Its default sampler: with `--temp 0` this build decodes ~6x slower (19 against 110 tok/s here)."""
    out = _first_output(
        [
            os.path.join(bin_dir, "llama-cli"),
            "-m",
            model,
            "-p",
            FLAGS.prompt,
            "-n",
            str(FLAGS.max_new_tokens),
            "-st",
            "-t",
            str(common.cpu_count()),
            "--no-display-prompt",
        ],
        env,
        FLAGS.timeout,
    )
    return {"total_s": out["total_s"]}


def run_llama_server(bin_dir: str, model: str, env: dict) -> dict[str, float]:
    port = _free_port()
    return _serve_timing(
        [os.path.join(bin_dir, "llama-server"), "-m", model, "--port", str(port), "-t", str(common.cpu_count())],
        port,
        env,
        {"prompt": FLAGS.prompt, "max_tokens": FLAGS.max_new_tokens, "stream": True},
        "/v1/completions",
    )


def _median(samples: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k, v in samples[0].items() if isinstance(v, (int, float))]
    return {k: statistics.median(s[k] for s in samples) for k in keys}


def main(argv):
    del argv
    from novallm_jax.loading import default_model_path

    model = FLAGS.model or default_model_path()
    bin_dir = llama_cpp_tools.find_bin(FLAGS.llama_cpp_bin)
    ours = {"generate": run_generate, "sdk": run_sdk, "serve": run_serve}
    unknown = set(FLAGS.entries) - set(ours)
    if unknown:
        raise app.UsageError(f"unknown --entries {sorted(unknown)}; known: {sorted(ours)}")
    runners = {name: functools.partial(ours[name], model) for name in FLAGS.entries}
    for name, run in (("llama-cli", run_llama_cli), ("llama-server", run_llama_server)):
        if bin_dir and os.access(os.path.join(bin_dir, name), os.X_OK):
            runners[name] = functools.partial(run, bin_dir, model)

    results: dict[str, Any] = {
        "machine": common.machine_info(),
        "model": model,
        "settings": {"rounds": FLAGS.rounds, "prompt": FLAGS.prompt, "max_new_tokens": FLAGS.max_new_tokens},
        "cold": {},
        "warm": {},
    }
    with tempfile.TemporaryDirectory() as caches:
        # Each entry point its own cache directory: its cold start finds it empty, its warm starts find what it wrote.
        envs = {name: _env(os.path.join(caches, name)) for name in runners}
        for name, run in runners.items():
            results["cold"][name] = _guarded(run, envs[name])
        if FLAGS.cold_kernel_build and "sdk" in runners:
            env = dict(_env(os.path.join(caches, _SDK_BUILD)), NOVALLM_INSTALLED_KERNELS="0")
            results["cold"][_SDK_BUILD] = _guarded(runners["sdk"], env)
        samples: dict[str, list] = {name: [] for name in runners}
        names = list(runners)
        for r in range(FLAGS.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                samples[name].append(_guarded(runners[name], envs[name]))
    for name, runs in samples.items():
        ok = [s for s in runs if "error" not in s]
        results["warm"][name] = {"median": _median(ok) if ok else None, "runs": runs}
    results["machine"]["loadavg_after"] = common.loadavg()
    common.write_json(FLAGS.output, results)

    rows = []
    for kind in ("cold", "warm"):
        for name in results["cold"] if kind == "cold" else runners:
            e = results[kind][name] if kind == "cold" else results["warm"][name]["median"]
            if not e or "error" in e:
                rows.append({"start": kind, "entry": name, "error": (e or {}).get("error", "every run failed")})
                continue
            rows.append(
                {
                    "start": kind,
                    "entry": name,
                    "to first token s": e.get("to_first_token_s"),
                    "to /health s": e.get("to_health_s"),
                    "total s": e.get("total_s"),
                    "LLM() s": e.get("llm_s"),
                }
            )
    print(
        common.format_table(rows, ["start", "entry", "to first token s", "to /health s", "total s", "LLM() s", "error"])
    )
    for kind in ("cold", "warm"):
        for name, peer, key in (
            ("generate", "llama-cli", "total_s"),
            ("serve", "llama-server", "to_first_token_s"),
            ("sdk", "llama-server", "to_first_token_s"),
        ):
            a, b = _figure(results, kind, name), _figure(results, kind, peer)
            if a and b and a.get(key) and b.get(key):
                print(f"{kind} {name} / {peer}, {key}: {a[key]:.2f} / {b[key]:.2f} s = {a[key] / b[key]:.2f}x")
    sdk = results["cold"].get("sdk")
    if sdk and "phases" in sdk:
        print("cold SDK phases: " + ", ".join(f"{n} {s:.2f} s" for n, s in sdk["phases"]) + f"; XLA: {sdk['xla']}")
    warm_sdk = (results["warm"].get("sdk") or {}).get("runs") or []
    if warm_sdk and "phases" in warm_sdk[-1]:
        print(
            "warm SDK phases: "
            + ", ".join(f"{n} {s:.2f} s" for n, s in warm_sdk[-1]["phases"])
            + f"; XLA: {warm_sdk[-1]['xla']}"
        )
    print(f"wrote {FLAGS.output}")


def _figure(results: dict, kind: str, name: str) -> dict | None:
    e = results[kind].get(name)
    e = e if kind == "cold" else (e or {}).get("median")
    return None if not e or "error" in e else e


def _guarded(run, env) -> dict[str, Any]:
    try:
        return run(env)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:  # one failed start must not sink the others
        return {"error": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    app.run(main)
