"""The gRPC front (novallm.proto): server-streaming `Generate` and `Health`, on the same `Server` as the REST API.

It shares the REST front's request building, admission limit and metrics, so a seeded request gives the same text
over either protocol. Run it on the event loop that serves REST (see `runner.py`), or on its own.

Bad input is INVALID_ARGUMENT, whatever it is: a message that does not parse (a string field that is not UTF-8, such
as a lone surrogate's bytes, fails there), an unknown role, a template that cannot render the conversation. Any other
failure is INTERNAL with a request id, its traceback logged under that id; no exception escapes a handler.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import uuid
from typing import AsyncIterator, Callable

import grpc
from absl import logging
from google.protobuf.message import DecodeError

from novallm_jax.engine.request import FinishReason
from novallm_jax.errors import InvalidRequestError
from novallm_jax.sampling_params import SamplingParams
from novallm_jax.serving import novallm_pb2 as pb
from novallm_jax.serving import novallm_pb2_grpc as pb_grpc
from novallm_jax.serving import protocol as P
from novallm_jax.serving.app import Server, _finish_reason
from novallm_jax.serving.errors import APIError
from novallm_jax.serving.streams import Fanout
from novallm_jax.tool_calls import ChatRendering, ToolStream

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _code(err: APIError) -> grpc.StatusCode:
    if err.code == "engine_unavailable":
        return grpc.StatusCode.UNAVAILABLE
    return _CODES.get(err.status, grpc.StatusCode.INTERNAL)


def sampling_from_proto(s: pb.SamplingParams) -> SamplingParams:
    """The SDK's settings of a proto message; unset fields take the REST API's defaults."""
    get = lambda name, default: getattr(s, name) if s.HasField(name) else default
    return SamplingParams(
        speculative=get("speculative", 0),
        temperature=get("temperature", 1.0),
        top_p=get("top_p", 1.0),
        top_k=get("top_k", 0),
        min_p=get("min_p", 0.0),
        repetition_penalty=get("repetition_penalty", 1.0),
        presence_penalty=get("presence_penalty", 0.0),
        frequency_penalty=get("frequency_penalty", 0.0),
        logit_bias=dict(s.logit_bias) or None,
        seed=get("seed", None),
        max_tokens=get("max_tokens", 16),
        min_tokens=s.min_tokens,
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        logprobs=get("logprobs", None),
    )


class Undecodable:
    """Stands for a request message that did not parse, so that the handler answers INVALID_ARGUMENT (grpc's own
    answer to a deserializer's exception is INTERNAL)."""

    def __init__(self, type_name: str, error: DecodeError):
        self.message = f"the request is not a valid {type_name} message: {error}"


def _json(text: str, param: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"{param} is not valid JSON: {e}", param=param) from None


def _tolerant(message_type) -> Callable[[bytes], object]:
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return Undecodable(message_type.DESCRIPTOR.full_name, e)

    return parse


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, server: Server):
        self.s = server

    async def _abort(self, context: grpc.aio.ServicerContext, e: Exception) -> None:
        err = APIError.from_exception(e)
        message = err.message
        if err.status >= 500:
            rid = f"grpc-{uuid.uuid4().hex}"
            logging.error("gRPC request %s failed: %s", rid, e, exc_info=e)
            message = f"{message} (request id {rid})"
        await context.abort(_code(err), message)

    def _check_key(self, context: grpc.aio.ServicerContext) -> None:
        key = self.s.config.api_key
        if not key:
            return
        auth = dict(context.invocation_metadata() or ()).get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or incorrect API key")

    def _chat(self, chat: pb.Conversation) -> tuple[list[int], ChatRendering]:
        messages = []
        for i, m in enumerate(chat.messages):
            if m.role not in P.ROLES:
                raise InvalidRequestError(
                    f"chat.messages[{i}].role must be one of {', '.join(P.ROLES)}, got {m.role!r}", param="chat"
                )
            message = {"role": m.role, "content": m.content}
            if m.tool_calls_json:
                message["tool_calls"] = _json(m.tool_calls_json, f"chat.messages[{i}].tool_calls_json")
            for key in ("tool_call_id", "name"):
                if getattr(m, key):
                    message[key] = getattr(m, key)
            messages.append(message)
        tools = _json(chat.tools_json, "chat.tools_json") if chat.tools_json else None
        choice = chat.tool_choice or None
        if choice not in (None, "auto", "none", "required"):
            choice = {"type": "function", "function": {"name": choice}}
        parallel = chat.parallel_tool_calls if chat.HasField("parallel_tool_calls") else None
        return self.s.render_chat(messages, tools, choice, parallel)

    def _prompt(self, request: pb.GenerateRequest) -> tuple[list[int], ChatRendering | None]:
        which = request.WhichOneof("prompt")
        if which == "text":
            ids = self.s.llm.encode(request.text)
        elif which == "token_ids":
            ids = list(request.token_ids.ids)
            if not ids:
                raise InvalidRequestError("the prompt is empty", param="token_ids")
        elif which == "chat":
            return self._chat(request.chat)
        else:
            raise InvalidRequestError("set one of text, token_ids or chat", param="prompt")
        return ids, None

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            self._check_key(context)
            if isinstance(request, Undecodable):
                raise InvalidRequestError(request.message)
            if request.model:
                self.s.check_model(request.model)
            params = sampling_from_proto(request.sampling)
            ids, rendering = self._prompt(request)
            if rendering is not None:
                params = self.s.llm.tool_params(params, rendering)
            if not request.sampling.HasField("speculative"):
                params = params.with_default_drafts(self.s.llm.speculative)
            tools = None if rendering is None else rendering.tools
            splitter = None if tools is None else ToolStream(tools, rendering.parser)
            params = dataclasses.replace(
                params, max_tokens=self.s.check_length(ids, params.max_tokens, request.WhichOneof("prompt"))
            )
            self.s.admission.acquire()
        except Exception as e:
            await self._abort(context, e)
            return
        fan = Fanout(self.s.llm, [(ids, params)])
        try:
            await fan.start()
        except Exception as e:
            self.s.admission.release()
            await self._abort(context, e)
            return
        try:
            async for _, out in fan:
                if out.finish_reason is FinishReason.ERROR:
                    err = APIError.of_failed(out.error)
                    await context.abort(_code(err), err.message)
                    return
                text, calls = out.delta_text, []
                if splitter is not None:
                    text = splitter.push(text)
                    if out.finished:
                        tail, calls = splitter.finish()
                        text += tail
                resp = pb.GenerateResponse(text=text, token_ids=out.delta_token_ids, finished=out.finished)
                for call in calls:
                    resp.tool_calls.add(id=call.id, name=call.name, arguments=call.arguments)
                if out.logprobs is not None and out.delta_token_ids:
                    end = len(out.token_ids)
                    for e in out.logprobs[end - len(out.delta_token_ids) : end]:
                        resp.logprobs.add(token_id=e.token_id, logprob=e.logprob, top=e.top)
                if out.finished:
                    resp.finish_reason = _finish_reason(out, bool(calls))
                    resp.usage.CopyFrom(
                        pb.Usage(
                            prompt_tokens=len(out.prompt_token_ids),
                            completion_tokens=len(out.token_ids),
                            cached_prompt_tokens=out.metrics.cached_prompt_tokens,
                        )
                    )
                yield resp
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # mid-stream: end the call with a status rather than let grpc report UNKNOWN
            await self._abort(context, e)
        finally:  # also on cancellation by the client: the fan-out aborts the engine request
            await fan.aclose()
            self.s.observe(fan.final)
            self.s.admission.release()

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        stats = self.s.llm.engine.stats()
        status = pb.HealthResponse.NOT_SERVING if self.s.llm.closed else pb.HealthResponse.SERVING
        return pb.HealthResponse(
            status=status,
            model=self.s.model_name,
            running=stats["running"],
            waiting=stats["waiting"],
            kv_pages_free=stats["kv_pages_free"],
        )


def build_grpc_server(server: Server, address: str) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server (not started) serving `server` on `address` ("host:port", port 0 for any); and its port."""
    grpc_server = grpc.aio.server()
    service = GenerationService(server)
    # As pb_grpc.add_GenerationServicer_to_server, with deserializers that hand a bad message to the handler.
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate,
            request_deserializer=_tolerant(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "Health": grpc.unary_unary_rpc_method_handler(
            service.Health,
            request_deserializer=_tolerant(pb.HealthRequest),
            response_serializer=pb.HealthResponse.SerializeToString,
        ),
    }
    grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("novallm.v1.Generation", handlers),))
    port = grpc_server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"gRPC could not bind {address}")
    return grpc_server, port
