"""The engine core: executes step plans on the executor and dispatches the sampler, knowing nothing of queues.

Executing a plan needs only the params (in the executor), the paged KV cache and the sampler's per-slot state, so a
process that holds a shard of them can execute the plans another process makes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from novallm_jax.amp.page_heap import copy_pages
from novallm_jax.engine.draft import Proposal
from novallm_jax.engine.executor import Executor, PrefillChunk
from novallm_jax.engine.plan import DECODE, PREFILL, RAGGED, ModelCall, StepPlan
from novallm_jax.sampling import SamplingBatch, plain_greedy, sample_slots, sample_slots_argmax, sample_slots_greedy
from novallm_jax.sampling_params import MAX_LOGPROBS, SamplingParams


@dataclasses.dataclass
class Sampled:
    """One sampler call of a step: the sampled rows' request ids (row i of the arrays is `request_ids[i]`'s, or padding
    when None) and the output arrays, still on the device."""

    request_ids: list[str | None]
    arrays: tuple[jax.Array, ...]


class EngineCore:
    """Runs `StepPlan`s: slot updates, then each model call and the sampling of its rows."""

    def __init__(self, executor: Executor, num_slots: int, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.executor = executor
        self.num_slots = num_slots
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        # Called as mirror("run", plan) and mirror("sample", plan, bitmasks) before this core does either, so that
        # the processes holding the other shards run the same (see `novallm_jax.distributed`); None: one process.
        self.mirror = None
        # The final hidden states of the last `run`'s calls that have `Row.hidden` rows (embedding requests), with
        # their call, still on the device: [tokens, 1, D] for a ragged call, [rows, chunk, D] for a prefill call.
        self.hidden: list[tuple[ModelCall, jax.Array]] = []
        self.reset_sampling()

    def execute(self, plan: StepPlan, storage, proposal: Proposal | None = None) -> tuple[list[Sampled], object]:
        """Executes `plan` on `storage` (donated); returns the sampler calls (tokens still on the device) and the
        updated storage. `proposal`: the draft model's for the plan (see `sample`)."""
        # A draft model's sampled drafts are verified against its logits: those steps need the target's.
        logits, storage = self.run(plan, storage, greedy=proposal is None or proposal.logits is None)
        return self.sample(plan, logits, proposal=proposal), storage

    def run(self, plan: StepPlan, storage, greedy: bool = False) -> tuple[list[jax.Array], object]:
        """The page copies, slot updates and model calls of `plan`: each call's logits (on the device) and the
        storage. `greedy`: a call whose sampled rows are all `plain_greedy` (and may be sampled without a bitmask)
        may return their argmax in place of the logits, from the executor's greedy head."""
        if self.mirror is not None:
            self.mirror("run", plan)
        storage = self._copy_pages(plan, storage)
        if plan.slot_updates:  # one call for them all: a wave of short requests sets and clears many rows per step
            rows = [(u.slot, u.params, u.prompt_token_ids, u.output_token_ids) for u in plan.slot_updates]
            self.sampling = self.sampling.update_rows(rows, self.eos_token_ids)
        for u in plan.slot_updates:
            self.slot_params[u.slot] = u.params
        out, self.hidden = [], []
        for call in plan.calls:
            logits, storage, *states = self._run(call, storage, greedy and self._argmax_only(call))
            out.append(logits)
            if states:
                self.hidden.append((call, states[0]))
        return out, storage

    def sample(
        self,
        plan: StepPlan,
        logits: list[jax.Array],
        bitmasks: list[np.ndarray | None] | None = None,
        proposal: Proposal | None = None,
    ) -> list[Sampled]:
        """Dispatches the sampler for each call with rows to sample; `bitmasks[i]` (int32 [rows, ceil(V / 32)], or
        None) restricts call i's rows to the tokens whose bits are set (structured outputs). `proposal`: a draft
        model's drafts drawn at a temperature, which the sampler verifies against the draft's distribution."""
        if self.mirror is not None:
            self.mirror("sample", plan, bitmasks)
        return [
            self._sample(call, out, None if bitmasks is None else bitmasks[i], proposal)
            for i, (call, out) in enumerate(zip(plan.calls, logits))
            if any(r.sample for r in call.rows)
        ]

    def _copy_pages(self, plan: StepPlan, storage):
        if not plan.copies:
            return storage
        groups = list(self.executor.split_cache(storage))
        for g in range(len(groups)):
            pairs = [(src, dst) for group, src, dst in plan.copies if group == g]
            if pairs:
                groups[g] = copy_pages(groups[g], pairs)
        return self.executor.join_cache(groups)

    def _argmax_only(self, call: ModelCall) -> bool:
        """Whether `call` can return its rows' argmax instead of their logits: every sampled row plain greedy, no
        hidden states, drafts only in a ragged call (a greedy row's draws at its drafted positions are argmaxes too),
        and few enough logits rows for the greedy head."""
        sampled = [r for r in call.rows if r.sample]
        return (
            (call.kind == RAGGED or (call.kind == DECODE and not any(r.draft for r in call.rows)))
            and bool(sampled)
            and not any(r.hidden for r in call.rows)
            and all(plain_greedy(self.slot_params[r.slot]) for r in sampled)
            and self.executor.argmax_fits(call.rows)
        )

    def _run(self, call: ModelCall, storage, argmax: bool = False):
        chunks = [
            PrefillChunk(
                list(r.tokens),
                r.start,
                list(r.pages),
                from_slot=r.from_slot,
                prompt_len=r.prompt_len,
                logits=1 + r.draft,
                window_pages=list(r.window_pages),
                window_first=r.window_first,
            )
            for r in call.rows
        ]
        hidden = any(r.hidden for r in call.rows)
        if call.kind == RAGGED:
            return self.executor.ragged_step(storage, chunks, self.sampling.last_token, hidden=hidden, argmax=argmax)
        if call.kind == PREFILL:
            return self.executor.prefill(storage, chunks, padded=True, hidden=hidden)
        if call.kind == DECODE and any(r.draft for r in call.rows):
            return self.executor.verify(storage, chunks, self.sampling.last_token)
        if call.kind == DECODE:
            return self.executor.decode(
                storage,
                [c.tokens[0] for c in chunks],
                [c.start for c in chunks],
                [c.pages for c in chunks],
                padded=True,
                from_slots=[c.from_slot for c in chunks],
                last_tokens=self.sampling.last_token,
                window_tables=[(c.window_first, c.window_pages) for c in chunks],
                argmax=argmax,
            )
        raise ValueError(f"unknown model call kind {call.kind!r}")

    def _sample(
        self, call: ModelCall, logits: jax.Array, bitmask: np.ndarray | None, proposal: Proposal | None
    ) -> Sampled:
        # The logits (one array per model call, padded to a row bucket) are sampled in place: their rows map to their
        # requests' slots, and the rest are padding rows (slot -1). No gather, so no shape beyond the warm-up's, and
        # the work scales with the step's row bucket, not with num_slots.
        # A row verifying drafted tokens has a logits row per position (see `Row.draft`), each drawn as its slot's
        # next-but-j token.
        slots = np.full(logits.shape[0], -1, np.int32)
        offsets = np.zeros(logits.shape[0], np.int32)
        ids: list[str | None] = [None] * logits.shape[0]
        # Position j of a row with sampled drafts verifies its draft j against the draft model's logits row.
        drafted = proposal is not None and proposal.logits is not None
        draft_rows = np.full(logits.shape[0], -1, np.int32)
        draft_tokens = np.full(logits.shape[0], -1, np.int32)
        at = 0
        for r in call.rows:
            if r.sample:
                slots[at : at + 1 + r.draft] = r.slot
                offsets[at : at + 1 + r.draft] = np.arange(1 + r.draft)
                ids[at : at + 1 + r.draft] = [r.request_id] * (1 + r.draft)
                if drafted and r.draft and r.request_id in proposal.rows:
                    draft_rows[at : at + r.draft] = proposal.rows[r.request_id]
                    draft_tokens[at : at + r.draft] = r.tokens[-r.draft :]
            at += 1 + r.draft
        params = [self.slot_params[s] for s in slots if s >= 0]
        n_top = MAX_LOGPROBS if any((p.logprobs or 0) > 0 for p in params) else 0
        # No keyword at all when unused: the warmed-up program.
        extra = ({} if bitmask is None else {"bitmask": bitmask}) | ({"offsets": offsets} if offsets.any() else {})
        if (draft_tokens >= 0).any():
            extra |= {"draft_logits": _rows_of(proposal.logits, draft_rows), "draft_tokens": draft_tokens}
        if logits.ndim == 1:  # the rows' argmax (`_argmax_only`): their draws whatever their offsets
            if set(extra) - {"offsets"}:
                raise ValueError("a step that returned its rows' argmax has rows to sample with a mask or a draft's q")
            result, self.sampling = sample_slots_argmax(logits, slots, self.sampling)
        elif not extra and all(plain_greedy(p) for p in params):
            result, self.sampling = sample_slots_greedy(logits, slots, self.sampling)
        else:
            result, self.sampling = sample_slots(logits, slots, self.sampling, num_top_logprobs=n_top, **extra)
        return Sampled(ids, (result.tokens, result.logprobs, result.top_ids, result.top_logprobs))

    def reset_sampling(self) -> None:
        """An empty sampler state: at start, and after a failed step (which fails every running request)."""
        self.sampling = SamplingBatch.from_params([None] * self.num_slots, self.vocab_size)
        self.slot_params: list[SamplingParams | None] = [None] * self.num_slots


@jax.jit
def _rows_of(logits: jax.Array, rows: jax.Array) -> jax.Array:
    """logits[rows] with zeros for rows -1 (positions without a draft)."""
    return jnp.where((rows >= 0)[:, None], logits[jnp.maximum(rows, 0)], 0.0)
