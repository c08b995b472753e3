"""Speculative decoding by prompt lookup: drafting, the acceptance rule's exactness, and the engine's outputs.

Greedy outputs must equal plain decoding token for token; sampled ones must follow the target distribution (a
chi-square over the first two tokens of 20,000 draws against the exact sequential distribution, with a draft the
target rarely picks); every page comes back after rejections.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from novallm_jax.engine import speculative
from novallm_jax.errors import InvalidRequestError
from novallm_jax.sampling import SamplingBatch, sample_slots
from novallm_jax.sampling_params import SamplingParams
from tests.engine_fixtures import TINY, make_engine, skip_without_ragged_steps


def test_prompt_lookup_drafts_what_followed_the_latest_earlier_occurrence():
    t = [5, 6, 7, 8, 9, 1, 6, 7, 3, 4, 2, 6, 7]
    assert speculative.propose(t, 3) == (3, 4, 2)  # "6 7" last seen before the end at index 6, then 3 4 2
    assert speculative.propose([1, 2, 3, 1, 2], 5) == (3, 1, 2)  # the continuation may run into the suffix itself
    assert speculative.propose([1, 2, 3, 4], 4) == ()  # nothing repeats
    assert speculative.propose(t, 0) == () and speculative.propose([7], 3) == ()
    assert speculative.propose([4, 9, 5, 9], 2) == ()  # a lone repeated token is no match (MIN_NGRAM = 2)
    assert speculative.propose([4, 9, 5, 9], 2, min_ngram=1) == (5, 9)
    assert speculative.may_find([5, 3, 7, 3]) and not speculative.may_find([1, 2, 3]) and not speculative.may_find([3])
    assert [speculative.draft_length(8, d, a) for d, a in ((0, 0), (2, 2), (8, 8), (8, 3), (4, 0))] == [8, 4, 8, 4, 1]
    assert [speculative.draft_length(8, d, a, copying=True) for d, a in ((2, 2), (8, 3), (4, 0))] == [4, 8, 8]
    assert speculative.accepted([3, 4, 9], (3, 4, 2)) == 2 and speculative.accepted([0], ()) == 0
    assert [speculative.pause_after(m, first=2) for m in range(6)] == [0, 2, 4, 8, 16, 16]
    assert [speculative.pause_after(m, first=1) for m in range(6)] == [0, 1, 2, 4, 8, 8]


def test_a_copy_drafts_from_the_occurrence_nearest_where_it_copies():
    """With `near` (where a copying text's next token was expected to come from), the occurrence whose continuation
    starts within `NEAR` tokens of it wins over the latest and over longer n-grams elsewhere, down to a lone token."""
    t = [5, 6, 7, 8, 9, 1, 6, 7, 3, 4, 2, 6, 7]  # "6 7" continues at 3 (8 9 1) and at 8 (3 4 2)
    assert speculative.lookup(t, 3) == (8, (3, 4, 2))
    assert speculative.lookup(t, 3, near=4) == (3, (8, 9, 1)) and speculative.lookup(t, 3, near=7) == (8, (3, 4, 2))
    assert speculative.lookup(t, 3, near=0) == (8, (3, 4, 2))  # none within 2 tokens: the latest
    t = [1, 2, 3, 9, 8, 2, 3, 7, 1, 2, 3]  # "1 2 3" continues at 3; "2 3" also at 7
    assert speculative.lookup(t, 2) == (3, (9, 8)) and speculative.lookup(t, 2, near=7) == (7, (7, 1))
    assert speculative.lookup([4, 9, 5, 9], 2, near=2) == (2, (5, 9))  # a lone token, where the copy was
    assert speculative.lookup([1, 2, 3, 4], 2, near=2) == (-1, ())


def test_speculative_is_validated_where_it_enters():
    with pytest.raises(InvalidRequestError, match="speculative must be an integer in") as e:
        SamplingParams(speculative=9)
    assert e.value.param == "speculative"
    with pytest.raises(InvalidRequestError, match="does not combine with repetition_penalty, min_tokens"):
        SamplingParams(speculative=2, repetition_penalty=1.2, min_tokens=1, max_tokens=4)


def test_a_servers_default_drafts_only_where_the_request_allows_them():
    from novallm_jax.serving import novallm_pb2 as pb
    from novallm_jax.serving.grpc_server import sampling_from_proto

    assert SamplingParams(temperature=0.0).with_default_drafts(4).speculative == 4
    assert SamplingParams(speculative=2).with_default_drafts(4).speculative == 2
    assert SamplingParams(repetition_penalty=1.1).with_default_drafts(4).speculative == 0
    assert sampling_from_proto(pb.SamplingParams(speculative=3)).speculative == 3
    with pytest.raises(InvalidRequestError, match="speculative"):
        sampling_from_proto(pb.SamplingParams(speculative=3, min_tokens=2))


def test_drafts_are_accepted_exactly_as_sequential_sampling():
    """Target: a 2-token sequence over 8 tokens, p(x1) from L0 and p(x2 | x1) from L1[x1], at temperature 0.8. The
    step drafts d1 (a token the target rarely picks) and d2, draws every position with `offsets`, and keeps the
    accepted drafts and the draw after them; where only one token came out, the next step draws x2 as usual."""
    v, n, temperature = 8, 20000, 0.8
    rng = np.random.default_rng(0)
    l0 = rng.normal(size=v).astype(np.float32)
    l0[3] = l0.min() - 1.0  # the draft's first token: rarely the target's choice
    l1 = rng.normal(size=(v, v)).astype(np.float32)
    draft = (3, 5)
    batch = SamplingBatch.from_params([SamplingParams(temperature=temperature, seed=i) for i in range(n)], v)
    slots = np.repeat(np.arange(n, dtype=np.int32), 3)
    offsets = np.tile(np.arange(3, dtype=np.int32), n)
    rows = np.stack([l0, l1[draft[0]], np.zeros(v, np.float32)])  # the 3rd row's draw is never kept here
    out, batch = sample_slots(jnp.asarray(np.tile(rows, (n, 1))), slots, batch, offsets=offsets)
    draws = np.asarray(out.tokens).reshape(n, 3)
    kept = [draws[i, : speculative.accepted(draws[i], draft) + 1] for i in range(n)]
    assert np.mean([len(k) > 1 for k in kept]) < 0.1  # mostly rejected: the rule's correction path is exercised
    # Second tokens of the samples that stopped after one: a plain draw from p(. | x1), from the advanced state.
    short = [i for i in range(n) if len(kept[i]) == 1]
    follow, _ = sample_slots(jnp.asarray(l1[[kept[i][0] for i in short]]), np.asarray(short, np.int32), batch)
    second = dict(zip(short, np.asarray(follow.tokens).tolist()))
    pairs = np.array([(k[0], k[1] if len(k) > 1 else second[i]) for i, k in enumerate(kept)])
    softmax = lambda x: (
        np.exp(x / temperature - (x / temperature).max(-1, keepdims=True))
        / np.exp(x / temperature - (x / temperature).max(-1, keepdims=True)).sum(-1, keepdims=True)
    )
    expected = (softmax(l0)[:, None] * softmax(l1)).reshape(-1) * n
    observed = np.bincount(pairs[:, 0] * v + pairs[:, 1], minlength=v * v)
    keep = expected > 5  # chi-square needs populated cells; the rest are pooled
    f_obs = np.append(observed[keep], observed[~keep].sum())
    f_exp = np.append(expected[keep], expected[~keep].sum())
    assert chisquare(f_obs, f_exp).pvalue > 1e-3


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    from novallm_jax.tokenizer import load_tokenizer

    return load_tokenizer(default_gguf)


@pytest.fixture(scope="module")
def engines(tokenizer):
    skip_without_ragged_steps()
    # Token buckets 1, 2, 4, 8, 16 (token_buckets=None: derived from these, not kept from EXEC's): rows draft 1, 3 or 7
    # tokens (what fills a bucket, see Scheduler._draft_length).
    buckets = dict(decode_batch_buckets=(1, 2, 4, 8, 16), token_buckets=None, num_pages=40)
    # draft_step_tokens: every row drafts however many rows decode beside it (the default shares out 8 tokens)
    spec = make_engine(tokenizer, max_draft_tokens=8, draft_step_tokens=128, **buckets)
    return spec, make_engine(tokenizer, **buckets)


@pytest.fixture(scope="module")
def padded_engines(tokenizer):
    """Padded steps (a GPU's and a mesh's; here by choice): drafts verify in `Executor.verify` steps."""
    buckets = dict(decode_batch_buckets=(1, 2, 4, 8, 16), num_pages=40, ragged_steps=False)
    spec = make_engine(tokenizer, max_draft_tokens=8, draft_step_tokens=128, **buckets)
    return spec, make_engine(tokenizer, **buckets)


def _draft_from(oracle, monkeypatch):
    """Prompt lookup replaced by `oracle(tokens, k, **kwargs) -> (start, draft)`, which may draft after any token."""
    monkeypatch.setattr(speculative, "lookup", oracle)
    monkeypatch.setattr(speculative, "may_find", lambda tokens: True)


def _run(eng, specs):
    reqs = [eng.add_request(p, sp) for p, sp in specs]
    eng.run_until_idle()
    assert eng.check_leaks() == []
    return [r.output_ids for r in reqs]


@pytest.mark.parametrize("steps", ["engines", "padded_engines"])
def test_greedy_speculative_outputs_equal_plain_decoding(steps, request, monkeypatch):
    """Rows drafting 1..8 tokens beside plain rows in the same steps, a pool small enough to preempt: each output is
    the plain engine's, token for token, in ragged steps and in padded ones. A random model repeats too little for
    prompt lookup, so the drafts come from an oracle that knows the plain output and spoils every third draft's last
    token: whole drafts accepted, partial ones, rejections, rejected pages returned."""
    spec, plain = request.getfixturevalue(steps)
    rng = np.random.default_rng(1)
    base = rng.integers(3, TINY.vocab_size, 12).tolist()
    prompts = [base * 3 + rng.integers(3, TINY.vocab_size, 5).tolist() for _ in range(9)]
    greedy = lambda k: SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, speculative=k)
    want = _run(plain, [(p, greedy(0)) for p in prompts])
    calls = []

    def oracle(tokens, k, **_):
        i = next(i for i, p in enumerate(prompts) if tokens[: len(p)] == p)
        done = len(tokens) - len(prompts[i])
        draft = list(want[i][done : done + k])
        calls.append(len(draft))
        if draft and len(calls) % 3 == 0:
            draft[-1] = (draft[-1] + 1) % TINY.vocab_size
        return -1, tuple(draft)

    _draft_from(oracle, monkeypatch)
    got = _run(spec, [(p, greedy(k)) for k, p in enumerate(prompts)])
    assert got == want
    assert spec.counters["preemptions"] > 0 and spec.counters["accepted_tokens"] > 0
    assert spec.counters["draft_tokens"] > spec.counters["accepted_tokens"]


def _oracle_rows(engines, monkeypatch, max_tokens: int, spoil, rows: int = 1) -> list[list[tuple]]:
    """Greedy rows (k = 8) whose drafts come from an oracle that knows plain decoding's output, passed through
    `spoil(draft, i)` (i: 1 for a row's first lookup that asks for drafts): their outputs must be plain decoding's.
    Returns per row the (text length, tokens asked for, `near`, `min_ngram`) of each lookup that asked; the oracle
    says each draft comes from 5 tokens back."""
    spec, plain = engines
    prompts = [list(range(3 + r, 15 + r)) for r in range(rows)]
    greedy = lambda k: SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, speculative=k)
    want = _run(plain, [(p, greedy(0)) for p in prompts])
    asked = [[] for _ in prompts]

    def oracle(tokens, k, near=None, min_ngram=None, **_):
        if not k:
            return -1, ()
        r = next(r for r, p in enumerate(prompts) if tokens[: len(p)] == p)
        asked[r].append((len(tokens), k, near, min_ngram))
        done = len(tokens) - len(prompts[r])
        return len(tokens) - 5, tuple(spoil(list(want[r][done : done + k]), len(asked[r])))

    _draft_from(oracle, monkeypatch)
    assert _run(spec, [(p, greedy(8)) for p in prompts]) == want
    return asked


def _wrong_first(draft: list[int]) -> list[int]:
    return [(draft[0] + 1) % TINY.vocab_size] + draft[1:] if draft else draft


def test_a_rows_draft_length_grows_back_after_a_rejection(engines, monkeypatch):
    """A lone row whose first draft is rejected at once drafts 1 token, then, its drafts accepted whole, grows to
    what fills the next token bucket (3, then 7 of k = 8 with buckets 2, 4, 8, 16), rather than staying at 1."""
    (asked,) = _oracle_rows(engines, monkeypatch, 40, lambda draft, i: _wrong_first(draft) if i == 1 else draft)
    assert [a[1] for a in asked[:5]] == [7, 1, 3, 7, 7], asked


def test_a_copying_row_drafts_again_at_once_from_where_it_copies(engines, monkeypatch):
    """A row whose drafts have been kept at `COPYING` or better (two whole drafts of 7) takes a draft rejected at its
    first token as a sign that its copy moved on: it drafts 7 again at the next step rather than pausing and starting
    from 1, and its lookups ask for an occurrence near where it copied from (5 tokens back, the oracle says, before
    and after the verifying steps), of n-grams down to 2 tokens where its first asked for 3. A second miss in a row pauses it as a first miss pauses other rows."""
    (asked,) = _oracle_rows(engines, monkeypatch, 60, lambda draft, i: _wrong_first(draft) if i in (3, 4) else draft)
    looked = [n for n, *_ in asked]
    assert [a[1] for a in asked[:5]] == [7, 7, 7, 7, 7], asked
    assert [b - a for a, b in zip(looked, looked[1:4])] == [8, 8, 1] and looked[4] - looked[3] == 1 + 2, asked
    assert [a[2] for a in asked[:5]] == [None] + [n - 5 for n in looked[1:5]], asked
    # 3-grams until the row copies (`UNPROVEN_MIN_NGRAM`), then 2-grams (and a lone token near the copy)
    assert [a[3] for a in asked[:5]] == [3, 2, 2, 2, 2], asked


def test_lookups_known_to_miss_are_planned_ahead(engines, monkeypatch):
    """A lone row whose last token never occurred before cannot find a draft once its next token is known (n-grams
    of 2 or more end in both): such a lookup counts as a miss, with the same pauses (1, 2, 4, then 8 tokens apart),
    without the step waiting for the token on the device, so its steps are planned ahead as plain ones are."""
    spec, plain = engines
    prompt = list(range(3, 15))
    greedy = lambda k: SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, speculative=k)
    want = _run(plain, [(prompt, greedy(0))])
    asked, known = [], []
    monkeypatch.setattr(speculative, "lookup", lambda tokens, k, **_: (asked.append(k) if k else None, (-1, ()))[1])
    monkeypatch.setattr(speculative, "may_find", lambda tokens: known.append(len(tokens)) or False)
    steps, ahead = spec.counters["steps"], spec.counters["steps_planned_ahead"]
    assert _run(spec, [(prompt, greedy(8))]) == want
    gaps = [b - a for a, b in zip(known, known[1:])]
    assert gaps[:3] == [1, 2, 4] and set(gaps[3:]) == {8} and len(gaps) >= 6, known
    assert asked == []
    assert spec.counters["steps_planned_ahead"] - ahead >= spec.counters["steps"] - steps - 2


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("miss", ["rejected", "not_found"])
def test_rows_pause_drafting_after_misses(engines, monkeypatch, miss, rows):
    """A lone row whose drafts are all rejected at their first token drafts again 3, 5, 9 and then every 17 tokens
    (the verifying step's token, then a pause of 2, 4, 8, 16); one whose prompt lookups find nothing looks again 1,
    2, 4 and then every 8 tokens. Beside another row the pauses double (a step that may draft holds up every row's
    pipelining). Outputs are plain decoding's, and the paused steps are planned while the previous one runs."""
    ahead = engines[0].counters["steps_planned_ahead"]
    spoil = (lambda draft, i: _wrong_first(draft)) if miss == "rejected" else (lambda draft, i: [])
    for asked in _oracle_rows(engines, monkeypatch, 80, spoil, rows):
        looked = [n for n, *_ in asked]
        gaps = [b - a for a, b in zip(looked, looked[1:])]
        pauses = [2 * rows << d for d in range(4)] if miss == "rejected" else [rows << d for d in range(4)]
        want = [p + (miss == "rejected") for p in pauses]  # a rejection's pause counts from the step's token
        assert gaps == (want + [want[-1]] * len(gaps))[: len(gaps)], looked
        assert len(gaps) >= 3
    assert engines[0].counters["steps_planned_ahead"] - ahead > 40


def test_a_steps_rows_share_out_its_draft_tokens(tokenizer, engines, monkeypatch):
    """With the default draft_step_tokens (8), decode rows and their drafts fill at most 8 tokens of a step: 2 rows
    draft 3 each, 4 rows 1 each, 8 or more rows none (a step of many rows costs several times one row), and then
    their steps are planned ahead."""
    _, plain = engines
    eng = make_engine(tokenizer, max_draft_tokens=8, decode_batch_buckets=(1, 2, 4, 8, 16), token_buckets=None)
    # a step's logits rows: a row per sequence and the 8 draft tokens, not 16 x 9 (a prompt's positions need none)
    assert max(eng.executor.logits_row_counts()) == 16 + 8
    rng = np.random.default_rng(2)
    greedy = lambda k: SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, speculative=k)
    steps = []
    schedule = eng.scheduler.schedule

    def recorded():
        plan = schedule()
        rows = [r for c in plan.calls for r in c.rows if len(r.tokens) == 1 + r.draft]
        steps.append(sorted(r.draft for r in rows))
        return plan

    monkeypatch.setattr(eng.scheduler, "schedule", recorded)
    for n in (2, 4, 9):
        prompts = [rng.integers(3, TINY.vocab_size, 10).tolist() for _ in range(n)]
        want = _run(plain, [(p, greedy(0)) for p in prompts])
        by_prompt = {tuple(p): w for p, w in zip(prompts, want)}

        def oracle(tokens, k, **_):
            p = next(p for p in by_prompt if tuple(tokens[: len(p)]) == p)
            done = len(tokens) - len(p)
            return -1, tuple(by_prompt[p][done : done + k])

        _draft_from(oracle, monkeypatch)
        ahead = eng.counters["steps_planned_ahead"]
        assert _run(eng, [(p, greedy(8)) for p in prompts]) == want
    # 9 rows leave no draft tokens to share: their steps are planned while the previous one runs, as plain rows' are
    assert eng.counters["steps_planned_ahead"] - ahead > 15
    assert all(len(d) + sum(d) <= 8 for d in steps if any(d)), steps
    assert [3, 3] in steps and [1, 1, 1, 1] in steps, steps
    assert [0] * 9 in steps and eng.counters["accepted_tokens"] > 0


def test_speculative_needs_an_engine_that_verifies_drafts(engines):
    _, plain = engines
    with pytest.raises(InvalidRequestError, match="max_draft_tokens") as e:
        plain.add_request([5, 6, 7], SamplingParams(speculative=2))
    assert e.value.param == "speculative"


COPY = (
    "Repeat this paragraph exactly: The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and "
    "the fox runs into the forest to find its friends."
)


def test_default_model_copies_with_drafts_and_the_server_serves_them(default_gguf):
    """The real default model on an input-copying prompt: greedy speculative output equals plain output over 64
    tokens, with the model as its own draft model and by prompt lookup, drafts accepted on the way; the server drafts
    by default (`--speculative`) and reports acceptance."""
    import httpx
    import openai
    from prometheus_client.parser import text_string_to_metric_families

    from novallm_jax.engine.engine import EngineConfig
    from novallm_jax.llm import LLM
    from novallm_jax.serving.app import ServerConfig
    from novallm_jax.serving.runner import BackgroundServer
    from tests.engine_fixtures import EXEC

    greedy = dict(temperature=0.0, max_tokens=64, ignore_eos=True)
    config = EngineConfig(executor=EXEC)
    with LLM(default_gguf, engine_config=config) as plain:
        ids = plain.chat_prompt([{"role": "user", "content": COPY}])
        want = plain.generate([ids], SamplingParams(**greedy))[0].outputs[0]
    # The model as its own draft (the plumbing's test: every draft accepted), with the draft model's default k.
    with LLM(default_gguf, engine_config=config, draft_model=default_gguf) as llm:
        assert llm.speculative == 4
        out = llm.generate([ids], SamplingParams(**greedy, speculative=4))[0].outputs[0]
        assert out.token_ids == want.token_ids
        assert out.metrics.accepted_tokens == out.metrics.draft_tokens > 0
        assert llm.engine.check_leaks() == []
    with pytest.raises(InvalidRequestError, match="does not exist") as e:
        LLM(default_gguf, draft_model="/nonexistent/draft.gguf")
    assert e.value.param == "draft_model"
    with LLM(default_gguf, engine_config=config, speculative=8) as llm:
        out = llm.generate([ids], SamplingParams(**greedy, speculative=8))[0].outputs[0]
        assert out.token_ids == want.token_ids
        assert llm.engine.counters["accepted_tokens"] > 0
        with BackgroundServer(llm, ServerConfig(model_name="m")) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=120, max_retries=0)
            messages = [{"role": "user", "content": COPY}]
            default = client.chat.completions.create(
                model="m", messages=messages, temperature=0, max_tokens=64, extra_body={"ignore_eos": True}
            )
            assert default.choices[0].message.content == want.text
            off = client.chat.completions.create(
                model="m",
                messages=messages,
                temperature=0,
                max_tokens=8,
                extra_body={"speculative": 0, "repetition_penalty": 1.1},
            )
            assert off.choices[0].finish_reason == "length"
            tools = [
                {
                    "type": "function",
                    "function": {
                        "name": "echo",
                        "parameters": {
                            "type": "object",
                            "properties": {"x": {"enum": ["yes", "no"]}},
                            "required": ["x"],
                        },
                    },
                }
            ]
            # Constrained (drafts off by default); one call, so that 40 tokens always finish it (with parallel calls
            # allowed, a sampled answer may keep writing calls past them).
            called = client.chat.completions.create(
                model="m",
                messages=messages,
                tools=tools,
                max_tokens=40,
                tool_choice="required",
                parallel_tool_calls=False,
                temperature=0,
            )
            assert called.choices[0].message.tool_calls
            with pytest.raises(openai.BadRequestError, match="speculative"):
                client.chat.completions.create(
                    model="m", messages=messages, max_tokens=8, extra_body={"speculative": 9}
                )
            metrics = httpx.get(srv.url + "/metrics", timeout=30).text
            values = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
            assert values["novallm_spec_decode_accepted_tokens_total"] > 0
        assert llm.engine.check_leaks() == []


def test_an_sdk_on_padded_steps_verifies_drafts(default_gguf):
    """Padded steps (a mesh's, a GPU's, or here by choice) verify prompt-lookup drafts: LLM(speculative=...)'s greedy
    output on the copying prompt equals the same steps' plain output, drafts accepted, every page back."""
    from novallm_jax.engine.engine import EngineConfig
    from novallm_jax.llm import LLM
    from tests.engine_fixtures import EXEC

    config = EngineConfig(executor=dataclasses.replace(EXEC, ragged_steps=False))
    greedy = dict(temperature=0.0, max_tokens=32, ignore_eos=True)
    with LLM(default_gguf, engine_config=config) as plain:
        ids = plain.chat_prompt([{"role": "user", "content": COPY}])
        want = plain.generate([ids], SamplingParams(**greedy))[0].outputs[0].token_ids
    with LLM(default_gguf, engine_config=config, speculative=8) as llm:
        assert not llm.engine.executor.ragged
        out = llm.generate([ids], SamplingParams(**greedy, speculative=8))[0].outputs[0]
        assert out.token_ids == want
        assert out.metrics.accepted_tokens > 0
        assert llm.engine.check_leaks() == []


def test_a_draft_model_where_ragged_steps_cannot_run_is_refused_naming_the_field(monkeypatch):
    """A draft model drafts in ragged steps, which need the native CPU kernels (none on a GPU): refused at once."""
    from novallm_jax.engine.draft import DraftModel
    from novallm_jax.kernels import native
    from tests.engine_fixtures import EXEC, tiny_params

    monkeypatch.setattr(native, "available", lambda: False)
    with pytest.raises(InvalidRequestError, match="ragged steps, which run on CPU with the native kernels") as e:
        DraftModel(TINY, tiny_params(), EXEC, TINY.vocab_size)
    assert e.value.param == "draft_model"
