"""The LLM engine: requests in, streamed outputs out, one step at a time.

Requests join and leave between steps. Each step, the scheduler (`scheduler.py`) admits what fits and plans what
the step computes (prompt chunks and one decode token per running sequence) as a `StepPlan`; the engine core
(`core.py`) executes the plan and samples every row in one batched call; this module reads the tokens back,
detokenizes, applies stop conditions and streams. KV pages come from the memory pool; when it runs dry, prefix-cache
pages nobody uses are evicted first, then the newest running request is preempted (swapped to the host arena, or
recomputed later), so no request fails for lack of memory.

Steps are pipelined (`EngineConfig.async_scheduling`): step n+1 is dispatched before step n's tokens are read back.
Its decode rows take their input tokens from the sampler's output on the device (`SamplingBatch.last_token`), so
the host's work for step n (reading the tokens, detokenizing, stop strings, streaming) overlaps the device's work
for step n+1. A request whose step-n token stops it has computed one more row, which is dropped; its pages are
freed as before. Whatever needs every token on the host first (preemption, a pool too full to plan the step ahead)
reads the step in flight back before planning.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import math
import threading
import time
import weakref
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from novallm_jax.amp import MemoryPool
from novallm_jax.config import ModelConfig
from novallm_jax.detokenizer import IncrementalDetokenizer
from novallm_jax.engine import prefix_cache as pc
from novallm_jax.engine import speculative
from novallm_jax.engine.core import EngineCore, Sampled
from novallm_jax.engine.draft import DraftModel
from novallm_jax.engine.executor import Executor, ExecutorConfig
from novallm_jax.engine.plan import RAGGED, ModelCall, StepPlan
from novallm_jax.engine.request import POOLINGS, FinishReason, Request, RequestOutput, Status, TokenLogprob
from novallm_jax.engine.scheduler import Scheduler
from novallm_jax.errors import EngineClosedError, EngineUnavailableError, InvalidRequestError
from novallm_jax.model import Params
from novallm_jax.sharding import bytes_per_device
from novallm_jax.sampling import sample_slots, sample_slots_argmax, sample_slots_greedy
from novallm_jax.sampling_params import MAX_LOGPROBS, SamplingParams
from novallm_jax.structured import Matcher, bitmask_words, fill_bitmasks
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
    # Devices to split the model and the steps' rows over: "model=4,data=2" or a `jax.sharding.Mesh` (sharding.py);
    # None: one device.
    mesh: str | Mesh | None = None

    def __post_init__(self):
        if self.preemption_mode not in ("swap", "recompute"):
            raise ValueError(f"preemption_mode must be 'swap' or 'recompute', got {self.preemption_mode!r}")


@dataclasses.dataclass
class _Sampled:
    """One sampler call of a step: its (request, row) pairs and its output arrays, still on the device."""

    rows: list[tuple[Request, list[int]]]  # each request's output rows: one, or one per position a draft verified
    arrays: tuple[jax.Array, ...]


def _long_context(cfg: ModelConfig) -> int | None:
    """The prompt length past which longrope rotates with its long factors; None for other models."""
    rs = cfg.rope_scaling
    return rs.original_max_position_embeddings if rs is not None and rs.rope_type == "longrope" else None


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


# Engines whose loop thread runs, closed at interpreter exit: a loop thread left alive while the interpreter and XLA's
# runtime tear down sometimes aborts the process (SIGABRT after the script's last line, seen with an LLM never closed).
_running: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_running_engines() -> None:
    for engine in list(_running):
        engine.close()


class LLMEngine:
    """Continuous batching over one model. Thread-safe: `add_request`/`abort` from any thread; `step` or `start`."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        tokenizer: Tokenizer,
        config: EngineConfig | None = None,
        draft: tuple[ModelConfig, Params] | None = None,
    ):
        """`draft`: a draft model's config and params (same vocabulary) that drafts for speculative requests instead
        of prompt lookup (see `draft.DraftModel`)."""
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.executor = Executor(cfg, params, self.config.executor, mesh=self.config.mesh)
        ecfg = self.executor.exec_cfg  # on a mesh, row buckets rounded up to whole rows per data replica
        self.page_size = ecfg.page_size
        self.max_model_len = min(ecfg.max_model_len, cfg.max_position_embeddings)
        self.num_slots = ecfg.max_decode_batch
        self.max_prefill_rows = self.config.max_prefill_rows or ecfg.prefill_batch_buckets[-1]
        # The KV pages: one pool, or with a window group (sliding layers' pages, `kv_cache.window_groups`) a second.
        storages = self.executor.split_cache(self.executor.new_cache())
        self.pool = MemoryPool(num_pages=ecfg.num_pages, storage=storages[0])
        self.window_pool = (
            None if len(storages) == 1 else MemoryPool(num_pages=self.executor.window_num_pages, storage=storages[1])
        )
        self.eos_token_ids = tuple(tokenizer.eos_token_ids) or cfg.eos_token_ids
        self.drafter = None if draft is None else DraftModel(*draft, ecfg, cfg.vocab_size)
        self.scheduler = Scheduler(
            self.pool,
            ecfg,
            ragged=self.executor.ragged,
            max_model_len=self.max_model_len,
            max_prefill_rows=self.max_prefill_rows,
            enable_prefix_caching=self.config.enable_prefix_caching,
            preemption_mode=self.config.preemption_mode,
            long_context=_long_context(cfg),
            window_pool=self.window_pool,
            window=self.executor.window,
            drafter=self.drafter,
        )
        self.pools = self.scheduler.pools  # one per KV cache group
        self.core = EngineCore(self.executor, self.num_slots, cfg.vocab_size, self.eos_token_ids)
        # The scheduler's state, under the names callers know.
        self.prefix_cache = self.scheduler.prefix_cache
        self.slots, self.waiting, self.swapped = self.scheduler.slots, self.scheduler.waiting, self.scheduler.swapped
        self.requests = self.scheduler.requests
        self._ids = itertools.count()
        self._lock = _CountingRLock()
        self._work = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        # Why the engine can serve no more (see `mark_unavailable`); None while it can.
        self.unavailable: str | None = None
        # Finish reasons, prefilled/generated tokens, preemptions, steps, steps planned ahead (async scheduling).
        self.counters = self.scheduler.counters
        self._inflight: list[_Sampled] | None = None  # the dispatched step whose tokens are not read back yet

    # ---- requests -----------------------------------------------------------------------------------------------

    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
        pooling: str | None = None,
    ) -> Request:
        """Queues one sequence (n must be 1: callers fan out n > 1); raises InvalidRequestError on bad input.

        `pooling` ("last" or "mean") makes it an embedding request: its prompt is computed in the steps like any
        other (chunked, batched, prefix-cached for "last"), nothing is sampled, and its one output carries
        `embedding`, the final hidden states (after the final norm) pooled so, not normalised. `params` is ignored.
        """
        if self.unavailable:
            raise EngineUnavailableError(self.unavailable)
        if pooling is not None:
            if pooling not in POOLINGS:
                raise InvalidRequestError(
                    f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}", param="pooling"
                )
            params = SamplingParams(max_tokens=1)
        params = (params or SamplingParams()).validate(self.cfg.vocab_size)
        if params.n != 1:
            raise InvalidRequestError("the engine takes one sequence per request; use LLM.generate for n > 1", "n")
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})", param="prompt"
            )
        room = 0 if pooling else 1  # a generation request needs a position for its first token
        if len(prompt) > self.max_model_len - room:
            raise InvalidRequestError(
                f"the prompt has {len(prompt)} tokens, but the model's context is {self.max_model_len} tokens "
                f"(max_model_len)" + (", leaving no room to generate" if room else ""),
                param="prompt",
            )
        if params.speculative and not self.executor.exec_cfg.max_draft_tokens:
            raise InvalidRequestError(
                "speculative decoding needs an engine that verifies drafted tokens: "
                "ExecutorConfig.max_draft_tokens > 0 (LLM(speculative=...), --speculative)",
                param="speculative",
            )
        longest = min(len(prompt) + (0 if pooling else params.max_tokens or self.max_model_len), self.max_model_len)
        if math.ceil(longest / self.page_size) > self.pool.num_pages - 1:
            raise InvalidRequestError(
                f"the request may need {longest} tokens of KV cache, more than the whole pool holds "
                f"({(self.pool.num_pages - 1) * self.page_size}); lower max_tokens",
                param="max_tokens",
            )
        params = params.with_resolved_seed()
        # Compiled here (cached per constraint), so a bad grammar is refused before the request is queued.
        matcher = None if params.structured is None else Matcher(params.structured, self.tokenizer, self.cfg.vocab_size)
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFullError(f"the request queue is full ({self.config.max_queue} waiting); retry later")
            rid = request_id or f"req-{next(self._ids)}"
            if rid in self.requests:
                raise InvalidRequestError(f"request id {rid!r} is already in use", param="request_id")
            detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
            req = Request(rid, prompt, params, detokenizer, self.eos_token_ids, on_output, pooling)
            req.matcher = matcher
            self.scheduler.add(req)
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
            self.kv_cache = self.executor.warmup(self.kv_cache)
            if self.drafter is not None:
                self.drafter.warmup()
            self.warmup_sampler()
            self.tokenizer.token_bytes(0)

    def warmup_sampler(self) -> None:
        """Compiles the sampler for each row bucket, with and without top logprobs (and drafted rows' offsets where
        the engine verifies drafts), the greedy rows' sampler (`sample_slots_greedy`), and the updates of the slots'
        sampling state for each row count they pad to.

        The calls sample and write padding rows only: they change no state.
        """
        core = self.core
        with self._lock:
            drafts = ({}, {"offsets": None}) if self.executor.exec_cfg.max_draft_tokens else ({},)
            for size, n_top, extra in itertools.product(self.sampler_buckets, (0, MAX_LOGPROBS), drafts):
                # Arguments of the kinds a step passes (a device array; a numpy array): one cache entry.
                _, core.sampling = sample_slots(
                    jnp.zeros((size, self.cfg.vocab_size), jnp.float32),
                    np.full(size, -1, np.int32),
                    core.sampling,
                    num_top_logprobs=n_top,
                    **{k: np.zeros(size, np.int32) for k in extra},
                )
            for size in self.sampler_buckets:
                _, core.sampling = sample_slots_greedy(
                    jnp.zeros((size, self.cfg.vocab_size), jnp.float32), np.full(size, -1, np.int32), core.sampling
                )
                if size <= self.executor.argmax_rows:
                    _, core.sampling = sample_slots_argmax(
                        jnp.zeros(size, jnp.int32), np.full(size, -1, np.int32), core.sampling
                    )
            for n in core.sampling.update_row_counts():  # padding rows only
                core.sampling = core.sampling.update_rows([], pad_to=n)
            jax.block_until_ready(core.sampling)
            logging.info("warm-up compiled the sampler for row buckets %s", self.sampler_buckets)

    # ---- the loop -----------------------------------------------------------------------------------------------

    @property
    def sampling(self):
        """The sampler's per-slot state (`core.EngineCore.sampling`)."""
        return self.core.sampling

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.scheduler.has_work() or self._inflight)

    def step(self) -> list[RequestOutput]:
        """One scheduling step: admit, prefill chunks, decode, sample. Returns the outputs it emitted: this step's,
        or with `async_scheduling` the previous step's (read back after this one was dispatched)."""
        with self._lock:
            emitted: list[RequestOutput] = []
            self.scheduler.admit()
            if self._inflight is not None and not self.scheduler.can_plan_ahead():
                emitted += self._emit(self._take_inflight())
            plan = self.scheduler.schedule()  # admits again: into the slots of requests that just finished
            sampled_rows = {r.request_id: self.requests[r.request_id] for c in plan.calls for r in c.rows if r.sample}
            if not any(req.matcher is not None for req in sampled_rows.values()):
                dispatched, self.kv_cache = self.core.execute(plan, self.kv_cache, self.scheduler.proposal)
                sampled = self._track(dispatched, sampled_rows) or None
                if self._inflight is not None:
                    self.counters["steps_planned_ahead"] += sampled is not None
                    emitted += self._emit(self._take_inflight())
            else:
                # A constrained row's mask needs its previous token: the model calls are dispatched first, and the
                # masks are computed from the step in flight, read back while they run; then the sampler.
                logits, self.kv_cache = self.core.run(plan, self.kv_cache)
                if self._inflight is not None:
                    self.counters["steps_planned_ahead"] += 1
                    emitted += self._emit(self._take_inflight())
                masks = self._bitmasks(plan, logits, sampled_rows)
                sampled = self._track(self.core.sample(plan, logits, masks, self.scheduler.proposal), sampled_rows)
                sampled = sampled or None
            if self.core.hidden:
                emitted += self._emit_embeddings(self.core.hidden)
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
                _running.add(self)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self.has_work():
                    self._work.wait()
                if self._closed:
                    return
                try:
                    self.step()
                except EngineUnavailableError as e:  # its requests were failed by `mark_unavailable`
                    logging.error("engine step stopped: %s", e)
                except Exception as e:  # the engine must keep serving: fail what was running, keep the loop alive
                    logging.exception("engine step failed; failing the running requests")
                    if self.core.mirror is not None:  # the other processes' state may differ from here on
                        self.mark_unavailable(f"a step failed ({type(e).__name__}: {e})")
                    else:
                        self._fail_running("internal error during a model step")
            # The lock is not fair: re-taken at once, it kept add_request/abort/stats callers waiting for up to ~30
            # steps (measured). Step aside until the threads already waiting have had it (10 ms at most).
            deadline = time.monotonic() + 0.01
            while self._lock.waiting and time.monotonic() < deadline:
                time.sleep(0.0001)

    def forward(self, kind: str, ids: list[int], arg: int = 0):
        """A prefill-only forward over the engine's weights beside its steps (`embeddings.run_forward`: "hidden_states"
        or "prompt_logprobs"), between two steps: on a cluster, every process runs it in the same place among the
        plans (their collectives must meet), so process 0 sends it to them as it sends plans."""
        from novallm_jax.embeddings import run_forward

        with self._lock:
            if self.unavailable:
                raise EngineUnavailableError(self.unavailable)
            if self.core.mirror is not None:
                self.core.mirror("forward", None, forward={"kind": kind, "ids": list(ids), "arg": arg})
            return run_forward(self.executor, kind, ids, arg)

    def mark_unavailable(self, reason: str, timeout: float = 1.0) -> None:
        """Refuses new requests and fails every pending one with `EngineUnavailableError`'s message: the engine can
        serve no more (a process of its cluster is gone). It does not wait for a step that may never end (one blocked
        in a collective with a lost process): without the lock within `timeout` seconds, requests are failed as they
        stand, their pages left to the process's exit."""
        if self.unavailable:
            return
        message = self.unavailable = f"{EngineUnavailableError.PREFIX}: {reason}"
        locked = self._lock.acquire(timeout=timeout)
        try:
            self._inflight = None
            for req in list(self.requests.values()):
                if req.finished:
                    continue
                req.error = message
                if locked:
                    self._finish(req, FinishReason.ERROR)
                else:
                    req.status, req.finish_reason = Status.FINISHED, FinishReason.ERROR
                req.emit("", [])
            if locked:
                self._work.notify_all()
        finally:
            if locked:
                self._lock.release()

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

    # ---- sampling and outputs ----------------------------------------------------------------------------------

    @property
    def sampler_buckets(self) -> tuple[int, ...]:
        """Row counts the sampler is compiled for: those of the logits a step returns."""
        return self.executor.logits_row_counts()

    @staticmethod
    def _track(sampled: list[Sampled], requests: dict[str, Request]) -> list[_Sampled]:
        """The dispatched sampler calls with their requests, each of which now has one more token on the device."""
        results = []
        for s in sampled:
            rows: dict[str, list[int]] = {}
            for i, rid in enumerate(s.request_ids):
                if rid is not None:
                    rows.setdefault(rid, []).append(i)
            for rid in rows:
                requests[rid].pending += 1
            results.append(_Sampled([(requests[rid], idx) for rid, idx in rows.items()], s.arrays))
        return results

    def _bitmasks(
        self, plan: StepPlan, logits: list[jax.Array], requests: dict[str, Request]
    ) -> list[np.ndarray | None]:
        """Per model call, the token bitmask of its rows (all bits set for unconstrained and padding rows), or None
        for a call without a constrained row: such calls sample exactly as without structured outputs."""
        masks: list[np.ndarray | None] = []
        for call, out in zip(plan.calls, logits):
            rows = [
                (requests[r.request_id].matcher, i)
                for i, r in enumerate(call.rows)
                if r.sample
                and requests[r.request_id].matcher is not None
                and requests[r.request_id].status is Status.RUNNING
                and not requests[r.request_id].matcher.done
            ]
            if not rows:
                masks.append(None)
                continue
            mask = np.full((out.shape[0], bitmask_words(self.cfg.vocab_size)), -1, np.int32)
            fill_bitmasks(rows, mask)
            masks.append(mask)
        return masks

    def _emit(self, sampled: list[_Sampled]) -> list[RequestOutput]:
        """Reads sampled tokens back and appends them; rows of requests that ended meanwhile are dropped."""
        fetched = jax.device_get([s.arrays for s in sampled])
        emitted = []
        for s, (tokens, logprobs, top_ids, top_lps) in zip(sampled, fetched):
            for req, idx in s.rows:
                if req.status is not Status.RUNNING:  # stopped by an earlier token, cancelled, or failed
                    continue
                req.pending -= 1
                try:
                    draft = req.draft
                    n = speculative.accepted(tokens[idx], draft)
                    if draft:
                        req.metrics.draft_tokens += len(draft)
                        req.metrics.accepted_tokens += n
                        self.counters["draft_tokens"] += len(draft)
                        self.counters["accepted_tokens"] += n
                    for i in idx[: n + 1]:  # the accepted drafts and the draw after them
                        if req.status is not Status.RUNNING:
                            break
                        emitted.append(
                            self._append_token(req, int(tokens[i]), float(logprobs[i]), top_ids[i], top_lps[i])
                        )
                    if draft:
                        self.scheduler.settle(req, n)
                except Exception as e:  # a bad request must not take the others down
                    logging.exception("request %s failed while emitting output", req.id)
                    req.error = f"{type(e).__name__}: {e}"
                    self._finish(req, FinishReason.ERROR)
                    req.emit("", [])
        return emitted

    def _emit_embeddings(self, hidden: list[tuple[ModelCall, jax.Array]]) -> list[RequestOutput]:
        """Pools the hidden states a step returned into their embedding requests; finishes those whose prompt's last
        token was in it."""
        emitted = []
        for call, states in hidden:
            states = np.asarray(states)
            at = 0
            for i, r in enumerate(call.rows):
                n = len(r.tokens)
                own = states[at : at + n, 0] if call.kind == RAGGED else states[i, :n]
                at += n
                req = self.requests.get(r.request_id)
                if not r.hidden or req is None or req.status is not Status.RUNNING:
                    continue
                if req.pooling == "last":
                    req.pooled = own[-1]
                else:
                    req.pooled = own.sum(axis=0, dtype=np.float64) + (0 if req.pooled is None else req.pooled)
                if r.start + n == len(req.prompt):
                    scale = 1 if req.pooling == "last" else len(req.prompt)
                    req.embedding = (req.pooled / scale).astype(np.float32)
                    self._finish(req, FinishReason.STOP)
                    emitted.append(req.emit("", []))
        return emitted

    def _append_token(self, req: Request, token: int, logprob: float, top_ids, top_lps) -> RequestOutput:
        if req.metrics.first_token is None:
            req.metrics.first_token = time.monotonic()
        req.tokens.append(token)
        self.counters["generated_tokens"] += 1
        if req.logprobs is not None:
            n = req.params.logprobs or 0
            req.logprobs.append(
                TokenLogprob(token, logprob, {int(i): float(v) for i, v in zip(top_ids[:n], top_lps[:n])})
            )
        reason = None
        if req.matcher is not None:
            req.matcher.advance(token)  # a token its mask allowed; a refusal fails this request only (see _emit)
        if token in req.stop_token_ids:
            reason, delta = FinishReason.STOP, self._drain_text(req)
        else:
            delta, stopped = req.stop.feed(req.detokenizer.add(token))
            if stopped:
                reason = FinishReason.STOP
            elif self.scheduler.at_length(req, len(req.tokens)):
                reason, delta = FinishReason.LENGTH, delta + self._drain_text(req)
            elif req.matcher is not None and req.matcher.done:  # the text is complete: nothing but EOS may follow
                reason, delta = FinishReason.STOP, delta + self._drain_text(req)
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
        self.scheduler.finish(req, reason)

    def _fail_running(self, message: str) -> None:
        self._inflight = None
        for req in list(self.requests.values()):
            if req.status in (Status.RUNNING, Status.SWAPPED):
                req.error = message
                self._finish(req, FinishReason.ERROR)
                req.emit("", [])
        if any(a.is_deleted() for p in self.pools for a in jax.tree.leaves(p.storage)):
            self.kv_cache = self.executor.new_cache()  # a failed donated step consumed the cache
        if any(a.is_deleted() for a in jax.tree.leaves(self.core.sampling)):  # likewise a failed sample_slots
            self.core.reset_sampling()
        if self.drafter is not None:
            self.drafter.reset()

    @property
    def kv_cache(self):
        """The KV cache the steps run on: the pools' storages (one per KV cache group) as one pytree."""
        return self.executor.join_cache([p.storage for p in self.pools])

    @kv_cache.setter
    def kv_cache(self, cache) -> None:
        for pool, storage in zip(self.pools, self.executor.split_cache(cache)):
            pool.storage = storage

    # ---- accounting ---------------------------------------------------------------------------------------------

    def check_leaks(self) -> list[str]:
        """Pages or buffers held by anyone but the prefix cache, plus any mismatch in the cache's own accounting."""
        with self._lock:
            leaks = []
            for pool, cached in zip(self.pools, (self.prefix_cache.pages(), self.prefix_cache.window_pages())):
                leaks += [line for line in pool.check_leaks() if repr(pc.OWNER) not in line]
                held = set(pool.pages_of(pc.OWNER))
                if held != cached:
                    leaks.append(
                        f"prefix cache index ({len(cached)} pages) disagrees with the pool "
                        f"({len(held)} pages held by {pc.OWNER!r})"
                    )
            if self.drafter is not None:
                stale = self.drafter.requests() - {r.id for r in self.slots if r is not None}
                leaks += [f"the draft model still tracks {rid}, which is not running" for rid in sorted(stale)]
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
                "kv_bytes_per_device": bytes_per_device(self.kv_cache),
                **({} if self.drafter is None else {"draft_kv_bytes": bytes_per_device(self.drafter.cache)}),
                **(
                    {}
                    if self.window_pool is None
                    else {
                        "kv_window_pages_used": self.window_pool.num_pages - 1 - self.window_pool.num_free,
                        "kv_window_pages_free": self.window_pool.num_free,
                    }
                ),
                "prefix_cache_pages": len(self.prefix_cache),
                "prefix_cache_hit_rate": self.prefix_cache.hit_rate,
                **self.counters,
            }
