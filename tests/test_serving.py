"""The REST API against a live server on 127.0.0.1: the official openai client gives the SDK's text for a seeded
request; 32 concurrent streams match their offline runs; a disconnect cancels and frees; bad input gets
OpenAI-shaped errors; keys, limits, metrics.

Every network call has a client timeout, so no test can hang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from novallm_jax.sampling_params import SamplingParams
from novallm_jax.serving.app import ServerConfig
from novallm_jax.serving.runner import BackgroundServer
from tests.test_serving_support import MODEL, is_openai_error, shared_llm, wait_idle

TIMEOUT = 60.0
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
# Sampling settings that exercise every sampler feature (top_k and min_p are extensions, sent in extra_body).
SAMPLING = dict(temperature=0.9, top_p=0.95, presence_penalty=0.3, frequency_penalty=0.2, seed=1234)
EXTRA = dict(top_k=200, min_p=0.001, repetition_penalty=1.1)


@pytest.fixture(scope="module")
def llm():
    return shared_llm()


@pytest.fixture(scope="module")
def server(llm):
    with BackgroundServer(llm, ServerConfig()) as srv:
        yield srv
    assert llm.engine.check_leaks() == []


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


def sdk_params(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, **{**SAMPLING, **EXTRA, **kw})


# ---- the openai client gives the SDK's text -------------------------------------------------------------------------


def test_completion_equals_sdk(client, llm):
    prompt = "The quick brown fox"
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, extra_body=EXTRA, **SAMPLING)
    want = llm.generate(prompt, sdk_params(12))[0]
    (choice,) = resp.choices
    assert choice.text == want.text
    assert choice.finish_reason == want.outputs[0].finish_reason.value
    assert resp.usage.prompt_tokens == len(want.prompt_token_ids)
    assert resp.usage.completion_tokens == len(want.outputs[0].token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.model == MODEL and resp.object == "text_completion"


def test_streamed_completion_equals_sdk_and_reports_usage(client, llm):
    prompt = "Once upon a time"
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=14,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=EXTRA,
            **SAMPLING,
        )
    )
    want = llm.generate(prompt, sdk_params(14))[0]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [want.outputs[0].finish_reason.value]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    assert usage_chunks[0].usage.completion_tokens == len(want.outputs[0].token_ids)
    assert usage_chunks[0].usage.prompt_tokens == len(want.prompt_token_ids)


def test_chat_equals_sdk(client, llm):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, extra_body=EXTRA, **SAMPLING)
    want = llm.chat(MESSAGES, sdk_params(10))
    assert resp.choices[0].message.content == want.text
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage.prompt_tokens == len(llm.chat_prompt(MESSAGES))
    assert resp.usage.completion_tokens == len(want.outputs[0].token_ids)


def test_streamed_chat_equals_sdk(client, llm):
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=10, stream=True, extra_body=EXTRA, **SAMPLING
        )
    )
    want = llm.chat(MESSAGES, sdk_params(10))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.outputs[0].finish_reason.value
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_n_and_prompt_lists_fan_out_like_the_sdk(client, llm):
    prompts = ["Alpha beta", "Gamma delta epsilon"]
    resp = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=8, seed=99, temperature=1.0)
    want = llm.generate(prompts, SamplingParams(n=2, max_tokens=8, seed=99))
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert [c.text for c in resp.choices] == [o.text for r in want for o in r.outputs]
    assert len({c.text for c in resp.choices}) > 1  # children are seeded apart


def test_token_id_prompts_and_stop_strings(client, llm):
    ids = llm.encode("Numbers: one two three")
    free = llm.generate([ids], SamplingParams(max_tokens=12, seed=5))[0].text
    stop = free.strip()[2:5]  # a piece of what the model says, so that generation stops before it
    resp = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, seed=5, stop=[stop])
    want = llm.generate([ids], SamplingParams(max_tokens=12, seed=5, stop=(stop,)))[0]
    assert resp.choices[0].text == want.text and stop not in resp.choices[0].text
    assert resp.choices[0].finish_reason == "stop"


def test_completion_logprobs_match_the_sdk(client, llm):
    resp = client.completions.create(model=MODEL, prompt="Logprobs please", max_tokens=6, seed=3, logprobs=3)
    want = llm.generate("Logprobs please", SamplingParams(max_tokens=6, seed=3, logprobs=3))[0].outputs[0]
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(want.token_ids) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert lp.token_logprobs == pytest.approx([e.logprob for e in want.logprobs], abs=1e-4)
    assert all(
        len(top) <= 3 and max(top.values()) >= chosen - 1e-5 for top, chosen in zip(lp.top_logprobs, lp.token_logprobs)
    )
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs(client, llm):
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, seed=8, logprobs=True, top_logprobs=2
    )
    want = llm.chat(MESSAGES, SamplingParams(max_tokens=5, seed=8, logprobs=2)).outputs[0]
    content = resp.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([e.logprob for e in want.logprobs], abs=1e-4)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert all(c.bytes == list(c.token.encode()) for c in content)


def test_models_and_health(client, http, llm):
    assert [m.id for m in client.models.list().data] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.owned_by == "novallm" and card.object == "model"
    assert 0 < card.created <= time.time() and card.max_model_len == llm.engine.max_model_len
    assert client.models.list().data[0].max_model_len == llm.engine.max_model_len
    assert http.get("/health").json() == {"status": "ok"}
    r = http.get("/v1/models/other")
    assert r.status_code == 404 and is_openai_error(r.json()) and r.json()["error"]["code"] == "model_not_found"


# ---- echo, suffix, tokenize and detokenize --------------------------------------------------------------------------


def test_echo_prepends_the_prompt_and_suffix_is_refused(client, llm):
    prompt = "Echo this prompt"
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, seed=4, echo=True)
    want = llm.generate(prompt, SamplingParams(max_tokens=6, seed=4))[0].text
    assert resp.choices[0].text == prompt + want
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=[llm.encode(prompt)], max_tokens=6, seed=4, echo=True, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == prompt + want
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, suffix=" and the end")
    assert e.value.body["param"] == "suffix" and "not supported" in e.value.body["message"]


def test_echo_with_logprobs_and_prompt_logprobs_give_the_prompts_logprobs(client, llm):
    """The prompt's tokens come first (None for the first, as OpenAI's legacy API), with the SDK's prompt_logprobs
    (which tests/test_embeddings.py checks against transformers); then the completion's, as without echo."""
    prompt = "Echo this prompt"
    ids = llm.encode(prompt)
    sdk = llm.prompt_logprobs(ids, 2)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, seed=4, logprobs=2)
    for stream in (False, True):
        r = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=4,
            seed=4,
            echo=True,
            logprobs=2,
            stream=stream,
            extra_body={"prompt_logprobs": 1},
        )
        choices = list(r) if stream else [r]
        lp = {
            key: sum(
                (
                    getattr(c.choices[0].logprobs, key)
                    for c in (choices if stream else [r])
                    if c.choices and c.choices[0].logprobs
                ),
                [],
            )
            for key in ("tokens", "token_logprobs", "top_logprobs")
        }
        first = (choices[0] if stream else r).choices[0].model_extra["prompt_logprobs"]
        n = len(ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:n] == pytest.approx([e.logprob for e in sdk[1:]], abs=1e-5)
        assert [len(t) for t in lp["top_logprobs"][1:n]] == [2] * (n - 1)
        assert lp["token_logprobs"][n:] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)
        assert first[0] is None and len(first) == n
        assert first[1][str(ids[1])]["logprob"] == pytest.approx(sdk[1].logprob, abs=1e-5)


def test_tokenize_and_detokenize(http, llm, server):
    max_len = llm.engine.max_model_len
    r = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello tokens"})
    ids = llm.encode("Hello tokens")
    assert r.json() == {"count": len(ids), "max_model_len": max_len, "tokens": ids, "token_strs": None}
    r = http.post("/tokenize", json={"prompt": "Hello tokens", "add_special_tokens": False, "return_token_strs": True})
    plain = llm.tokenizer.encode("Hello tokens", add_special_tokens=False)
    assert r.json()["tokens"] == plain
    assert r.json()["token_strs"] == [llm.tokenizer.id_to_token(t) for t in plain]
    chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == llm.chat_prompt(MESSAGES) and chat["count"] == len(chat["tokens"])
    no_prompt = http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert no_prompt["tokens"] == llm.chat_prompt(MESSAGES, add_generation_prompt=False) != chat["tokens"]
    r = http.post("/detokenize", json={"model": MODEL, "tokens": chat["tokens"]})
    assert r.json() == {"prompt": llm.tokenizer.decode(chat["tokens"])}
    assert "Name a colour." in r.json()["prompt"]
    assert http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}
    # The chat request's usage counts exactly the tokens /tokenize reports.
    done = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 1}).json()
    assert done["usage"]["prompt_tokens"] == chat["count"]
    _post(http, "/tokenize", json.dumps({"model": MODEL}), 400, param="prompt")
    _post(http, "/tokenize", json.dumps({"prompt": "x", "messages": MESSAGES}), 400, param="prompt")
    _post(http, "/tokenize", json.dumps({"model": "other", "prompt": "x"}), 404, param="model")
    _post(http, "/detokenize", json.dumps({"tokens": [1, llm.tokenizer.vocab_size]}), 400, param="tokens")
    _post(http, "/detokenize", json.dumps({"tokens": [-1]}), 400, param="tokens")
    _post(http, "/detokenize", json.dumps({"tokens": "abc"}), 400, param="tokens")


# ---- the last resort: unexpected errors -----------------------------------------------------------------------------


def test_an_unexpected_error_is_an_openai_500_with_a_request_id_and_a_logged_traceback(http, llm, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise TypeError("TextInputSequence must be str")  # what a library raised on a lone surrogate

    monkeypatch.setattr(llm.tokenizer, "encode", broken)
    with caplog.at_level("ERROR"):
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}, headers={"x-request-id": "probe-1"})
        r2 = http.post("/tokenize", json={"prompt": "x"})
    for resp, rid in ((r, "probe-1"), (r2, r2.headers["x-request-id"])):
        assert resp.status_code == 500 and is_openai_error(resp.json()), resp.text
        assert resp.headers["x-request-id"] == rid and rid in resp.json()["error"]["message"]
        assert "TextInputSequence" not in resp.text and resp.json()["error"]["type"] == "server_error"
        logged = [rec for rec in caplog.records if rid in rec.getMessage()]
        assert logged and logged[0].exc_info and "TextInputSequence" in caplog.text
    assert http.get("/health").headers["x-request-id"].startswith("req-")
    assert http.get("/health", headers={"x-request-id": "bad id\u00e9".encode()}).headers["x-request-id"] != "bad id"


def test_an_error_mid_stream_ends_the_stream_with_an_error_event(http, llm, monkeypatch):
    from novallm_jax.serving import app as app_module

    real = app_module._finish_reason
    calls = []

    def broken(out):
        calls.append(out)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(out)

    monkeypatch.setattr(app_module, "_finish_reason", broken)
    r = http.post(
        "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 8, "stream": True, "ignore_eos": True}
    )
    events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert is_openai_error(error) and r.headers["x-request-id"] in error["error"]["message"]
    assert "boom" not in r.text
    wait_idle(llm)
    assert llm.engine.check_leaks() == []


# ---- concurrency, disconnects ---------------------------------------------------------------------------------------


def test_32_concurrent_streams_each_equal_their_offline_run(server, llm, http):
    prompts = [f"Client {i} asks about item {i * 7}." for i in range(32)]
    params = [SamplingParams(max_tokens=16 + i % 5, seed=1000 + i, temperature=1.0) for i in range(32)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:  # offline, through the SDK (batched by the engine)
        offline = list(pool.map(lambda a: llm.generate(a[0], a[1])[0].text, zip(prompts, params)))

    async def one(client, prompt, p):
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=p.max_tokens, seed=p.seed, stream=True
        )
        return "".join([c.choices[0].text async for c in stream])

    async def all_clients():
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0
        ) as client:
            return await asyncio.gather(*(one(client, pr, p) for pr, p in zip(prompts, params)))

    online = asyncio.run(asyncio.wait_for(all_clients(), 120))
    assert online == offline
    # The server keeps serving.
    assert http.get("/health").status_code == 200
    r = http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": prompts[0], "max_tokens": params[0].max_tokens, "seed": params[0].seed},
    )
    assert r.json()["choices"][0]["text"] == offline[0]
    wait_idle(llm)
    assert llm.engine.check_leaks() == []


def test_disconnect_mid_stream_cancels_and_frees_pages(server, llm, monkeypatch):
    wait_idle(llm)
    step = llm.engine.step

    def slow_step():  # >= 4 s for the long request, so it is still running when the client hangs up, whatever the load
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(llm.engine, "step", slow_step)
    cancelled_before = llm.engine.stats().get("finished_cancelled", 0)
    others = [("Other stream one", 7), ("Other stream two", 8), ("Other stream three", 9)]
    offline = [llm.generate(p, SamplingParams(max_tokens=40, seed=s))[0].text for p, s in others]
    started = threading.Barrier(len(others) + 1, timeout=TIMEOUT)

    def other(prompt, seed):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "seed": seed, "stream": True}
        with httpx.Client(timeout=TIMEOUT) as c, c.stream("POST", server.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            text, first = "", True
            for line in lines:
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if first:
                    started.wait()
                    first = False
                text += json.loads(line[6:])["choices"][0]["text"]
            return text

    with concurrent.futures.ThreadPoolExecutor(len(others)) as pool:
        futures = [pool.submit(other, p, s) for p, s in others]
        body = {
            "model": MODEL,
            "prompt": "A very long story",
            "max_tokens": 200,
            "ignore_eos": True,
            "seed": 1,
            "stream": True,
        }
        with httpx.Client(timeout=TIMEOUT) as c:
            with c.stream("POST", server.url + "/v1/completions", json=body) as r:
                seen = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        seen.append(line)
                    if len(seen) == 3:
                        break
                stats = llm.engine.stats()  # on failure: what the stream sent, and the engine's counters
                assert stats["running"] >= 1, (seen, stats)
                started.wait()  # the other streams are mid-flight too
        # Leaving the blocks closes the connection: the server must cancel the request.
        deadline = time.monotonic() + 10
        while llm.engine.stats().get("finished_cancelled", 0) == cancelled_before:
            assert time.monotonic() < deadline, "the disconnected request was not cancelled"
            time.sleep(0.01)
        assert [f.result(timeout=TIMEOUT) for f in futures] == offline
    stats = wait_idle(llm)
    assert stats["finished_cancelled"] == cancelled_before + 1
    assert stats["running"] == stats["waiting"] == stats["swapped"] == 0
    assert llm.engine.check_leaks() == []


def test_over_max_concurrent_gets_429_and_full_queue_503(llm, monkeypatch):
    with BackgroundServer(llm, ServerConfig(max_concurrent=1)) as srv, httpx.Client(timeout=TIMEOUT) as c:
        first = {}
        body = {"model": MODEL, "prompt": "hold the line", "max_tokens": 4}
        with llm.engine._lock:  # the engine cannot step, so the first request stays in flight
            sender = threading.Thread(target=lambda: first.update(r=c.post(srv.url + "/v1/completions", json=body)))
            sender.start()
            deadline = time.monotonic() + TIMEOUT
            while srv.server.admission.active < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = c.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "second"})
        sender.join(TIMEOUT)
        assert r.status_code == 429 and is_openai_error(r.json())
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert first["r"].status_code == 200
        wait_idle(llm)
        monkeypatch.setattr(llm.engine, "config", dataclasses.replace(llm.engine.config, max_queue=0))
        r = c.post(srv.url + "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
        assert r.status_code == 503 and is_openai_error(r.json()) and r.json()["error"]["code"] == "queue_full"
        monkeypatch.undo()
        assert (
            c.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "again", "max_tokens": 2}).status_code
            == 200
        )
    wait_idle(llm)
    assert llm.engine.check_leaks() == []


# ---- bad input ------------------------------------------------------------------------------------------------------


def _post(http, path, content, status, param=None, code=None):
    r = http.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    body = r.json()
    assert is_openai_error(body), body
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_malformed_json_and_invalid_utf8(http, path):
    for bad in (
        b"{",
        b"",
        b"[1, 2",
        b"null",
        b'{"model": "tiny-llama",}',
        b"\xff\xfe\xfd",
        b'{"model": "tiny-llama", "prompt": "\xff\xfe", "messages": "\xc3\x28"}',
    ):
        _post(http, path, bad, 400)


def test_wrong_types_name_the_parameter(http):
    cases = [
        ({"model": MODEL, "prompt": "x", "max_tokens": "16"}, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "prompt": "x", "n": 1.5}, "n"),
        ({"model": MODEL, "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": MODEL, "prompt": {"a": 1}}, "prompt"),
        ({"model": MODEL, "prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"model": MODEL, "prompt": "x", "logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"model": MODEL, "prompt": "x", "seed": 2**70}, "seed"),
        ({"model": MODEL, "prompt": "x", "stop": ["ok", ""]}, "stop"),
        ({"model": MODEL, "prompt": [5, 10**9]}, "prompt"),
        ({"model": 7, "prompt": "x"}, "model"),
    ]
    for body, param in cases:
        _post(http, "/v1/completions", json.dumps(body), 400, param=param)
    _post(
        http,
        "/v1/chat/completions",
        json.dumps({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}),
        400,
        param="messages",
    )
    _post(http, "/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hello"}), 400, param="messages")
    # Of a union's errors (content: str | list of parts), the message shows the one that got furthest.
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}
    body = _post(http, "/v1/chat/completions", json.dumps({"model": MODEL, "messages": [image]}), 400, param="messages")
    assert "Input should be 'text' at messages.0.content.0.type" in body["error"]["message"]


def test_negative_zero_and_huge_max_tokens(http, llm):
    for path, key in (("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")):
        base = {"model": MODEL, key: "hi" if key == "prompt" else MESSAGES}
        for value in (-1, 0):
            _post(http, path, json.dumps({**base, "max_tokens": value}), 400, param="max_tokens")
        for value in (10**6, 2**63, 10**30):
            _post(
                http,
                path,
                json.dumps({**base, "max_tokens": value}),
                400,
                param="max_tokens",
                code="context_length_exceeded",
            )
    long_prompt = " ".join(["word"] * (llm.engine.max_model_len + 10))
    _post(
        http,
        "/v1/completions",
        json.dumps({"model": MODEL, "prompt": long_prompt}),
        400,
        param="prompt",
        code="context_length_exceeded",
    )


def test_empty_inputs(http):
    _post(http, "/v1/chat/completions", json.dumps({"model": MODEL, "messages": []}), 400, param="messages")
    _post(http, "/v1/completions", json.dumps({"model": MODEL, "prompt": ""}), 400, param="prompt")
    _post(http, "/v1/completions", json.dumps({"model": MODEL, "prompt": []}), 400, param="prompt")
    _post(http, "/v1/completions", json.dumps({"model": MODEL}), 400, param="prompt")


def test_unknown_model_route_and_method(http):
    _post(
        http,
        "/v1/completions",
        json.dumps({"model": "gpt-5", "prompt": "x"}),
        404,
        param="model",
        code="model_not_found",
    )
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and is_openai_error(r.json())
    r = http.delete("/v1/completions")
    assert r.status_code == 405 and is_openai_error(r.json())


def test_ten_megabyte_body_is_refused_before_parsing(http):
    big = json.dumps({"model": MODEL, "prompt": "x" * (10 << 20)}).encode()
    _post(http, "/v1/completions", big, 413, code="request_too_large")

    def chunks():  # no Content-Length: the limit holds while streaming the body too
        for _ in range(10):
            yield b"x" * (1 << 20)

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and is_openai_error(r.json())
    assert http.get("/health").status_code == 200


# ---- access ---------------------------------------------------------------------------------------------------------


def test_api_key_is_enforced_when_set(llm):
    with BackgroundServer(llm, ServerConfig(api_key="sk-secret")) as srv, httpx.Client(timeout=TIMEOUT) as c:
        body = {"model": MODEL, "prompt": "key?", "max_tokens": 3, "seed": 1}
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "sk-secret"},
            {"Authorization": "Basic sk-secret"},
        ):
            r = c.post(srv.url + "/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and is_openai_error(r.json()), headers
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert c.get(srv.url + "/v1/models").status_code == 401
        assert c.get(srv.url + "/health").status_code == 200
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-secret", timeout=TIMEOUT, max_retries=0)
        assert (
            good.completions.create(**body).choices[0].text
            == llm.generate("key?", SamplingParams(max_tokens=3, seed=1))[0].text
        )
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_binds_to_loopback_unless_told_otherwise(server):
    from novallm_jax.serving import cli

    assert server.rest_address[0] == "127.0.0.1"
    assert cli.FLAGS["host"].default == "127.0.0.1"


# ---- metrics --------------------------------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_tokens_and_latency(llm):
    with BackgroundServer(llm, ServerConfig()) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        usages = []
        for i in range(3):
            r = c.post(
                "/v1/completions", json={"model": MODEL, "prompt": f"metric {i}", "max_tokens": 5 + i, "seed": i}
            )
            usages.append(r.json()["usage"])
        c.post("/v1/completions", json={"model": MODEL, "prompt": 5})  # a 400
        m = _samples(c.get("/metrics").text)
    ok = (("endpoint", "/v1/completions"), ("status", "200"))
    bad = (("endpoint", "/v1/completions"), ("status", "400"))
    assert m[("novallm_requests_total", ok)] == 3 and m[("novallm_requests_total", bad)] == 1
    assert m[("novallm_generation_tokens_total", ())] == sum(u["completion_tokens"] for u in usages)
    assert m[("novallm_prompt_tokens_total", ())] == sum(u["prompt_tokens"] for u in usages)
    assert m[("novallm_time_to_first_token_seconds_count", ())] == 3
    assert m[("novallm_time_per_output_token_seconds_count", ())] == 3
    assert m[("novallm_kv_pages_used", ())] + m[("novallm_kv_pages_free", ())] == llm.engine.pool.num_pages - 1
    assert m[("novallm_preemptions_total", ())] == llm.engine.counters["preemptions"]
    for name in ("novallm_requests_running", "novallm_requests_waiting", "novallm_prefix_cache_hit_rate"):
        assert (name, ()) in m
