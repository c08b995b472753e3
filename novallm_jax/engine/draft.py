"""Speculative decoding with a draft model: a smaller model with the same vocabulary drafts each row's next tokens.

The draft keeps its K/V in pages of its own arrays under the same page ids as the target's (each request's page
table), so the memory pool's pages, prefix sharing, rollback and leak accounting cover it unchanged: a page the
target holds has room for the draft's K/V of the same positions, and a rejected page goes back with both.

Each time a row drafts, the draft model computes the tokens of the row not yet in its cache (the whole prompt the
first time, then the one or two tokens the last verification added) and then one token per further draft, each
step a ragged batch of every drafting row. The drafts are the draft model's greedy choices: a deterministic
proposal given the text, which the target's verification (`speculative` module) accepts with probability p(draft)
and otherwise replaces by a draw from p without the draft, renormalised; the standard speculative-sampling rule
for a draft whose distribution puts all its mass on its choice. So sampled outputs follow the target exactly, and
greedy ones equal plain decoding.

Which of its K/V the draft can trust is tracked per request: positions written for tokens that are still the
request's tokens, in pages still its pages. A request that was preempted (its pages freed, perhaps reused) is
forgotten and caught up again from its first token.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from novallm_jax.config import ModelConfig
from novallm_jax.engine.executor import Executor, ExecutorConfig, PrefillChunk
from novallm_jax.errors import InvalidRequestError
from novallm_jax.model import Params


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
        self.executor = Executor(cfg, params, exec_cfg)
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

    def propose(self, rows: list[tuple[str, list[int], list[int], int]]) -> dict[str, tuple[int, ...]]:
        """Drafts for rows (request id, its tokens, its page table, drafts wanted): the draft model's greedy next
        tokens after each row's tokens. Each row's pages must cover its tokens and all but the last draft."""
        rows = [r for r in rows if r[3] > 0]
        if not rows:
            return {}
        starts = [min(self._valid(rid, tokens, pages), len(tokens) - 1) for rid, tokens, pages, _ in rows]
        last = self._catch_up(rows, starts)
        drafts = [[int(t)] for t in last]
        for j in range(1, max(k for *_, k in rows)):
            live = [i for i, r in enumerate(rows) if r[3] > j]
            chunks = [PrefillChunk([drafts[i][-1]], len(rows[i][1]) + j - 1, rows[i][2]) for i in live]
            for i, t in zip(live, self._greedy(chunks, [True] * len(chunks))):
                drafts[i].append(int(t))
        for (rid, tokens, pages, k), d in zip(rows, drafts):
            # Written: every token, and the drafts but the last, at positions len(tokens), len(tokens) + 1, ...
            n = len(tokens)
            self._written[rid] = _Written(n, tuple(pages[: math.ceil((n + k - 1) / self.page_size)]), tuple(d[:-1]))
        return {r[0]: tuple(d) for r, d in zip(rows, drafts)}

    def _catch_up(self, rows, starts: list[int]) -> list[int]:
        """Runs each row's tokens from its start through its last one, in ragged steps of at most the largest token
        bucket; the greedy token after each row's last."""
        e = self.executor.exec_cfg
        todo = [(i, s) for i, s in enumerate(starts)]
        out = [0] * len(rows)
        while todo:
            chunks, ends, budget, rest = [], [], e.token_buckets[-1], []
            for i, s in todo:
                _, tokens, pages, _ = rows[i]
                n = min(len(tokens) - s, budget)
                if n <= 0 or len(chunks) == e.max_decode_batch:
                    rest.append((i, s))
                    continue
                chunks.append(PrefillChunk(tokens[s : s + n], s, pages))
                ends.append((i, s + n == len(tokens)))
                budget -= n
                if s + n < len(tokens):
                    rest.append((i, s + n))
            for (i, done), t in zip(ends, self._greedy(chunks, [d for _, d in ends])):
                if done:
                    out[i] = t
            todo = rest
        return out

    def _greedy(self, chunks: list[PrefillChunk], wanted: list[bool]) -> np.ndarray:
        """One ragged step of the draft over `chunks`; the argmax after each chunk's last token (read back only when
        some chunk's is `wanted`)."""
        logits, self.cache = self.executor.ragged_step(self.cache, chunks)
        if not any(wanted):
            return np.zeros(len(chunks), np.int64)
        return np.asarray(jax.device_get(_argmax(logits)))[: len(chunks)]


@jax.jit
def _argmax(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1)
