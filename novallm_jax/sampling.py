"""The sampler: one pure, jitted, batched function in which every row carries its own parameters.

`SamplingBatch` holds the per-row parameters and state as arrays, so one compiled `sample` serves any mix of
requests (greedy and sampled rows, penalties or none) for a given (batch, vocab) shape. Processing order, as in
vLLM v1 and transformers:

1. logit bias, and the min_tokens ban of EOS / stop token ids;
2. repetition penalty (prompt and output tokens), then frequency and presence penalties (output tokens only);
3. temperature (temperature 0 rows are greedy: argmax of the logits after step 2);
4. top-k, top-p, min-p filters (removed tokens get -inf); tokens tied with the last survivor survive too;
5. an inverse-CDF draw with one uniform per row (cheaper on CPU than Gumbel-max over V variates).

Randomness: row b draws with `fold_in(key(seed_b), step_b)`, where `step_b` counts the tokens the request has
generated so far. A request's tokens thus depend only on its seed, its step and its logits, never on its slot or
on the other rows. For seeds < 2**32 the key is exactly `jax.random.key(seed)` (threefry2x32); larger seeds and
negative ones use their 64-bit two's complement split into two uint32 words. Requests without a seed get one at
admission (`SamplingParams.with_resolved_seed`); `from_params` and `set_row` resolve a missing seed the same way.

Logprobs: the chosen token's logprob and the top-N are taken from the log-softmax of the *raw* model logits,
before any bias, penalty, temperature or filter (vLLM's default `raw_logprobs` mode; OpenAI reports the model's
probabilities too).

The engine keeps one `SamplingBatch` row per slot and calls `sample_slots` with the logits of the rows it computed,
padded to a row bucket: the work scales with the running rows, not the slots, and the state of those rows advances
in place. Per-row flags (`penalized`, `wants_logprobs`) let a step skip the penalty pass and the log-softmax without
reading [B, V] arrays; an all-greedy step without penalties is one argmax.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from novallm_jax.errors import InvalidRequestError
from novallm_jax.sampling_params import MAX_LOGPROBS, SamplingParams

_RNG_IMPL = "threefry2x32"  # Fixed so that seeds stay reproducible whatever jax_default_prng_impl says.
_NEG_INF = -jnp.inf


@flax.struct.dataclass
class SamplingBatch:
    """Per-row sampling parameters and state, B rows over a vocabulary of V tokens.

    Rows of empty slots are greedy with no penalties; their outputs are meaningless and ignored by the engine.
    """

    temperature: jax.Array  # f32[B]; 0 = greedy
    top_k: jax.Array  # i32[B]; 0 = off
    top_p: jax.Array  # f32[B]; 1 = off
    min_p: jax.Array  # f32[B]; 0 = off
    repetition_penalty: jax.Array  # f32[B]; 1 = off
    presence_penalty: jax.Array  # f32[B]
    frequency_penalty: jax.Array  # f32[B]
    min_tokens: jax.Array  # i32[B]
    key_data: jax.Array  # u32[B, 2]; threefry2x32 key of the row's seed
    steps: jax.Array  # i32[B]; tokens generated so far
    last_token: jax.Array  # i32[B]; the token `sample_slots` drew last, which a pipelined engine feeds back on device
    output_counts: jax.Array  # i32[B, V]; how often each token was generated
    prompt_mask: jax.Array  # bool[B, V]; token occurs in the prompt
    logit_bias: jax.Array  # f32[B, V]; dense OpenAI logit_bias
    stop_mask: jax.Array  # bool[B, V]; EOS and stop_token_ids, banned while steps < min_tokens
    # Derived from the fields above when the row is built, so that the sampler can skip whole passes over [B, V]
    # without reading those arrays (keep them in step if you replace a field by hand).
    penalized: jax.Array  # bool[B]; logit bias, repetition, frequency or presence penalty is on
    wants_logprobs: jax.Array  # bool[B]; the request asked for logprobs (`sample_slots` computes them only then)

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.output_counts.shape[1]

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams | None],
        vocab_size: int,
        *,
        prompt_token_ids: Sequence[Sequence[int] | None] | None = None,
        output_token_ids: Sequence[Sequence[int] | None] | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> SamplingBatch:
        """Builds a batch on the host; `None` entries are empty slots.

        prompt_token_ids: per row, for the repetition penalty. output_token_ids: per row, tokens already
        generated (a resumed request): they set the counts and the step. eos_token_ids: banned with the row's
        stop_token_ids until min_tokens tokens exist, unless the row ignores EOS.
        """
        n = len(params)
        prompts = prompt_token_ids if prompt_token_ids is not None else [None] * n
        outputs = output_token_ids if output_token_ids is not None else [None] * n
        if len(prompts) != n or len(outputs) != n:
            raise ValueError(f"got {n} params but {len(prompts)} prompts and {len(outputs)} outputs")
        rows = [_host_row(p, vocab_size, pr, out, eos_token_ids) for p, pr, out in zip(params, prompts, outputs)]
        # device_put, not jnp.asarray: the latter traces a program per field the first time (0.1 s at a start).
        return cls(**{name: jax.device_put(np.stack([r[name] for r in rows])) for name in rows[0]})

    def set_row(
        self,
        slot: int,
        params: SamplingParams | None,
        *,
        prompt_token_ids: Sequence[int] | None = None,
        output_token_ids: Sequence[int] | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> SamplingBatch:
        """This batch with row `slot` set for a new (or resumed) request; `None` clears it.

        The arrays of `self` are donated: use only the returned batch afterwards.
        """
        row = _host_row(params, self.vocab_size, prompt_token_ids, output_token_ids, eos_token_ids)
        return _write_row(self, jnp.int32(slot), row)

    def clear_row(self, slot: int) -> SamplingBatch:
        """This batch with row `slot` emptied (greedy, no penalties). Donates `self` like `set_row`."""
        return _clear_row(self, jnp.int32(slot))

    def update_rows(
        self,
        rows: Sequence[tuple[int, SamplingParams | None, Sequence[int], Sequence[int]]],
        eos_token_ids: Sequence[int] = (),
        pad_to: int | None = None,
    ) -> SamplingBatch:
        """This batch with rows (slot, params, prompt_token_ids, output_token_ids) set as `set_row` sets them (params
        None: cleared), in one call padded to a power of two of rows (or `pad_to`); where a slot comes twice, the
        later row wins. Donates `self` like `set_row`."""
        last = {slot: rest for slot, *rest in rows}
        if not last and pad_to is None:
            return self
        n = pad_to or _update_rows_padded(len(last))
        host = [_host_row(p, self.vocab_size, pr, out, eos_token_ids) for p, pr, out in last.values()]
        host += [_host_row(None, self.vocab_size, None, None, ())] * (n - len(host))
        slots = np.full(n, self.batch_size, np.int32)  # padding rows land out of bounds, and are dropped
        slots[: len(last)] = list(last)
        return _write_rows(self, slots, {name: np.stack([r[name] for r in host]) for name in host[0]})

    def update_row_counts(self) -> tuple[int, ...]:
        """Every row count `update_rows` pads to (a step updates each slot at most once): what warm-up compiles."""
        return tuple(sorted({_update_rows_padded(n) for n in range(1, self.batch_size + 1)}))


@flax.struct.dataclass
class SamplerOutput:
    tokens: jax.Array  # i32[B]
    logprobs: jax.Array  # f32[B]; the chosen token's raw logprob
    top_ids: jax.Array  # i32[B, N]; N = num_top_logprobs
    top_logprobs: jax.Array  # f32[B, N]


def seed_key_data(seed: int) -> np.ndarray:
    """uint32[2] threefry key data for a seed; equals `jax.random.key_data(jax.random.key(seed))` for seeds < 2**32."""
    seed %= 2**64
    return np.array([seed >> 32, seed & 0xFFFFFFFF], dtype=np.uint32)


def _penalizes(p: SamplingParams) -> bool:
    """Whether `apply_penalties` may change these rows' logits other than by min_tokens (the `penalized` flag)."""
    return (
        any(v != 0.0 for v in (p.logit_bias or {}).values())
        or p.repetition_penalty != 1.0
        or p.frequency_penalty != 0.0
        or p.presence_penalty != 0.0
    )


def plain_greedy(p: SamplingParams) -> bool:
    """Whether a row with these params draws the argmax of the model's logits at every step and wants no logprobs:
    greedy, no penalty, bias or min_tokens (`_host_row`'s flags all off). `sample_slots_greedy` serves such rows."""
    return p.greedy and p.min_tokens == 0 and p.logprobs is None and not _penalizes(p)


def _host_row(
    params: SamplingParams | None,
    vocab_size: int,
    prompt_ids: Sequence[int] | None,
    output_ids: Sequence[int] | None,
    eos_ids: Sequence[int],
) -> dict[str, np.ndarray]:
    p = SamplingParams(temperature=0.0, seed=0) if params is None else params.validate(vocab_size)
    p = p.with_resolved_seed()
    greedy = p.greedy
    prompt_mask = np.zeros(vocab_size, np.bool_)
    output_ids = np.asarray(output_ids if output_ids is not None else [], np.int64)
    prompt_ids = np.asarray(prompt_ids if prompt_ids is not None else [], np.int64)
    for name, ids in (("prompt_token_ids", prompt_ids), ("output_token_ids", output_ids)):
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise InvalidRequestError(f"{name} must be in [0, {vocab_size})", param=name)
    if params is not None:
        prompt_mask[prompt_ids] = True
    bias = np.zeros(vocab_size, np.float32)
    for token, value in (p.logit_bias or {}).items():
        bias[token] = value
    stop_mask = np.zeros(vocab_size, np.bool_)
    if p.min_tokens > 0:
        stop_mask[list(p.stop_token_ids)] = True
        if not p.ignore_eos:
            for t in eos_ids:
                if 0 <= t < vocab_size:
                    stop_mask[t] = True
    return {
        "temperature": np.float32(0.0 if greedy else p.temperature),
        "top_k": np.int32(p.top_k if 0 < p.top_k < vocab_size else 0),
        "top_p": np.float32(p.top_p),
        "min_p": np.float32(p.min_p),
        "repetition_penalty": np.float32(p.repetition_penalty),
        "presence_penalty": np.float32(p.presence_penalty),
        "frequency_penalty": np.float32(p.frequency_penalty),
        "min_tokens": np.int32(p.min_tokens),
        "key_data": seed_key_data(p.seed),
        "steps": np.int32(output_ids.size),
        "last_token": np.int32(output_ids[-1] if output_ids.size else 0),
        "output_counts": np.bincount(output_ids, minlength=vocab_size).astype(np.int32),
        "prompt_mask": prompt_mask,
        "logit_bias": bias,
        "stop_mask": stop_mask,
        "penalized": np.bool_(_penalizes(p)),
        "wants_logprobs": np.bool_(params is not None and params.logprobs is not None),
    }


@functools.partial(jax.jit, donate_argnums=0)
def _write_row(batch: SamplingBatch, slot: jax.Array, row: dict[str, jax.Array]) -> SamplingBatch:
    return batch.replace(**{name: getattr(batch, name).at[slot].set(value) for name, value in row.items()})


def _update_rows_padded(n: int) -> int:
    """The power of two >= n: `update_rows` compiles one program per such row count."""
    return 1 << (n - 1).bit_length()


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(batch: SamplingBatch, slots: jax.Array, rows: dict[str, jax.Array]) -> SamplingBatch:
    return batch.replace(
        **{name: getattr(batch, name).at[slots].set(value, mode="drop") for name, value in rows.items()}
    )


@functools.partial(jax.jit, donate_argnums=0)
def _clear_row(batch: SamplingBatch, slot: jax.Array) -> SamplingBatch:
    neutral = {"repetition_penalty": 1, "top_p": 1}  # Every other field's neutral value is zero / False.
    return batch.replace(
        **{
            name: getattr(batch, name).at[slot].set(jnp.asarray(neutral.get(name, 0), getattr(batch, name).dtype))
            for name in batch.__dataclass_fields__
        }
    )


@jax.jit
def update_counts(batch: SamplingBatch, tokens: jax.Array) -> SamplingBatch:
    """Records one generated token per row: counts[b, tokens[b]] += 1, steps[b] += 1, last_token[b] = tokens[b].

    A negative token means "no token this step" (e.g. a slot still in prefill) and changes nothing.
    """
    tokens = tokens.astype(jnp.int32)
    valid = tokens >= 0
    rows = jnp.arange(tokens.shape[0])
    counts = batch.output_counts.at[rows, jnp.where(valid, tokens, 0)].add(valid.astype(jnp.int32))
    return batch.replace(
        output_counts=counts,
        steps=batch.steps + valid.astype(jnp.int32),
        last_token=jnp.where(valid, tokens, batch.last_token),
    )


@jax.jit
def apply_penalties(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    """Steps 1-2: logit bias, min_tokens ban, repetition / frequency / presence penalties. Returns f32[B, V]."""
    x = logits.astype(jnp.float32) + batch.logit_bias
    banned = batch.stop_mask & (batch.steps < batch.min_tokens)[:, None]
    x = jnp.where(banned, _NEG_INF, x)
    # transformers' RepetitionPenaltyLogitsProcessor: divide positive logits, multiply negative ones.
    seen = batch.prompt_mask | (batch.output_counts > 0)
    rep = batch.repetition_penalty[:, None]
    x = jnp.where(seen, jnp.where(x < 0, x * rep, x / rep), x)
    counts = batch.output_counts.astype(jnp.float32)
    x = x - batch.frequency_penalty[:, None] * counts
    return x - batch.presence_penalty[:, None] * (counts > 0)


# Exact order statistics without sorting. XLA:CPU sorts at ~350 ns per float (13 ms per row at V=49152) and its
# top_k is 2-10 ms at B=32; a fused compare-and-sum pass over [B, V] costs ~0.4 ms. So thresholds are found by
# bisection over a monotone int32 key of the float32 logits, first on a small candidate set (the tokens of the
# _SELECT_CHUNKS chunks with the largest maxima), and on the whole vocabulary only for the rows where the
# candidates cannot contain the answer (top-k deeper than the candidates, or a deep top-p nucleus).
_SELECT_CHUNK = 64
_SELECT_CHUNKS = 64
_INT_MAX = np.iinfo(np.int32).max
_INT_MIN = np.iinfo(np.int32).min
# Value-space midpoints split dense data far faster than key-space ones; key-space steps bound the worst case.
_VALUE_STEPS = 16
_MAX_STEPS = 128
_MIN_NORMAL = float(np.finfo(np.float32).tiny)
_NEG_MIN_NORMAL_KEY = int(np.array(-_MIN_NORMAL, np.float32).view(np.int32) ^ _INT_MAX)


def _key(x: jax.Array) -> jax.Array:
    """Monotone int32 key of float32 values: a < b iff key(a) < key(b), and -0.0 has the key of +0.0."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ _INT_MAX, bits)


def _from_key(key: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.where(key < 0, key ^ _INT_MAX, key), jnp.float32)


def _midpoint(lo: jax.Array, hi: jax.Array, step: jax.Array) -> jax.Array:
    """A key strictly between lo and hi (hi >= lo + 2): the value-space midpoint where it is one, else the key one."""
    key_mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
    vlo, vhi = _from_key(lo), _from_key(hi)
    value_mid = _key(vlo * 0.5 + vhi * 0.5)
    use_value = (
        ((step < _VALUE_STEPS) | (step % 2 == 0))
        & jnp.isfinite(vlo)
        & jnp.isfinite(vhi)
        & (value_mid > lo)
        & (value_mid < hi)
    )
    return jnp.where(use_value, value_mid, key_mid)


def _smallest_key_below(
    x: jax.Array,
    weights: jax.Array | None,
    target: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    done: jax.Array,
) -> jax.Array:
    """Per row, the smallest key t with f(t) < target, where f(t) = sum of `weights` (1 if None) over keys > t.

    f is non-increasing and steps only at the keys of the row, so that t is a key of the row. Requires
    f(lo) >= target > f(hi) for the rows not `done` (their result is meaningless). Bisects (lo, hi] until it holds
    one key, then returns the smallest key above lo. x f32[B, N] (keys = _key(x)), weights f32[B, N], the rest [B].
    """

    def measure(t: jax.Array) -> tuple[jax.Array, jax.Array]:
        # keys > t as a float compare, so that no int32 copy of x is materialized. XLA:CPU treats denormals as
        # zero, so no token has a denormal key, and keys > t (t the key of -0.0 or of a negative denormal) means
        # x >= 0: compare with the largest negative normal float there.
        bound = jnp.where((t < 0) & (t > _NEG_MIN_NORMAL_KEY), -_MIN_NORMAL, _from_key(t))
        above = x > bound[:, None]
        # A float count: XLA:CPU fuses it into the reduction; an int32 one is materialized first. Exact < 2**24.
        count = jnp.sum(jnp.where(above, 1.0, 0.0), axis=-1).astype(jnp.int32)
        if weights is None:
            return count, count
        return count, jnp.sum(jnp.where(above, weights, 0.0), axis=-1)

    def body(state):
        step, lo, hi, n_lo, n_hi, done = state
        mid = _midpoint(lo, hi, step)
        n_mid, f_mid = measure(mid)
        below = f_mid < target  # mid is an upper bound of the answer
        move_hi, move_lo = ~done & below, ~done & ~below
        lo, n_lo = jnp.where(move_lo, mid, lo), jnp.where(move_lo, n_mid, n_lo)
        hi, n_hi = jnp.where(move_hi, mid, hi), jnp.where(move_hi, n_mid, n_hi)
        # (lo, hi] always holds a key (f(lo) != f(hi)); when it holds one, that key is the answer.
        done = done | (hi == lo + 1) | (n_lo - n_hi <= 1)
        return step + 1, lo, hi, n_lo, n_hi, done

    n = x.shape[-1]
    done = done | (hi == lo + 1)
    state = (jnp.int32(0), lo, hi, jnp.full_like(lo, n), jnp.zeros_like(hi), done)
    state = jax.lax.while_loop(lambda s: (s[0] < _MAX_STEPS) & ~jnp.all(s[5]), body, state)
    keys = _key(x)
    return jnp.min(jnp.where(keys > state[1][:, None], keys, _INT_MAX), axis=-1)


def _chunked(x: jax.Array, chunk: int, fill: float) -> jax.Array:
    """x [B, V] as [B, ceil(V / chunk), chunk], padded with `fill`."""
    rows, vocab = x.shape
    return jnp.pad(x, ((0, 0), (0, (-vocab) % chunk)), constant_values=fill).reshape(rows, -1, chunk)


def _top_chunks(x: jax.Array, count: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The `count` chunks of x [B, V] with the largest maxima, in vocabulary order.

    Returns (candidates f32[B, count * _SELECT_CHUNK], their token ids, the smallest of those chunk maxima f32[B]).
    Every token > that smallest maximum is a candidate, and so is at least one token per chosen chunk that is >= it.
    """
    chunks = _chunked(x, _SELECT_CHUNK, _NEG_INF)
    chunk_max = jnp.max(chunks, axis=-1)
    # Without the barrier XLA fuses lax.top_k into its consumers and recomputes it per element.
    top_max, top_idx = jax.lax.optimization_barrier(jax.lax.top_k(chunk_max, count))
    top_idx = jnp.sort(top_idx, axis=-1)  # vocabulary order, so that lax.top_k over candidates breaks ties as over x
    cand = jnp.take_along_axis(chunks, top_idx[:, :, None], axis=1).reshape(x.shape[0], -1)
    ids = (top_idx[:, :, None] * _SELECT_CHUNK + jnp.arange(_SELECT_CHUNK)).reshape(x.shape[0], -1)
    return cand, ids, top_max[:, -1]


def _top_k_top_p_threshold(x: jax.Array, top_k: jax.Array, top_p: jax.Array, active: jax.Array) -> jax.Array:
    """Per row, the smallest logit that survives top-k then top-p; -inf for rows not `active` or without them.

    top-k: the k-th largest logit (ties with it survive). top-p follows transformers' TopPLogitsWarper on the
    top-k survivors: a token survives while the probability mass of the tokens strictly above it is < top_p; the
    threshold is the smallest such logit (ties with it survive too).
    """
    vocab = x.shape[-1]
    count = min(_SELECT_CHUNKS, -(-vocab // _SELECT_CHUNK))
    row_max = jnp.max(x, axis=-1)
    max_key = _key(row_max)
    cand, _, floor = _top_chunks(x, count)
    # The barrier keeps XLA:CPU from fusing (and recomputing) these producers into every consumer.
    cand, floor_key = jax.lax.optimization_barrier((cand, _key(floor)))
    k_on = active & (top_k > 0) & (top_k < vocab)
    p_on = active & (top_p < 1.0)

    def kth_key():
        # The smallest key t with count(keys > t) < k. The candidates hold >= `count` tokens >= floor and every
        # token above it, so for k <= count they give the answer of the whole row.
        k_cand = k_on & (top_k <= count)
        target = top_k.astype(jnp.int32)
        found = _smallest_key_below(cand, None, target, floor_key - 1, max_key, ~k_cand)
        k_full = k_on & ~k_cand

        def full():
            lo = _key(jnp.min(x, axis=-1)) - 1
            return _smallest_key_below(x, None, target, lo, max_key, ~k_full)

        return jnp.where(k_full, jax.lax.cond(jnp.any(k_full), full, lambda: found), found)

    no_key = lambda: jnp.full_like(max_key, _INT_MIN)
    kth = jnp.where(k_on, _from_key(jax.lax.cond(jnp.any(k_on), kth_key, no_key)), _NEG_INF)

    def pth_key():
        # The smallest key t with mass(keys > t) < top_p * mass(top-k survivors).
        weights = jnp.where(x >= kth[:, None], jnp.exp(x - row_max[:, None]), 0.0)
        finite_min = jnp.min(jnp.where(x > _NEG_INF, x, jnp.inf), axis=-1)
        lo = jnp.maximum(_key(finite_min) - 1, jnp.where(k_on, _key(kth) - 1, _INT_MIN))
        weights, lo = jax.lax.optimization_barrier((weights, lo))
        # Tokens at or below lo weigh nothing, so this sum equals the search's own f(lo).
        target = top_p * jnp.sum(weights, axis=-1)
        cand_weights = jnp.where(cand >= kth[:, None], jnp.exp(cand - row_max[:, None]), 0.0)
        # When the mass above floor reaches the target, the answer lies above floor, where the candidates hold
        # every token.
        above_floor = jnp.sum(jnp.where(cand > floor[:, None], cand_weights, 0.0), axis=-1)
        p_cand = p_on & (above_floor >= target)
        found = _smallest_key_below(cand, cand_weights, target, floor_key, max_key, ~p_cand)
        p_full = p_on & ~p_cand
        full = lambda: _smallest_key_below(x, weights, target, lo, max_key, ~p_full)
        return jnp.where(p_full, jax.lax.cond(jnp.any(p_full), full, lambda: found), found)

    pth = jnp.where(p_on, _from_key(jax.lax.cond(jnp.any(p_on), pth_key, no_key)), _NEG_INF)
    return jnp.maximum(kth, pth)


def _filters(x: jax.Array, batch: SamplingBatch) -> tuple[jax.Array, jax.Array]:
    """Steps 3-4 as (x / temperature, bool keep mask). Greedy rows are not filtered (their argmax survives all)."""
    greedy = batch.temperature <= 0.0
    x = x / jnp.where(greedy, 1.0, batch.temperature)[:, None]
    sort_rows = ~greedy & ((batch.top_k > 0) | (batch.top_p < 1.0))
    threshold = jax.lax.cond(
        jnp.any(sort_rows),
        _top_k_top_p_threshold,
        lambda x, k, p, a: jnp.full(x.shape[:1], _NEG_INF, x.dtype),
        x,
        batch.top_k,
        batch.top_p,
        sort_rows,
    )
    keep = x >= threshold[:, None]
    # MinPLogitsWarper keeps p >= min_p * p_max, i.e. exp(x - x_max) >= min_p (the normalizer cancels; the
    # maximum survives top-k and top-p).
    min_p = jnp.where(greedy, 0.0, batch.min_p)
    keep = jax.lax.cond(
        jnp.any(min_p > 0),
        lambda: keep & (jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)) >= min_p[:, None]),
        lambda: keep,
    )
    return x, keep


@jax.jit
def apply_filters(x: jax.Array, batch: SamplingBatch) -> jax.Array:
    """Steps 3-4 on penalized logits: temperature, then top-k, top-p, min-p; removed tokens get -inf.

    Greedy rows are returned unfiltered: their token is the argmax, which every filter keeps.
    """
    x, keep = _filters(x, batch)
    return jnp.where(keep, x, _NEG_INF)


_CHUNK = 256


def _last_positive(v: jax.Array) -> jax.Array:
    """Index of the last entry > 0 along the last axis."""
    n = v.shape[-1]
    return n - 1 - jnp.argmax(jnp.flip(v > 0, axis=-1), axis=-1)


def _inverse_cdf(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Per row, the token i with cdf[i-1] <= u * total < cdf[i] for unnormalized weights f32[B, V] >= 0.

    Two levels (chunk sums, then one chunk) keep it O(V) with short cumulative sums, and it needs one uniform
    per row instead of V Gumbel variates (which cost 2 ms per row at V=49152 on CPU). Rounding never yields a
    zero-weight token: each level is clipped to its last positive entry.
    """
    rows, vocab = weights.shape
    padded = jnp.pad(weights, ((0, 0), (0, (-vocab) % _CHUNK))).reshape(rows, -1, _CHUNK)
    chunk_cdf = jnp.cumsum(jnp.sum(padded, axis=-1), axis=-1)
    target = u * chunk_cdf[:, -1]
    chunk = jnp.minimum(
        jnp.sum(chunk_cdf <= target[:, None], axis=-1), _last_positive(jnp.diff(chunk_cdf, prepend=0.0))
    )
    below = jnp.where(chunk > 0, jnp.take_along_axis(chunk_cdf, jnp.maximum(chunk - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    inner = jnp.take_along_axis(padded, chunk[:, None, None], axis=1)[:, 0]
    inner_cdf = jnp.cumsum(inner, axis=-1)
    pos = jnp.minimum(jnp.sum(inner_cdf <= (target - below)[:, None], axis=-1), _last_positive(inner))
    return chunk * _CHUNK + pos


def _argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax(x, axis=-1) (first maximum; first NaN if any) for x f32[B, V], via chunk maxima.

    XLA:CPU's variadic (value, index) reduction costs ~3.5 ms at [32, 49152]; a max pass and two small ones ~0.4.
    """
    chunks = _chunked(x, _SELECT_CHUNK, _NEG_INF)
    chunk_max = jnp.max(chunks, axis=-1)
    row_max = jnp.max(chunk_max, axis=-1, keepdims=True)
    hit = lambda v, m: (v == m) | jnp.isnan(v)
    chunk = jnp.argmax(hit(chunk_max, row_max), axis=-1)
    inner = jnp.take_along_axis(chunks, chunk[:, None, None], axis=1)[:, 0]
    return (chunk * _SELECT_CHUNK + jnp.argmax(hit(inner, row_max), axis=-1)).astype(jnp.int32)


def _needs_penalties(batch: SamplingBatch) -> jax.Array:
    """Whether apply_penalties may change any logit of the batch (from [B] flags: no pass over [B, V])."""
    return jnp.any(batch.penalized | (batch.steps < batch.min_tokens))


def _penalized(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    x = logits.astype(jnp.float32)
    return jax.lax.cond(_needs_penalties(batch), apply_penalties, lambda x, b: x, x, batch)


def _draw_penalized(logits: jax.Array, batch: SamplingBatch, penalized: Callable[[], jax.Array]) -> jax.Array:
    """`_draw` of the penalized logits, where `penalized()` computes them (only when some row needs it).

    An all-greedy batch without penalties (the common engine step) takes an argmax of the logits as they are: a
    cond that returned [B, V] logits writes them to a fresh buffer every call, and fresh multi-MB buffers may cost
    page faults (measured up to 5 ms at B=32, V=49152 on a 2-core CPU, against 0.5-0.9 ms for the argmax).
    """
    needs = _needs_penalties(batch)

    def general():
        return _draw(jax.lax.cond(needs, penalized, lambda: logits.astype(jnp.float32)), batch)

    greedy = ~needs & jnp.all(batch.temperature <= 0.0)
    return jax.lax.cond(greedy, lambda: _argmax(logits.astype(jnp.float32)), general)


@jax.jit
def process_logits(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    """The logits the draw uses: penalties and filters applied. f32[B, V], -inf where removed."""
    return apply_filters(_penalized(logits, batch), batch)


def _row_key(key_data: jax.Array, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(key_data, impl=_RNG_IMPL), step)


def _draw(x: jax.Array, batch: SamplingBatch) -> jax.Array:
    """Tokens for penalized logits x: the argmax for greedy rows, an inverse-CDF draw for the others."""
    greedy = batch.temperature <= 0.0
    argmax = _argmax(x)

    def draw():
        weights = jax.lax.optimization_barrier(_weights(x, batch))
        uniforms = jax.vmap(jax.random.uniform)(_row_keys(batch))
        return jnp.where(greedy, argmax, _inverse_cdf(weights, uniforms).astype(jnp.int32))

    return jax.lax.cond(jnp.all(greedy), lambda: argmax, draw)


def _weights(x: jax.Array, batch: SamplingBatch) -> jax.Array:
    """The unnormalised distribution the rows draw from, for penalized logits x: temperature and filters applied. The
    row maximum survives every filter, so these are exp(filtered - max(filtered)) exactly, 0 where filtered out."""
    scaled, keep = _filters(x, batch)
    return jnp.where(keep, jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True)), 0.0)


def _row_keys(batch: SamplingBatch) -> jax.Array:
    """Each row's key for its current step (its draw's uniform comes from it)."""
    return jax.vmap(_row_key)(batch.key_data, batch.steps)


_ACCEPT_STREAM = 1  # folded into a row's key for the acceptance uniform, apart from the draw's


def _draw_verifying(
    logits: jax.Array,
    rows: SamplingBatch,
    penalized: Callable[[], jax.Array],
    draft_logits: jax.Array,
    draft_tokens: jax.Array,
) -> jax.Array:
    """`_draw_penalized`'s tokens, but each sampled row with a token x that a draft model drew from q (draft_tokens
    >= 0) verifies it by speculative sampling's rule: keep x with probability min(1, p(x) / q(x)), else draw from
    max(0, p - q) renormalised; the result follows the target's p exactly (Leviathan et al. 2023; Chen et al.
    2023). p is the distribution the row would draw from (penalties, bias, temperature, top-k/top-p/min-p, bitmask).
    A rejected draw never equals x (p(x) < q(x) there), so the engine accepts drafts while the draws equal them, as
    for drafts by prompt lookup. Rows without a draft draw as `_draw` does, from the same weights and uniforms."""
    x = jax.lax.cond(_needs_penalties(rows), penalized, lambda: logits.astype(jnp.float32))
    weights = _weights(x, rows)
    p = weights / jnp.sum(weights, axis=-1, keepdims=True)
    temperature = jnp.where(rows.temperature > 0.0, rows.temperature, 1.0)[:, None]
    q = jax.nn.softmax(draft_logits.astype(jnp.float32) / temperature, axis=-1)
    drafted = jnp.maximum(draft_tokens, 0)[:, None]
    p_x = jnp.take_along_axis(p, drafted, axis=-1)[:, 0]
    q_x = jnp.take_along_axis(q, drafted, axis=-1)[:, 0]
    keys = _row_keys(rows)
    u_accept = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, _ACCEPT_STREAM)))(keys)
    u_draw = jax.vmap(jax.random.uniform)(keys)
    residual = jnp.maximum(p - q, 0.0)
    # p == q to rounding leaves no residual: then x is kept (it is a draw from p).
    accept = (u_accept * q_x < p_x) | (jnp.sum(residual, axis=-1) <= 0.0)
    verified = jnp.where(accept, draft_tokens, _inverse_cdf(residual, u_draw).astype(jnp.int32))
    plain = _inverse_cdf(weights, u_draw).astype(jnp.int32)
    sampled = jnp.where(draft_tokens >= 0, verified, plain)
    return jnp.where(rows.temperature > 0.0, sampled, _argmax(x))


def _check_num_top(num_top_logprobs: int) -> None:
    if not 0 <= num_top_logprobs <= MAX_LOGPROBS:
        raise ValueError(f"num_top_logprobs must be in [0, {MAX_LOGPROBS}], got {num_top_logprobs}")


def _logprobs(raw: jax.Array, tokens: jax.Array, num_top_logprobs: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The raw log-softmax as jax.nn.log_softmax computes it, at the chosen tokens and the top N only."""
    shifted_max = jnp.max(raw, axis=-1, keepdims=True)
    log_total = jnp.log(jnp.sum(jnp.exp(raw - shifted_max), axis=-1, keepdims=True))
    chosen = (jnp.take_along_axis(raw, tokens[:, None], axis=-1) - shifted_max - log_total)[:, 0]
    if not num_top_logprobs:
        return chosen, jnp.zeros((raw.shape[0], 0), jnp.int32), jnp.zeros((raw.shape[0], 0), jnp.float32)
    count = min(num_top_logprobs, -(-raw.shape[-1] // _SELECT_CHUNK))
    if count == num_top_logprobs:  # the top N lie in the N chunks with the largest maxima
        cand, ids, _ = _top_chunks(raw, count)
    else:
        cand, ids = raw, jnp.broadcast_to(jnp.arange(raw.shape[-1]), raw.shape)
    top_logprobs, pos = jax.lax.top_k(cand - shifted_max - log_total, num_top_logprobs)
    return chosen, jnp.take_along_axis(ids, pos, axis=-1).astype(jnp.int32), top_logprobs


@functools.partial(jax.jit, static_argnames="num_top_logprobs")
def sample(logits: jax.Array, batch: SamplingBatch, num_top_logprobs: int = 0) -> SamplerOutput:
    """Draws one token per row from logits f32/bf16[B, V] with each row's own parameters.

    num_top_logprobs (static, 0..20) sizes the top-N logprobs output for the whole batch: pass 0 when no row
    asks for logprobs, else a fixed bucket (e.g. 20) so that compiles stay bounded; rows slice what they asked.
    The chosen token's logprob is always computed. Does not advance the state: call `update_counts(batch,
    out.tokens)` after it. An engine whose batch has more slots than running rows wants `sample_slots`.
    """
    _check_num_top(num_top_logprobs)
    tokens = _draw_penalized(logits, batch, lambda: apply_penalties(logits, batch))
    chosen, top_ids, top_logprobs = _logprobs(logits.astype(jnp.float32), tokens, num_top_logprobs)
    return SamplerOutput(tokens=tokens, logprobs=chosen, top_ids=top_ids, top_logprobs=top_logprobs)


_WIDE_FIELDS = ("output_counts", "prompt_mask", "logit_bias", "stop_mask")


def _take_rows(batch: SamplingBatch, slots: jax.Array, wide: bool) -> SamplingBatch:
    """Rows `slots` of the batch; slot -1 gives a neutral row (greedy, no penalties, no logprobs).

    Without `wide` the [B, V] fields are None: the draw reads only the [B] ones, and leaving the others out makes
    sure that no [n, V] gather runs outside the penalties branch (rather than trusting XLA to drop unused gathers
    that flow into lax.cond operands).
    """
    valid = slots >= 0
    index = jnp.maximum(slots, 0)
    rows = batch.replace(
        **{
            name: getattr(batch, name)[index] if wide or name not in _WIDE_FIELDS else None
            for name in batch.__dataclass_fields__
        }
    )
    neutral = {"temperature": 0.0, "min_tokens": 0, "penalized": False, "wants_logprobs": False}
    return rows.replace(
        **{
            name: jnp.where(valid, getattr(rows, name), jnp.asarray(v, getattr(rows, name).dtype))
            for name, v in neutral.items()
        }
    )


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """logits [B, V] with the tokens whose bit is 0 in bitmask [B, ceil(V / 32)] (int32) set to -inf.

    A row whose words are all -1 (every bit set) is unchanged: that is how unconstrained rows are passed.
    """
    b, v = logits.shape
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32], bit j of word w: token 32w+j
    allowed = bits.reshape(b, -1)[:, :v].astype(bool)
    return jnp.where(allowed, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnames="num_top_logprobs", donate_argnames="batch")
def sample_slots(
    logits: jax.Array,
    slots: jax.Array,
    batch: SamplingBatch,
    num_top_logprobs: int = 0,
    bitmask: jax.Array | None = None,
    offsets: jax.Array | None = None,
    draft_logits: jax.Array | None = None,
    draft_tokens: jax.Array | None = None,
) -> tuple[SamplerOutput, SamplingBatch]:
    """`sample` for the running rows of a slot batch, then `update_counts` for them; costs O(n), not O(B).

    logits f32/bf16[n, V]: row i is drawn with the parameters and state of `batch` row `slots[i]` (i32[n]; -1 =
    padding, whose output is meaningless). n is the caller's shape bucket (one compile per n and
    num_top_logprobs); slots are distinct but with `offsets`. Returns the output rows [n] and the batch with the
    state of those slots advanced (steps + 1, the token counted), updated in place: `batch` is donated.

    bitmask i32[n, ceil(V / 32)] (structured outputs): only the tokens whose bit is set may be drawn; rows of all
    bits set are unconstrained. Logprobs stay those of the model's logits. Without it the program is the same as
    before (one more compile per row bucket when given).

    offsets i32[n] (speculative decoding): row i draws as its slot's `steps + offsets[i]`-th token, so that several
    rows of one slot (the positions a step verifies) draw independently; a slot's steps then advance by its rows.

    draft_logits f32[n, V] with draft_tokens i32[n] (speculative decoding with a draft model): row i verifies
    draft_tokens[i] (-1: none), which the draft model drew from q = softmax(draft_logits[i] / temperature), by the
    standard rule (`_draw_verifying`). Rows without a draft, and greedy rows, draw as usual.

    Tokens equal `sample` on the same rows (a row's draw depends only on its own parameters, seed and step).
    Logprobs differ in one way: with num_top_logprobs = 0 the chosen token's logprob is computed only when some
    row has `wants_logprobs`, and is 0 for every row otherwise (a log-softmax over [n, V] saved per step).
    """
    _check_num_top(num_top_logprobs)
    raw = logits.astype(jnp.float32)
    if bitmask is not None:
        logits = apply_token_bitmask(logits, bitmask)
    rows = _take_rows(batch, slots, wide=False)
    if offsets is not None:
        rows = rows.replace(steps=rows.steps + offsets)
    # The penalties read [n, V] rows of the batch; gathering them inside the branch skips that copy when unused.
    penalized = lambda: apply_penalties(logits, _take_rows(batch, slots, wide=True))
    if draft_logits is None:
        tokens = _draw_penalized(logits, rows, penalized)
    else:
        tokens = _draw_verifying(logits, rows, penalized, draft_logits, draft_tokens)
    if num_top_logprobs:
        chosen, top_ids, top_logprobs = _logprobs(raw, tokens, num_top_logprobs)
    else:
        chosen = jax.lax.cond(
            jnp.any(rows.wants_logprobs),
            lambda: _logprobs(raw, tokens, 0)[0],
            lambda: jnp.zeros(tokens.shape, jnp.float32),
        )
        top_ids, top_logprobs = jnp.zeros((raw.shape[0], 0), jnp.int32), jnp.zeros((raw.shape[0], 0), jnp.float32)
    out = SamplerOutput(tokens=tokens, logprobs=chosen, top_ids=top_ids, top_logprobs=top_logprobs)
    return out, _advance(batch, slots, tokens)


@functools.partial(jax.jit, donate_argnames="batch")
def sample_slots_greedy(
    logits: jax.Array, slots: jax.Array, batch: SamplingBatch
) -> tuple[SamplerOutput, SamplingBatch]:
    """`sample_slots` (num_top_logprobs 0, no bitmask or offsets) for rows that are all `plain_greedy`: the same
    tokens (the argmax), outputs and state update, from a program a fraction of the size. jax traces and lowers the
    general sampler in ~0.4 s per row bucket, which a start's first greedy request would otherwise wait for."""
    return _greedy(_argmax(logits.astype(jnp.float32)), slots, batch)


@functools.partial(jax.jit, donate_argnames="batch")
def sample_slots_argmax(
    tokens: jax.Array, slots: jax.Array, batch: SamplingBatch
) -> tuple[SamplerOutput, SamplingBatch]:
    """`sample_slots_greedy` for rows whose argmax the model step returned (int32 [rows]) in place of their logits."""
    return _greedy(tokens, slots, batch)


def _greedy(tokens: jax.Array, slots: jax.Array, batch: SamplingBatch) -> tuple[SamplerOutput, SamplingBatch]:
    zeros = jnp.zeros((tokens.shape[0], 0))
    out = SamplerOutput(
        tokens=tokens,
        logprobs=jnp.zeros(tokens.shape, jnp.float32),
        top_ids=zeros.astype(jnp.int32),
        top_logprobs=zeros.astype(jnp.float32),
    )
    return out, _advance(batch, slots, tokens)


def _advance(batch: SamplingBatch, slots: jax.Array, tokens: jax.Array) -> SamplingBatch:
    """The batch with slots' state after drawing `tokens`: steps + 1, the token last and counted. Only what changed is
    scattered, in place; padding rows (slot -1) point past the end and are dropped."""
    target = jnp.where(slots >= 0, slots, batch.batch_size)
    return batch.replace(
        steps=batch.steps.at[target].add(1, mode="drop"),
        last_token=batch.last_token.at[target].set(tokens, mode="drop"),
        output_counts=batch.output_counts.at[target, tokens].add(1, mode="drop"),
    )
