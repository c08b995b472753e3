"""Speculative decoding with a draft model: a smaller model with the same vocabulary drafts each row's next tokens.

The draft keeps its K/V in pages of its own arrays under the same page ids as the target's (each request's page
table), so the memory pool's pages, prefix sharing, rollback and leak accounting cover it unchanged: a page the
target holds has room for the draft's K/V of the same positions, and a rejected page goes back with both.

Each time a row drafts, the draft model computes the tokens of the row not yet in its cache (the whole prompt the
first time, then the one or two tokens the last verification added) and then one token per further draft, each
step a ragged batch of every drafting row. A row sampled at a temperature draws its drafts from the draft model's
q = softmax(logits / temperature) (with its own seed, apart from the target's draws), and the target's sampler
verifies them by the standard speculative-sampling rule: keep a draft x with probability min(1, p(x) / q(x)),
else draw from max(0, p - q) renormalised (`sampling._draw_verifying`), so sampled outputs follow the target
exactly and a draft model close to the target has most of its drafts kept. A greedy row's drafts are the draft's
argmax, kept while they equal the target's: greedy outputs equal plain decoding.

Which of its K/V the draft can trust is tracked per request: positions written for tokens that are still the
request's tokens, in pages still its pages. A request that was preempted (its pages freed, perhaps reused) is
forgotten and caught up again from its first token.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from novallm_jax.config import ModelConfig
from novallm_jax.engine.executor import Executor, ExecutorConfig, PrefillChunk
from novallm_jax.errors import InvalidRequestError
from novallm_jax.model import Params
from novallm_jax.sampling import _RNG_IMPL, seed_key_data


@dataclasses.dataclass
class _Written:
    """What the draft's cache holds for one request: its K/V is right for positions < `valid` while the request's
    first pages are still `pages`; `drafts` were written at positions valid, valid + 1, ... and are right as far
    as they equal the request's tokens there (the ones the target accepted)."""

    valid: int
    pages: tuple[int, ...]
    drafts: tuple[int, ...] = ()


class DraftModel:
    """Proposes drafted tokens for requests of a target engine, from a model with the target's vocabulary."""

    def __init__(self, cfg: ModelConfig, params: Params, target: ExecutorConfig, vocab_size: int):
        if cfg.vocab_size != vocab_size:
            raise InvalidRequestError(
                f"the draft model's vocabulary has {cfg.vocab_size} tokens, the target's {vocab_size}: a draft must "
                f"share the target's tokenizer",
                param="draft_model",
            )
        exec_cfg = dataclasses.replace(
            target,
            max_draft_tokens=0,
            ragged_steps=True,
            window_kv_group=False,  # its sliding layers read the request's one page table
        )
        try:
            self.executor = Executor(cfg, params, exec_cfg)
        except ValueError as e:  # no native kernels here (a GPU, or bfloat16 weights)
            raise InvalidRequestError(
                f"a draft model drafts in ragged steps, which run on CPU with the native kernels ({e}); leave "
                f"draft_model unset for prompt-lookup drafts, which verify on any device",
                param="draft_model",
            ) from e
        self.page_size = exec_cfg.page_size
        self.cache = self.executor.new_cache()
        self._written: dict[str, _Written] = {}

    def requests(self) -> set[str]:
        """The requests whose draft K/V is tracked (none once every request finished or was preempted)."""
        return set(self._written)

    def reset(self) -> None:
        """Forgets every request, with new pages if a failed step consumed the donated cache."""
        self._written.clear()
        if any(a.is_deleted() for a in jax.tree.leaves(self.cache)):
            self.cache = self.executor.new_cache()

    def forget(self, request_id: str) -> None:
        """Drops what the draft holds for a request that finished or lost its pages."""
        self._written.pop(request_id, None)

    def warmup(self) -> None:
        self.cache = self.executor.warmup(self.cache)

    def _valid(self, request_id: str, tokens: list[int], pages: list[int]) -> int:
        """Positions whose draft K/V is right for `tokens` in `pages`."""
        w = self._written.get(request_id)
        if w is None:
            return 0
        valid = w.valid
        for d in w.drafts:
            if valid >= len(tokens) or tokens[valid] != d:
                break
            valid += 1
        for i in range(math.ceil(valid / self.page_size)):
            if i >= len(w.pages) or i >= len(pages) or w.pages[i] != pages[i]:
                return min(valid, i * self.page_size)
        return valid

    def propose(self, rows: list[DraftRow]) -> Proposal:
        """Drafts for `rows`: after each row's tokens, the draft model's next tokens, drawn from
        q = softmax(logits / temperature) with the row's temperature and seed (its argmax when greedy). Each row's
        pages must cover its tokens and all but the last draft."""
        rows = [r for r in rows if r.k > 0]
        if not rows:
            return Proposal({})
        temperature = np.array([r.temperature for r in rows], np.float32)
        key_data = np.stack([seed_key_data(r.seed) for r in rows])
        drafts: list[list[int]] = [[] for _ in rows]
        pieces: list[jax.Array] = []  # each step's logits [row bucket, V], kept on the device
        drawn_from: list[list[tuple[int, int]]] = [[] for _ in rows]  # (piece, its row) of each draft's logits

        def pick(logits: jax.Array, members: list[tuple[int, int]], position) -> None:
            """Draws the drafts of `members` (row, its logits row) from one step's logits, in one program per row
            bucket (other rows' draws are discarded)."""
            n = logits.shape[0]
            t, kd, pos = np.zeros(n, np.float32), np.zeros((n, 2), np.uint32), np.zeros(n, np.int32)
            for i, at in members:
                t[at], kd[at], pos[at] = temperature[i], key_data[i], position(i)
            picked = np.asarray(jax.device_get(_pick(logits, t, kd, pos)))
            pieces.append(logits)
            for i, at in members:
                drafts[i].append(int(picked[at]))
                drawn_from[i].append((len(pieces) - 1, at))

        starts = [min(self._valid(r.request_id, r.tokens, r.pages), len(r.tokens) - 1) for r in rows]
        self._catch_up(rows, starts, lambda logits, members: pick(logits, members, lambda i: len(rows[i].tokens)))
        for j in range(1, max(r.k for r in rows)):
            live = [i for i, r in enumerate(rows) if r.k > j]
            chunks = [PrefillChunk([drafts[i][-1]], len(rows[i].tokens) + j - 1, rows[i].pages) for i in live]
            logits, self.cache = self.executor.ragged_step(self.cache, chunks)
            pick(logits, [(i, n) for n, i in enumerate(live)], lambda i: len(rows[i].tokens) + j)
        for r, d in zip(rows, drafts):
            # Written: every token, and the drafts but the last, at positions len(tokens), len(tokens) + 1, ...
            n = len(r.tokens)
            self._written[r.request_id] = _Written(
                n, tuple(r.pages[: math.ceil((n + r.k - 1) / self.page_size)]), tuple(d[:-1])
            )
        tokens = {r.request_id: tuple(d) for r, d in zip(rows, drafts)}
        sampled = [i for i, r in enumerate(rows) if r.temperature > 0]
        if not sampled:
            return Proposal(tokens)
        # The sampled rows' logits in one array (a power-of-two number of rows: few compiles).
        used = sorted({p for i in sampled for p, _ in drawn_from[i]})
        offsets, total = {}, 0
        for p in used:
            offsets[p], total = total, total + pieces[p].shape[0]
        logits = jnp.zeros((1 << (total - 1).bit_length(), pieces[0].shape[-1]), jnp.float32)
        for p in used:
            logits = _put(logits, pieces[p], offsets[p])
        at = {rows[i].request_id: tuple(offsets[p] + n for p, n in drawn_from[i]) for i in sampled}
        return Proposal(tokens, logits, at)

    def _catch_up(self, rows: list[DraftRow], starts: list[int], done) -> None:
        """Runs each row's tokens from its start through its last one, in ragged steps of at most the largest token
        bucket; calls done(logits, [(row, its logits row)]) for the rows whose last token a step computed."""
        e = self.executor.exec_cfg
        todo = [(i, s) for i, s in enumerate(starts)]
        while todo:
            chunks, ends, budget, rest = [], [], e.token_buckets[-1], []
            for i, s in todo:
                tokens = rows[i].tokens
                n = min(len(tokens) - s, budget)
                if n <= 0 or len(chunks) == e.max_decode_batch:
                    rest.append((i, s))
                    continue
                chunks.append(PrefillChunk(tokens[s : s + n], s, rows[i].pages))
                ends.append((i, s + n == len(tokens)))
                budget -= n
                if s + n < len(tokens):
                    rest.append((i, s + n))
            logits, self.cache = self.executor.ragged_step(self.cache, chunks)
            finished = [(i, at) for at, (i, last) in enumerate(ends) if last]
            if finished:
                done(logits, finished)
            todo = rest


@dataclasses.dataclass(frozen=True)
class DraftRow:
    """A request to draft for: its tokens and page table, how many drafts, and how to draw them."""

    request_id: str
    tokens: list[int]
    pages: list[int]
    k: int
    temperature: float = 0.0  # 0: the draft model's argmax
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Proposal:
    """A step's drafts by request, and for the rows drawn at a temperature, the draft model's logits they were drawn
    from (`logits` [M, V] on the device, `rows[request_id]`: the row of each of its drafts), which the target's
    verification needs (`sampling._draw_verifying`). Greedy rows' drafts are its argmax: no logits."""

    tokens: dict[str, tuple[int, ...]]
    logits: jax.Array | None = None
    rows: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


_DRAFT_STREAM = 0x5EED  # folded into a request's key for its drafts' draws, apart from the target's


@functools.partial(jax.jit, donate_argnums=0)
def _put(logits: jax.Array, piece: jax.Array, offset: int) -> jax.Array:
    return jax.lax.dynamic_update_slice(logits, piece.astype(logits.dtype), (offset, 0))


@jax.jit
def _pick(logits: jax.Array, temperature: jax.Array, key_data: jax.Array, positions: jax.Array) -> jax.Array:
    def draw(row, t, kd, pos):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(kd, impl=_RNG_IMPL), _DRAFT_STREAM), pos)
        return jax.random.categorical(key, row.astype(jnp.float32) / jnp.where(t > 0, t, 1.0))

    drawn = jax.vmap(draw)(logits, temperature, key_data, positions)
    return jnp.where(temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
