"""SamplingParams validation: each invalid field raises InvalidRequestError naming the field and its range."""

import dataclasses
import math

import pytest

from novallm_jax.errors import InvalidRequestError
from novallm_jax.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "kwargs, param, message",
    [
        ({"temperature": -0.1}, "temperature", "temperature must be >= 0, got -0.1"),
        ({"temperature": math.nan}, "temperature", "temperature must be a finite number >= 0"),
        ({"temperature": "hot"}, "temperature", "temperature must be a finite number >= 0"),
        ({"top_k": -2}, "top_k", "top_k must be an integer >= 1, or 0 or -1 to disable it, got -2"),
        ({"top_k": 2.5}, "top_k", "top_k must be an integer"),
        ({"top_p": 1.5}, "top_p", "top_p must be in (0, 1], got 1.5"),
        ({"top_p": 0.0}, "top_p", "top_p must be in (0, 1], got 0.0"),
        ({"min_p": -0.5}, "min_p", "min_p must be in [0, 1], got -0.5"),
        ({"min_p": 1.01}, "min_p", "min_p must be in [0, 1], got 1.01"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "repetition_penalty must be > 0, got 0.0"),
        ({"presence_penalty": 2.5}, "presence_penalty", "presence_penalty must be in [-2, 2], got 2.5"),
        ({"frequency_penalty": -3}, "frequency_penalty", "frequency_penalty must be in [-2, 2], got -3"),
        ({"logit_bias": {5: 150}}, "logit_bias", "logit_bias values must be in [-100, 100], got 150 for token 5"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias", "logit_bias keys must be token ids (integers >= 0), got -1"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias", "logit_bias keys must be token ids"),
        ({"logit_bias": [1, 2]}, "logit_bias", "logit_bias must be a map from token id to bias"),
        ({"seed": 2**64}, "seed", "seed must be null or an integer in [-2**63, 2**64)"),
        ({"seed": 1.5}, "seed", "seed must be null or an integer"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be null or an integer >= 1, got 0"),
        ({"min_tokens": -1}, "min_tokens", "min_tokens must be an integer >= 0, got -1"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens", "min_tokens must be <= max_tokens (10), got 20"),
        ({"stop": ["ok", ""]}, "stop", "stop must be a string or a list of non-empty strings"),
        ({"stop": [1]}, "stop", "stop must be a string or a list of non-empty strings"),
        ({"stop": ["ok", "\ud800 hi"]}, "stop", "stop string '\\ud800 hi' holds a lone UTF-16 surrogate U+D800"),
        ({"logit_bias": {"\u00b2": 1.0}}, "logit_bias", "logit_bias keys must be token ids"),  # int() refuses "²"
        ({"logit_bias": {"9" * 5000: 1.0}}, "logit_bias", "logit_bias keys must be token ids"),  # past int()'s limit
        ({"stop_token_ids": [3, -4]}, "stop_token_ids", "stop_token_ids must be a list of token ids"),
        ({"ignore_eos": 1}, "ignore_eos", "ignore_eos must be a boolean"),
        ({"logprobs": 21}, "logprobs", "logprobs must be null or an integer in [0, 20], got 21"),
        ({"logprobs": -1}, "logprobs", "logprobs must be null or an integer in [0, 20], got -1"),
        ({"n": 0}, "n", "n must be an integer >= 1, got 0"),
    ],
)
def test_invalid_field_raises_with_param_and_range(kwargs, param, message):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)  # the HTTP layer maps ValueError-like errors to 400


@pytest.mark.parametrize(
    "kwargs, param",
    [({"logit_bias": {100: 1.0}}, "logit_bias"), ({"stop_token_ids": [7, 100]}, "stop_token_ids")],
)
def test_token_ids_checked_against_vocab(kwargs, param):
    params = SamplingParams(**kwargs)
    params.validate()  # unknown vocabulary: nothing to check
    params.validate(vocab_size=101)
    with pytest.raises(InvalidRequestError) as info:
        params.validate(vocab_size=100)
    assert info.value.param == param
    assert "token id 100, out of range: token ids must be in [0, 100)" in str(info.value)


def test_boundaries_accepted_and_normalized():
    p = SamplingParams(
        temperature=0,
        top_k=-1,
        top_p=1,
        min_p=1,
        presence_penalty=-2,
        frequency_penalty=2,
        logit_bias={"12": -100, 3: 100},
        seed=-(2**63),
        stop="END",
        stop_token_ids=[5],
        logprobs=20,
        max_tokens=None,
        min_tokens=3,
    )
    assert p.greedy and isinstance(p.temperature, float)
    assert p.logit_bias == {12: -100.0, 3: 100.0}
    assert p.stop == ("END",) and p.stop_token_ids == (5,)
    assert hash(p) == hash(dataclasses.replace(p))  # hashable despite the dict
    assert SamplingParams(temperature=1e-6).greedy and not SamplingParams(temperature=1e-4).greedy


def test_seed_resolution_and_children():
    p = SamplingParams()
    resolved = p.with_resolved_seed()
    assert p.seed is None and isinstance(resolved.seed, int)
    assert resolved.with_resolved_seed() is resolved
    parent = SamplingParams(seed=7, n=3)
    assert [parent.for_child(i).seed for i in range(3)] == [7, 8, 9]
    assert all(parent.for_child(i).n == 1 for i in range(3))
    assert SamplingParams(n=2).for_child(1).seed is None
