"""Fuzzing the live REST server with schemathesis, from the server's own OpenAPI schema: over 1,000 generated
requests (schema-valid and schema-violating), no 5xx, every error in OpenAI's shape, every stream well-formed, and
no KV page leaked.

Cases are generated first (Hypothesis, derandomized: the same cases every run), then sent 16 at a time so that the
valid ones batch in the engine; the server's context is cut to 24 tokens to bound each generation.
"""

from __future__ import annotations

import concurrent.futures
import json

import pytest
import schemathesis
# Imported here, once: `case.call` imports the transports lazily, and 16 sender threads importing them at the same
# time under pytest's assertion rewriting crashed CPython 3.11's ast.parse ("AST constructor recursion depth
# mismatch") in a CI run.
import schemathesis.transport.asgi  # noqa: F401
import schemathesis.transport.requests  # noqa: F401
import schemathesis.transport.wsgi  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from novallm_jax.serving.app import ServerConfig
from novallm_jax.serving.runner import BackgroundServer
from tests.test_serving_support import is_openai_error, shared_llm, wait_idle

# (positive, negative) examples per operation; Hypothesis stops early where an operation has fewer distinct inputs.
EXAMPLES = {("POST", "/v1/completions"): (300, 230), ("POST", "/v1/chat/completions"): (300, 230),
            ("GET", "/v1/models/{model}"): (40, 40)}
DEFAULT_EXAMPLES = (10, 10)
MIN_REQUESTS = 1000
TIMEOUT = 60.0


def generate_and_send(schema, send) -> list:
    """Generates every case, handing each to `send` as soon as it is drawn; returns what `send` returned."""
    cases = []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode, count in zip((schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE),
                               EXAMPLES.get((op.method.upper(), op.path), DEFAULT_EXAMPLES)):
            @settings(max_examples=count, derandomize=True, database=None, deadline=None,
                      suppress_health_check=list(HealthCheck))
            @given(op.as_strategy(mode))
            def collect(case):
                cases.append(send(case))

            try:
                collect()
            except Unsatisfiable:  # negative mode of an operation that takes no input: nothing to break
                pass
    return cases


def check(case, base_url: str) -> str | None:
    """None if the response is acceptable, else what is wrong with it."""
    response = case.call(base_url=base_url, timeout=TIMEOUT)
    status = response.status_code
    where = f"{case.method} {case.formatted_path} body={case.body!r:.300} -> {status}"
    if status >= 500:
        return f"server error: {where}: {response.text[:300]}"
    if status >= 400:
        try:
            body = response.json()
        except ValueError:
            return f"error is not JSON: {where}: {response.text[:300]}"
        return None if is_openai_error(body) else f"error not in OpenAI shape: {where}: {body}"
    ctype = response.headers.get("content-type") or ""
    ctype = ctype[0] if isinstance(ctype, list) else ctype  # schemathesis keeps every value of a header
    if ctype.startswith("text/event-stream"):
        events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return f"stream does not end with [DONE]: {where}"
        for e in events[:-1]:
            if "error" in json.loads(e):
                return f"stream carried an error: {where}: {e}"
    return None


@pytest.fixture(scope="module")
def server():
    llm = shared_llm()
    with BackgroundServer(llm, ServerConfig(max_model_len=24)) as srv:
        yield srv
    wait_idle(llm)
    assert llm.engine.check_leaks() == []


def test_schemathesis_finds_no_5xx_and_only_openai_errors(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    tokens_before = shared_llm().engine.stats().get("generated_tokens", 0)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # sending overlaps the (slower) generation
        futures = generate_and_send(schema, lambda case: pool.submit(check, case, server.url))
        problems = [p for p in (f.result(timeout=TIMEOUT) for f in futures) if p]
    assert len(futures) >= MIN_REQUESTS
    assert problems == [], f"{len(problems)} of {len(futures)} requests failed:\n" + "\n".join(problems[:20])
    # Schema-valid requests were served, not just refused: the fuzzer reached the engine.
    assert shared_llm().engine.stats().get("generated_tokens", 0) - tokens_before > 100
