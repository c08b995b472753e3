"""Speculative decoding at batch 1: tokens/s with drafts against plain decoding, same model, same run.

Drafts come from prompt lookup, or with `--draft_model` from that model.

Three tasks on the default model (greedy, so both runs produce the same tokens): `copy`, where the answer repeats
its input (a paragraph to return with one word changed), so drafts are mostly accepted; `free`, a question whose
answer repeats its input little (a poem), where drafts pay only as far as the answer repeats itself (this model's
poems repeat their lines); and `prose`, an explanation whose n-grams recur with other continuations, so that drafts
are rejected (the aim there: no slower than plain decoding, within 5%). Plain and speculative runs alternate round
by round (the machine's load drifts); the table gives each task's median tokens/s per mode (whole requests, prefill
included), the ratio, the ratio of decode rates alone (from the first token to the last: prefill is the same work in
both modes), and the drafts' acceptance rate.

    python benchmarks/bench_speculative.py                 # 6 rounds, k = 8, 128 tokens
    python benchmarks/bench_speculative.py --quick         # smoke run
    python benchmarks/bench_speculative.py --steps=padded  # drafts verified in padded steps (a GPU's, a mesh's)
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app, flags

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # common.py, and the package when it is not installed
import common  # noqa: E402  (the benchmarks folder is not a package)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "GGUF file or model directory (default: the default model).")
flags.DEFINE_enum(
    "activations",
    "float32",
    ["float32", "int8"],
    "LLM(activations=...): the exact kernels, "
    "or int8 dot products (whose cost grows far less with the rows a step verifies).",
)
flags.DEFINE_integer("draft", 8, "Tokens drafted per step (SamplingParams.speculative).")
flags.DEFINE_string(
    "draft_model",
    None,
    "A draft model with the target's tokenizer (LLM(draft_model=...)): its drafts instead of prompt lookup's.",
)
flags.DEFINE_enum(
    "steps",
    "default",
    ["default", "padded"],
    "The engine's steps: its default (ragged on CPU), or padded ones (ExecutorConfig(ragged_steps=False): drafts "
    "verify in `Executor.verify` calls, as on a GPU or a mesh).",
)
flags.DEFINE_bool(
    "greedy_head",
    True,
    "Greedy steps (plain and verifying) of at most 16 logits rows take their argmax from the greedy head "
    "(ExecutorConfig.greedy_head); --nogreedy_head: the full logits.",
)
flags.DEFINE_integer("max_tokens", 128, "Tokens generated per run.")
flags.DEFINE_float(
    "temperature",
    0.0,
    "0: greedy (both modes emit the same tokens); above 0, sampled with a seed per round (a draft model's drafts are "
    "then drawn from its distribution and kept with probability min(1, p/q)).",
)
flags.DEFINE_integer("rounds", 6, "Alternating rounds of plain and speculative runs per task.")
flags.DEFINE_bool("quick", False, "Smoke run: 2 rounds of 24 tokens.")
flags.DEFINE_string("output", os.path.join(_HERE, "results", "bench_speculative.json"), "Where to write the JSON.")

TASKS = {
    "copy": "Rewrite this paragraph, changing only 'cat' to 'dog': The cat sat on the mat, and the cat looked at the "
    "bird in the garden while the sun was setting behind the old house. Every evening the cat waited by the "
    "window for the children to come home from school, and when they arrived the cat ran to the door to "
    "greet them before dinner was served in the warm kitchen.",
    "free": "Write a short poem about the sea at night.",
    "prose": "What are the main causes of the French Revolution?",
}


def _run(llm, ids, params) -> tuple[float, int, int, int, float]:
    """(seconds, tokens, drafted, accepted, decode seconds) of one generation; decode seconds run from the first
    token to the last (the prompt's prefill, the same in both modes, left out)."""
    before = dict(llm.engine.counters)
    start = time.perf_counter()
    out = llm.generate([ids], params)[0].outputs[0]
    seconds = time.perf_counter() - start
    drafted = llm.engine.counters["draft_tokens"] - before.get("draft_tokens", 0)
    accepted = llm.engine.counters["accepted_tokens"] - before.get("accepted_tokens", 0)
    return seconds, len(out.token_ids), drafted, accepted, out.metrics.finished - out.metrics.first_token


def main(argv) -> None:
    del argv
    import dataclasses

    from novallm_jax.engine.engine import EngineConfig
    from novallm_jax.llm import LLM
    from novallm_jax.sampling_params import SamplingParams

    rounds, max_tokens = (2, 24) if FLAGS.quick else (FLAGS.rounds, FLAGS.max_tokens)
    load_before, t0 = common.loadavg(), time.perf_counter()
    results = {}
    executor = EngineConfig().executor
    executor = dataclasses.replace(executor, ragged_steps=False if FLAGS.steps == "padded" else None)
    config = EngineConfig(executor=dataclasses.replace(executor, greedy_head=FLAGS.greedy_head))
    with LLM(
        FLAGS.model,
        speculative=FLAGS.draft,
        activations=FLAGS.activations,
        draft_model=FLAGS.draft_model,
        engine_config=config,
    ) as llm:
        t, ignore = FLAGS.temperature, FLAGS.temperature > 0  # sampled runs: always max_tokens, for like rates
        modes = {
            "plain": SamplingParams(temperature=t, seed=0, max_tokens=max_tokens, ignore_eos=ignore),
            "speculative": SamplingParams(
                temperature=t, seed=0, max_tokens=max_tokens, ignore_eos=ignore, speculative=FLAGS.draft
            ),
        }
        for task, text in TASKS.items():
            ids = llm.chat_prompt([{"role": "user", "content": text}])
            for params in modes.values():  # compile and warm up both
                _run(llm, ids, params)
            runs = {mode: [] for mode in modes}
            for r in range(rounds):
                for mode in list(modes) if r % 2 == 0 else list(reversed(modes)):
                    runs[mode].append(_run(llm, ids, modes[mode]))
            tok_s = {mode: statistics.median(n / s for s, n, *_ in rs) for mode, rs in runs.items()}
            decode = {mode: statistics.median((n - 1) / d for _, n, _, _, d in rs) for mode, rs in runs.items()}
            drafted = sum(r[2] for r in runs["speculative"])
            accepted = sum(r[3] for r in runs["speculative"])
            results[task] = {
                "tok_s_median": tok_s,
                "ratio": tok_s["speculative"] / tok_s["plain"],
                "decode_tok_s_median": decode,
                "decode_ratio": decode["speculative"] / decode["plain"],
                "tokens": runs["plain"][0][1],
                "acceptance_rate": accepted / drafted if drafted else None,
                "runs": {m: [list(x) for x in rs] for m, rs in runs.items()},
            }
    rows = [
        {
            "task": t,
            "plain tok/s": r["tok_s_median"]["plain"],
            "speculative tok/s": r["tok_s_median"]["speculative"],
            "ratio": r["ratio"],
            "decode ratio": r["decode_ratio"],
            "acceptance": r["acceptance_rate"],
            "tokens": r["tokens"],
        }
        for t, r in results.items()
    ]
    columns = ["task", "plain tok/s", "speculative tok/s", "ratio", "decode ratio", "acceptance", "tokens"]
    print(common.format_table(rows, columns))
    machine = {**common.machine_info(), "loadavg_before": load_before, "loadavg_after": common.loadavg()}
    print(
        f"k = {FLAGS.draft}, drafts by {FLAGS.draft_model or 'prompt lookup'}, activations {FLAGS.activations}, "
        f"temperature {FLAGS.temperature}, {FLAGS.steps} steps, greedy head {'on' if FLAGS.greedy_head else 'off'}, "
        f"{rounds} rounds, load {load_before} -> {machine['loadavg_after']}, {time.perf_counter() - t0:.0f} s"
    )
    common.write_json(
        FLAGS.output,
        {
            "machine": machine,
            "settings": {
                "draft": FLAGS.draft,
                "draft_model": FLAGS.draft_model,
                "rounds": rounds,
                "activations": FLAGS.activations,
                "max_tokens": max_tokens,
                "temperature": FLAGS.temperature,
                "steps": FLAGS.steps,
                "greedy_head": FLAGS.greedy_head,
            },
            "tasks": results,
        },
    )
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
