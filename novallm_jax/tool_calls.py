"""Tool calling, shared by the SDK (`LLM.chat(..., tools=...)`), the REST API and gRPC.

A request's `tools` (OpenAI's shape) go to the model's chat template as its `tools` variable, as transformers'
`apply_chat_template(tools=...)` passes them; assistant messages' `tool_calls` (their `arguments` JSON text made
objects, as templates index them) and `tool` messages go back through the template. A template that never reads
`tools` (SmolLM2's, Gemma 2's) would drop them silently, as transformers does; we render them instead the way Qwen
2.5's template does (a system block listing them, `<tool_call>` calls, `<tool_response>` results), so that such a
model sees its tools and speaks the `hermes` syntax.

tool_choice: "auto" lets the model choose and parses whatever calls it writes (`tool_parsers`); "none" renders no
tools and parses nothing; "required" and a named function constrain sampling with a JSON schema built from the
tools' parameter schemas (vLLM's way): an array of {"name", "parameters"} objects (keys that sort in that order, as the canonical schema text sorts them) (at most one without
parallel_tool_calls), or the named function's arguments object, so every call's arguments validate.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from typing import Any, Mapping, Sequence

from novallm_jax.errors import InvalidRequestError
from novallm_jax.structured import StructuredOutput
from novallm_jax.text_checks import check_text
from novallm_jax.tool_parsers import ToolCall, ToolParser, call_id, parser_for_template, template_knows_tools

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_CHOICES = ("auto", "none", "required")


def _check_strings(value: Any, param: str) -> None:
    """Lone surrogates anywhere in a nested JSON value (a schema, arguments) are refused by name."""
    if isinstance(value, str):
        check_text(value, param)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _check_strings(k, param)
            _check_strings(v, param)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_strings(v, param)


def _check_schema(schema: Any, param: str) -> dict[str, Any]:
    import jsonschema

    if not isinstance(schema, Mapping):
        raise InvalidRequestError(f"{param} must be a JSON schema object", param=param)
    _check_strings(schema, param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise InvalidRequestError(f"{param} is not a valid JSON schema: {e.message}", param=param) from None
    except Exception as e:  # a $schema or $ref that jsonschema cannot even resolve
        raise InvalidRequestError(f"{param} is not a usable JSON schema: {e}", param=param) from None
    return dict(schema)


@dataclasses.dataclass(frozen=True)
class ToolRequest:
    """A request's checked tools: `tools` in OpenAI's shape, `choice` one of auto/none/required or a function's
    name, `parallel` whether several calls may come in one answer."""

    tools: tuple[dict[str, Any], ...]
    choice: str
    named: bool
    parallel: bool = True

    @classmethod
    def check(
        cls, tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any = None, parallel_tool_calls: bool | None = None
    ) -> "ToolRequest | None":
        """Validates OpenAI's fields; None when the request has no tools (and no tool_choice other than "none")."""
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise InvalidRequestError("parallel_tool_calls must be a boolean", param="parallel_tool_calls")
        if not tools:
            if tools is not None and (isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence)):
                raise InvalidRequestError(
                    "tools must be a list of {'type': 'function', 'function': {...}}", param="tools"
                )
            if tool_choice not in (None, "none"):
                raise InvalidRequestError(
                    "tool_choice needs tools: give the functions the model may call", param="tool_choice"
                )
            return None
        if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
            raise InvalidRequestError("tools must be a list of {'type': 'function', 'function': {...}}", param="tools")
        checked, names = [], set()
        for i, tool in enumerate(tools):
            where = f"tools[{i}]"
            if (
                not isinstance(tool, Mapping)
                or tool.get("type", "function") != "function"
                or not isinstance(tool.get("function"), Mapping)
            ):
                raise InvalidRequestError(
                    f"{where} must be {{'type': 'function', 'function': {{'name': ...}}}}", param=where
                )
            fn = tool["function"]
            name = fn.get("name")
            if not isinstance(name, str) or not _NAME.match(name):
                raise InvalidRequestError(
                    f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}",
                    param=f"{where}.function.name",
                )
            if name in names:
                raise InvalidRequestError(
                    f"{where}.function.name {name!r} is given twice", param=f"{where}.function.name"
                )
            names.add(name)
            description = fn.get("description")
            if description is not None:
                if not isinstance(description, str):
                    raise InvalidRequestError(
                        f"{where}.function.description must be a string", param=f"{where}.function.description"
                    )
                check_text(description, f"{where}.function.description")
            function = {"name": name}
            if description is not None:
                function["description"] = description
            parameters = fn.get("parameters")
            if parameters is not None:
                function["parameters"] = _check_schema(parameters, f"{where}.function.parameters")
            checked.append({"type": "function", "function": function})
        if tool_choice is None:
            tool_choice = "auto"
        if isinstance(tool_choice, str):
            if tool_choice not in _CHOICES:
                raise InvalidRequestError(
                    f"tool_choice must be one of {', '.join(_CHOICES)} or "
                    "{'type': 'function', 'function': {'name': ...}}",
                    param="tool_choice",
                )
            choice, named = tool_choice, False
        else:
            fn = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
            name = fn.get("name") if isinstance(fn, Mapping) else None
            if not isinstance(name, str) or tool_choice.get("type", "function") != "function":
                raise InvalidRequestError(
                    "tool_choice must be a string or {'type': 'function', 'function': {'name': ...}}",
                    param="tool_choice",
                )
            if name not in names:
                raise InvalidRequestError(
                    f"tool_choice names the function {name!r}, which is not in tools ({', '.join(sorted(names))})",
                    param="tool_choice",
                )
            choice, named = name, True
        return cls(tuple(checked), choice, named, True if parallel_tool_calls is None else parallel_tool_calls)

    @property
    def forced(self) -> bool:
        return self.named or self.choice == "required"

    def template_tools(self) -> list[dict[str, Any]] | None:
        """What the template's `tools` variable gets: none for tool_choice "none"."""
        return None if self.choice == "none" else copy.deepcopy(list(self.tools))

    def _parameters(self, name: str) -> dict[str, Any]:
        """The schema a forced call's arguments are sampled under: the function's, with no properties beyond
        those it lists unless it says otherwise (OpenAI's strict mode; whatever this admits, the function's schema
        admits too), since a model otherwise invents arguments (SmolLM2 copies the schema's own keys)."""
        fn = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        schema = fn.get("parameters") or {"type": "object"}
        if "properties" in schema and "additionalProperties" not in schema:
            schema = {**schema, "additionalProperties": False}
        return schema

    def structured(self) -> StructuredOutput | None:
        """The constraint that makes "required" and named choices produce valid calls."""
        if self.named:
            schema = self._parameters(self.choice)
        elif self.choice == "required":
            one = [
                {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name", "parameters"],
                    "properties": {
                        "name": {"const": t["function"]["name"]},
                        "parameters": self._parameters(t["function"]["name"]),
                    },
                }
                for t in self.tools
            ]
            schema = {"type": "array", "minItems": 1, "items": one[0] if len(one) == 1 else {"anyOf": one}}
            if not self.parallel:
                schema["maxItems"] = 1
        else:
            return None
        return StructuredOutput(json=schema)

    def parse(self, text: str, parser: ToolParser) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished answer."""
        if self.choice == "none":
            return text, []
        if self.forced:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:  # cut short (max_tokens): what there is, as content
                return text, []
            if self.named:
                return None, [ToolCall(call_id(parser.short_ids), self.choice, json.dumps(value, ensure_ascii=False))]
            return None, [
                ToolCall(call_id(parser.short_ids), c["name"], json.dumps(c["parameters"], ensure_ascii=False))
                for c in value
            ]
        content, calls = parser.parse(text)
        if not self.parallel:
            calls = calls[:1]
        return content, calls


def _arguments_object(arguments: Any, param: str) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{param} is not valid JSON: {e}", param=param) from None
    return arguments


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as templates read them: each tool call's `arguments` an object (OpenAI sends its JSON text), and
    a `tool` message's `name` filled in from the call it answers where the client left it out."""
    out, names = [], {}
    for i, message in enumerate(messages):
        m = dict(message) if isinstance(message, Mapping) else message
        if isinstance(m, dict) and m.get("tool_calls"):
            calls = []
            for j, call in enumerate(m["tool_calls"]):
                if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
                    raise InvalidRequestError(
                        f"messages[{i}].tool_calls[{j}] must be {{'type': 'function', "
                        "'function': {'name': ..., 'arguments': ...}}",
                        param=f"messages[{i}].tool_calls",
                    )
                fn = dict(call["function"])
                fn["arguments"] = _arguments_object(
                    fn.get("arguments", {}), f"messages[{i}].tool_calls[{j}].function.arguments"
                )
                _check_strings(fn, f"messages[{i}].tool_calls[{j}].function")
                calls.append({**call, "type": "function", "function": fn})
                if call.get("id"):
                    names[call["id"]] = fn.get("name")
            m["tool_calls"] = calls
        elif isinstance(m, dict) and m.get("role") == "tool" and not m.get("name") and m.get("tool_call_id") in names:
            m["name"] = names[m["tool_call_id"]]
        out.append(m)
    return out


_HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def _hermes_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Tools, calls and results written into plain messages as Qwen 2.5's template writes them, for templates
    that know no tools."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            blocks = [
                json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
                for c in m["tool_calls"]
            ]
            text = (m.get("content") or "") + "".join(f"\n<tool_call>\n{b}\n</tool_call>" for b in blocks)
            out.append({**{k: v for k, v in m.items() if k != "tool_calls"}, "content": text.lstrip("\n")})
        elif m.get("role") == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            out.append(m)
    if tools:
        listing = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
        block = _HERMES_SYSTEM.format(tools=listing)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


@dataclasses.dataclass(frozen=True)
class ChatRendering:
    """What the template is given for one conversation, and how its answer is read back."""

    messages: list[dict[str, Any]]
    template_kwargs: dict[str, Any]
    tools: ToolRequest | None
    parser: ToolParser


def prepare_chat(
    messages: Sequence[Mapping[str, Any]],
    template: str | None,
    tools: ToolRequest | None,
    parser: ToolParser | None = None,
) -> ChatRendering:
    """The messages and template variables for `template` (tools rendered natively, or Hermes-style for a
    template without tools), and the parser of the answer (`parser` overrides the template's)."""
    parser = parser or parser_for_template(template if template_knows_tools(template) else None)
    msgs = template_messages(messages)
    has_tool_turns = any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in msgs)
    if not template_knows_tools(template) and (tools is not None or has_tool_turns):
        return ChatRendering(_hermes_messages(msgs, tools and tools.template_tools()), {}, tools, parser)
    kwargs = {"tools": tools.template_tools()} if tools is not None and tools.template_tools() else {}
    return ChatRendering(msgs, kwargs, tools, parser)


class ToolStream:
    """Splits a streamed answer into content to send now and tool calls read at the end: text from where a call
    may begin is held back (a marker's prefix at the end too), the rest goes out as it comes."""

    def __init__(self, tools: ToolRequest, parser: ToolParser):
        self.tools, self.parser = tools, parser
        self.text, self.sent, self.in_calls = "", 0, tools.forced

    def push(self, delta: str) -> str:
        self.text += delta
        if self.in_calls or self.tools.choice == "none":
            return "" if self.in_calls else self._send(len(self.text))
        start = self.parser.start(self.text)
        if start is not None:
            self.in_calls = True
            return self._send(start)
        return self._send(len(self.text) - self.parser.held(self.text))

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not yet sent, calls) once the answer is complete."""
        content, calls = self.tools.parse(self.text, self.parser)
        if not calls:
            return self._send(len(self.text)), []
        return "", calls

    def _send(self, end: int) -> str:
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out
