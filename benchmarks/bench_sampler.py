"""Times the batched sampler (`novallm_jax.sampling`) per call, as the engine calls it once per decode step.

Cases: all-greedy, temperature-only, top-k(50), top-p(0.9) and top-k+top-p+min-p on peaked and on flat logits,
penalties (repetition / frequency / presence / logit bias), a mixed batch of all of them, the same with 20 top
logprobs, and the state updates `update_counts`, `set_row`, `clear_row`. Each figure is the best (and median) of
`--repeats` calls after a warm-up call that also compiles.

Engine-shaped cases (`engine_*_S{slots}`): B running rows out of a slot batch of --slots rows, sampled and counted
the way `LLMEngine` does it, with `sample_slots` (only the B rows, state advanced in place); each has a baseline
measured in the same run, `full_*_S{slots}`: `sample` over all the slots then `update_counts`, the engine's
former path (what a step cost before whatever the number of running rows).

    python benchmarks/bench_sampler.py                    # B = 1, 8, 32 at V = 49152; slot batches of 32 and 64
    python benchmarks/bench_sampler.py --quick            # smoke run
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

from absl import app, flags

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # common.py, and the package when it is not installed
import common  # noqa: E402  (the benchmarks folder is not a package)

FLAGS = flags.FLAGS
flags.DEFINE_list("batches", ["1", "8", "32"], "Batch sizes.")
flags.DEFINE_integer("vocab", 49152, "Vocabulary size (SmolLM2's by default).")
flags.DEFINE_integer("repeats", 30, "Timed calls per case; the best and the median are reported.")
flags.DEFINE_list("cases", [], "Only these cases (default: all).")
flags.DEFINE_list("slots", ["32", "64"], "Slot-batch sizes of the engine-shaped cases (each >= the largest B).")
flags.DEFINE_bool("quick", False, "Smoke run: B=1,2, V=1024, 3 repeats, 4 slots.")
flags.DEFINE_string("output", os.path.join(_HERE, "results", "bench_sampler.json"), "Where to write the JSON.")


def _cases() -> dict[str, tuple[str, list[Any]]]:
    """name -> (logits kind, params cycled over the rows)."""
    from novallm_jax.sampling_params import SamplingParams as P

    penalties = P(
        temperature=0.8,
        repetition_penalty=1.2,
        frequency_penalty=0.5,
        presence_penalty=0.3,
        logit_bias={11: 2.0},
        seed=3,
    )
    return {
        "greedy": ("peaked", [P(temperature=0)]),
        "greedy_empty_slots": ("peaked", [None]),
        "temperature": ("peaked", [P(temperature=0.8, seed=1)]),
        "top_k50_peaked": ("peaked", [P(top_k=50, seed=1)]),
        "top_k50_flat": ("flat", [P(top_k=50, seed=1)]),
        "top_p0.9_peaked": ("peaked", [P(top_p=0.9, seed=1)]),
        "top_p0.9_flat": ("flat", [P(top_p=0.9, seed=1)]),
        "k50_p0.9_minp_flat": ("flat", [P(top_k=50, top_p=0.9, min_p=0.05, seed=1)]),
        "penalties": ("peaked", [penalties]),
        "mixed": (
            "peaked",
            [P(temperature=0), P(temperature=0.8, seed=1), P(top_k=50, seed=2), P(top_p=0.9, seed=4), penalties, None],
        ),
    }


def _logits(kind: str, rows: int, vocab: int):
    import numpy as np

    rng = np.random.default_rng(0)
    if kind == "flat":  # near-uniform: the top-p(0.9) cut lies deep in the vocabulary
        return (rng.normal(size=(rows, vocab)) * 0.1).astype(np.float32)
    x = rng.normal(size=(rows, vocab)).astype(np.float32) * 2.0
    x[:, :20] += 14.0  # a few strong candidates hold ~98% of the mass, as in most LM steps
    return x


def _time(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    t = common.time_repeats(fn, repeats, warmup=2)
    return {"best_ms": t.best * 1e3, "median_ms": t.median * 1e3}


def run(batches: list[int], vocab: int, repeats: int, only: list[str]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from novallm_jax.sampling import SamplingBatch, sample, update_counts

    results: list[dict[str, Any]] = []
    cases = {k: v for k, v in _cases().items() if not only or k in only}
    rng_prompt = list(range(1, 200, 3))
    for b in batches:
        for name, (kind, params) in cases.items():
            rows = [params[i % len(params)] for i in range(b)]
            batch = SamplingBatch.from_params(
                rows, vocab, prompt_token_ids=[rng_prompt] * b, output_token_ids=[[5, 7, 7, 9]] * b
            )
            logits = jnp.asarray(_logits(kind, b, vocab))
            for n_top in (0, 20) if name == "mixed" else (0,):
                fn = lambda: sample(logits, batch, num_top_logprobs=n_top).tokens.block_until_ready()
                label = name if n_top == 0 else f"{name}_logprobs20"
                results.append({"case": label, "batch": b, **_time(fn, repeats)})
        if not only or "update_counts" in only:
            batch = SamplingBatch.from_params([None] * b, vocab)
            tokens = jnp.arange(b, dtype=jnp.int32)
            state = {"batch": batch}

            def step():
                state["batch"] = update_counts(state["batch"], tokens)
                state["batch"].steps.block_until_ready()

            results.append({"case": "update_counts", "batch": b, **_time(step, repeats)})

            def set_clear(clear: bool):
                def fn():
                    nb = state["batch"]
                    nb = nb.clear_row(0) if clear else nb.set_row(0, cases_params, prompt_token_ids=rng_prompt)
                    state["batch"] = nb
                    jax.block_until_ready(nb)

                return fn

            from novallm_jax.sampling_params import SamplingParams

            cases_params = SamplingParams(top_p=0.9, repetition_penalty=1.1, seed=5)
            results.append({"case": "set_row", "batch": b, **_time(set_clear(False), repeats)})
            results.append({"case": "clear_row", "batch": b, **_time(set_clear(True), repeats)})
    return {"vocab": vocab, "results": results}


def run_engine_shaped(
    batches: list[int], slot_counts: list[int], vocab: int, repeats: int, only: list[str]
) -> list[dict[str, Any]]:
    """B running rows out of S slots: sample_slots (the engine) against sample + update_counts over all S slots."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from novallm_jax.sampling import SamplingBatch, sample, sample_slots, update_counts
    from novallm_jax.sampling_params import SamplingParams as P

    kinds = {"greedy": [P(temperature=0, seed=0)], "mixed": _cases()["mixed"][1]}
    results: list[dict[str, Any]] = []
    for slots in slot_counts:
        for name, params in kinds.items():
            engine_case, full_case = f"engine_{name}_S{slots}", f"full_{name}_S{slots}"
            if only and engine_case not in only and full_case not in only:
                continue
            for b in batches:
                if b > slots:
                    continue
                rows = [params[i % len(params)] for i in range(b)] + [None] * (slots - b)
                make = lambda: SamplingBatch.from_params(rows, vocab, prompt_token_ids=[list(range(1, 200, 3))] * slots)
                logits = jnp.asarray(_logits("peaked", b, vocab))
                state = {"batch": make()}
                ids = jnp.arange(b, dtype=jnp.int32)

                def engine_step():
                    out, state["batch"] = sample_slots(logits, ids, state["batch"])
                    jax.device_get(out)

                results.append({"case": engine_case, "batch": b, **_time(engine_step, repeats)})
                full = jnp.zeros((slots, vocab), jnp.float32).at[:b].set(logits)
                mask = jnp.asarray(np.arange(slots) < b)
                state["batch"] = make()

                def full_step():
                    out = sample(full, state["batch"])
                    state["batch"] = update_counts(state["batch"], jnp.where(mask, out.tokens, -1))
                    jax.device_get(out)

                results.append({"case": full_case, "batch": b, **_time(full_step, repeats)})
    return results


def main(argv: list[str]) -> None:
    del argv
    batches = [1, 2] if FLAGS.quick else [int(b) for b in FLAGS.batches]
    vocab = 1024 if FLAGS.quick else FLAGS.vocab
    repeats = 3 if FLAGS.quick else FLAGS.repeats
    t0 = time.perf_counter()
    before_load, before_cpu = common.loadavg(), common.cpu_times()
    res = run(batches, vocab, repeats, FLAGS.cases)
    slot_counts = [4] if FLAGS.quick else [int(x) for x in FLAGS.slots]
    res["results"] += run_engine_shaped(batches, slot_counts, vocab, repeats, FLAGS.cases)
    machine = common.machine_info()
    machine.update(
        loadavg_before=before_load,
        loadavg_after=common.loadavg(),
        cpu_share=common.cpu_share(before_cpu, common.cpu_times()),
    )
    out = {
        "machine": machine,
        "settings": {"batches": batches, "vocab": vocab, "repeats": repeats, "slots": slot_counts},
        "wall_s": time.perf_counter() - t0,
        **res,
    }
    table = {}
    for r in res["results"]:
        table.setdefault(r["case"], {"case": r["case"]})[f"B={r['batch']}"] = r["best_ms"]
    print(f"ms per call (best of {repeats}), V={vocab}")
    print(common.format_table(list(table.values()), ["case"] + [f"B={b}" for b in batches]))
    speedups = []
    for case, row in table.items():
        full = table.get(case.replace("engine_", "full_", 1)) if case.startswith("engine_") else None
        if full:
            speedups.append({"case": case, **{k: full[k] / v for k, v in row.items() if k != "case" and k in full}})
    if speedups:
        print("engine-shaped: full-slot path / sample_slots (x faster)")
        print(common.format_table(speedups, ["case"] + [f"B={b}" for b in batches]))
        out["speedup_engine_vs_full"] = speedups
    common.write_json(FLAGS.output, out)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
