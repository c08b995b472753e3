"""The scheduler: the request queues and the memory pool's bookkeeping, turned into one `StepPlan` per step.

It admits requests into batch slots (swapped ones first), reserves their KV pages (evicting unused prefix-cache pages,
then preempting the newest running request by swap or recompute), and picks what each step computes: on CPU one
ragged batch (every decode row, then prompt chunks up to a token bucket), elsewhere padded prefill and decode calls.
A request's tokens count as computed when they are planned, as in vLLM's scheduler: the plan is executed before the
next one is made. It runs no model: `core.EngineCore` executes its plans.

A model whose sliding-window layers have a KV cache group of their own (`kv_cache.window_groups`) gives each request a
second page table, from a second pool: before each step a request is planned in, its window-group pages that lie
wholly behind the window of its next query (the page's last position <= that position - window) go back to that
pool and their entries become the null page; so the group holds about window / page_size + 1 pages per sequence
however long it grows, while the full group's pages grow with its length.

Copy-on-write is a plan operation: the pool takes the private page at once, and the plan's `copies` tell the core to
copy the contents before the step's calls, so every process holding a shard of the cache makes the same copy. Swap
(out and in) copies between the device and the host at once, on the local cache: a cluster of processes preempts by
recompute instead.
"""

from __future__ import annotations

import collections
import math
import time

from absl import logging

from novallm_jax.amp import MemoryPool
from novallm_jax.engine import prefix_cache as pc
from novallm_jax.engine import speculative
from novallm_jax.engine.draft import DraftModel, DraftRow, Proposal
from novallm_jax.engine.executor import ExecutorConfig, bucket
from novallm_jax.engine.plan import DECODE, PREFILL, RAGGED, ModelCall, Row, SlotUpdate, StepPlan
from novallm_jax.engine.request import FinishReason, Request, Status
from novallm_jax.kv_cache import NULL_PAGE


class Scheduler:
    """Queues, slots and pages of the engine's requests. Not thread-safe: the engine calls it under its lock."""

    def __init__(
        self,
        pool: MemoryPool,
        exec_cfg: ExecutorConfig,
        *,
        ragged: bool,
        max_model_len: int,
        max_prefill_rows: int,
        enable_prefix_caching: bool,
        preemption_mode: str,
        long_context: int | None = None,
        window_pool: MemoryPool | None = None,
        window: int | None = None,
        drafter: DraftModel | None = None,
    ):
        self.pool = pool
        # Speculative decoding's drafts: a draft model's (`draft.DraftModel`), or by prompt lookup when None.
        self.drafter = drafter
        # The draft model's drafts for the last plan, with the logits they were drawn from (the sampler's verification
        # reads them; device arrays, so not part of the plan, which speculative decoding never sends elsewhere).
        self.proposal = Proposal({})
        # The window group's pool and window (sliding layers' pages, see the module docstring); None: one group.
        self.window_pool, self.window = window_pool, window
        self.exec_cfg = exec_cfg
        self.ragged = ragged
        self.page_size = exec_cfg.page_size
        self.max_model_len = max_model_len
        self.max_prefill_rows = max_prefill_rows
        self.enable_prefix_caching = enable_prefix_caching
        self.preemption_mode = preemption_mode
        # longrope (Phi-3): a prompt longer than this rotates every key with the long factors, so its cached pages
        # must not serve a shorter prompt with the same tokens (nor the reverse).
        self.long_context = long_context
        self.prefix_cache = pc.PrefixCache(pool, self.page_size, window_pool, window)
        for p in self.pools:  # each plan carries what was done to page contents since the last one (`pool_ops`)
            p.journal = []
        self.slots: list[Request | None] = [None] * exec_cfg.max_decode_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.swapped: collections.deque[Request] = collections.deque()
        self.requests: dict[str, Request] = {}
        self.counters = collections.Counter()
        self._slot_updates: list[SlotUpdate] = []  # for the next plan
        # Copy-on-write for the next plan: (request, KV cache group, src page, dst page).
        self._copies: list[tuple[Request, int, int, int]] = []
        self._steps = 0

    # ---- requests -------------------------------------------------------------------------------------------------

    def add(self, req: Request) -> None:
        self.requests[req.id] = req
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.swapped or any(self.slots))

    def finish(self, req: Request, reason: FinishReason) -> None:
        """Frees everything the request holds; it stays in `requests` only until its final output is emitted."""
        if req.status is Status.WAITING and req in self.waiting:
            self.waiting.remove(req)
        if req.status is Status.SWAPPED and req in self.swapped:
            self.swapped.remove(req)
            if req.swap_handle is not None:
                self.pool.drop_swapped(req.swap_handle)
                req.swap_handle = None
        self._release_slot(req)
        self._free_all(req)
        if self.drafter is not None:
            self.drafter.forget(req.id)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.metrics.finished = time.monotonic()
        self.counters[f"finished_{reason.value}"] += 1
        self.requests.pop(req.id, None)

    # ---- admission and pages --------------------------------------------------------------------------------------

    def _free_slot(self) -> int | None:
        return next((i for i, r in enumerate(self.slots) if r is None), None)

    def admit(self) -> None:
        """Resumes swapped requests first (they were admitted earlier), then waiting ones, while slots and pages last."""
        while self.swapped and (slot := self._free_slot()) is not None:
            req = self.swapped[0]
            first, handle = req.window_swap or (0, None)
            if not self._reserve(req.swap_handle.num_pages, handle.num_pages if handle else 0):
                return
            req.pages = self.pool.swap_in(req.swap_handle)
            req.swap_handle = None
            if req.window_swap is not None:
                req.window_pages = [NULL_PAGE] * first + (self.window_pool.swap_in(handle) if handle else [])
                req.window_swap = None
            self.swapped.popleft()
            self._place(req, slot)
        while self.waiting and (slot := self._free_slot()) is not None:
            req = self.waiting[0]
            if req.metrics.first_scheduled is None:
                req.metrics.first_scheduled = time.monotonic()
            if self.enable_prefix_caching and not req.page_hashes:
                long = self.long_context is not None and len(req.prompt) > self.long_context
                req.page_hashes = pc.page_hashes(
                    req.prompt,
                    self.page_size,
                    (len(req.prompt) - 1) // self.page_size,
                    salt=b"longrope" if long else b"",
                )
            need = math.ceil(len(req.tokens) / self.page_size)
            if self.enable_prefix_caching and req.pooling != "mean":  # mean pooling needs every token's state
                req.pages, req.window_pages = self.prefix_cache.match(req.id, req.page_hashes)
                req.num_cached_pages = len(req.pages)
                req.num_computed = len(req.pages) * self.page_size
                req.metrics.cached_prompt_tokens = req.num_computed
            # The window group needs pages for the first step only: the earlier ones return before the next.
            need_window = min(need - len(req.pages), math.ceil(self._step_cap / self.page_size) + 1)
            if not self._reserve(need - len(req.pages), need_window if self.window_pool else 0):
                self._free_all(req)
                req.num_computed, req.num_cached_pages = 0, 0
                return
            self.waiting.popleft()
            self._place(req, slot)

    def _place(self, req: Request, slot: int) -> None:
        req.slot, req.status = slot, Status.RUNNING
        self.slots[slot] = req
        if req.pooling is None:  # an embedding request samples nothing: its row needs no sampling state
            self._slot_updates.append(SlotUpdate(slot, req.params, tuple(req.prompt), tuple(req.output_ids)))

    def _release_slot(self, req: Request) -> None:
        if req.slot is not None:
            self.slots[req.slot] = None
            if req.pooling is None:
                self._slot_updates.append(SlotUpdate(req.slot))
            req.slot = None

    def _reserve(self, n: int, n_window: int = 0) -> bool:
        """Whether `n` pages (and `n_window` of the window group) are free, evicting unused prefix-cache pages if that
        helps."""
        short = n - self.pool.num_free
        if short > 0:
            self.prefix_cache.evict(short)
        if self.window_pool is not None and n_window > self.window_pool.num_free:
            self.prefix_cache.evict_window(n_window - self.window_pool.num_free)
        return self.pool.num_free >= n and (self.window_pool is None or self.window_pool.num_free >= n_window)

    def _free_all(self, req: Request) -> None:
        """Frees every page `req` holds, in both groups, and its host copies."""
        self.pool.free_all(req.id)
        req.pages = []
        if self.window_pool is not None:
            self.window_pool.free_all(req.id)
            req.window_pages, req.window_swap = [], None

    def _window_first(self, req: Request) -> int:
        """The first window-group page that `req`'s next query (and every later one) can see."""
        return max(0, req.num_computed - self.window + 1) // self.page_size

    def _recycle_window_pages(self, req: Request) -> None:
        """Returns `req`'s window-group pages behind the window of its next query to the pool."""
        first = min(self._window_first(req), len(req.window_pages))
        behind = [p for p in req.window_pages[:first] if p != NULL_PAGE]
        if behind:
            self.window_pool.free(req.id, behind)
            req.window_pages[:first] = [NULL_PAGE] * first
            self.counters["window_pages_recycled"] += len(behind)

    def _ensure_pages(self, req: Request, upto: int) -> bool:
        """Gives `req` pages for positions < upto, preempting newer requests if needed; False if `req` was preempted."""
        if self.window_pool is not None:
            self._recycle_window_pages(req)
        while True:
            need = math.ceil(upto / self.page_size) - len(req.pages)
            need_window = math.ceil(upto / self.page_size) - len(req.window_pages) if self.window_pool else 0
            if need <= 0 and need_window <= 0:
                break
            if self._reserve(need, need_window):
                if need > 0:
                    req.pages += self.pool.allocate(req.id, need)
                if need_window > 0:
                    req.window_pages += self.window_pool.allocate(req.id, need_window)
                break
            victim = max((r for r in self.slots if r is not None), key=lambda r: r.metrics.arrival)
            self._preempt(victim)
            if victim is req:
                return False
        # Copy-on-write before writing into a page someone else also holds.
        idx = req.num_computed // self.page_size
        if req.num_computed % self.page_size and idx < len(req.pages):
            req.pages[idx] = self._writable(req, 0, req.pages[idx])
            if self.window_pool is not None and req.window_pages[idx] != NULL_PAGE:
                req.window_pages[idx] = self._writable(req, 1, req.window_pages[idx])
        return True

    def _writable(self, req: Request, group: int, page: int) -> int:
        new = self.pools[group].make_writable(req.id, page, copy=False)
        if new != page:
            self._copies.append((req, group, page, new))
        return new

    @property
    def pools(self) -> tuple[MemoryPool, ...]:
        return (self.pool,) if self.window_pool is None else (self.pool, self.window_pool)

    def _take_copies(self, req: Request | None = None) -> list[tuple[int, int, int]]:
        """The pending copies (of `req`, or all) as (group, src, dst), forgotten here; those into a page the
        request no longer holds (it was preempted since) are dropped."""
        taken = [c for c in self._copies if req is None or c[0] is req]
        self._copies = [c for c in self._copies if req is not None and c[0] is not req]
        return [(g, src, dst) for r, g, src, dst in taken if dst in (r.pages, r.window_pages)[g]]

    def _preempt(self, req: Request) -> None:
        if req.pending:  # `can_plan_ahead` makes the engine read the step in flight back before anything may preempt
            raise RuntimeError(f"preempting {req.id} with a token still on the device")
        logging.info("preempting %s (%s) to free %d pages", req.id, self.preemption_mode, len(req.pages))
        req.metrics.preemptions += 1
        self.counters["preemptions"] += 1
        self._release_slot(req)
        if self.drafter is not None:  # its pages are freed or move, and others may write into them
            self.drafter.forget(req.id)
        if self.preemption_mode == "swap" and req.num_computed > 0:
            for g, src, dst in self._take_copies(req):  # its host copy must hold them
                self.pools[g].copy_pages([(src, dst)])
            req.swap_handle = self.pool.swap_out(req.id, req.pages)
            if self.window_pool is not None:  # its pages still held, a tail of its window table
                live = [p for p in req.window_pages if p != NULL_PAGE]
                handle = self.window_pool.swap_out(req.id, live) if live else None
                req.window_swap, req.window_pages = (len(req.window_pages) - len(live), handle), []
            req.status = Status.SWAPPED
            self.swapped.append(req)
        else:
            self._free_all(req)
            req.num_computed, req.num_cached_pages = 0, 0
            req.pooled = None  # its states are computed again
            req.status = Status.WAITING
            self.waiting.appendleft(req)
        req.pages = []

    def can_plan_ahead(self) -> bool:
        """Whether the next step can be planned before the step in flight is read back: it must not preempt anyone
        (a preempted request would leave with a token still on the device), so every page it may need must be free.
        Nothing is evicted for it: when pages are short, the step waits and plans as a synchronous one would. Rows
        whose next lookups are known to miss (`_may_find_draft`) do not hold it back: their misses count here.
        """
        drafting, share = self._drafting(
            [r for r in self.slots if r is not None and r.num_tokens - r.num_computed == 1]
        )
        if share > 0:
            if any(self._may_find_draft(r) for r in drafting):
                return False  # a row may draft, which needs its last token on the host
            for req in drafting:  # their lookups are known to miss: counted so, without waiting for the tokens
                self._missed_lookup(req)
        cap = self._step_cap
        need = need_window = 0
        for req in self.slots:
            if req is not None:
                pages = math.ceil((req.num_computed + min(req.num_tokens - req.num_computed, cap)) / self.page_size)
                need += max(0, pages - len(req.pages)) + 1  # + 1: a copy-on-write page
                need_window += max(0, pages - len(req.window_pages)) + 1
        return self.pool.num_free >= need and (self.window_pool is None or self.window_pool.num_free >= need_window)

    # ---- planning -------------------------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Admits what fits, then plans this step's model calls; their tokens count as computed from here on."""
        self.admit()
        self.proposal = Proposal({})
        calls = self._plan_ragged() if self.ragged else self._plan_padded()
        updates, self._slot_updates = tuple(self._slot_updates), []
        self._steps += 1
        ops = tuple((g, op) for g, pool in enumerate(self.pools) for op in pool.take_journal())
        return StepPlan(self._steps, updates, tuple(calls), tuple(self._take_copies()), ops)

    def _plan_ragged(self) -> list[ModelCall]:
        """One ragged call: every decode row, then prompt chunks, oldest first, up to the step's token budget.

        Only the call's total is padded (to a token bucket), so prompts are cut wherever the budget ends.
        """
        running = sorted((r for r in self.slots if r is not None), key=lambda r: r.metrics.arrival)
        lengths, drafts = self._draft_lengths([r for r in running if r.num_tokens - r.num_computed == 1])
        budget = self._ragged_budget(running, sum(lengths.values()))
        picked: list[tuple[Request, int, int]] = []  # (request, tokens, drafts)
        for decoding in (True, False):
            for req in running:
                remaining = req.num_tokens - req.num_computed
                if (remaining == 1) != decoding or req.status is not Status.RUNNING or budget <= 0:
                    continue
                if self._done_when_read(req):
                    continue
                n = min(remaining, budget)
                k = min(lengths.get(req.id, 0), budget - 1) if decoding else 0
                if self._ensure_pages(req, req.num_computed + n + k):
                    picked.append((req, n, k))
                    budget -= n + k
        rows = self._rows(self._with_drafts(picked, drafts))
        return [ModelCall(RAGGED, rows)] if rows else []

    def _plan_padded(self) -> list[ModelCall]:
        """A prefill call for chunks of prompts that share a length bucket, then a decode call for every decode row."""
        running = [r for r in self.slots if r is not None]
        # An embedding request's rows are prompt chunks to the end (decode calls return no hidden states).
        prompt = lambda r: r.num_tokens - r.num_computed > (0 if r.pooling else 1)
        prefill = []
        for req in self._pick_prefill([r for r in running if prompt(r)]):
            n = self._chunk_len(req)
            # A request picked above may have been preempted to make room for an older one.
            if req.status is Status.RUNNING and self._ensure_pages(req, req.num_computed + n):
                prefill.append((req, n, ()))
        decoding = [
            r
            for r in self.slots
            if r is not None
            and r.pooling is None
            and r.num_tokens - r.num_computed == 1
            and not self._done_when_read(r)
        ]
        lengths, drafts = self._draft_lengths(decoding)
        # A row another row's pages preempted (the newest go first) is skipped: it holds no pages now.
        k = lambda r: lengths.get(r.id, 0)
        decode = [
            (r, 1, k(r)) for r in decoding if r.status is Status.RUNNING and self._ensure_pages(r, r.num_tokens + k(r))
        ]
        calls = [
            ModelCall(kind, rows)
            for kind, rows in ((PREFILL, self._rows(prefill)), (DECODE, self._rows(self._with_drafts(decode, drafts))))
            if rows
        ]
        return calls

    def _drafting(self, decoding: list[Request]) -> tuple[list[Request], int]:
        """The decode rows that may draft (speculative, drafting not paused) and each one's share of the step's draft
        tokens (`ExecutorConfig.draft_step_tokens`, less a token per decode row)."""
        drafting = [r for r in decoding if r.params.speculative and r.num_tokens >= r.draft_resume]
        return drafting, (self.exec_cfg.draft_step_tokens - len(decoding)) // max(len(drafting), 1)

    def _may_find_draft(self, req: Request) -> bool:
        """Whether a decode row's next lookup, once its token on the device is here, may find a draft (if not, the
        step need not wait for that token). A copying request's lookups may match that token alone."""
        if self.drafter is not None or not req.pending or self._copying(req):
            return True
        return speculative.may_find(req.tokens)

    def _draft_lengths(self, decoding: list[Request]) -> tuple[dict[str, int], dict[str, tuple[int, ...]]]:
        """How many tokens each of a step's decode rows drafts, and their drafts where prompt lookup makes them
        (known now; a draft model's only once the rows' pages are there, since it writes K/V: `_with_drafts`)."""
        drafting, share = self._drafting(decoding)
        lengths = {r.id: self._draft_length(r, share) for r in drafting}
        if self.drafter is not None:
            return lengths, {}
        drafts = {}
        for rid, k in lengths.items():
            req = self.requests[rid]
            # A text that copies keeps copying from where its last drafts came from: of the occurrences of its last
            # n-gram, the one nearest there (the latest one is often an earlier copy of the same words); one that
            # does not yet copy drafts from 3-grams only.
            near, least = None, speculative.UNPROVEN_MIN_NGRAM
            if self._copying(req):
                least = speculative.MIN_NGRAM
                if req.copy_shift is not None:
                    near = req.num_tokens + req.copy_shift
            req.draft_source, drafts[rid] = speculative.lookup(req.tokens, k, min_ngram=least, near=near)
        for rid in (rid for rid, k in lengths.items() if k):
            if drafts[rid]:
                self.requests[rid].lookup_misses = 0
            else:
                self._missed_lookup(self.requests[rid])
        return {rid: len(d) for rid, d in drafts.items()}, drafts

    def _missed_lookup(self, req: Request) -> None:
        """A prompt lookup of `req`'s found nothing: its last n-gram does not recur, so it looks again later."""
        req.lookup_misses += 1
        if not self._copying(req):
            self._pause(req, req.lookup_misses, first=1)

    def _rows(self, picked: list[tuple[Request, int, tuple[int, ...]]]) -> tuple[Row, ...]:
        """The rows of the picked (request, tokens, drafted tokens) that are still running (a later pick may have
        preempted an earlier one); their tokens count as computed from now (drafts once accepted, see `settle`)."""
        rows = []
        for req, n, draft in picked:
            if req.status is not Status.RUNNING:
                continue
            if req.pending:  # then n == 1: a decode row fed by the sampler's last token for the slot
                tokens, from_slot = (0,), req.slot
            else:
                tokens, from_slot = tuple(req.tokens[req.num_computed : req.num_computed + n]), -1
            start, first = req.num_computed, 0
            if self.window_pool is not None:
                first = next((i for i, p in enumerate(req.window_pages) if p != NULL_PAGE), len(req.window_pages))
            sample = self._advance(req, n)
            # An embedding request's states: of every chunk for a mean, of the last one for the last token's.
            hidden = req.pooling is not None and (sample or req.pooling == "mean")
            sample = sample and req.pooling is None
            req.draft = draft
            rows.append(
                Row(
                    req.id,
                    req.slot,
                    tokens + draft,
                    start,
                    tuple(req.pages),
                    sample,
                    from_slot,
                    len(req.prompt),
                    len(draft),
                    tuple(req.window_pages[first:]),
                    first,
                    hidden,
                )
            )
        return tuple(rows)

    def _draft_length(self, req: Request, share: int) -> int:
        """Tokens to draft for a decode row whose last token is on the host: at most its share of the step's draft
        tokens (in ragged steps; padded ones only need a share), and what its length allows (the step may add them
        all and one more)."""
        if req.pending or req.num_tokens - req.num_computed != 1:
            return 0
        left = min((req.params.max_tokens or math.inf) - len(req.output_ids), self.max_model_len - req.num_tokens)
        cap = int(min(req.params.speculative, self.exec_cfg.max_draft_tokens, left - 1))
        if min(cap, share) <= 0:
            return 0
        if not self.ragged:  # a padded verifying row computes 1 + max_draft_tokens positions whatever it drafts
            return cap
        cap = min(cap, share)
        k = speculative.draft_length(cap, *req.last_draft, copying=self._copying(req))
        # A row alone in its step pads to a token bucket: draft what fills the bucket that k falls in (3 for 2, into 4
        # rows), or, past the cap, the largest bucket below it (7 rather than 8 into 16 rows). Rounding up keeps a
        # length that grows from 1 growing, where rounding down left it at 1 for good.
        fills = [b - 1 for b in self.exec_cfg.token_buckets if 1 <= b - 1 <= cap]
        return min((f for f in fills if f >= k), default=max(fills, default=k))

    def _with_drafts(
        self, picked: list[tuple[Request, int, int]], lookup: dict[str, tuple[int, ...]]
    ) -> list[tuple[Request, int, tuple[int, ...]]]:
        """The picked (request, tokens, drafts wanted) with their drafts: the first of those prompt lookup found, or
        the draft model's for the requests still running (a later pick may have preempted an earlier one)."""
        if self.drafter is None:
            return [(req, n, lookup.get(req.id, ())[:k]) for req, n, k in picked]
        live = [(req, k) for req, _, k in picked if k and req.status is Status.RUNNING]
        self.proposal = self.drafter.propose(
            [
                DraftRow(
                    req.id,
                    req.tokens,
                    req.pages,
                    k,
                    0.0 if req.params.greedy else req.params.temperature,
                    req.params.seed or 0,
                )
                for req, k in live
            ]
        )
        return [(req, n, self.proposal.tokens.get(req.id, ())) for req, n, _ in picked]

    def settle(self, req: Request, accepted: int) -> None:
        """After a step verified `req.draft`: the first `accepted` drafts are its tokens now (their KV is computed);
        the pages that only the rejected ones reached go back to the pool. A draft rejected at its first token pauses
        the request's drafting (`speculative.pause_after`; a copying request's first such miss does not), and a
        lookup's draft moves where the request copies from (`Request.copy_shift`)."""
        req.last_draft = (len(req.draft), accepted)
        if req.draft and req.draft_source >= 0:  # past the kept drafts and the step's own token
            req.copy_shift = req.draft_source + accepted + 1 - req.num_tokens
        req.draft_misses = 0 if accepted else req.draft_misses + 1
        # A request that copies takes its next draft from a new occurrence: its first miss in a row does not pause it.
        misses = req.draft_misses - self._copying(req)
        if misses > 0:
            self._pause(req, misses, first=2)
        req.draft = ()
        if req.status is not Status.RUNNING:
            return
        req.num_computed += accepted
        keep = math.ceil((req.num_computed + 1) / self.page_size)
        if len(req.pages) > keep:
            self.pool.free(req.id, req.pages[keep:])
            req.pages = req.pages[:keep]
        if len(req.window_pages) > keep:
            self.window_pool.free(req.id, [p for p in req.window_pages[keep:] if p != NULL_PAGE])
            req.window_pages = req.window_pages[:keep]

    def _copying(self, req: Request) -> bool:
        """Whether `req` drafts by prompt lookup and its drafts have been kept at `speculative.COPYING` or better so far
        (none drafted: no). A draft model's drafts do not come from an occurrence in the text."""
        m = req.metrics
        return self.drafter is None and m.draft_tokens > 0 and m.accepted_tokens >= speculative.COPYING * m.draft_tokens

    def _pause(self, req: Request, misses: int, first: int) -> None:
        """No drafts from `req` for a while after `misses` misses in a row (`speculative.pause_after`), longer with
        more requests running: a step that may draft waits for its rows' last tokens, which holds up every row."""
        running = sum(r is not None for r in self.slots)
        req.draft_resume = req.num_tokens + speculative.pause_after(misses, first * max(running, 1))

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
        return req.pending > 0 and self.at_length(req, req.num_tokens)

    def at_length(self, req: Request, num_tokens: int) -> bool:
        """Whether `req` stops by length (max_tokens, or the model's context) once it has `num_tokens` tokens."""
        return num_tokens - len(req.prompt) >= (req.params.max_tokens or math.inf) or num_tokens >= self.max_model_len

    @property
    def _step_cap(self) -> int:
        """The most tokens of one sequence that one step computes."""
        return max(self.exec_cfg.token_buckets[-1], self.exec_cfg.max_chunk)

    def _ragged_budget(self, running: list[Request], drafted: int = 0) -> int:
        """Tokens for this ragged step: every decode row, and prompt tokens up to a token bucket.

        A large step that would end between two buckets stops at the lower one: the prompt tokens left over join
        the next step, whose decode rows they would otherwise pad. Small steps pad instead, since a step costs a
        read of every weight however few its tokens.
        """
        e = self.exec_cfg
        remaining = [r.num_tokens - r.num_computed for r in running]
        decode = sum(n == 1 for n in remaining) + drafted
        total = min(sum(remaining) + drafted, e.token_buckets[-1])
        lower = max((b for b in e.token_buckets if b <= total), default=0)
        return lower if lower > decode and lower >= 2 * e.max_decode_batch else total

    def _chunk_len(self, req: Request) -> int:
        """Tokens of `req`'s next prefill chunk: the largest length bucket that its remaining prompt fills.

        A chunk is padded to its bucket, and prefill is compute-bound, so a 200-token prompt runs as 128 + 64 + 8
        rather than as one 256-token chunk with 56 tokens of padding; only the last piece (< the smallest bucket) pads.
        """
        remaining = req.num_tokens - req.num_computed
        filled = [b for b in self.exec_cfg.prefill_len_buckets if b <= remaining]
        return filled[-1] if filled else remaining

    def _pick_prefill(self, candidates: list[Request]) -> list[Request]:
        """The oldest request's chunk, plus others whose chunks fall in the same length bucket.

        A prefill step pads every row to the longest chunk's bucket and to a row bucket: rows share one length bucket
        and their count is a row bucket exactly (3 rows padded to 4 would cost as much as 4).
        """
        if not candidates:
            return []
        e = self.exec_cfg
        length = lambda r: bucket(self._chunk_len(r), e.prefill_len_buckets)
        candidates = sorted(candidates, key=lambda r: r.metrics.arrival)
        first = length(candidates[0])
        same = [r for r in candidates if length(r) == first][: self.max_prefill_rows]
        fits = [b for b in e.prefill_batch_buckets if b <= len(same)]
        return same[: fits[-1]] if fits else same

    def _cache_prompt_pages(self, req: Request) -> None:
        if not self.enable_prefix_caching:
            return
        full = min(req.num_computed // self.page_size, len(req.page_hashes))
        if full > req.num_cached_pages:
            self.prefix_cache.insert(req.id, req.page_hashes[:full], req.pages[:full], req.window_pages[:full])
            req.num_cached_pages = full
