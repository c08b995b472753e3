"""Where a decode step's time goes: the host round trip, the dispatch, or the device's work.

For a preset model with random weights, at each batch size, three timings of the same decode steps:

- `sync`: a step, then the next tokens fetched to the host (what the engine does each token);
- `async`: steps dispatched back to back, each step's tokens taken on device from the last one's logits; one sync at
  the end. `sync - async` is the host round trip.
- `loop`: the steps inside one jitted `lax.fori_loop`: no per-step dispatch, so `async - loop` is the dispatch cost
  and `loop` the device's own work.

    python benchmarks/profile_step.py --model=smollm2-135m --batches=1,32
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "A preset in configs/models.")
flags.DEFINE_list("batches", ["1", "32"], "Decode batch sizes.")
flags.DEFINE_string("dtype", "auto", "auto (float32 on CPU, bfloat16 on GPU), float32 or bfloat16.")
flags.DEFINE_integer("steps", 16, "Decode steps per timed repeat.")
flags.DEFINE_integer("repeats", 5, "Timed repeats (best and median are reported).")
flags.DEFINE_integer("context", 128, "Tokens in each sequence's cache before the timed steps.")
flags.DEFINE_string("output", "", "Optional JSON path for the results.")


def profile(cfg, params, batch: int, steps: int, repeats: int, context: int) -> dict[str, float]:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from novallm_jax.config import rope_inv_freq
    from novallm_jax.engine.executor import Executor, ExecutorConfig
    from novallm_jax.model import forward, rope_tables

    ps = 16
    width = -(-(context + 2 * steps + 2) // ps)
    ex = Executor(
        cfg,
        params,
        ExecutorConfig(
            page_size=ps,
            num_pages=1 + batch * width,
            max_model_len=width * ps,
            decode_batch_buckets=(batch,),
            prefill_batch_buckets=(1,),
            prefill_len_buckets=(ps,),
            page_table_buckets=(width,),
        ),
    )
    table = np.arange(1, 1 + batch * width, dtype=np.int32).reshape(batch, width)
    zeros = np.zeros(batch, np.int32)
    next_tokens = jax.jit(lambda logits: jnp.argmax(logits, -1).astype(jnp.int32)[:, None])
    state = {"cache": ex.new_cache(), "tok": np.ones((batch, 1), np.int32)}

    def positions(i):
        return np.full((batch, 1), context + i, np.int32)

    def sync():
        for i in range(steps):
            logits, state["cache"] = ex._run(state["cache"], state["tok"], positions(i), table, zeros)
            state["tok"] = np.asarray(next_tokens(logits))

    def run_async():
        tok = jnp.asarray(state["tok"])
        for i in range(steps):
            logits, state["cache"] = ex._run(state["cache"], tok, positions(i), table, zeros)
            tok = next_tokens(logits)
        state["tok"] = np.asarray(tok)

    # RoPE tables from the host, as the executor's steps get them (computed in the loop, XLA recomputes them per head).
    tables = [rope_tables(positions(i), rope_inv_freq(cfg), xp=np) for i in range(steps)]
    cos, sin = (jnp.asarray(np.stack([t[j] for t in tables])) for j in (0, 1))

    @functools.partial(jax.jit, donate_argnums=2)
    def loop_fn(p, tok, cache, table, cos, sin):
        def body(i, carry):
            tok, cache = carry
            pos = jnp.full((batch, 1), context, jnp.int32) + i
            logits, cache = forward(
                p, tok, pos, cache, cfg, table, jnp.zeros(batch, jnp.int32), rope_cs=((cos[i], sin[i]),)
            )
            return jnp.argmax(logits, -1).astype(jnp.int32)[:, None], cache

        return jax.lax.fori_loop(0, steps, body, (tok, cache))

    def loop():
        tok, state["cache"] = loop_fn(
            ex.params, jnp.asarray(state["tok"]), state["cache"], jnp.asarray(table), cos, sin
        )
        state["tok"] = np.asarray(tok)

    out = {}
    for name, fn in (("sync", sync), ("async", run_async), ("loop", loop)):
        t = common.time_repeats(fn, repeats, warmup=1)
        out[f"{name}_ms"] = 1e3 * t.best / steps
        out[f"{name}_ms_median"] = 1e3 * t.median / steps
    out["native_kernels"] = ex.native_kernels
    return out


def main(argv):
    del argv
    import jax

    from novallm_jax.config import ModelConfig
    from novallm_jax.device import resolve_dtype
    from novallm_jax.model import init_params

    cfg = ModelConfig.from_preset(FLAGS.model)
    dtype = resolve_dtype(FLAGS.dtype)
    params = init_params(cfg, jax.random.key(0), dtype)
    results = {
        "machine": common.machine_info(),
        "backend": jax.default_backend(),
        "model": FLAGS.model,
        "dtype": str(dtype.dtype if hasattr(dtype, "dtype") else dtype),
        "batches": {},
    }
    rows = []
    for b in map(int, FLAGS.batches):
        r = profile(cfg, params, b, FLAGS.steps, FLAGS.repeats, FLAGS.context)
        results["batches"][str(b)] = r
        rows.append(
            {
                "batch": b,
                "sync ms": r["sync_ms"],
                "async ms": r["async_ms"],
                "loop ms": r["loop_ms"],
                "round trip ms": r["sync_ms"] - r["async_ms"],
                "dispatch ms": r["async_ms"] - r["loop_ms"],
            }
        )
    print(f"{FLAGS.model} ({results['dtype']}) on {jax.devices()[0]}, ms per decode step (best of {FLAGS.repeats}):")
    print(common.format_table(rows, list(rows[0])))
    if FLAGS.output:
        common.write_json(FLAGS.output, results)


if __name__ == "__main__":
    app.run(main)
