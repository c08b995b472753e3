"""Structured outputs: sampling through llguidance's masks at temperature 1.0 on a random model always yields text that
the constraint accepts (50 random JSON schemas, regexes, a Lark grammar, choices); the mask on the device equals the
bits on the host; bad constraints are refused naming the field."""

import functools
import json
import random
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from novallm_jax.config import ModelConfig
from novallm_jax.errors import InvalidRequestError
from novallm_jax.kv_cache import ContiguousKVCache
from novallm_jax.model import forward, init_params
from novallm_jax.sampling import apply_token_bitmask
from novallm_jax.structured import (
    Matcher,
    StructuredOutput,
    bitmask_words,
    compile_grammar,
    fill_bitmasks,
    ll_tokenizer,
)

MAX_STEPS = 320


@pytest.fixture(scope="module")
def tok(default_gguf):
    from novallm_jax.tokenizer import load_tokenizer

    return load_tokenizer(default_gguf)


@pytest.fixture(scope="module")
def tiny(tok):
    cfg = ModelConfig(
        model_type="llama",
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
    )
    return cfg, init_params(cfg, jax.random.key(3))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _step(params, tokens, pos, cache, bitmask, key, cfg):
    logits, cache = forward(params, tokens[:, None], pos[:, None], cache, cfg, logits_index=jnp.zeros_like(pos))
    return jax.random.categorical(key, apply_token_bitmask(logits, bitmask), axis=-1).astype(jnp.int32), cache


def sample_constrained(tiny, tok, specs, seed=0) -> list[str]:
    """Temperature-1.0 sampling of every spec's row at once, each row masked by its own matcher until it is done."""
    cfg, params = tiny
    n = len(specs)
    matchers = [Matcher(s, tok, cfg.vocab_size) for s in specs]
    cache = ContiguousKVCache.create(cfg, n, MAX_STEPS + 1)
    tokens = jnp.full((n,), tok.bos_token_id or 0, jnp.int32)
    out: list[list[int]] = [[] for _ in range(n)]
    key = jax.random.key(seed)
    bitmask = np.full((n, bitmask_words(cfg.vocab_size)), -1, np.int32)
    ended = set()  # rows that drew an end-of-sequence token (allowed once the text is complete)
    for step in range(MAX_STEPS):
        live = [i for i, m in enumerate(matchers) if not m.done and i not in ended]
        if not live:
            break
        bitmask[:] = -1
        fill_bitmasks([(matchers[i], i) for i in live], bitmask)
        key, sub = jax.random.split(key)
        tokens, cache = _step(
            params, tokens, jnp.full((n,), step, jnp.int32), cache, jnp.asarray(bitmask), sub, cfg=cfg
        )
        drawn = np.asarray(tokens)
        for i in live:
            matchers[i].advance(int(drawn[i]))
            if int(drawn[i]) in tok.eos_token_ids:
                ended.add(i)
            else:
                out[i].append(int(drawn[i]))
    unfinished = [i for i, m in enumerate(matchers) if not m.done and i not in ended]
    assert not unfinished, [(specs[i], tok.decode(out[i])[-200:]) for i in unfinished][:3]
    return [tok.decode(ids) for ids in out]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """Nested objects, arrays, enums, bounded numbers, required and optional fields; every part bounded in size so
    that uniform sampling finishes."""
    kinds = ["integer", "number", "string", "boolean", "enum", "null"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 100)}
    if kind == "number":
        lo = rng.uniform(-10, 10)
        return {"type": "number", "minimum": round(lo, 2), "maximum": round(lo + rng.uniform(0.5, 20), 2)}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 8), **({"minLength": 1} if rng.random() < 0.5 else {})}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "null":
        return {"type": "null"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 3, None, True, "a b"], rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(1, 3)}
    props = {f"k{i}_{rng.randint(0, 99)}": random_schema(rng, depth + 1) for i in range(rng.randint(1, 4))}
    required = [k for k in props if rng.random() < 0.6]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def test_fifty_random_json_schemas_always_validate(tiny, tok):
    rng = random.Random(0)
    schemas = [_object_schema(rng) for _ in range(50)]
    texts = sample_constrained(tiny, tok, [StructuredOutput(json=s) for s in schemas])
    for schema, text in zip(schemas, texts):
        jsonschema.validate(json.loads(text), schema)  # raises on any mismatch
    assert len(set(texts)) > 25  # really sampled (some schemas allow a single text, e.g. a one-value enum)


def _object_schema(rng: random.Random) -> dict:
    s = random_schema(rng, 1)
    return (
        s
        if s.get("type") == "object"
        else {"type": "object", "properties": {"value": s}, "required": ["value"], "additionalProperties": False}
    )


def test_regex_grammar_and_choice(tiny, tok):
    regex = r"[A-Z][a-z]{1,6}-\d{2,4}"
    lark = 'start: expr\nexpr: NUM (OP NUM){0,4}\nNUM: /[0-9]{1,3}/\nOP: "+" | "-" | "*"'
    choices = ("yes", "no", "maybe not")
    specs = (
        [StructuredOutput(regex=regex)] * 4
        + [StructuredOutput(grammar=lark)] * 4
        + [StructuredOutput(choice=choices)] * 4
    )
    texts = sample_constrained(tiny, tok, specs, seed=1)
    for text in texts[:4]:
        assert re.fullmatch(regex, text), text
    for text in texts[4:8]:
        assert re.fullmatch(r"[0-9]{1,3}([-+*][0-9]{1,3}){0,4}", text), text
        eval(compile(text, "<grammar output>", "eval"), {})  # an arithmetic expression Python parses
    assert all(t in choices for t in texts[8:])


def test_json_object_starts_an_object_and_ends_after_it(tok):
    """Any JSON object (its contents unbounded, so not sampled from a random model here): the first token must open
    an object, and once it is closed only the end may follow."""
    m = Matcher(StructuredOutput(json_object=True), tok, tok.vocab_size)
    bitmask = np.zeros((1, bitmask_words(tok.vocab_size)), np.int32)
    m.fill(bitmask, 0)
    allowed = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[: tok.vocab_size].nonzero()[0]
    assert len(allowed) and all(tok.decode([int(t)]).startswith("{") for t in allowed)
    for t in tok.encode('{"a": [1, 2]}', add_special_tokens=False):
        m.advance(t)
    assert m.done


def test_device_mask_equals_the_host_bits():
    rng = np.random.default_rng(0)
    v = 1000  # not a multiple of 32: the last word's high bits are past the vocabulary
    bitmask = rng.integers(-(2**31), 2**31, (3, bitmask_words(v)), dtype=np.int64).astype(np.int32)
    bitmask[2] = -1  # an unconstrained row
    logits = rng.standard_normal((3, v)).astype(np.float32)
    got = np.asarray(apply_token_bitmask(jnp.asarray(logits), jnp.asarray(bitmask)))
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :v].astype(bool)
    np.testing.assert_array_equal(got, np.where(allowed, logits, -np.inf))
    np.testing.assert_array_equal(got[2], logits[2])


def test_bad_constraints_are_refused_naming_the_field(tok):
    with pytest.raises(InvalidRequestError, match="exactly one") as e:
        StructuredOutput(regex="a", choice=("a",))
    assert e.value.param == "structured_outputs"
    with pytest.raises(InvalidRequestError) as e:
        StructuredOutput(json="{not json")
    assert e.value.param == "structured_outputs.json"
    with pytest.raises(InvalidRequestError) as e:
        compile_grammar(StructuredOutput(regex="(unclosed"), tok, tok.vocab_size)
    assert e.value.param == "structured_outputs.regex"
    with pytest.raises(InvalidRequestError) as e:
        compile_grammar(StructuredOutput(grammar="start: undefined_rule"), tok, tok.vocab_size)
    assert e.value.param == "structured_outputs.grammar"
    with pytest.raises(InvalidRequestError) as e:
        StructuredOutput.from_dict({"jsonn": {}})
    assert "unknown field 'jsonn'" in str(e.value)


def test_grammars_and_tokenizer_views_are_built_once(tok):
    assert ll_tokenizer(tok, tok.vocab_size) is ll_tokenizer(tok, tok.vocab_size)
    a = StructuredOutput(json={"type": "object", "properties": {"x": {"type": "integer"}}})
    b = StructuredOutput(json='{"properties": {"x": {"type": "integer"}}, "type": "object"}')  # same schema, other text
    assert a == b and hash(a) == hash(b)
    assert compile_grammar(a, tok, tok.vocab_size) is compile_grammar(b, tok, tok.vocab_size)


# --- through the engine --------------------------------------------------------------------------------------------


def test_engine_constrained_rows_validate_and_free_rows_are_untouched(tokenizer_engine):
    """A batch mixing constrained and free rows: every constrained output validates; every free row's tokens are
    exactly those of the same request run with no constrained neighbour; nothing leaks."""
    from novallm_jax.sampling_params import SamplingParams
    from tests.engine_fixtures import make_engine

    tok = tokenizer_engine
    rng = random.Random(5)
    schemas = [_object_schema(rng) for _ in range(6)]
    free = [SamplingParams(temperature=0.8, seed=i, max_tokens=12, ignore_eos=True) for i in range(4)]
    prompts = [[100 + i, 7, 8, 9] for i in range(10)]

    def run(prompts, params_list):
        engine = make_engine(tok)
        reqs = [engine.add_request(p, params) for p, params in zip(prompts, params_list)]
        engine.run_until_idle()
        assert engine.check_leaks() == []
        return reqs

    constrained = [
        SamplingParams(temperature=1.0, seed=10 + i, max_tokens=300, structured={"json": s})
        for i, s in enumerate(schemas)
    ]
    mixed = run(prompts, constrained + free)
    alone = run(prompts[6:], free)  # the free rows with no constrained neighbour
    for schema, req in zip(schemas, mixed[:6]):
        assert req.finish_reason.value == "stop", req.text
        jsonschema.validate(json.loads(req.text), schema)
    assert [r.output_ids for r in mixed[6:]] == [r.output_ids for r in alone]


def test_a_bad_schema_is_refused_before_queueing(tokenizer_engine):
    from novallm_jax.sampling_params import SamplingParams
    from tests.engine_fixtures import make_engine

    engine = make_engine(tokenizer_engine)
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request([5, 6], SamplingParams(structured={"regex": "(unclosed"}))
    assert e.value.param == "structured_outputs.regex" and engine.stats()["waiting"] == 0


@pytest.fixture(scope="module")
def tokenizer_engine(tok):
    return tok


@pytest.mark.slow
def test_the_default_model_answers_in_json_mode_with_valid_json():
    from novallm_jax import LLM
    from novallm_jax.sampling_params import SamplingParams

    with LLM() as llm:
        r = llm.chat(
            [{"role": "user", "content": "Give me a JSON object describing Paris with keys city and country."}],
            SamplingParams(temperature=0.0, max_tokens=120, structured={"json_object": True}),
        )
    assert r.outputs[0].finish_reason.value == "stop"
    answer = json.loads(r.text)
    assert isinstance(answer, dict) and answer.get("city") == "Paris", r.text
