"""A step plan: what one engine step computes, as plain data.

The scheduler (`scheduler.py`) decides it from the queues and the memory pool; the engine core (`core.py`) executes it
with nothing but the params, the KV cache and the sampler's state. `to_dict`/`from_dict` give JSON-safe data, the
form in which process 0 can send a plan to the processes that hold the other shards.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from novallm_jax.sampling_params import SamplingParams

# Kinds of model call: one ragged batch of rows (prompt chunks and decode rows alike, CPU), or padded prefill and
# decode calls (see `executor.Executor`).
RAGGED, PREFILL, DECODE = "ragged", "prefill", "decode"
_LISTS = ("tokens", "pages", "window_pages")  # a Row's tuples, lists in JSON


@dataclasses.dataclass(frozen=True)
class Row:
    """One sequence's tokens in a model call: `tokens` at positions start.., its KV pages `pages`, sampled after when
    `sample` (the row computes its sequence's last known token). `from_slot` >= 0: the row's one token is still on
    the device, the sampler's last draw for that slot (`tokens` then holds a placeholder). `prompt_len`: its
    sequence's prompt length (longrope picks its factors by it, see `executor.PrefillChunk`). `draft` > 0: the last
    `draft` tokens are drafted (speculative decoding), and each of the row's last draft + 1 positions is sampled.
    `window_pages`: its pages of the window group (a model's sliding layers, see `kv_cache.window_groups`) from page
    index `window_first` on; the earlier ones went back to the pool once behind the window. `hidden`: the call
    returns the final hidden states of the row's tokens (an embedding request's, see `Request.pooling`)."""

    request_id: str
    slot: int
    tokens: tuple[int, ...]
    start: int
    pages: tuple[int, ...]
    sample: bool
    from_slot: int = -1
    prompt_len: int = 0
    draft: int = 0
    window_pages: tuple[int, ...] = ()
    window_first: int = 0
    hidden: bool = False


@dataclasses.dataclass(frozen=True)
class ModelCall:
    kind: str
    rows: tuple[Row, ...]


@dataclasses.dataclass(frozen=True)
class SlotUpdate:
    """A batch slot's sampling state set for a request (`params` given) or cleared (`params` None)."""

    slot: int
    params: SamplingParams | None = None
    prompt_token_ids: tuple[int, ...] = ()
    output_token_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One step: the page copies (copy-on-write: (KV cache group, src page, dst page)) and the slot updates to apply
    first, then the model calls, in order; sampling follows every call that has rows to sample.

    `pool_ops`: what the scheduler did to page contents since the last plan, as (KV cache group, operation) in order
    (swaps to and from the host, copies; `MemoryPool.journal`): done already where the plan was made, repeated
    first by a process that holds other shards of the pages (`distributed.apply_pool_ops`)."""

    step: int
    slot_updates: tuple[SlotUpdate, ...] = ()
    calls: tuple[ModelCall, ...] = ()
    copies: tuple[tuple[int, int, int], ...] = ()
    pool_ops: tuple[tuple[int, list], ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(r.tokens) for c in self.calls for r in c.rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe data (lists, ints, strings, and sampling parameters as dicts)."""
        return {
            "step": self.step,
            "slot_updates": [
                {
                    "slot": u.slot,
                    "params": None if u.params is None else u.params.to_dict(),
                    "prompt_token_ids": list(u.prompt_token_ids),
                    "output_token_ids": list(u.output_token_ids),
                }
                for u in self.slot_updates
            ],
            "calls": [
                {
                    "kind": c.kind,
                    "rows": [{**dataclasses.asdict(r), **{k: list(getattr(r, k)) for k in _LISTS}} for r in c.rows],
                }
                for c in self.calls
            ],
            "copies": [list(c) for c in self.copies],
            "pool_ops": [[g, op] for g, op in self.pool_ops],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StepPlan":
        updates = tuple(
            SlotUpdate(
                u["slot"],
                None if u["params"] is None else SamplingParams.from_dict(u["params"]),
                tuple(u["prompt_token_ids"]),
                tuple(u["output_token_ids"]),
            )
            for u in d["slot_updates"]
        )
        calls = tuple(
            ModelCall(c["kind"], tuple(Row(**{**r, **{k: tuple(r[k]) for k in _LISTS if k in r}}) for r in c["rows"]))
            for c in d["calls"]
        )
        copies = tuple(tuple(c) for c in d.get("copies", ()))
        return cls(d["step"], updates, calls, copies, tuple((g, op) for g, op in d.get("pool_ops", ())))
