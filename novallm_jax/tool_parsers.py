"""Tool calls in generated text, in the formats the chat templates of the families we run teach their models.

    hermes       Hermes 2/3, Qwen 2.5/3, SmolLM3: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, repeated
    llama3_json  Llama 3.1-3.3: {"name": ..., "parameters": {...}} (after <|python_tag|> or alone), several split by ";"
    mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] (v3, Nemo) or [TOOL_CALLS]name[ARGS]{...} (v7+)
    gemma4       Gemma 4: <|tool_call>call:name{key:value,...}<tool_call|>, strings quoted as <|"|>...<|"|>
    pythonic     Gemma 3 (its tool-use prompt): ```tool_code\nname(key=value, ...)\n``` or [name(key=value), ...]

`parser_for_template` picks one from a template's text (vLLM's --tool-call-parser names them by hand); a template
that knows no tool syntax gets `hermes`, with the tools rendered as Qwen 2.5's template renders them
(`novallm_jax.tool_calls`). A parser turns a finished text into (content, calls); a text whose calls do not parse is
all content, as vLLM's parsers return it.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import secrets
import string
from typing import Any

from novallm_jax.errors import InvalidRequestError


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One function call: `arguments` is the JSON text of the arguments object (as OpenAI returns it)."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_id(short: bool = False) -> str:
    """A fresh tool-call id: OpenAI's `call_` + 24 hex digits, or 9 alphanumerics (Mistral's templates demand it)."""
    if short:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return "call_" + secrets.token_hex(12)


def _arguments_text(arguments: Any) -> str | None:
    """The JSON text of an arguments object given as an object or as its JSON text; None if it is neither."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return json.dumps(arguments, ensure_ascii=False)


def _json_values(text: str) -> list[Any] | None:
    """Consecutive JSON values in `text`, separated by whitespace, ',' or ';'; None unless all of it is JSON."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)


_EMPTY_THOUGHT = re.compile(r"<think>\s*</think>")


class ToolParser:
    """Finds tool calls in a finished text; `start` says where calls begin, so a stream can hold that part back."""

    name = ""
    markers: tuple[str, ...] = ()  # text that begins the calls
    short_ids = False

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = self.start(text)
        if start is None:
            return text, []
        calls = self._calls(text[start:])
        if not calls:
            return text, []
        content = _EMPTY_THOUGHT.sub("", text[:start]).strip()  # Qwen 3 writes <think></think> before calls
        return content or None, calls

    def start(self, text: str) -> int | None:
        """Where the calls begin in `text`, or None if they have not (yet)."""
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(found) if found else None

    def held(self, text: str) -> int:
        """How many characters at the end of `text` (no call begun) may still become the beginning of one."""
        for n in range(min(len(text), max(map(len, self.markers), default=0)), 0, -1):
            if any(m.startswith(text[-n:]) for m in self.markers):
                return n
        return 0

    def _call(self, name: Any, arguments: Any) -> ToolCall | None:
        args = _arguments_text({} if arguments is None else arguments)
        if not isinstance(name, str) or not name or args is None:
            return None
        return ToolCall(call_id(self.short_ids), name, args)

    def _calls(self, text: str) -> list[ToolCall]:
        raise NotImplementedError

    def _from_objects(self, values: list[Any] | None, args_keys=("arguments", "parameters")) -> list[ToolCall]:
        calls = []
        for value in values or ():
            if not isinstance(value, dict):
                return []
            args = next((value[k] for k in args_keys if k in value), None)
            call = self._call(value.get("name"), args)
            if call is None:
                return []
            calls.append(call)
        return calls


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)

    def _calls(self, text: str) -> list[ToolCall]:
        values = []
        for body in self._block.findall(text):
            parsed = _json_values(body)
            if not parsed or len(parsed) != 1:
                return []
            values.append(parsed[0])
        return self._from_objects(values)


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>",)

    def start(self, text: str) -> int | None:
        tag = super().start(text)
        if tag is not None:
            return tag
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith("{") else None

    def held(self, text: str) -> int:
        return len(text) if not text.strip() else super().held(text)

    def _calls(self, text: str) -> list[ToolCall]:
        return self._from_objects(_json_values(text.replace("<|python_tag|>", "")), ("parameters", "arguments"))


class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    short_ids = True
    _named = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[CALL_ID\]\s*[A-Za-z0-9]+\s*)?\[ARGS\]", re.DOTALL)

    def _calls(self, text: str) -> list[ToolCall]:
        calls = []
        for part in text.split("[TOOL_CALLS]")[1:]:
            named = self._named.match(part)
            if named:  # name[ARGS]{...} (v7 and later)
                values = _json_values(part[named.end() :])
                if not values or len(values) != 1:
                    return []
                call = self._call(named.group(1), values[0])
                if call is None:
                    return []
                calls.append(call)
                continue
            values = _json_values(part)  # [{...}, ...] (v3)
            if not values:
                return []
            objects = [v for value in values for v in (value if isinstance(value, list) else [value])]
            found = self._from_objects(objects)
            if not found:
                return []
            calls += found
        return calls


class _GemmaArgs:
    """Reads Gemma 4's argument syntax: {key:value,...}, [..], <|"|>string<|"|>, numbers, true/false/null."""

    QUOTE = '<|"|>'

    def __init__(self, text: str):
        self.text, self.i = text, 0

    def value(self) -> Any:
        t = self.text
        if t.startswith(self.QUOTE, self.i):
            end = t.index(self.QUOTE, self.i + len(self.QUOTE))
            s = t[self.i + len(self.QUOTE) : end]
            self.i = end + len(self.QUOTE)
            return s
        if t.startswith("{", self.i):
            return self.mapping()
        if t.startswith("[", self.i):
            self.i += 1
            items = []
            while not self._take("]"):
                items.append(self.value())
                self._take(",")
            return items
        m = re.compile(r"[^,}\]]+").match(t, self.i)
        if m is None:
            raise ValueError(f"no value at {self.i}")
        self.i = m.end()
        word = m.group(0).strip()
        if word in ("true", "false"):
            return word == "true"
        if word in ("null", "None"):
            return None
        return json.loads(word)  # a number

    def mapping(self) -> dict[str, Any]:
        if not self._take("{"):
            raise ValueError(f"no '{{' at {self.i}")
        out = {}
        while not self._take("}"):
            if self.text.startswith(self.QUOTE, self.i):
                key = self.value()
            else:
                colon = self.text.index(":", self.i)
                key, self.i = self.text[self.i : colon].strip(), colon
            if not self._take(":"):
                raise ValueError(f"no ':' at {self.i}")
            out[key] = self.value()
            self._take(",")
        return out

    def _take(self, s: str) -> bool:
        if self.i >= len(self.text):
            raise ValueError("unexpected end")
        if self.text.startswith(s, self.i):
            self.i += len(s)
            return True
        return False


class Gemma4Parser(ToolParser):
    name = "gemma4"
    markers = ("<|tool_call>",)
    _block = re.compile(r"<\|tool_call>call:([A-Za-z0-9_.-]+)(\{.*?\})<tool_call\|>", re.DOTALL)

    def _calls(self, text: str) -> list[ToolCall]:
        calls = []
        for name, body in self._block.findall(text):
            try:
                call = self._call(name, _GemmaArgs(body).mapping())
            except (ValueError, json.JSONDecodeError):
                return []
            if call is None:
                return []
            calls.append(call)
        return calls


class PythonicParser(ToolParser):
    """Calls written as Python: name(key=value, ...), in a ```tool_code block (Gemma 3) or a list [a(), b()]."""

    name = "pythonic"
    markers = ("```tool_code", "[")

    def _calls(self, text: str) -> list[ToolCall]:
        body = text.strip()
        if body.startswith("```tool_code"):
            body = body[len("```tool_code") :].split("```", 1)[0]
        try:
            tree = ast.parse(body.strip(), mode="eval").body
        except SyntaxError:
            return []
        nodes = tree.elts if isinstance(tree, ast.List) else [tree]
        calls = []
        for node in nodes:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                return []
            try:
                args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
            except ValueError:
                return []
            call = self._call(node.func.id, args)
            if call is None:
                return []
            calls.append(call)
        return calls

    def start(self, text: str) -> int | None:
        stripped = text.lstrip()
        lead = len(text) - len(stripped)
        if stripped.startswith("```tool_code") or stripped.startswith("["):
            return lead
        found = text.find("```tool_code")
        return found if found >= 0 else None


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser, Gemma4Parser, PythonicParser)
}


def get_parser(name: str) -> ToolParser:
    if name not in PARSERS:
        raise InvalidRequestError(
            f"unknown tool-call parser {name!r}; known: {', '.join(PARSERS)}", param="tool_call_parser"
        )
    return PARSERS[name]()


def parser_for_template(template: str | None) -> ToolParser:
    """The parser for the call syntax `template` renders (hermes when it has none of its own)."""
    t = template or ""
    if "<|tool_call>" in t:
        return Gemma4Parser()
    if "[TOOL_CALLS]" in t:
        return MistralParser()
    if "<tool_call>" in t:
        return HermesParser()
    if "<|python_tag|>" in t or ('"parameters"' in t and "<|start_header_id|>" in t):
        return Llama3JsonParser()
    if "tool_code" in t:
        return PythonicParser()
    return HermesParser()


def template_knows_tools(template: str | None) -> bool:
    """Whether the template reads the `tools` variable at all (SmolLM2's, Gemma 2's do not)."""
    return bool(template) and re.search(r"\btools\b", template) is not None
