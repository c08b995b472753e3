"""The OpenAI-compatible REST API over one `LLM`: completions, chat completions, models, tokenize and detokenize
(vLLM's), health and metrics.

    app = build_app(llm, ServerConfig(api_key="sk-..."))   # then serve it with uvicorn

Generation goes through the SDK (`LLM.astream_outputs`); nothing here re-implements it. With n > 1, or a list of
prompts, each completion is its own engine request with `SamplingParams.for_child(i)`, exactly as `LLM.generate`
does, so a seeded request gives the same text from the SDK and from the server.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable

from absl import logging
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from novallm_jax.engine.request import FinishReason, RequestOutput, TokenLogprob
from novallm_jax.errors import InvalidRequestError
from novallm_jax.llm import LLM
from novallm_jax.sampling_params import SamplingParams
from novallm_jax.serving import protocol as P
from novallm_jax.structured import StructuredOutput
from novallm_jax.tool_calls import ChatRendering, ToolStream
from novallm_jax.serving.errors import (
    APIError,
    APIKeyMiddleware,
    BodyLimitMiddleware,
    RequestIdMiddleware,
    install_handlers,
    internal_error,
    request_id,
)
from novallm_jax.serving.metrics import ServerMetrics
from novallm_jax.serving.streams import Fanout

# How often a non-streaming request checks whether its client is still there.
_DISCONNECT_POLL_S = 0.25


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Limits and access of one server. `model_name` defaults to the LLM's name."""

    model_name: str | None = None
    api_key: str | None = None
    max_concurrent: int = 256  # generation requests in flight before 429
    max_body_bytes: int = 1 << 20
    max_model_len: int | None = None  # a context shorter than the engine's, for this server's requests


class Admission:
    """Counts generation requests in flight (REST and gRPC together); refuses past `limit`."""

    def __init__(self, limit: int):
        self.limit, self.active = limit, 0

    def acquire(self) -> None:
        if self.active >= self.limit:
            raise APIError(
                429,
                f"too many requests in flight (limit {self.limit}); retry later",
                "rate_limit_exceeded",
                None,
                "rate_limit_exceeded",
            )
        self.active += 1

    def release(self) -> None:
        self.active -= 1


class Server:
    """State shared by the REST and gRPC fronts: the LLM, limits, metrics, and request building."""

    def __init__(self, llm: LLM, config: ServerConfig | None = None):
        self.llm = llm
        self.config = config or ServerConfig()
        self.model_name = self.config.model_name or llm.name
        self.admission = Admission(self.config.max_concurrent)
        self.metrics = ServerMetrics(llm.engine)
        self.created = int(time.time())

    @property
    def max_model_len(self) -> int:
        return min(self.config.max_model_len or self.llm.engine.max_model_len, self.llm.engine.max_model_len)

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def check_length(self, ids: list[int], max_tokens: int | None, param: str) -> int:
        """OpenAI's rule: prompt plus max_tokens must fit the context. Returns max_tokens (None: what fits)."""
        n, limit = len(ids), self.max_model_len
        if n >= limit or (max_tokens is not None and n + max_tokens > limit):
            asked = f" and {max_tokens} for the completion" if max_tokens is not None else ""
            raise APIError(
                400,
                f"this model's maximum context length is {limit} tokens; the request has {n} "
                f"prompt tokens{asked}. Shorten the prompt or lower max_tokens.",
                "invalid_request_error",
                param if n >= limit else "max_tokens",
                "context_length_exceeded",
            )
        return limit - n if max_tokens is None else max_tokens

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """Every id must be one the tokenizer can render (the model's vocabulary may be padded past it)."""
        vocab = min(self.llm.cfg.vocab_size, self.llm.tokenizer.vocab_size)
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} in {param} is outside the vocabulary [0, {vocab})", param=param)

    def chat_ids(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, add_special_tokens: bool = False
    ) -> list[int]:
        """The token ids of a conversation (roles already checked), rendered with the model's chat template."""
        return self.render_chat(
            messages, add_generation_prompt=add_generation_prompt, add_special_tokens=add_special_tokens
        )[0]

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict] | None = None,
        tool_choice=None,
        parallel_tool_calls: bool | None = None,
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
    ) -> tuple[list[int], ChatRendering]:
        """`LLM.render_chat` with "developer" read as "system" and a template's own failures as a plain 400."""
        rendered = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
        try:
            return self.llm.render_chat(
                rendered,
                tools,
                tool_choice,
                parallel_tool_calls,
                add_generation_prompt=add_generation_prompt,
                add_special_tokens=add_special_tokens,
            )
        except InvalidRequestError:
            raise
        except Exception as e:  # a template that cannot render this conversation: its text is not for clients
            logging.warning("the chat template failed on a request: %r", e)
            raise APIError(
                400,
                "the model's chat template could not render these messages (check their roles, order and contents)",
                param="messages",
            ) from e

    def token_text(self, token_id: int) -> str:
        try:
            return self.llm.tokenizer.decode([token_id])
        except Exception:  # an id the tokenizer cannot render alone
            return f"<{token_id}>"

    def observe(self, outs: list[RequestOutput | None]) -> None:
        for out in outs:
            if out is not None:
                self.metrics.observe_sequence(out)


def structured_output(req: P._Sampling) -> StructuredOutput | None:
    """The request's constraint, from whichever one of its fields gives it (two are a 400 naming the second)."""
    given: list[tuple[str, dict]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        given.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise APIError(
                400,
                "response_format of type json_schema needs a json_schema object",
                param="response_format.json_schema",
            )
        given.append(("response_format", {"json": fmt.json_schema.schema_}))
    if req.structured_outputs is not None:
        so = req.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        given.append(("structured_outputs", {k: v for k, v in so.items() if v is not False}))
    for name, key in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        if getattr(req, name) is not None:
            given.append((name, {key: getattr(req, name)}))
    if not given:
        return None
    if len(given) > 1:
        raise APIError(
            400, f"give one structured-output constraint, not {given[0][0]} and {given[1][0]}", param=given[1][0]
        )
    name, fields = given[0]
    try:
        return StructuredOutput.from_dict(fields)
    except InvalidRequestError as e:
        raise APIError(
            400, str(e), param=name if e.param == "structured_outputs" else e.param.replace("structured_outputs", name)
        ) from None


def sampling_params(req: P._Sampling, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """The SDK's settings of one request body (each child of n > 1 gets `for_child(i)` later)."""
    opt = lambda v, default: default if v is None else v
    return SamplingParams(
        speculative=opt(req.speculative, 0),
        temperature=opt(req.temperature, 1.0),
        top_p=opt(req.top_p, 1.0),
        top_k=opt(req.top_k, 0),
        min_p=opt(req.min_p, 0.0),
        repetition_penalty=opt(req.repetition_penalty, 1.0),
        presence_penalty=opt(req.presence_penalty, 0.0),
        frequency_penalty=opt(req.frequency_penalty, 0.0),
        logit_bias=req.logit_bias,
        seed=req.seed,
        max_tokens=max_tokens,
        min_tokens=opt(req.min_tokens, 0),
        stop=opt(req.stop, ()),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        n=req.n,
        structured=structured_output(req),
    )


def _finish_reason(out: RequestOutput, tool_calls: bool = False) -> str | None:
    if not out.finished:
        return None
    if out.finish_reason is FinishReason.LENGTH:
        return "length"
    return "tool_calls" if tool_calls else "stop"


def _check_failed(out: RequestOutput) -> None:
    if out.finish_reason is FinishReason.ERROR:
        raise APIError.of_failed(out.error)
    if out.finish_reason is FinishReason.CANCELLED:
        raise APIError(
            503, "the request was cancelled: the server is shutting down", "server_overloaded", None, "cancelled"
        )


def _usage(prompts: list[list[int]], outs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _delta_logprobs(out: RequestOutput) -> list[TokenLogprob]:
    if out.logprobs is None or not out.delta_token_ids:
        return []
    end = len(out.token_ids)
    return out.logprobs[end - len(out.delta_token_ids) : end]


class _Handlers:
    """The route bodies; one instance per app."""

    def __init__(self, server: Server):
        self.s = server

    # ---- shared ----------------------------------------------------------------------------------------------

    async def _run(
        self,
        request: Request,
        jobs: list[tuple[list[int], SamplingParams]],
        stream: bool,
        make_stream: Callable[[Fanout], AsyncIterator[str]],
        make_body: Callable[[list[RequestOutput]], dict],
    ) -> Response:
        """Admits, submits (errors become 4xx/5xx before any byte is sent), then streams or collects."""
        self.s.admission.acquire()
        fan = Fanout(self.s.llm, jobs)
        try:
            await fan.start()
        except BaseException:
            self.s.admission.release()
            raise
        if stream:
            rid = request_id(request.scope)

            async def body():
                try:
                    async for chunk in make_stream(fan):
                        yield chunk
                except Exception:  # the status line is sent: end the stream with an error event instead
                    logging.exception("request %s: its stream failed", rid)
                    yield _sse(internal_error(rid).body())
                    yield "data: [DONE]\n\n"
                finally:
                    await fan.aclose()
                    self.s.observe(fan.final)
                    self.s.admission.release()

            return StreamingResponse(
                body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        try:
            outs = await self._collect(request, fan)
        finally:
            self.s.observe(fan.final)
            self.s.admission.release()
        for out in outs:
            _check_failed(out)
        return JSONResponse(make_body(outs))

    @staticmethod
    async def _collect(request: Request, fan: Fanout) -> list[RequestOutput]:
        task = asyncio.create_task(fan.collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected", "invalid_request_error")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await fan.aclose()

    def _check_common(self, body: P._Sampling) -> None:
        self.s.check_model(body.model)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")

    # ---- completions -----------------------------------------------------------------------------------------

    def _prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.s.llm.encode(prompt)]
        if isinstance(prompt[0], str):
            return [self.s.llm.encode(p) for p in prompt]
        prompts = [list(prompt)] if isinstance(prompt[0], int) else [list(p) for p in prompt]
        for ids in prompts:
            self.s.check_token_ids(ids, "prompt")
        return prompts

    def _completion_logprobs(self, entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens = [self.s.token_text(e.token_id) for e in entries]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self.s.token_text(k): v for k, v in e.top.items()} for e in entries],
            "text_offset": offsets,
        }

    async def _prompt_logprobs(self, prompts: list[list[int]], k: int) -> list[list[TokenLogprob | None]]:
        return [await asyncio.to_thread(self.s.llm.prompt_logprobs, ids, k) for ids in prompts]

    def _vllm_prompt_logprobs(self, entries: list[TokenLogprob | None]) -> list[dict[str, Any] | None]:
        """vLLM's shape: per prompt token, None for the first, else {token id: {"logprob", "decoded_token"}} for the
        token and the top k."""
        out = []
        for e in entries:
            if e is None:
                out.append(None)
                continue
            scores = {e.token_id: e.logprob, **e.top}
            out.append({str(t): {"logprob": v, "decoded_token": self.s.token_text(t)} for t, v in scores.items()})
        return out

    async def completions(self, body: P.CompletionRequest, request: Request) -> Response:
        self._check_common(body)
        if body.suffix:
            raise APIError(
                400,
                "suffix (fill-in-the-middle) is not supported by this server; put the text to "
                "continue in prompt and leave suffix out",
                param="suffix",
            )
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of must equal n (or be left out)", param="best_of")
        prompts = self._prompts(body.prompt)
        if len(prompts) * body.n > P.MAX_CHOICES:
            raise APIError(400, f"n times the number of prompts must be at most {P.MAX_CHOICES}", param="n")
        params = sampling_params(body, body.max_tokens, body.logprobs)
        if body.speculative is None:
            params = params.with_default_drafts(self.s.llm.speculative)
        jobs = []
        for ids in prompts:
            fitted = dataclasses.replace(params, max_tokens=self.s.check_length(ids, body.max_tokens, "prompt"))
            jobs += [(ids, fitted.for_child(i)) for i in range(body.n)]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = [self.s.llm.tokenizer.decode(ids, skip_special_tokens=True) if body.echo else "" for ids in prompts]
        prompt_of = lambda index: index // body.n
        # The prompt's own logprobs: for echo with logprobs (OpenAI's legacy shape: None for the first token), and
        # for vLLM's prompt_logprobs field.
        k = max(body.logprobs if body.echo and body.logprobs is not None else 0, body.prompt_logprobs or 0)
        wanted = (body.echo and body.logprobs is not None) or body.prompt_logprobs is not None
        prompt_lps = await self._prompt_logprobs(prompts, k) if wanted else [None] * len(prompts)

        def echoed_logprobs(index: int) -> dict[str, Any] | None:
            entries = prompt_lps[prompt_of(index)]
            if not (body.echo and body.logprobs is not None):
                return None
            first = TokenLogprob(prompts[prompt_of(index)][0], None, {})
            lp = self._completion_logprobs(
                [first]
                + [
                    TokenLogprob(e.token_id, e.logprob, dict(list(e.top.items())[: body.logprobs])) for e in entries[1:]
                ],
                0,
            )
            lp["top_logprobs"][0] = None
            return lp

        def joined(head: dict[str, Any] | None, tail: dict[str, Any]) -> dict[str, Any]:
            if head is None:
                return tail
            end = head["text_offset"][-1] + len(head["tokens"][-1]) if head["tokens"] else 0
            return {
                "tokens": head["tokens"] + tail["tokens"],
                "token_logprobs": head["token_logprobs"] + tail["token_logprobs"],
                "top_logprobs": head["top_logprobs"] + tail["top_logprobs"],
                "text_offset": head["text_offset"] + [o + end for o in tail["text_offset"]],
            }

        def chunk(choices, usage=None):
            data = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self.s.model_name,
                "choices": choices,
            }
            if body.stream_options is not None and body.stream_options.include_usage:
                data["usage"] = usage
            return _sse(data)

        async def stream(fan: Fanout) -> AsyncIterator[str]:
            sent_echo = set()
            offsets = [0] * len(jobs)
            async for i, out in fan:
                if out.finish_reason is FinishReason.ERROR:
                    yield _sse(APIError.of_failed(out.error).body())
                    break
                text, head = out.delta_text, None
                first = i not in sent_echo
                if first:
                    sent_echo.add(i)
                    text = echo[prompt_of(i)] + text
                    head = echoed_logprobs(i)
                    if head is not None and head["tokens"]:
                        offsets[i] = head["text_offset"][-1] + len(head["tokens"][-1])
                lp = None
                if body.logprobs is not None:
                    entries = _delta_logprobs(out)
                    lp = self._completion_logprobs(entries, offsets[i])
                    offsets[i] += sum(len(t) for t in lp["tokens"])
                    if head is not None:
                        lp = {key: head[key] + lp[key] for key in lp}
                extra = (
                    {"prompt_logprobs": self._vllm_prompt_logprobs(prompt_lps[prompt_of(i)])}
                    if (first and body.prompt_logprobs is not None)
                    else {}
                )
                if text or out.finished or lp:
                    yield chunk(
                        [{"index": i, "text": text, "logprobs": lp, "finish_reason": _finish_reason(out), **extra}]
                    )
            else:
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield chunk([], _usage(prompts, list(fan.final)))
            yield "data: [DONE]\n\n"

        def full(outs: list[RequestOutput]) -> dict:
            choices = []
            for i, out in enumerate(outs):
                lp = None
                if body.logprobs is not None:
                    lp = joined(echoed_logprobs(i), self._completion_logprobs(out.logprobs or [], 0))
                choice = {
                    "index": i,
                    "text": echo[prompt_of(i)] + out.text,
                    "logprobs": lp,
                    "finish_reason": _finish_reason(out),
                }
                if body.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = self._vllm_prompt_logprobs(prompt_lps[prompt_of(i)])
                choices.append(choice)
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self.s.model_name,
                "choices": choices,
                "usage": _usage(prompts, outs),
            }

        return await self._run(request, jobs, body.stream, stream, full)

    # ---- embeddings ------------------------------------------------------------------------------------------

    async def embeddings(self, body: P.EmbeddingRequest) -> dict:
        self.s.check_model(body.model)
        inputs = body.input
        if isinstance(inputs, list) and inputs and isinstance(inputs[0], list):
            for ids in inputs:
                self.s.check_token_ids(ids, "input")
        elif isinstance(inputs, list) and inputs and isinstance(inputs[0], int):
            self.s.check_token_ids(inputs, "input")
        elif isinstance(inputs, str) and not inputs:
            raise APIError(400, "input must not be empty", param="input")
        prompts = self.s.llm._inputs(inputs)
        if body.dimensions is not None and body.dimensions != self.s.llm.cfg.hidden_size:
            raise APIError(
                400,
                f"dimensions must be {self.s.llm.cfg.hidden_size} (this model's hidden size) or left out",
                param="dimensions",
            )
        for ids in prompts:
            if len(ids) > self.s.max_model_len:
                raise APIError(
                    400,
                    f"an input has {len(ids)} tokens, more than this model's maximum context length "
                    f"({self.s.max_model_len})",
                    param="input",
                    code="context_length_exceeded",
                )
        self.s.admission.acquire()
        try:
            vectors = await asyncio.to_thread(self.s.llm.embed, prompts, body.pooling, body.normalize)
        finally:
            self.s.admission.release()
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": (
                    base64.b64encode(v.astype("<f4").tobytes()).decode()
                    if body.encoding_format == "base64"
                    else v.tolist()
                ),
            }
            for i, v in enumerate(vectors)
        ]
        n = sum(len(p) for p in prompts)
        return {
            "object": "list",
            "data": data,
            "model": self.s.model_name,
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }

    # ---- tokenize --------------------------------------------------------------------------------------------

    def tokenize(self, body: P.TokenizeRequest) -> dict:
        if body.model is not None:
            self.s.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.prompt is not None:
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = self.s.llm.tokenizer.encode(body.prompt, add_special_tokens=add_special)
        else:
            ids = self.s.chat_ids(
                P.message_dicts(body.messages), body.add_generation_prompt, bool(body.add_special_tokens)
            )
        strs = [self.s.llm.tokenizer.id_to_token(t) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.s.max_model_len, "tokens": ids, "token_strs": strs}

    # ---- chat ------------------------------------------------------------------------------------------------

    def _chat_logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        def item(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.s.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {**item(e.token_id, e.logprob), "top_logprobs": [item(k, v) for k, v in e.top.items()]} for e in entries
            ]
        }

    async def chat(self, body: P.ChatCompletionRequest, request: Request) -> Response:
        self._check_common(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        ids, rendering = self.s.render_chat(
            P.message_dicts(body.messages), **body.tool_fields(), add_generation_prompt=body.add_generation_prompt
        )
        tools = rendering.tools
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self.s.llm.tool_params(sampling_params(body, max_tokens, logprobs), rendering)
        if body.speculative is None:
            params = params.with_default_drafts(self.s.llm.speculative)
        params = dataclasses.replace(params, max_tokens=self.s.check_length(ids, max_tokens, "messages"))
        jobs = [(ids, params.for_child(i)) for i in range(body.n)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_lps = None
        if body.prompt_logprobs is not None:
            prompt_lps = self._vllm_prompt_logprobs((await self._prompt_logprobs([ids], body.prompt_logprobs))[0])
        extra = {} if prompt_lps is None else {"prompt_logprobs": prompt_lps}

        def chunk(choices, usage=None):
            data = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.s.model_name,
                "choices": choices,
            }
            if body.stream_options is not None and body.stream_options.include_usage:
                data["usage"] = usage
            return _sse(data)

        async def stream(fan: Fanout) -> AsyncIterator[str]:
            splitters = [ToolStream(tools, rendering.parser) if tools is not None else None for _ in jobs]
            for i in range(len(jobs)):
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                            **extra,
                        }
                    ]
                )
            async for i, out in fan:
                if out.finish_reason is FinishReason.ERROR:
                    yield _sse(APIError.of_failed(out.error).body())
                    break
                lp = self._chat_logprobs(_delta_logprobs(out)) if body.logprobs else None
                text, calls = out.delta_text, []
                if splitters[i] is not None:
                    text = splitters[i].push(text)
                    if out.finished:
                        tail, calls = splitters[i].finish()
                        text += tail
                if text or (lp and lp["content"]):
                    yield chunk([{"index": i, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}])
                for k, call in enumerate(calls):  # OpenAI's shape: id, type and name first, then the arguments
                    yield chunk(
                        [
                            {
                                "index": i,
                                "delta": {
                                    "tool_calls": [
                                        {
                                            "index": k,
                                            "id": call.id,
                                            "type": "function",
                                            "function": {"name": call.name, "arguments": ""},
                                        }
                                    ]
                                },
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                    yield chunk(
                        [
                            {
                                "index": i,
                                "delta": {"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                if out.finished:
                    yield chunk(
                        [{"index": i, "delta": {}, "logprobs": None, "finish_reason": _finish_reason(out, bool(calls))}]
                    )
            else:
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield chunk([], _usage([ids], list(fan.final)))
            yield "data: [DONE]\n\n"

        def message(out: RequestOutput) -> tuple[dict, bool]:
            if tools is None:
                return {"role": "assistant", "content": out.text}, False
            content, calls = tools.parse(out.text, rendering.parser)
            msg = {"role": "assistant", "content": content}
            if calls:
                msg["tool_calls"] = [c.to_openai() for c in calls]
            return msg, bool(calls)

        def full(outs: list[RequestOutput]) -> dict:
            choices = []
            for i, out in enumerate(outs):
                msg, called = message(out)
                choices.append(
                    {
                        "index": i,
                        "message": msg,
                        "logprobs": self._chat_logprobs(out.logprobs or []) if body.logprobs else None,
                        "finish_reason": _finish_reason(out, called),
                        **extra,
                    }
                )
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": self.s.model_name,
                "choices": choices,
                "usage": _usage([ids], outs),
            }

        return await self._run(request, jobs, body.stream, stream, full)


class _MetricsMiddleware:
    """Counts every response by route and status (unknown paths are one label, so fuzzing cannot blow it up)."""

    def __init__(self, app, server: Server, routes: set[str]):
        self.app, self.server, self.routes = app, server, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.routes else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.server.metrics.observe_request(endpoint, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
_ERRORS = {
    code: {"description": desc, "content": _ERROR_CONTENT}
    for code, desc in (
        (400, "Invalid request"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (413, "Body too large"),
        (429, "Too many requests in flight"),
        (503, "Queue full"),
    )
}


def build_app(llm: LLM, config: ServerConfig | None = None, server: Server | None = None) -> FastAPI:
    """The FastAPI app serving `llm` (pass `server` to share limits and metrics with a gRPC front)."""
    server = server or Server(llm, config)
    config = server.config
    app = FastAPI(
        title="NovaLLM-JAX",
        version="0.1.0",
        description="OpenAI-compatible completions and chat completions; vLLM's tokenize and detokenize.",
    )
    app.state.server = server
    install_handlers(app, P.field_names())
    h = _Handlers(server)

    @app.get("/health")
    async def health() -> Response:
        if llm.closed:
            return JSONResponse({"status": "closed"}, status_code=503)
        if llm.engine.unavailable:
            return JSONResponse({"status": "unavailable", "reason": llm.engine.unavailable}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {
            "id": server.model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "novallm",
            "max_model_len": server.max_model_len,
        }

    @app.get("/v1/models", responses=_ERRORS)
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}", responses=_ERRORS)
    async def model(model: str) -> dict:
        server.check_model(model)
        return model_card()

    @app.post("/v1/completions", responses=_ERRORS)
    async def completions(body: P.CompletionRequest, request: Request) -> Response:
        return await h.completions(body, request)

    @app.post("/v1/chat/completions", responses=_ERRORS)
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
        return await h.chat(body, request)

    @app.post("/v1/embeddings", responses=_ERRORS)
    async def embeddings(body: P.EmbeddingRequest) -> dict:
        return await h.embeddings(body)

    @app.post("/tokenize", responses=_ERRORS)
    async def tokenize(body: P.TokenizeRequest) -> dict:
        return h.tokenize(body)

    @app.post("/detokenize", responses=_ERRORS)
    async def detokenize(body: P.DetokenizeRequest) -> dict:
        if body.model is not None:
            server.check_model(body.model)
        server.check_token_ids(body.tokens, "tokens")
        return {"prompt": llm.tokenizer.decode(body.tokens)}

    _complete_schema(app, server.model_name)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(_MetricsMiddleware, server=server, routes={r.path for r in app.routes})
    return app


def _complete_schema(app: FastAPI, model_name: str) -> None:
    """Adds to the OpenAPI document the Error schema that `responses=` refers to, and the one model name served."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                }
            },
        }
        for name in ("CompletionRequest", "ChatCompletionRequest", "EmbeddingRequest"):
            props = schema["components"]["schemas"].get(name, {}).get("properties", {})
            if "model" in props:
                props["model"] = {"type": "string", "enum": [model_name], "title": "Model"}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
