"""Request bodies of the OpenAI-compatible REST API, as pydantic models (they also make the OpenAPI schema).

Field ranges mirror `SamplingParams`, so that the schema tells clients (and the fuzzer) what is valid; whatever the
schema cannot say (a prompt longer than the context, token ids outside the vocabulary) is checked when the request
is built and reported as a 400 with `param` set. Unknown fields are ignored, as OpenAI-compatible servers do, so
that newer clients keep working. Every string is `Text`: one holding a lone UTF-16 surrogate (JSON `"\ud800"`) is
refused with a 400 naming its field (see `novallm_jax.text_checks`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic_core import PydanticCustomError

from novallm_jax.sampling_params import MAX_DRAFT_TOKENS, MAX_LOGPROBS
from novallm_jax.text_checks import lone_surrogate_problem

# Most completions one request may ask for (n times the number of prompts): bounds the work one call can queue.
MAX_CHOICES = 64


def _valid_text(text: str) -> str:
    problem = lone_surrogate_problem(text)
    if problem is not None:
        raise PydanticCustomError("invalid_text", problem)
    return text


Text = Annotated[StrictStr, AfterValidator(_valid_text)]
Number = StrictInt | StrictFloat
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
Stop = Text | Annotated[list[Text], Field(max_length=16)] | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    """Fields common to completions and chat completions (OpenAI's, then vLLM-style extensions)."""

    model: Text
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] = 1
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[Text, Annotated[Number, Field(ge=-100, le=100)]] | None = None
    seed: StrictInt | None = None
    stop: Stop = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # Extensions (vLLM's names).
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0, le=2)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    ignore_eos: StrictBool = False
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    # Structured outputs: OpenAI's response_format, or vLLM's structured_outputs and its older guided_* fields.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[Text, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: Annotated[list[Text], Field(min_length=1)] | None = None
    guided_grammar: Text | None = None
    prompt_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # vLLM's
    # Prompt-lookup speculative decoding: drafted tokens per step (default: the server's --speculative where the
    # request's settings allow it).
    speculative: Annotated[StrictInt, Field(ge=0, le=MAX_DRAFT_TOKENS)] | None = None


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: (
        Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    )
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] | None = None
    suffix: Text | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: Text


Role = Literal["system", "developer", "user", "assistant", "tool"]
ROLES = Role.__args__


class CalledFunction(_Body):
    name: Text
    arguments: Text  # JSON text of the arguments object, as OpenAI sends it


class MessageToolCall(_Body):
    id: Text | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Body):
    role: Role
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: Text | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """What the chat template sees of each message: its role, its text, and the tool fields it has."""
    out = []
    for m in messages:
        d = {"role": m.role, "content": m.text()}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


class FunctionDefinition(_Body):
    name: Annotated[Text, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: Text | None = None
    parameters: dict[Text, Any] | None = None  # a JSON schema; checked when the request is built
    strict: StrictBool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Body):
    name: Text


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: FunctionName


class JsonSchema(_Body):
    """OpenAI's `response_format.json_schema`: the schema under `schema` (a Python name pydantic reserves)."""

    name: Text = "response"
    description: Text | None = None
    schema_: dict[Text, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchema | None = None


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs`: exactly one of these."""

    json_: dict[Text, Any] | Text | None = Field(default=None, alias="json")
    json_object: StrictBool | None = None
    regex: Text | None = None
    grammar: Text | None = None
    choice: Annotated[list[Text], Field(min_length=1)] | None = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: StrictBool = True
    # Tool calling (OpenAI's fields).
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None

    def tool_fields(self) -> dict[str, Any]:
        """tools, tool_choice and parallel_tool_calls as `LLM.render_chat` takes them."""
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, BaseModel) else self.tool_choice
        return {
            "tools": None if self.tools is None else [t.model_dump(exclude_none=True) for t in self.tools],
            "tool_choice": choice,
            "parallel_tool_calls": self.parallel_tool_calls,
        }


class EmbeddingRequest(_Body):
    """POST /v1/embeddings (OpenAI's): a text, texts, token ids, or lists of token ids."""

    model: Text
    input: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_CHOICES)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_CHOICES)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: Text | None = None
    # Extensions: how the final hidden states become one vector.
    pooling: Literal["last", "mean"] = "last"
    normalize: StrictBool = True


class TokenizeRequest(_Body):
    """POST /tokenize (vLLM's): `prompt` (raw text) or `messages` (through the chat template), not both."""

    model: Text | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    # Default: True for a prompt (as /v1/completions encodes it), False for messages (the template adds them).
    add_special_tokens: StrictBool | None = None
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False


class DetokenizeRequest(_Body):
    """POST /detokenize (vLLM's)."""

    model: Text | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0)]]


def field_names() -> frozenset[str]:
    """Every request body's field names (of every `_Body` subclass defined so): what an error's location may show
    (see serving/errors.py)."""
    names, todo = set(), [_Body]
    while todo:
        model = todo.pop()
        names.update(model.model_fields)
        todo.extend(model.__subclasses__())
    return frozenset(names)
