"""Structured outputs through the REST API and the official openai client: `chat.completions.parse` with a pydantic
model, response_format json_schema / json_object, vLLM's structured_outputs and guided_* fields (streaming too), and
precise 400s for bad constraints."""

from __future__ import annotations

import json
import random
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from novallm_jax.serving.app import ServerConfig
from novallm_jax.serving.runner import BackgroundServer
from tests.test_serving_support import MODEL, is_openai_error, shared_llm, wait_idle
from tests.test_structured import _object_schema

TIMEOUT = 120.0
MESSAGES = [{"role": "user", "content": "Describe a city."}]


@pytest.fixture(scope="module")
def server():
    llm = shared_llm()
    with BackgroundServer(llm, ServerConfig()) as srv:
        yield srv
    wait_idle(llm)
    assert llm.engine.check_leaks() == []


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


class City(BaseModel):
    name: Literal["Paris", "Rome", "Lima"]
    population_millions: int = Field(ge=0, le=40)
    coastal: bool


def test_parse_with_a_pydantic_model_returns_the_parsed_object(client):
    for seed in range(3):
        completion = client.chat.completions.parse(
            model=MODEL, messages=MESSAGES, response_format=City, temperature=1.0, seed=seed, max_tokens=200
        )
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, City), completion.choices[0].message.content
        assert completion.choices[0].finish_reason == "stop"


def test_json_schemas_always_validate_on_both_endpoints_and_streaming(client):
    rng = random.Random(11)
    for i in range(8):
        schema = _object_schema(rng)
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
        if i % 2:
            r = client.completions.create(
                model=MODEL,
                prompt="JSON:",
                max_tokens=200,
                temperature=1.0,
                seed=i,
                extra_body={"response_format": fmt},
            )
            text = r.choices[0].text
        else:
            stream = client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                response_format=fmt,
                max_tokens=200,
                temperature=1.0,
                seed=i,
                stream=True,
            )
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_regex_choice_and_grammar_fields(client):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format={"type": "json_object"}, max_tokens=200, temperature=0.0
    )
    assert r.choices[0].message.content.startswith("{")  # the random model's object may run past max_tokens
    for extra, check in (
        ({"structured_outputs": {"regex": r"[A-Z]{2}-\d{3}"}}, lambda t: re.fullmatch(r"[A-Z]{2}-\d{3}", t)),
        ({"guided_regex": r"(yes|no)!"}, lambda t: t in ("yes!", "no!")),
        ({"guided_choice": ["alpha", "beta gamma"]}, lambda t: t in ("alpha", "beta gamma")),
        ({"structured_outputs": {"choice": ["x", "y"]}}, lambda t: t in ("x", "y")),
        ({"guided_grammar": 'start: "(" NUM ")"\nNUM: /[0-9]{1,2}/'}, lambda t: re.fullmatch(r"\(\d{1,2}\)", t)),
    ):
        for seed in range(2):
            r = client.completions.create(
                model=MODEL, prompt="Answer:", max_tokens=50, temperature=1.0, seed=seed, extra_body=extra
            )
            assert check(r.choices[0].text), (extra, r.choices[0].text)


def test_bad_constraints_get_a_400_naming_the_field(server):
    bad = [
        ({"guided_regex": "(unclosed"}, "regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"guided_grammar": "start: undefined_rule"}, "grammar"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}}, "json"),
    ]
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        for extra, param in bad:
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4, **extra})
            body = r.json()
            assert r.status_code == 400 and is_openai_error(body), (extra, r.status_code, body)
            assert param in (body["error"]["param"] or ""), (extra, body)
