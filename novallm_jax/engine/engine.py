"""The LLM engine: a request queue, a continuous-batching scheduler and streaming outputs over the executor.

Requests join and leave between steps. Each step prefills chunks of waiting prompts, decodes one token for every
running sequence, and samples all of them in one batched call. KV pages come from the memory pool; when it runs
dry, prefix-cache pages nobody uses are evicted first, then the newest running request is preempted (swapped to the
host arena, or recomputed later), so no request fails for lack of memory.

Steps are pipelined (`EngineConfig.async_scheduling`): step n+1 is dispatched before step n's tokens are read back.
Its decode rows take their input tokens from the sampler's output on the device (`SamplingBatch.last_token`), so
the host's work for step n (reading the tokens, detokenizing, stop strings, streaming) overlaps the device's work
for step n+1. A request whose step-n token stops it has computed one more row, which is dropped; its pages are
freed as before. Whatever needs every token on the host first (preemption, a pool too full to plan the step ahead)
reads the step in flight back before planning.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from novallm_jax.amp import MemoryPool
from novallm_jax.config import ModelConfig
from novallm_jax.detokenizer import IncrementalDetokenizer
from novallm_jax.engine import prefix_cache as pc
from novallm_jax.engine.executor import Executor, ExecutorConfig, PrefillChunk, bucket
from novallm_jax.engine.request import FinishReason, Request, RequestOutput, Status, TokenLogprob
from novallm_jax.errors import EngineClosedError, InvalidRequestError
from novallm_jax.model import Params
from novallm_jax.sampling import SamplingBatch, sample_slots
from novallm_jax.sampling_params import MAX_LOGPROBS, SamplingParams
from novallm_jax.tokenization.base import Tokenizer


class QueueFullError(InvalidRequestError):
    """The engine's waiting queue is full; retry later."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    executor: ExecutorConfig = ExecutorConfig()
    max_queue: int = 4096  # waiting requests before add_request refuses
    enable_prefix_caching: bool = True
    preemption_mode: str = "swap"  # "swap" (to the host arena) or "recompute"
    # Prompts prefilled per prefill step (default: the largest prefill bucket). Ragged steps (ExecutorConfig) instead
    # fill the largest token bucket with decode rows, then prompt chunks.
    max_prefill_rows: int | None = None
    # Dispatch each step before reading the previous step's tokens back (see the module docstring).
    async_scheduling: bool = True

    def __post_init__(self):
        if self.preemption_mode not in ("swap", "recompute"):
            raise ValueError(f"preemption_mode must be 'swap' or 'recompute', got {self.preemption_mode!r}")


def _next_chunk(req: Request, n: int) -> PrefillChunk:
    """The next `n` of `req`'s tokens to compute, with its page table (the last sampled one may be on the device)."""
    if req.pending:  # then n == 1: a decode row fed by the sampler's last token for the slot
        return PrefillChunk([0], req.num_computed, req.pages, from_slot=req.slot)
    return PrefillChunk(req.tokens[req.num_computed:req.num_computed + n], req.num_computed, req.pages)


@dataclasses.dataclass
class _Sampled:
    """One sampler call of a step: its (request, row) pairs and its output arrays, still on the device."""

    rows: list[tuple[Request, int]]
    arrays: tuple[jax.Array, ...]


class _CountingRLock:
    """A re-entrant lock that counts the threads blocked on it, so that the engine loop can let them in between steps."""

    def __init__(self):
        self._lock = threading.RLock()
        self._count = threading.Lock()
        self.waiting = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        if not blocking:
            return False
        with self._count:
            self.waiting += 1
        try:
            return self._lock.acquire(True, timeout)
        finally:
            with self._count:
                self.waiting -= 1

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # What `threading.Condition` uses to release a re-entrant lock fully in `wait()` and take it back after.
    def _release_save(self):
        return self._lock._release_save()

    def _acquire_restore(self, state) -> None:
        self._lock._acquire_restore(state)

    def _is_owned(self) -> bool:
        return self._lock._is_owned()


class LLMEngine:
    """Continuous batching over one model. Thread-safe: `add_request`/`abort` from any thread; `step` or `start`."""

    def __init__(self, cfg: ModelConfig, params: Params, tokenizer: Tokenizer, config: EngineConfig | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        ecfg = self.config.executor
        self.executor = Executor(cfg, params, ecfg)
        self.page_size = ecfg.page_size
        self.max_model_len = min(ecfg.max_model_len, cfg.max_position_embeddings)
        self.num_slots = ecfg.max_decode_batch
        self.max_prefill_rows = self.config.max_prefill_rows or ecfg.prefill_batch_buckets[-1]
        self.pool = MemoryPool(num_pages=ecfg.num_pages, storage=self.executor.new_cache())
        self.prefix_cache = pc.PrefixCache(self.pool, self.page_size)
        self.eos_token_ids = tuple(tokenizer.eos_token_ids) or cfg.eos_token_ids
        self.sampling = SamplingBatch.from_params([None] * self.num_slots, cfg.vocab_size)
        self.slots: list[Request | None] = [None] * self.num_slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.swapped: collections.deque[Request] = collections.deque()
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._lock = _CountingRLock()
        self._work = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        # Finish reasons, prefilled/generated tokens, preemptions, steps, steps planned ahead (async scheduling).
        self.counters = collections.Counter()
        self._inflight: list[_Sampled] | None = None  # the dispatched step whose tokens are not read back yet

    # ---- requests -----------------------------------------------------------------------------------------------

    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None,
                    on_output: Callable[[RequestOutput], None] | None = None) -> Request:
        """Queues one sequence (n must be 1: callers fan out n > 1); raises InvalidRequestError on bad input."""
        params = (params or SamplingParams()).validate(self.cfg.vocab_size)
        if params.n != 1:
            raise InvalidRequestError("the engine takes one sequence per request; use LLM.generate for n > 1", "n")
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})",
                                      param="prompt")
        if len(prompt) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt)} tokens, but the model's context is {self.max_model_len} tokens "
                f"(max_model_len), leaving no room to generate", param="prompt")
        longest = min(len(prompt) + (params.max_tokens or self.max_model_len), self.max_model_len)
        if math.ceil(longest / self.page_size) > self.pool.num_pages - 1:
            raise InvalidRequestError(
                f"the request may need {longest} tokens of KV cache, more than the whole pool holds "
                f"({(self.pool.num_pages - 1) * self.page_size}); lower max_tokens", param="max_tokens")
        params = params.with_resolved_seed()
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFullError(f"the request queue is full ({self.config.max_queue} waiting); retry later")
            rid = request_id or f"req-{next(self._ids)}"
            if rid in self.requests:
                raise InvalidRequestError(f"request id {rid!r} is already in use", param="request_id")
            req = Request(rid, prompt, params, IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True),
                          self.eos_token_ids, on_output)
            self.requests[rid] = req
            self.waiting.append(req)
            self._work.notify_all()
        return req

    def abort(self, request_id: str) -> bool:
        """Cancels a request and frees its pages at once; False if it is unknown or already finished."""
        with self._lock:
            req = self.requests.get(request_id)
            if req is None or req.finished:
                return False
            self._finish(req, FinishReason.CANCELLED)
            req.emit("", [])
            return True

    def warmup(self) -> None:
        """Compiles every shape a step can use: the executor's step shapes, then `warmup_sampler`; and builds the
        tokenizer's per-token byte table, which its first detokenized token would otherwise build (~0.2-0.4 s)."""
        with self._lock:
            self.pool.storage = self.executor.warmup(self.pool.storage)
            self.warmup_sampler()
            self.tokenizer.token_bytes(0)

    def warmup_sampler(self) -> None:
        """Compiles the sampler for each row bucket, with and without top logprobs (2 shapes per bucket), and the
        updates of a slot's sampling state.

        The calls sample padding rows only, and set and clear a free slot's row: they change no state.
        """
        with self._lock:
            for size in self.sampler_buckets:
                for n_top in (0, MAX_LOGPROBS):
                    # Arguments of the kinds a step passes (a device array; a numpy array): one cache entry.
                    _, self.sampling = sample_slots(jnp.zeros((size, self.cfg.vocab_size), jnp.float32),
                                                    np.full(size, -1, np.int32), self.sampling,
                                                    num_top_logprobs=n_top)
            free = next((i for i, req in enumerate(self.slots) if req is None), None)
            if free is not None:
                self.sampling = self.sampling.set_row(free, SamplingParams()).clear_row(free)
            jax.block_until_ready(self.sampling)
            logging.info("warm-up compiled the sampler for row buckets %s", self.sampler_buckets)

    # ---- the loop -----------------------------------------------------------------------------------------------

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.swapped or any(self.slots) or self._inflight)

    def step(self) -> list[RequestOutput]:
        """One scheduling step: admit, prefill chunks, decode, sample. Returns the outputs it emitted: this step's,
        or with `async_scheduling` the previous step's (read back after this one was dispatched)."""
        with self._lock:
            emitted: list[RequestOutput] = []
            self._admit()
            if self._inflight is not None and not self._can_plan_ahead():
                emitted += self._emit(self._take_inflight())
                self._admit()  # into the slots of the requests that just finished
            computed = self._run_model()
            sampled = self._dispatch_sampling(computed) if computed else None
            if self._inflight is not None:
                self.counters["steps_planned_ahead"] += sampled is not None
                emitted += self._emit(self._take_inflight())
            if sampled is not None:
                if self.config.async_scheduling:
                    self._inflight = sampled
                else:
                    emitted += self._emit(sampled)
            self.counters["steps"] += 1
            return emitted

    def _take_inflight(self) -> list[_Sampled]:
        inflight, self._inflight = self._inflight, None
        return inflight

    def _can_plan_ahead(self) -> bool:
        """Whether the next step can be planned before the step in flight is read back: it must not preempt anyone
        (a preempted request would leave with a token still on the device), so every page it may need must be free.
        Nothing is evicted for it: when pages are short, the step waits and plans as a synchronous one would.
        """
        cap = max(self.executor.exec_cfg.token_buckets[-1], self.executor.exec_cfg.max_chunk)
        need = 0
        for req in self.slots:
            if req is not None:
                upto = req.num_computed + min(req.num_tokens - req.num_computed, cap)
                need += max(0, math.ceil(upto / self.page_size) - len(req.pages)) + 1  # + 1: a copy-on-write page
        return self.pool.num_free >= need

    def run_until_idle(self, max_steps: int | None = None) -> None:
        """Steps until no request is waiting or running (for offline use and tests)."""
        for _ in itertools.count() if max_steps is None else range(max_steps):
            if not self.has_work():
                return
            self.step()

    def start(self) -> None:
        """Runs the loop on a background thread (the SDK and the server use this)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="novallm-engine", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self.has_work():
                    self._work.wait()
                if self._closed:
                    return
                try:
                    self.step()
                except Exception:  # the engine must keep serving: fail what was running, keep the loop alive
                    logging.exception("engine step failed; failing the running requests")
                    self._fail_running("internal error during a model step")
            # The lock is not fair: re-taken at once, it kept add_request/abort/stats callers waiting for up to ~30
            # steps (measured). Step aside until the threads already waiting have had it (10 ms at most).
            deadline = time.monotonic() + 0.01
            while self._lock.waiting and time.monotonic() < deadline:
                time.sleep(0.0001)

    def close(self) -> None:
        """Stops the loop thread and cancels everything pending; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._inflight = None
            for req in list(self.requests.values()):
                if not req.finished:
                    self._finish(req, FinishReason.CANCELLED)
                    req.emit("", [])
            self._work.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    # ---- scheduling ---------------------------------------------------------------------------------------------

    def _free_slot(self) -> int | None:
        return next((i for i, r in enumerate(self.slots) if r is None), None)

    def _admit(self) -> None:
        """Resumes swapped requests first (they were admitted earlier), then waiting ones, while slots and pages last."""
        while self.swapped and (slot := self._free_slot()) is not None:
            req = self.swapped[0]
            if not self._reserve(req.swap_handle.num_pages):
                return
            req.pages = self.pool.swap_in(req.swap_handle)
            req.swap_handle = None
            self.swapped.popleft()
            self._place(req, slot)
        while self.waiting and (slot := self._free_slot()) is not None:
            req = self.waiting[0]
            if req.metrics.first_scheduled is None:
                req.metrics.first_scheduled = time.monotonic()
            if self.config.enable_prefix_caching and not req.page_hashes:
                req.page_hashes = pc.page_hashes(req.prompt, self.page_size, (len(req.prompt) - 1) // self.page_size)
            need = math.ceil(len(req.tokens) / self.page_size)
            if self.config.enable_prefix_caching:
                req.pages = self.prefix_cache.match(req.id, req.page_hashes)
                req.num_cached_pages = len(req.pages)
                req.num_computed = len(req.pages) * self.page_size
                req.metrics.cached_prompt_tokens = req.num_computed
            if not self._reserve(need - len(req.pages)):
                if req.pages:
                    self.pool.free(req.id, req.pages)
                req.pages, req.num_computed, req.num_cached_pages = [], 0, 0
                return
            self.waiting.popleft()
            self._place(req, slot)

    def _place(self, req: Request, slot: int) -> None:
        req.slot, req.status = slot, Status.RUNNING
        self.slots[slot] = req
        self.sampling = self.sampling.set_row(slot, req.params, prompt_token_ids=req.prompt,
                                              output_token_ids=req.output_ids, eos_token_ids=self.eos_token_ids)

    def _reserve(self, n: int) -> bool:
        """Whether `n` pages are free, evicting unused prefix-cache pages if that helps."""
        short = n - self.pool.num_free
        if short > 0:
            self.prefix_cache.evict(short)
        return self.pool.num_free >= n

    def _ensure_pages(self, req: Request, upto: int) -> bool:
        """Gives `req` pages for positions < upto, preempting newer requests if needed; False if `req` was preempted."""
        need = math.ceil(upto / self.page_size) - len(req.pages)
        while need > 0:
            if self._reserve(need):
                req.pages += self.pool.allocate(req.id, need)
                break
            victim = max((r for r in self.slots if r is not None), key=lambda r: r.metrics.arrival)
            self._preempt(victim)
            if victim is req:
                return False
        # Copy-on-write before writing into a page someone else also holds.
        idx = req.num_computed // self.page_size
        if req.num_computed % self.page_size and idx < len(req.pages):
            req.pages[idx] = self.pool.make_writable(req.id, req.pages[idx])
        return True

    def _preempt(self, req: Request) -> None:
        if req.pending:  # `_can_plan_ahead` reads the step in flight back before anything may preempt
            raise RuntimeError(f"preempting {req.id} with a token still on the device")
        if req.num_computed == req.num_tokens:
            # Its last token was computed in this step (a prefill chunk planned before the decode rows that
            # preempt it), but a preempted request's rows are not sampled: compute that token again on resume.
            req.num_computed -= 1
        logging.info("preempting %s (%s) to free %d pages", req.id, self.config.preemption_mode, len(req.pages))
        req.metrics.preemptions += 1
        self.counters["preemptions"] += 1
        self._release_slot(req)
        if self.config.preemption_mode == "swap" and req.num_computed > 0:
            req.swap_handle = self.pool.swap_out(req.id, req.pages)
            req.status = Status.SWAPPED
            self.swapped.append(req)
        else:
            self.pool.free_all(req.id)
            req.num_computed, req.num_cached_pages = 0, 0
            req.status = Status.WAITING
            self.waiting.appendleft(req)
        req.pages = []

    def _release_slot(self, req: Request) -> None:
        if req.slot is not None:
            self.slots[req.slot] = None
            self.sampling = self.sampling.clear_row(req.slot)
            req.slot = None

    # ---- model steps --------------------------------------------------------------------------------------------

    def _run_model(self) -> list[tuple[Request, jax.Array, int]]:
        """Runs this step's prefill chunks and decode; returns (request, logits rows, row) for each to sample."""
        if self.executor.ragged:
            return self._run_ragged()
        running = [r for r in self.slots if r is not None]
        prefill = self._pick_prefill([r for r in running if r.num_tokens - r.num_computed > 1])
        out: list[tuple[Request, jax.Array, int]] = []
        chunks, reqs = [], []
        for req in prefill:
            n = self._chunk_len(req)
            # A request planned above may have been preempted to make room for an older one.
            if req.status is not Status.RUNNING or not self._ensure_pages(req, req.num_computed + n):
                continue
            chunks.append(_next_chunk(req, n))
            reqs.append(req)
        planned = [(c, r) for c, r in zip(chunks, reqs) if r.status is Status.RUNNING]
        if planned:
            logits, self.pool.storage = self.executor.prefill(self.pool.storage, [c for c, _ in planned],
                                                              padded=True)
            for i, (c, req) in enumerate(planned):
                if self._advance(req, len(c.tokens)):
                    out.append((req, logits, i))
        decode = [r for r in self.slots if r is not None and r.num_tokens - r.num_computed == 1 and
                  not self._done_when_read(r)]
        decode = [r for r in decode if r.status is Status.RUNNING and self._ensure_pages(r, r.num_tokens)]
        decode = [r for r in decode if r.status is Status.RUNNING]
        if decode:
            rows = [_next_chunk(r, 1) for r in decode]
            logits, self.pool.storage = self.executor.decode(
                self.pool.storage, [c.tokens[0] for c in rows], [c.start for c in rows], [c.pages for c in rows],
                padded=True, from_slots=[c.from_slot for c in rows], last_tokens=self.sampling.last_token)
            for i, req in enumerate(decode):
                self._advance(req, 1)
                out.append((req, logits, i))
        return [(r, l, i) for r, l, i in out if r.status is Status.RUNNING]

    def _run_ragged(self) -> list[tuple[Request, jax.Array, int]]:
        """One ragged step: every decode row, then prompt chunks, oldest first, up to the step's token budget.

        Only the step's total is padded (to a token bucket), so prompts are cut wherever the budget ends.
        """
        running = sorted((r for r in self.slots if r is not None), key=lambda r: r.metrics.arrival)
        budget = self._ragged_budget(running)
        plan: list[tuple[Request, int]] = []
        for decoding in (True, False):
            for req in running:
                remaining = req.num_tokens - req.num_computed
                if (remaining == 1) != decoding or req.status is not Status.RUNNING or budget <= 0:
                    continue
                if self._done_when_read(req):
                    continue
                n = min(remaining, budget)
                if self._ensure_pages(req, req.num_computed + n):
                    plan.append((req, n))
                    budget -= n
        # A request planned above may have been preempted to make room for an older one.
        plan = [(r, n) for r, n in plan if r.status is Status.RUNNING]
        if not plan:
            return []
        seqs = [_next_chunk(r, n) for r, n in plan]
        logits, self.pool.storage = self.executor.ragged_step(self.pool.storage, seqs, self.sampling.last_token)
        out = []
        for i, (req, n) in enumerate(plan):
            if self._advance(req, n):
                out.append((req, logits, i))
        return out

    def _advance(self, req: Request, n: int) -> bool:
        """Counts `n` more of `req`'s tokens as computed; True when the next one is to be sampled."""
        if n > 1 or req.num_computed < len(req.prompt):  # a prompt chunk, or a prompt's last token
            req.metrics.prefilled_tokens += n
            self.counters["prefill_tokens"] += n
        req.num_computed += n
        self._cache_prompt_pages(req)
        return req.num_computed == req.num_tokens

    def _done_when_read(self, req: Request) -> bool:
        """Whether a token still on the device ends `req` by length (so no step is planned for it)."""
        return req.pending > 0 and self._at_length(req, req.num_tokens)

    def _at_length(self, req: Request, num_tokens: int) -> bool:
        """Whether `req` stops by length (max_tokens, or the model's context) once it has `num_tokens` tokens."""
        return num_tokens - len(req.prompt) >= (req.params.max_tokens or math.inf) or num_tokens >= self.max_model_len

    def _ragged_budget(self, running: list[Request]) -> int:
        """Tokens for this ragged step: every decode row, and prompt tokens up to a token bucket.

        A large step that would end between two buckets stops at the lower one: the prompt tokens left over join
        the next step, whose decode rows they would otherwise pad. Small steps pad instead, since a step costs a
        read of every weight however few its tokens.
        """
        e = self.executor.exec_cfg
        remaining = [r.num_tokens - r.num_computed for r in running]
        decode = sum(n == 1 for n in remaining)
        total = min(sum(remaining), e.token_buckets[-1])
        lower = max((b for b in e.token_buckets if b <= total), default=0)
        return lower if lower > decode and lower >= 2 * e.max_decode_batch else total

    def _chunk_len(self, req: Request) -> int:
        """Tokens of `req`'s next prefill chunk: the largest length bucket that its remaining prompt fills.

        A chunk is padded to its bucket, and prefill is compute-bound, so a 200-token prompt runs as 128 + 64 + 8
        rather than as one 256-token chunk with 56 tokens of padding; only the last piece (< the smallest bucket) pads.
        """
        remaining = req.num_tokens - req.num_computed
        filled = [b for b in self.executor.exec_cfg.prefill_len_buckets if b <= remaining]
        return filled[-1] if filled else remaining

    def _pick_prefill(self, candidates: list[Request]) -> list[Request]:
        """The oldest request's chunk, plus others whose chunks fall in the same length bucket.

        A prefill step pads every row to the longest chunk's bucket and to a row bucket: rows share one length bucket
        and their count is a row bucket exactly (3 rows padded to 4 would cost as much as 4).
        """
        if not candidates:
            return []
        e = self.executor.exec_cfg
        length = lambda r: bucket(self._chunk_len(r), e.prefill_len_buckets)
        candidates = sorted(candidates, key=lambda r: r.metrics.arrival)
        first = length(candidates[0])
        same = [r for r in candidates if length(r) == first][: self.max_prefill_rows]
        fits = [b for b in e.prefill_batch_buckets if b <= len(same)]
        return same[: fits[-1]] if fits else same

    def _cache_prompt_pages(self, req: Request) -> None:
        if not self.config.enable_prefix_caching:
            return
        full = min(req.num_computed // self.page_size, len(req.page_hashes))
        if full > req.num_cached_pages:
            self.prefix_cache.insert(req.id, req.page_hashes[:full], req.pages[:full])
            req.num_cached_pages = full

    @property
    def sampler_buckets(self) -> tuple[int, ...]:
        """Row counts the sampler is compiled for: those of the logits a step returns."""
        return self.executor.logits_row_counts()

    def _dispatch_sampling(self, computed: list[tuple[Request, jax.Array, int]]) -> list[_Sampled]:
        """Dispatches the sampler for the rows of this step; the tokens stay on the device until `_emit`."""
        # Each logits array (one per model call, padded to a row bucket) is sampled in place: its rows map to their
        # requests' slots, and the rest are padding rows (slot -1). No gather, so no shape beyond the warm-up's, and
        # the work scales with the step's row bucket, not with num_slots.
        groups: dict[int, tuple[jax.Array, list[tuple[Request, int]]]] = {}
        for req, logits, row in computed:
            groups.setdefault(id(logits), (logits, []))[1].append((req, row))
            req.pending += 1
        results = []
        for logits, rows in groups.values():
            slots = np.full(logits.shape[0], -1, np.int32)
            for req, row in rows:
                slots[row] = req.slot
            n_top = MAX_LOGPROBS if any((r.params.logprobs or 0) > 0 for r, _ in rows) else 0
            result, self.sampling = sample_slots(logits, slots, self.sampling, num_top_logprobs=n_top)
            results.append(_Sampled(rows, (result.tokens, result.logprobs, result.top_ids, result.top_logprobs)))
        return results

    def _emit(self, sampled: list[_Sampled]) -> list[RequestOutput]:
        """Reads sampled tokens back and appends them; rows of requests that ended meanwhile are dropped."""
        fetched = jax.device_get([s.arrays for s in sampled])
        emitted = []
        for s, (tokens, logprobs, top_ids, top_lps) in zip(sampled, fetched):
            for req, i in s.rows:
                if req.status is not Status.RUNNING:  # stopped by an earlier token, cancelled, or failed
                    continue
                req.pending -= 1
                try:
                    emitted.append(self._append_token(req, int(tokens[i]), float(logprobs[i]), top_ids[i],
                                                      top_lps[i]))
                except Exception as e:  # a bad request must not take the others down
                    logging.exception("request %s failed while emitting output", req.id)
                    req.error = f"{type(e).__name__}: {e}"
                    self._finish(req, FinishReason.ERROR)
                    req.emit("", [])
        return emitted

    def _append_token(self, req: Request, token: int, logprob: float, top_ids, top_lps) -> RequestOutput:
        if req.metrics.first_token is None:
            req.metrics.first_token = time.monotonic()
        req.tokens.append(token)
        self.counters["generated_tokens"] += 1
        if req.logprobs is not None:
            n = req.params.logprobs or 0
            req.logprobs.append(TokenLogprob(token, logprob, {int(i): float(v) for i, v in zip(top_ids[:n],
                                                                                                top_lps[:n])}))
        reason = None
        if token in req.stop_token_ids:
            reason, delta = FinishReason.STOP, self._drain_text(req)
        else:
            delta, stopped = req.stop.feed(req.detokenizer.add(token))
            if stopped:
                reason = FinishReason.STOP
            elif self._at_length(req, len(req.tokens)):
                reason, delta = FinishReason.LENGTH, delta + self._drain_text(req)
        req.text += delta
        if reason is not None:
            self._finish(req, reason)
        return req.emit(delta, [token])

    @staticmethod
    def _drain_text(req: Request) -> str:
        """Text still held back by the detokenizer and the stop-string matcher, at the end of generation."""
        tail, stopped = req.stop.feed(req.detokenizer.flush())
        return tail if stopped else tail + req.stop.flush()

    def _finish(self, req: Request, reason: FinishReason) -> None:
        """Frees everything the request holds; it stays in `requests` only until its final output is emitted."""
        if req.status is Status.WAITING and req in self.waiting:
            self.waiting.remove(req)
        if req.status is Status.SWAPPED and req in self.swapped:
            self.swapped.remove(req)
            if req.swap_handle is not None:
                self.pool.drop_swapped(req.swap_handle)
                req.swap_handle = None
        self._release_slot(req)
        self.pool.free_all(req.id)
        req.pages = []
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.metrics.finished = time.monotonic()
        self.counters[f"finished_{reason.value}"] += 1
        self.requests.pop(req.id, None)

    def _fail_running(self, message: str) -> None:
        self._inflight = None
        for req in list(self.requests.values()):
            if req.status in (Status.RUNNING, Status.SWAPPED):
                req.error = message
                self._finish(req, FinishReason.ERROR)
                req.emit("", [])
        if any(a.is_deleted() for a in jax.tree.leaves(self.pool.storage)):
            self.pool.storage = self.executor.new_cache()  # a failed donated step consumed the cache
        if any(a.is_deleted() for a in jax.tree.leaves(self.sampling)):  # likewise a failed sample_slots
            self.sampling = SamplingBatch.from_params([None] * self.num_slots, self.cfg.vocab_size)

    # ---- accounting ---------------------------------------------------------------------------------------------

    def check_leaks(self) -> list[str]:
        """Pages or buffers held by anyone but the prefix cache, plus any mismatch in the cache's own accounting."""
        with self._lock:
            leaks = [line for line in self.pool.check_leaks() if repr(pc.OWNER) not in line]
            held = set(self.pool.pages_of(pc.OWNER))
            if held != self.prefix_cache.pages():
                leaks.append(f"prefix cache index ({len(self.prefix_cache)} pages) disagrees with the pool "
                             f"({len(held)} pages held by {pc.OWNER!r})")
            return leaks

    def stats(self) -> dict:
        with self._lock:
            used = self.pool.num_pages - 1 - self.pool.num_free
            return {
                "running": sum(r is not None for r in self.slots),
                "waiting": len(self.waiting),
                "swapped": len(self.swapped),
                "kv_pages_used": used,
                "kv_pages_free": self.pool.num_free,
                "prefix_cache_pages": len(self.prefix_cache),
                "prefix_cache_hit_rate": self.prefix_cache.hit_rate,
                **self.counters,
            }
