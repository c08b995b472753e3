"""Fuzzing the live REST server with schemathesis, from the server's own OpenAPI schema: over 1,000 generated
requests (schema-valid and schema-violating), no 5xx, every error in OpenAI's shape, every stream well-formed, and
no KV page leaked. Then hand-written bad inputs the fuzzer would not think of: a lone surrogate in every string
field, NaN and infinities, huge and oddly-written numbers, deep nesting, wrong content types, empty arrays.

Cases are generated first (Hypothesis, derandomized: the same cases every run), then sent 16 at a time so that the
valid ones batch in the engine; the server's context is cut to 24 tokens to bound each generation.
"""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest
import schemathesis

# Imported here, once: `case.call` imports the transports lazily, and 16 sender threads importing them at the same
# time under pytest's assertion rewriting crashed CPython 3.11's ast.parse ("AST constructor recursion depth
# mismatch") in a CI run.
import schemathesis.transport.asgi  # noqa: F401
import schemathesis.transport.requests  # noqa: F401
import schemathesis.transport.wsgi  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from novallm_jax.serving.app import ServerConfig
from novallm_jax.serving.runner import BackgroundServer
from tests.test_serving_support import MODEL, is_openai_error, shared_llm, wait_idle

# (positive, negative) examples per operation; Hypothesis stops early where an operation has fewer distinct inputs.
EXAMPLES = {
    ("POST", "/v1/completions"): (300, 230),
    ("POST", "/v1/chat/completions"): (300, 230),
    ("GET", "/v1/models/{model}"): (40, 40),
    ("POST", "/tokenize"): (40, 40),
    ("POST", "/detokenize"): (40, 40),
    ("POST", "/v1/embeddings"): (40, 40),
}
DEFAULT_EXAMPLES = (10, 10)
MIN_REQUESTS = 1000
TIMEOUT = 60.0


def generate_and_send(schema, send) -> list:
    """Generates every case, handing each to `send` as soon as it is drawn; returns what `send` returned."""
    cases = []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode, count in zip(
            (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE),
            EXAMPLES.get((op.method.upper(), op.path), DEFAULT_EXAMPLES),
        ):

            @settings(
                max_examples=count,
                derandomize=True,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            )
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


# ---- hand-written bad inputs ----------------------------------------------------------------------------------------

LONE = "\ud800 hi"  # json.dumps writes it as the escape "\ud800", as a client's JSON would carry it
# Text that only an internal error would put in a message.
INTERNAL = ("Error(", "Exception", "Traceback", "TextInputSequence", "object has no", "NoneType", "codec")
CHAT = [{"role": "user", "content": "hi"}]
# (path, body, the field the message must name): a lone surrogate in each string field the API takes.
SURROGATE_CASES = [
    ("/v1/completions", {"model": LONE, "prompt": "x"}, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": LONE}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["ok", LONE]}, "prompt.1"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": LONE}, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["ok", LONE]}, "stop.1"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "user": LONE}, "user"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "suffix": LONE}, "suffix"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {LONE: 1}}, "logit_bias"),
    ("/v1/chat/completions", {"model": LONE, "messages": CHAT}, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
    (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [
                *CHAT,
                {"role": "assistant", "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": LONE}]},
            ],
        },
        "messages.1.content.1.text",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi", "name": LONE}]},
        "messages.0.name",
    ),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": LONE, "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "stop": [LONE]}, "stop.0"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "user": LONE}, "user"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "logit_bias": {LONE: 1}}, "logit_bias"),
    (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": CHAT,
            "tools": [{"type": "function", "function": {"name": "f", "description": LONE}}],
        },
        "tools.0.function.description",
    ),
    (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": CHAT,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": LONE}},
        },
        "tool_choice.function.name",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": CHAT + [{"role": "tool", "content": "x", "tool_call_id": LONE}]},
        "messages.1.tool_call_id",
    ),
    (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [
                {"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": LONE}}]}
            ]
            + CHAT,
        },
        "messages.0.tool_calls.0.function.arguments",
    ),
    ("/v1/embeddings", {"model": MODEL, "input": LONE}, "input"),
    ("/v1/embeddings", {"model": MODEL, "input": ["ok", LONE]}, "input.1"),
    ("/tokenize", {"model": LONE, "prompt": "x"}, "model"),
    ("/tokenize", {"prompt": LONE}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
    ("/detokenize", {"model": LONE, "tokens": [1]}, "model"),
]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


def _refused(response, where: str) -> dict:
    """The response is a 400 in OpenAI's shape with a request id, and its message shows nothing internal."""
    assert response.status_code == 400, f"{where} -> {response.status_code}: {response.text[:300]}"
    body = response.json()
    assert is_openai_error(body), body
    assert response.headers.get("x-request-id"), where
    leaked = [t for t in INTERNAL if t in body["error"]["message"]]
    assert not leaked, f"{where}: the message shows internal error text {leaked}: {body}"
    return body["error"]


@pytest.mark.parametrize("path, body, field", SURROGATE_CASES, ids=[f"{p}:{f}" for p, _, f in SURROGATE_CASES])
def test_a_lone_surrogate_in_any_string_field_is_a_400_naming_it(http, path, body, field):
    content = json.dumps(body)  # ensure_ascii: the surrogate travels as the escape \ud800, as the issue found it
    assert "\\ud800" in content
    error = _refused(http.post(path, content=content, headers={"content-type": "application/json"}), field)
    assert error["param"] == field.split(".")[0]
    assert field in error["message"], error
    if field != "messages.0.role":  # pydantic refuses it before our check, as text it cannot compare
        assert "lone UTF-16 surrogate U+D800" in error["message"], error


def test_surrogate_pairs_are_text_not_errors(http):
    """A valid pair ("\ud83d\ude00", an emoji) decodes to one character and is served."""
    r = http.post(
        "/v1/completions",
        content='{"model": "%s", "prompt": "\\ud83d\\ude00", "max_tokens": 2}' % MODEL,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 200, r.text
    tokens = http.post("/tokenize", json={"prompt": "\U0001f600"}).json()["tokens"]
    assert r.json()["usage"]["prompt_tokens"] == len(tokens)


def test_odd_bodies_never_get_a_5xx(http):
    raw = [
        b'{"model": "%s", "prompt": "x", "temperature": NaN}',
        b'{"model": "%s", "prompt": "x", "top_p": Infinity}',
        b'{"model": "%s", "prompt": "x", "presence_penalty": -Infinity}',
        b'{"model": "%s", "prompt": "x", "logit_bias": {"5": NaN}}',
        b'{"model": "%s", "prompt": "x", "frequency_penalty": 1e400}',
        b'{"model": "%s", "prompt": "x", "seed": ' + b"9" * 5000 + b"}",
        b'{"model": "%s", "prompt": "x", "max_tokens": 1e3}',
        b'{"model": "%s", "prompt": [' + b"[" * 20000 + b"]" * 20000 + b"]}",
        b"[" * 100000 + b"]" * 100000,
        b'{"model": "%s", "prompt": "a\\u0000b", "max_tokens": 2}',
        b'{"model": "%s", "prompt": "x", "prompt": 5}',
    ]
    for body in raw:
        content = body.replace(b"%s", MODEL.encode())
        r = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code < 500 and (r.status_code == 200 or is_openai_error(r.json())), (content[:80], r.text)
    odd_json = [
        {"model": MODEL, "prompt": "x", "logit_bias": {"\u00b2": 1}},  # a digit int() refuses
        {"model": MODEL, "prompt": "x", "logit_bias": {"9" * 5000: 1}},  # past int()'s digit limit
        {"model": MODEL, "prompt": "x", "logit_bias": {"-0": 1, " 7 ": 2}, "max_tokens": 2},
        {"model": MODEL, "prompt": "x", "top_k": 10**30, "max_tokens": 2},
        {"model": MODEL, "prompt": "x", "min_tokens": 2**63},
        {"model": MODEL, "prompt": "x", "stop_token_ids": [2**70]},
        {"model": MODEL, "prompt": [[]]},
        {"model": MODEL, "prompt": [[], [1]]},
        {"model": MODEL, "prompt": "x", "stop": [], "stop_token_ids": [], "logit_bias": {}, "max_tokens": 2},
        {"model": MODEL, "messages": [{"role": "user", "content": []}], "max_tokens": 1},
        {"model": MODEL, "messages": [{"role": "user", "content": None}], "max_tokens": 1},
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {"model": MODEL, "messages": [{"role": "tool"}], "max_tokens": 1},
        {"model": MODEL, "messages": [{}]},
        {"model": MODEL, "messages": [[]]},
        [],
        "x",
        5,
        None,
    ]
    for body in odd_json:
        path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
        r = http.post(path, json=body)
        assert r.status_code < 500 and (r.status_code == 200 or is_openai_error(r.json())), (str(body)[:80], r.text)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": ctype} if ctype else {}
        r = http.post("/v1/completions", content=json.dumps({"model": MODEL, "prompt": "x"}), headers=headers)
        if r.status_code != 200:
            assert "Content-Type: application/json" in _refused(r, ctype)["message"]


# Any code point, lone surrogates included (Hypothesis' characters() leaves them out unless asked for category Cs,
# so schemathesis never sends one). Of these 60 examples, 24 hold one.
_texts = lambda chars: st.text(chars, min_size=1, max_size=12)
ANY_TEXT = st.one_of(_texts(st.characters()), _texts(st.one_of(st.characters(), st.characters(categories=["Cs"]))))
FIELDS = st.sampled_from(["prompt", "stop", "user", "content", "text", "name"])


@settings(max_examples=60, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=FIELDS, text=ANY_TEXT)
def test_any_text_in_a_string_field_is_served_or_refused_naming_it(http, field, text):
    if field in ("prompt", "stop", "user"):
        path, body = "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1, field: text}
    else:
        message = {"role": "user", "content": "hi", field: text}
        if field == "text":  # a content part
            message = {"role": "user", "content": [{"type": "text", "text": text}]}
        path, body = "/v1/chat/completions", {"model": MODEL, "messages": [message], "max_tokens": 1}
    r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    lone = any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    if lone:
        assert "lone UTF-16 surrogate" in _refused(r, field)["message"]
    else:  # served, or refused for another reason (a context too long), never a 5xx
        assert r.status_code == 200 or (r.status_code == 400 and is_openai_error(r.json())), (body, r.text)
