"""The engine split into a scheduler that emits plain step plans and a core that executes them.

A plan round-trips through JSON; a second core that holds only the params, its own cache and sampler state, fed the
deserialised plans of a workload with preemption and prefix caching, draws exactly the tokens the engine drew; and
the scheduler plans without a model.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from novallm_jax.amp import MemoryPool
from novallm_jax.engine.core import EngineCore
from novallm_jax.engine.executor import Executor, ExecutorConfig
from novallm_jax.distributed import apply_pool_ops
from novallm_jax.engine.plan import DECODE, PREFILL, RAGGED, StepPlan
from novallm_jax.engine.request import FinishReason, Request, Status
from novallm_jax.engine.scheduler import Scheduler
from novallm_jax.sampling_params import SamplingParams
from tests.engine_fixtures import TINY, make_engine, skip_without_ragged_steps, tiny_params


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    from novallm_jax.tokenizer import load_tokenizer

    return load_tokenizer(default_gguf)


def _recording(engine):
    """Records each step's plan (as JSON text) and the tokens its sampler calls drew."""
    plans, drawn = [], []
    schedule, execute = engine.scheduler.schedule, engine.core.execute

    def recorded_schedule():
        plan = schedule()
        plans.append(json.dumps(plan.to_dict()))
        return plan

    def recorded_execute(plan, storage, *rest):
        sampled, storage = execute(plan, storage, *rest)
        drawn.append([(s.request_ids, np.asarray(s.arrays[0])) for s in sampled])
        return sampled, storage

    engine.scheduler.schedule, engine.core.execute = recorded_schedule, recorded_execute
    return plans, drawn


@pytest.mark.parametrize("ragged,mode", [(True, "recompute"), (False, "recompute"), (True, "swap"), (False, "swap")])
def test_a_second_core_replays_the_plans_of_a_workload_exactly(tokenizer, ragged, mode):
    if ragged:
        skip_without_ragged_steps()
    # A pool of 24 pages of 8 tokens for 6 requests of up to 40 tokens: preemption must happen; the shared first 16
    # tokens hit the prefix cache. A second engine replays the plans as a cluster's worker does: the pool operations
    # first (swaps of its own pages to its host and back), then the calls.
    engine = make_engine(tokenizer, num_pages=24, preemption_mode=mode, ragged_steps=ragged)
    plans, drawn = _recording(engine)
    common = list(range(100, 116))
    reqs = [
        engine.add_request(
            common + [200 + i] * (3 + i), SamplingParams(temperature=0.9, seed=i, max_tokens=18, ignore_eos=True)
        )
        for i in range(6)
    ]
    engine.run_until_idle()
    assert engine.counters["preemptions"] > 0
    if mode == "recompute":  # a recomputed prompt reads its first pages from the prefix cache
        assert engine.stats()["prefix_cache_hit_rate"] > 0
    assert all(len(r.output_ids) == 18 for r in reqs) and engine.check_leaks() == []

    replica, held = make_engine(tokenizer, num_pages=24, preemption_mode=mode, ragged_steps=ragged), {}
    kinds, swaps = set(), 0
    for text, expected in zip(plans, drawn):
        plan = StepPlan.from_dict(json.loads(text))
        kinds |= {c.kind for c in plan.calls}
        swaps += sum(op[0] == "swap_out" for _, op in plan.pool_ops)
        apply_pool_ops(replica, plan.pool_ops, held)
        sampled, replica.kv_cache = replica.core.execute(plan, replica.kv_cache)
        got = [(s.request_ids, np.asarray(s.arrays[0])) for s in sampled]
        assert [ids for ids, _ in got] == [ids for ids, _ in expected]
        for (ids, tokens), (_, want) in zip(got, expected):
            rows = [i for i, rid in enumerate(ids) if rid is not None]
            np.testing.assert_array_equal(tokens[rows], want[rows])
    assert kinds == ({RAGGED} if ragged else {PREFILL, DECODE})
    assert (swaps > 0) == (mode == "swap") and held == {}  # every swapped copy was swapped back in


def test_plans_round_trip_through_json(tokenizer):
    engine = make_engine(tokenizer)
    plans, _ = _recording(engine)
    engine.add_request(
        [5, 6, 7, 8] * 5,
        SamplingParams(temperature=0.7, top_p=0.9, logit_bias={3: -2.0}, seed=1, stop=("x",), max_tokens=4, logprobs=2),
    )
    engine.run_until_idle()
    for text in plans:
        plan = StepPlan.from_dict(json.loads(text))
        assert json.dumps(plan.to_dict()) == text
        assert StepPlan.from_dict(plan.to_dict()) == plan
    first = StepPlan.from_dict(json.loads(plans[0]))
    assert first.slot_updates[0].params.logit_bias == {3: -2.0} and first.slot_updates[0].params.stop == ("x",)


def test_a_plans_page_copies_run_before_its_calls(tokenizer):
    """Copy-on-write as plan data: the core copies each (group, src, dst) page before the step's calls, so a process
    that holds another shard of the cache makes the same copy."""
    engine = make_engine(tokenizer)
    plans, _ = _recording(engine)
    engine.add_request(list(range(100, 116)), SamplingParams(max_tokens=2, ignore_eos=True))
    engine.run_until_idle()
    first = StepPlan.from_dict(json.loads(plans[0]))
    src = first.calls[0].rows[0].pages[1]
    core = EngineCore(
        Executor(TINY, tiny_params(), engine.executor.exec_cfg), engine.num_slots, TINY.vocab_size, engine.eos_token_ids
    )
    _, storage = core.execute(first, core.executor.new_cache())
    dst = engine.executor.exec_cfg.num_pages - 1
    copy = StepPlan.from_dict(json.loads(json.dumps(StepPlan(2, copies=((0, src, dst),)).to_dict())))
    assert copy.copies == ((0, src, dst),)
    _, storage = core.execute(copy, storage)
    for leaf in jax.tree.leaves(storage):
        page_axis = [i for i, n in enumerate(leaf.shape) if n == engine.executor.exec_cfg.num_pages][0]
        got, want = (np.asarray(jnp.take(leaf, p, axis=page_axis)) for p in (dst, src))
        assert np.abs(want).sum() > 0
        np.testing.assert_array_equal(got, want)


def _request(rid: str, prompt_len: int, arrival: float) -> Request:
    req = Request(
        rid, list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=8, seed=0), detokenizer=None, eos_token_ids=()
    )
    req.metrics.arrival = arrival
    return req


def _scheduler(exec_cfg: ExecutorConfig) -> Scheduler:
    """A ragged scheduler over a pool without KV storage, one prompt chunk per step, recompute preemption."""
    return Scheduler(
        MemoryPool(num_pages=exec_cfg.num_pages),
        exec_cfg,
        ragged=True,
        max_model_len=exec_cfg.max_model_len,
        max_prefill_rows=1,
        enable_prefix_caching=False,
        preemption_mode="recompute",
    )


def test_the_scheduler_plans_without_a_model():
    """Admission, chunking, decode rows fed from the device, and preemption, on a pool with no KV storage at all."""
    exec_cfg = ExecutorConfig(
        page_size=4,
        num_pages=7,
        max_model_len=32,
        decode_batch_buckets=(1, 2, 4),
        prefill_batch_buckets=(1,),
        prefill_len_buckets=(8,),
        token_buckets=(4, 8),
    )
    sched = _scheduler(exec_cfg)
    a, b = _request("a", 6, 0.0), _request("b", 5, 1.0)
    sched.add(a), sched.add(b)

    plan = sched.schedule()
    assert [(u.slot, u.params is not None) for u in plan.slot_updates] == [(0, True), (1, True)]
    assert plan.copies == ()
    (call,) = plan.calls
    # 8 tokens: a's whole prompt (6) then the first 2 of b's; only a's last token is sampled.
    assert [(r.request_id, r.start, len(r.tokens), r.sample) for r in call.rows] == [
        ("a", 0, 6, True),
        ("b", 0, 2, False),
    ]
    assert call.rows[0].tokens == tuple(a.prompt) and len(call.rows[0].pages) == 2

    a.pending = 1  # the engine dispatched a's sampling: its next token is on the device
    plan = sched.schedule()
    rows = plan.calls[0].rows
    assert (rows[0].request_id, rows[0].from_slot, rows[0].tokens) == ("a", 0, (0,))  # fed from slot 0
    assert (rows[1].request_id, rows[1].start, rows[1].tokens) == ("b", 2, tuple(b.prompt[2:]))
    assert sched.pool.num_free == 6 - 4  # 2 pages each (page 0 is the null page)

    a.pending, b.pending = 0, 0
    a.tokens += [1, 2, 3, 4, 5, 6, 7, 8]  # a long run of output: a's 14 tokens need 4 pages, and 2 are free...
    a.num_computed = len(a.tokens) - 1
    b.tokens += [1]
    plan = sched.schedule()
    # ... a (older) takes them; b fits in 2 pages still.
    assert [r.request_id for r in plan.calls[0].rows] == ["a", "b"] and sched.pool.num_free == 0
    b.tokens += [2, 3, 4]
    b.num_computed = len(b.tokens) - 1
    plan = sched.schedule()  # b needs a 3rd page: none free, so b (the newest) is preempted and recomputed later
    assert [r.request_id for r in plan.calls[0].rows] == ["a"]
    assert b.status is Status.WAITING and b.num_computed == 0 and sched.counters["preemptions"] == 1
    assert [(u.slot, u.params) for u in plan.slot_updates] == [(1, None)]


def test_the_scheduler_plans_copy_on_write_into_a_page_it_shares():
    """Writing into a page another owner also holds: the scheduler takes a private page at once and the plan carries
    the copy (the pool copies nothing itself), once."""
    exec_cfg = ExecutorConfig(
        page_size=4, num_pages=8, max_model_len=32, decode_batch_buckets=(1,), prefill_batch_buckets=(1,)
    )
    exec_cfg = dataclasses.replace(exec_cfg, prefill_len_buckets=(8,), token_buckets=(8,))
    sched = _scheduler(exec_cfg)
    a = _request("a", 6, 0.0)
    sched.add(a)
    assert sched.schedule().copies == ()
    shared = a.pages[1]  # positions 4..7, of which 4 and 5 are written
    sched.pool.share("a", "other", [shared])
    a.tokens.append(1)
    plan = sched.schedule()
    assert a.pages[1] != shared and plan.copies == ((0, shared, a.pages[1]),)
    assert plan.calls[0].rows[0].pages == tuple(a.pages)
    a.tokens.append(2)
    assert sched.schedule().copies == ()  # the page is a's alone now
    sched.pool.free_all("other")
    sched.finish(a, FinishReason.LENGTH)
    assert sched.pool.check_leaks() == []
