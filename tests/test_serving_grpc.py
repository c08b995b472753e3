"""The gRPC front: committed stubs are what protoc makes of the .proto; a streamed generation equals REST's text
for the same seed; errors map to status codes; cancelling a call frees the request's pages."""

from __future__ import annotations

import json
import os
import re
import time

import grpc
import httpx
import pytest

from novallm_jax.serving import novallm_pb2 as pb
from novallm_jax.serving import novallm_pb2_grpc as pb_grpc
from novallm_jax.serving import proto_gen
from novallm_jax.serving.app import ServerConfig
from novallm_jax.serving.runner import BackgroundServer
from tests.test_serving_support import MODEL, shared_llm, wait_idle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 60.0


def test_committed_stubs_are_what_protoc_generates(tmp_path):
    import grpc_tools

    texts = proto_gen.generate(ROOT, str(tmp_path))
    for rel, text in texts.items():
        with open(os.path.join(ROOT, rel)) as f:
            committed = f.read()
        generated_with = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", texts[proto_gen.OUTPUTS[1]]).group(1)
        if generated_with != getattr(grpc_tools, "__version__", generated_with):
            # Another grpcio-tools writes other version stamps; everything else must still match.
            mask = lambda s: re.sub(r"\d+\.\d+\.\d+|\n\s+\d+,", "V", s)
            committed, text = mask(committed), mask(text)
        assert committed == text, f"{rel} is stale: run python -m novallm_jax.serving.proto_gen"


@pytest.fixture(scope="module")
def llm():
    return shared_llm()


@pytest.fixture(scope="module")
def server(llm):
    with BackgroundServer(llm, ServerConfig(api_key="sk-grpc"), grpc=True) as srv:
        yield srv
    assert llm.engine.check_leaks() == []


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield pb_grpc.GenerationStub(channel)


AUTH = (("authorization", "Bearer sk-grpc"),)


def _generate(stub, request, metadata=AUTH):
    return list(stub.Generate(request, metadata=metadata, timeout=TIMEOUT))


def test_grpc_stream_equals_rest_for_the_same_seed(server, stub):
    sampling = dict(temperature=0.8, top_p=0.9, top_k=100, seed=4242, max_tokens=20, presence_penalty=0.5)
    responses = _generate(
        stub, pb.GenerateRequest(model=MODEL, text="gRPC and REST agree", sampling=pb.SamplingParams(**sampling))
    )
    assert len(responses) > 1 and responses[-1].finished and not any(r.finished for r in responses[:-1])
    text = "".join(r.text for r in responses)
    ids = [t for r in responses for t in r.token_ids]
    rest = httpx.post(
        server.url + "/v1/completions",
        timeout=TIMEOUT,
        headers={"Authorization": "Bearer sk-grpc"},
        json={"model": MODEL, "prompt": "gRPC and REST agree", **sampling},
    ).json()
    assert text == rest["choices"][0]["text"]
    assert responses[-1].finish_reason == rest["choices"][0]["finish_reason"]
    assert responses[-1].usage.completion_tokens == len(ids) == rest["usage"]["completion_tokens"]
    assert responses[-1].usage.prompt_tokens == rest["usage"]["prompt_tokens"]


def test_grpc_chat_and_token_ids_match_rest(server, stub, llm):
    messages = [{"role": "user", "content": "Hello over gRPC"}]
    chat = _generate(
        stub,
        pb.GenerateRequest(
            chat=pb.Conversation(messages=[pb.ChatMessage(**m) for m in messages]),
            sampling=pb.SamplingParams(seed=11, max_tokens=8, logprobs=2),
        ),
    )
    rest = httpx.post(
        server.url + "/v1/chat/completions",
        timeout=TIMEOUT,
        headers={"Authorization": "Bearer sk-grpc"},
        json={"model": MODEL, "messages": messages, "seed": 11, "max_tokens": 8},
    ).json()
    assert "".join(r.text for r in chat) == rest["choices"][0]["message"]["content"]
    lps = [lp for r in chat for lp in r.logprobs]
    assert [lp.token_id for lp in lps] == [t for r in chat for t in r.token_ids]
    assert all(len(lp.top) == 2 and max(lp.top.values()) >= lp.logprob - 1e-5 for lp in lps)
    ids = llm.encode("token ids in")
    by_ids = _generate(
        stub, pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(seed=3, max_tokens=6))
    )
    by_text = _generate(stub, pb.GenerateRequest(text="token ids in", sampling=pb.SamplingParams(seed=3, max_tokens=6)))
    assert "".join(r.text for r in by_ids) == "".join(r.text for r in by_text)


def test_grpc_errors_map_to_status_codes(stub):
    cases = [
        (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(sampling=pb.SamplingParams()), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(text=""), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(max_tokens=10**6)), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10**8])), grpc.StatusCode.INVALID_ARGUMENT),
        (
            pb.GenerateRequest(text="x", sampling=pb.SamplingParams(temperature=float("nan"))),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            pb.GenerateRequest(text="x", sampling=pb.SamplingParams(top_p=float("inf"))),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            pb.GenerateRequest(text="x", sampling=pb.SamplingParams(logit_bias={5: float("nan")})),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(stop=[""])), grpc.StatusCode.INVALID_ARGUMENT),
        (
            pb.GenerateRequest(text="x", sampling=pb.SamplingParams(min_tokens=2**32 - 1)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (pb.GenerateRequest(chat=pb.Conversation()), grpc.StatusCode.INVALID_ARGUMENT),
        (
            pb.GenerateRequest(chat=pb.Conversation(messages=[pb.ChatMessage(role="robot", content="x")])),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (pb.GenerateRequest(model="other", text="x"), grpc.StatusCode.NOT_FOUND),
    ]
    for request, code in cases:
        with pytest.raises(grpc.RpcError) as e:
            _generate(stub, request)
        assert e.value.code() == code, (request, e.value.details())
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.RpcError) as e:
            _generate(stub, pb.GenerateRequest(text="x"), metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_grpc_bytes_that_are_not_utf8_are_invalid_argument(server):
    """A lone surrogate cannot be set on a Python proto string; on the wire it is bytes that are not UTF-8 (here
    U+D800 as CESU-8 would write it), which fail to parse: INVALID_ARGUMENT, not grpc's INTERNAL."""
    field = lambda number, payload: bytes([number << 3 | 2, len(payload)]) + payload  # a length-delimited field
    text = b"\xed\xa0\x80 hi"
    bodies = {
        "text": field(2, text),
        "chat": field(4, field(1, field(1, b"user") + field(2, text))),
        "model": field(1, text) + field(2, b"ok"),
        "truncated": b"\x12\x10abc",
    }
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        generate = channel.unary_stream(
            "/novallm.v1.Generation/Generate",
            request_serializer=lambda b: b,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        health = channel.unary_unary(
            "/novallm.v1.Generation/Health",
            request_serializer=lambda b: b,
            response_deserializer=pb.HealthResponse.FromString,
        )
        for name, body in bodies.items():
            with pytest.raises(grpc.RpcError) as e:
                list(generate(body, metadata=AUTH, timeout=TIMEOUT))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, e.value.details())
            assert "GenerateRequest" in e.value.details()
            assert name == "truncated" or "UTF-8" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            health(b"\x0a\x05ab", timeout=TIMEOUT)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_unexpected_error_is_internal_with_a_request_id(stub, llm, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise TypeError("TextInputSequence must be str")

    monkeypatch.setattr(llm.tokenizer, "encode", broken)
    with caplog.at_level("ERROR"), pytest.raises(grpc.RpcError) as e:
        _generate(stub, pb.GenerateRequest(text="x"))
    assert e.value.code() == grpc.StatusCode.INTERNAL and "TextInputSequence" not in e.value.details()
    rid = re.search(r"request id (grpc-[0-9a-f]+)", e.value.details()).group(1)
    assert any(rid in r.getMessage() and r.exc_info for r in caplog.records)


def test_grpc_cancel_frees_pages_and_health(stub, llm):
    wait_idle(llm)
    before = llm.engine.stats().get("finished_cancelled", 0)
    call = stub.Generate(
        pb.GenerateRequest(text="cancel me", sampling=pb.SamplingParams(max_tokens=200, ignore_eos=True, seed=1)),
        metadata=AUTH,
        timeout=TIMEOUT,
    )
    for i, _ in enumerate(call):
        if i == 2:
            break
    call.cancel()
    deadline = time.monotonic() + 10
    while llm.engine.stats().get("finished_cancelled", 0) == before:
        assert time.monotonic() < deadline, "the cancelled call's request is still running"
        time.sleep(0.01)
    stats = wait_idle(llm)
    assert llm.engine.check_leaks() == []
    health = stub.Health(pb.HealthRequest(), timeout=TIMEOUT)
    assert health.status == pb.HealthResponse.SERVING and health.model == MODEL
    assert health.kv_pages_free == llm.engine.stats()["kv_pages_free"] and health.running == stats["running"] == 0


def test_grpc_tool_calls_match_rest(server, stub):
    """The same tool-calling code under both fronts: a named function's call, seeded, is the same over gRPC and REST;
    a tool_choice naming no tool is INVALID_ARGUMENT."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather",
                "parameters": {
                    "type": "object",
                    "required": ["city", "days"],
                    "properties": {
                        "city": {"type": "string", "enum": ["Paris", "Rome"]},
                        "days": {"type": "integer", "minimum": 1, "maximum": 9},
                    },
                },
            },
        }
    ]
    messages = [{"role": "user", "content": "Weather?"}]
    responses = _generate(
        stub,
        pb.GenerateRequest(
            chat=pb.Conversation(
                messages=[pb.ChatMessage(**m) for m in messages],
                tools_json=json.dumps(tools),
                tool_choice="get_weather",
            ),
            sampling=pb.SamplingParams(seed=7, max_tokens=30, temperature=1.0),
        ),
    )
    last = responses[-1]
    assert last.finish_reason == "tool_calls" and "".join(r.text for r in responses) == ""
    (call,) = last.tool_calls
    rest = httpx.post(
        server.url + "/v1/chat/completions",
        timeout=TIMEOUT,
        headers={"Authorization": "Bearer sk-grpc"},
        json={
            "model": MODEL,
            "messages": messages,
            "seed": 7,
            "max_tokens": 30,
            "temperature": 1.0,
            "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        },
    ).json()
    (rest_call,) = rest["choices"][0]["message"]["tool_calls"]
    assert (call.name, json.loads(call.arguments)) == (
        rest_call["function"]["name"],
        json.loads(rest_call["function"]["arguments"]),
    )
    with pytest.raises(grpc.RpcError) as e:
        _generate(
            stub,
            pb.GenerateRequest(
                chat=pb.Conversation(
                    messages=[pb.ChatMessage(**m) for m in messages], tools_json=json.dumps(tools), tool_choice="nope"
                )
            ),
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tool_choice" in e.value.details()
