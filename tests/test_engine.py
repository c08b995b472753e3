"""Continuous batching, prefix caching, preemption, cancellation and stop strings, against exact references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from novallm_jax.engine.request import FinishReason
from novallm_jax.errors import InvalidRequestError
from novallm_jax.kernels import native
from novallm_jax.model import greedy_generate
from novallm_jax.sampling_params import SamplingParams
from tests.engine_fixtures import TINY, make_engine, tiny_params


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    from novallm_jax.tokenizer import load_tokenizer

    return load_tokenizer(default_gguf)


def prompt_of(n, seed):
    return np.random.default_rng(seed).integers(3, TINY.vocab_size, n).tolist()


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def run_alone(tokenizer, prompt, params, **engine_kw):
    eng = make_engine(tokenizer, **engine_kw)
    req = eng.add_request(prompt, params)
    eng.run_until_idle()
    return list(req.output_ids)


@pytest.fixture(params=["ragged", "prefill/decode"])
def step_kind(request):
    """Engine tests run with both kinds of step (ExecutorConfig.ragged_steps); ragged ones need the native kernels."""
    ragged = request.param == "ragged"
    if ragged and not (jax.default_backend() == "cpu" and native.available()):
        pytest.skip("ragged steps need the native paged attention")
    return {"ragged_steps": ragged}


@pytest.fixture
def engine(tokenizer, step_kind):
    eng = make_engine(tokenizer, **step_kind)
    yield eng
    assert eng.check_leaks() == []
    eng.prefix_cache.clear()
    assert eng.pool.check_leaks() == []


def test_32_staggered_requests_match_each_alone(engine):
    rng = np.random.default_rng(0)
    specs = [(prompt_of(int(rng.integers(1, 90)), i), int(rng.integers(1, 24))) for i in range(32)]
    reqs = []
    for i, (prompt, max_tokens) in enumerate(specs):
        reqs.append(engine.add_request(prompt, greedy(max_tokens)))
        for _ in range(i % 3):  # staggered arrivals: some steps run between additions
            engine.step()
    engine.run_until_idle()
    # The reference decodes all prompts as one ragged batch, each row exactly as it would alone.
    refs = greedy_generate(tiny_params(), TINY, [p for p, _ in specs], max(m for _, m in specs))
    for (prompt, max_tokens), req, ref in zip(specs, reqs, refs):
        assert req.output_ids == ref[:max_tokens]
        assert req.finish_reason is FinishReason.LENGTH
    assert engine.counters["preemptions"] == 0


def test_seeded_request_is_batch_invariant(engine, tokenizer):
    target = prompt_of(20, 99)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    alone = run_alone(tokenizer, target, params)
    for position in (0, 3, 8):
        others = [
            engine.add_request(
                prompt_of(5 + 3 * i, i), SamplingParams(temperature=0.7, seed=i, max_tokens=9, ignore_eos=True)
            )
            for i in range(position)
        ]
        req = engine.add_request(target, params)
        others += [engine.add_request(prompt_of(7 + i, 50 + i), greedy(10)) for i in range(8 - position)]
        engine.run_until_idle()
        assert req.output_ids == alone, f"slot position {position}"
        assert all(o.finished for o in others)


def test_prefix_cache_prefills_only_the_suffix(engine, tokenizer):
    prefix = prompt_of(100, 7)
    first = engine.add_request(prefix + prompt_of(9, 8), greedy(8))
    engine.run_until_idle()
    second_prompt = prefix + prompt_of(13, 9)
    second = engine.add_request(second_prompt, greedy(8))
    engine.run_until_idle()
    cached = (100 // 8) * 8  # full pages of the shared prefix
    assert second.metrics.cached_prompt_tokens == cached
    assert second.metrics.prefilled_tokens == len(second_prompt) - cached
    assert second.output_ids == run_alone(tokenizer, second_prompt, greedy(8), enable_prefix_caching=False)
    assert first.metrics.cached_prompt_tokens == 0


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_with_a_pool_too_small(tokenizer, mode, step_kind):
    eng = make_engine(tokenizer, num_pages=24, preemption_mode=mode, **step_kind)  # 23 usable pages of 8 tokens
    specs = [(prompt_of(30 + 5 * i, 200 + i), 40) for i in range(6)]  # each needs up to 10 pages
    reqs = [eng.add_request(p, greedy(m)) for p, m in specs]
    eng.run_until_idle()
    assert eng.counters["preemptions"] > 0
    refs = greedy_generate(tiny_params(), TINY, [p for p, _ in specs], 40)
    for req, ref in zip(reqs, refs):
        assert req.output_ids == ref
    assert eng.check_leaks() == []


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_a_bfloat16_kv_cache_survives_preemption(tokenizer, mode, step_kind):
    """kv_cache_dtype="bfloat16": pages swapped to the host arena and back (or recomputed) hold the same keys and
    values, so every request's greedy output is what it gives alone in a pool large enough."""
    eng = make_engine(tokenizer, num_pages=24, preemption_mode=mode, kv_cache_dtype="bfloat16", **step_kind)
    assert all(k.dtype == jnp.bfloat16 for k in eng.pool.storage.k)
    specs = [(prompt_of(30 + 5 * i, 300 + i), 40) for i in range(6)]
    reqs = [eng.add_request(p, greedy(m)) for p, m in specs]
    eng.run_until_idle()
    assert eng.counters["preemptions"] > 0
    for (prompt, max_tokens), req in zip(specs, reqs):
        assert req.output_ids == run_alone(
            tokenizer, prompt, greedy(max_tokens), kv_cache_dtype="bfloat16", **step_kind
        )
    assert eng.check_leaks() == []


def test_cancellation_frees_pages_at_once(engine):
    req = engine.add_request(prompt_of(60, 3), greedy(50))
    other = engine.add_request(prompt_of(10, 4), greedy(20))
    for _ in range(5):
        engine.step()
    assert engine.pool.pages_of(req.id)
    assert engine.abort(req.id)
    assert engine.pool.pages_of(req.id) == []
    assert req.finish_reason is FinishReason.CANCELLED
    engine.run_until_idle()
    assert other.output_ids == greedy_generate(tiny_params(), TINY, [prompt_of(10, 4)], 20)[0]
    assert not engine.abort(req.id)


def _find_stop_split_across_tokens(tokenizer, ids):
    """A stop string made of the end of one generated token's text and the start of the next."""
    pieces = [tokenizer.decode([t]) for t in ids]
    for i in range(2, len(pieces) - 1):
        a, b = pieces[i], pieces[i + 1]
        if len(a) >= 2 and len(b) >= 2 and "\ufffd" not in a + b:
            stop = a[-2:] + b[:2]
            text_before = "".join(pieces[: i + 1])
            if stop not in text_before[:-2] + a[-2:]:
                return stop, tokenizer.decode(ids[: i + 1])[:-2]
    raise AssertionError("no usable token pair")


@pytest.mark.parametrize("streaming", [False, True])
def test_stop_string_split_across_two_tokens(engine, tokenizer, streaming):
    prompt = prompt_of(12, 11)
    free_run = run_alone(tokenizer, prompt, greedy(30))
    stop, expected = _find_stop_split_across_tokens(tokenizer, free_run)
    req = engine.add_request(prompt, greedy(30, stop=(stop,)))
    engine.run_until_idle()
    deltas = []
    while not req.outputs.empty():
        deltas.append(req.outputs.get().delta_text)
    assert req.finish_reason is FinishReason.STOP
    assert req.text == expected and stop not in req.text
    if streaming:
        assert "".join(deltas) == expected
        assert all(stop not in d for d in deltas)


def test_bad_requests_get_precise_errors_and_the_engine_keeps_serving(engine):
    good = engine.add_request(prompt_of(5, 1), greedy(4))
    with pytest.raises(InvalidRequestError, match="the prompt is empty"):
        engine.add_request([], greedy(4))
    with pytest.raises(InvalidRequestError, match=r"prompt token id 49152 is outside the vocabulary \[0, 49152\)"):
        engine.add_request([1, 49152], greedy(4))
    with pytest.raises(InvalidRequestError, match=r"the prompt has 300 tokens, but the model's context is 256"):
        engine.add_request(prompt_of(300, 2), greedy(4))
    with pytest.raises(InvalidRequestError, match=r"top_p must be"):
        engine.add_request(prompt_of(5, 1), SamplingParams(top_p=1.5))
    engine.run_until_idle()
    assert good.output_ids == greedy_generate(tiny_params(), TINY, [prompt_of(5, 1)], 4)[0]


def test_eos_finishes_with_stop_and_min_tokens_holds_it_back(engine):
    prompt = prompt_of(10, 5)
    free = greedy_generate(tiny_params(), TINY, [prompt], 6)[0]
    eos = free[3]  # pretend the 4th generated token is EOS
    req = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=(eos,)))
    engine.run_until_idle()
    assert req.finish_reason is FinishReason.STOP and req.output_ids == free[:4]


def test_sampler_warmup_covers_every_step_and_logprobs_are_batch_invariant(engine, tokenizer):
    from novallm_jax.sampling import sample_slots, sample_slots_greedy

    engine.warmup_sampler()
    sizes = lambda: (sample_slots._cache_size(), sample_slots_greedy._cache_size())
    compiled = sizes()
    target = prompt_of(11, 21)
    params = SamplingParams(temperature=0.8, top_k=40, seed=77, max_tokens=6, ignore_eos=True, logprobs=3)
    alone = make_engine(tokenizer)
    alone_req = alone.add_request(target, params)
    alone.run_until_idle()
    # Neighbours of every kind join while the target runs, so row counts cross buckets 1 -> 4 -> 16 and prefill
    # and decode rows share steps.
    req = engine.add_request(target, params)
    kinds = [
        greedy(5),
        greedy(4, presence_penalty=0.5, logit_bias={7: 2.0}),
        greedy(3, logprobs=0),
        SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=5, ignore_eos=True, min_tokens=2),
    ]
    others = []
    for i in range(9):
        engine.step()
        others.append(engine.add_request(prompt_of(4 + i, 60 + i), kinds[i % len(kinds)]))
    engine.run_until_idle()
    assert sizes() == compiled  # the warm-up compiled every shape the steps used, greedy steps' sampler too
    assert req.output_ids == alone_req.output_ids
    for got, want in zip(req.logprobs, alone_req.logprobs):
        assert got.token_id == want.token_id and got.logprob == pytest.approx(want.logprob, rel=1e-4, abs=1e-5)
        assert list(got.top) == list(want.top) and len(got.top) == 3
    assert all(o.finished for o in others)
    assert others[2].logprobs and all(lp.top == {} and lp.logprob <= 0.0 for lp in others[2].logprobs)
    assert others[0].logprobs is None


def test_ragged_step_runs_decode_rows_and_prompt_chunks_together(tokenizer):
    eng = make_engine(tokenizer, token_buckets=(1, 4, 16, 64))
    if not eng.executor.ragged:
        pytest.skip("ragged steps need the native paged attention")
    budget = eng.executor.exec_cfg.token_buckets[-1]
    short = eng.add_request(prompt_of(5, 1), greedy(20))
    eng.step()  # prefills the short prompt and samples its first token
    long_prompt = prompt_of(budget + 40, 2)
    long = eng.add_request(long_prompt, greedy(3))
    eng.step()  # the short request's decode row, and the long prompt up to the step's token budget
    # num_tokens counts tokens drawn whether or not read back yet (with async scheduling, a step's are read in the next)
    assert short.num_tokens == 5 + 2 and long.num_computed == budget - 1
    eng.step()
    assert short.num_tokens == 5 + 3 and long.num_computed == len(long_prompt) == long.num_tokens - 1
    eng.run_until_idle()
    assert long.output_ids == run_alone(tokenizer, long_prompt, greedy(3), ragged_steps=False)
    assert eng.check_leaks() == []


def test_prefill_rows_share_a_length_bucket_and_fill_a_row_bucket(tokenizer):
    engine = make_engine(tokenizer, ragged_steps=False)  # EXEC: chunk-length buckets (16, 64), row buckets (1, 4)
    from types import SimpleNamespace

    def req(arrival, remaining):
        return SimpleNamespace(num_tokens=remaining, num_computed=0, metrics=SimpleNamespace(arrival=arrival))

    oldest_long, long2, long3, long4, long5 = (req(t, n) for t, n in [(0, 70), (3, 64), (4, 200), (5, 65), (6, 99)])
    short = req(1, 10)
    assert [engine.scheduler._chunk_len(r) for r in (short, req(0, 16), req(0, 40), long3)] == [10, 16, 16, 64]
    picked = engine.scheduler._pick_prefill([long2, short, long3, oldest_long, long4, long5])
    assert picked == [oldest_long, long2, long3, long4]  # oldest first; all 64-token chunks; 4 = a row bucket
    # Three 64-bucket chunks would be padded to 4 rows: take one (the row buckets are 1 and 4).
    assert engine.scheduler._pick_prefill([long3, short, oldest_long, long2]) == [oldest_long]
    assert engine.scheduler._pick_prefill([short, long2]) == [short]
    assert engine.scheduler._pick_prefill([]) == []


def test_warm_engine_compiles_nothing_while_serving(engine):
    """After `warmup()`, a mixed workload compiles nothing: no step, sampler, state update or array conversion.

    Prompts of 1..150 tokens (chunked, and sharing a cached prefix), 1..24 rows at once, greedy and seeded sampling,
    logprobs, penalties, and steps whose logits hold more rows than they sample (prompt chunks; classic steps with
    both a prefill and a decode group).
    """
    from jax import monitoring

    engine.warmup()
    compiles = []

    def on_event(event, secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(secs)

    monitoring.register_event_duration_secs_listener(on_event)
    try:
        rng = np.random.default_rng(5)
        shared = prompt_of(40, 99)
        reqs = []
        for i in range(24):
            prompt = prompt_of(int(rng.integers(1, 150)), 200 + i)
            if i % 4 == 0:
                prompt = shared + prompt[:10]
            kind = [
                greedy(int(rng.integers(1, 12))),
                SamplingParams(temperature=0.9, top_p=0.8, seed=i, max_tokens=6, logprobs=2),
                greedy(5, repetition_penalty=1.3, logit_bias={11: 1.5}),
            ][i % 3]
            reqs.append(engine.add_request(prompt, kind))
            for _ in range(int(rng.integers(0, 3))):
                engine.step()
        engine.run_until_idle()
    finally:
        monitoring.unregister_event_duration_listener(on_event)
    assert all(r.finished and r.finish_reason is not FinishReason.ERROR for r in reqs)
    assert any(r.metrics.cached_prompt_tokens for r in reqs)  # the shared prefix came from the cache
    assert compiles == []


def test_engine_lock_counts_waiting_threads():
    """The engine loop steps aside between steps while other threads wait for its lock (it is re-entrant)."""
    import threading
    import time

    from novallm_jax.engine.engine import _CountingRLock

    lock = _CountingRLock()
    got = threading.Event()

    def other():
        with lock:
            got.set()

    with lock, lock:  # re-entrant
        t = threading.Thread(target=other)
        t.start()
        deadline = time.monotonic() + 5
        while lock.waiting != 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert not got.is_set()
    t.join(5)
    assert got.is_set() and lock.waiting == 0
    cond = threading.Condition(lock)  # what the engine's idle wait uses
    with cond:
        assert not cond.wait(timeout=0.01)


def _mixed_specs(tokenizer):
    """Greedy and seeded sampling, penalties, logprobs, stop tokens and a stop string."""
    free = greedy_generate(tiny_params(), TINY, [prompt_of(10, 5)], 8)[0]
    stop, _ = _find_stop_split_across_tokens(tokenizer, run_alone(tokenizer, prompt_of(12, 11), greedy(30)))
    return [
        (prompt_of(10, 5), SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=(free[2],))),
        (prompt_of(12, 11), greedy(30, stop=(stop,))),
        (
            prompt_of(40, 6),
            SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=12, logprobs=2, ignore_eos=True),
        ),
        (
            prompt_of(25, 7),
            SamplingParams(temperature=0.7, top_k=20, seed=3, max_tokens=9, repetition_penalty=1.3, ignore_eos=True),
        ),
    ] + [(prompt_of(5 + 9 * i, 20 + i), greedy(3 + 2 * i)) for i in range(6)]


def _run_staggered(engine, specs):
    """Runs (prompt, params) pairs arriving at staggered times; returns what each request produced."""
    reqs = []
    for i, (prompt, params) in enumerate(specs):
        reqs.append(engine.add_request(prompt, params))
        for _ in range(i % 2):
            engine.step()
    engine.run_until_idle()
    return [
        (r.output_ids, r.text, r.finish_reason, [(lp.token_id, lp.logprob, lp.top) for lp in r.logprobs or []])
        for r in reqs
    ]


def test_async_scheduling_gives_the_outputs_of_synchronous_steps(tokenizer, step_kind):
    """Steps dispatched before the previous step's tokens are read back (fed to the model on the device) give the
    same tokens, text, finish reasons and logprobs as steps that wait; a request stopped by a token drawn while the
    next step was in flight loses that step's row and nothing else."""
    specs = _mixed_specs(tokenizer)
    outputs, planned_ahead = {}, {}
    for async_scheduling in (False, True):
        eng = make_engine(tokenizer, async_scheduling=async_scheduling, **step_kind)
        outputs[async_scheduling] = _run_staggered(eng, specs)
        planned_ahead[async_scheduling] = eng.counters["steps_planned_ahead"]
        assert eng.check_leaks() == [] and eng._inflight is None
        assert all(r is None for r in eng.slots)
    assert outputs[True] == outputs[False]
    assert planned_ahead[False] == 0 and planned_ahead[True] > 10
    assert outputs[True][0][2] is FinishReason.STOP and outputs[True][1][2] is FinishReason.STOP


def test_async_step_reads_back_the_previous_step(tokenizer):
    eng = make_engine(tokenizer)
    req = eng.add_request(prompt_of(6, 1), greedy(3))
    assert eng.step() == []  # the prompt's step: its token is drawn on the device, not read back yet
    assert req.pending == 1 and req.output_ids == []
    first = eng.step()  # dispatches the decode row fed with that token, then reads the token back
    assert [o.delta_token_ids for o in first] == [req.output_ids] and len(req.output_ids) == 1 and req.pending == 1
    eng.run_until_idle()
    assert req.output_ids == greedy_generate(tiny_params(), TINY, [prompt_of(6, 1)], 3)[0] and req.pending == 0
    assert eng.check_leaks() == []
