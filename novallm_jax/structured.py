"""Structured outputs: generated text held, token by token, to a JSON schema, a regex, a Lark grammar or a choice.

llguidance (a Rust grammar engine; vLLM's default backend too) compiles the constraint and computes on the host, per
step and row, the bitmask of the tokens that keep the text valid: a few microseconds to ~1 ms a row, in its own
threads without the GIL, so the mask of the next step can be computed while a step runs. The sampler puts the mask
on the logits on the device (`sampling.apply_token_bitmask`); rows without a constraint are left alone.

Grammars are compiled once per constraint (`compile_grammar`, cached) and llguidance's view of a tokenizer is built
once per tokenizer (`ll_tokenizer`, ~0.3 s for a 49k vocabulary).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
import weakref
from typing import Any, Mapping, Sequence

import numpy as np

from novallm_jax.errors import InvalidRequestError
from novallm_jax.tokenization.base import Tokenizer

_FIELDS = ("json", "json_object", "regex", "grammar", "choice")
# JSON laid out as Python's json.dumps lays it out: no whitespace but after separators. With free whitespace a model
# can emit blanks without end (a random one does), and the layout is what models are trained on anyway.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """What a request's text must be: exactly one of

    json: a JSON schema (a dict, or its JSON text); json_object: any JSON object; regex: a regular expression the whole
    text matches; grammar: a Lark grammar (llguidance's dialect, `start` the top rule); choice: one of these strings.
    Named as vLLM's `structured_outputs` fields.
    """

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: tuple[str, ...] | None = None

    def __post_init__(self):
        if isinstance(self.json, Mapping):
            object.__setattr__(self, "json", _canonical(self.json, "json"))
        elif self.json is not None:
            if not isinstance(self.json, str):
                raise InvalidRequestError(
                    "json must be a JSON schema (an object or its JSON text)", param="structured_outputs.json"
                )
            object.__setattr__(self, "json", _canonical(_parse(self.json), "json"))
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice) or not self.choice:
                raise InvalidRequestError(
                    "choice must be a non-empty list of strings", param="structured_outputs.choice"
                )
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidRequestError(f"{name} must be a non-empty string", param=f"structured_outputs.{name}")
        given = [f for f in _FIELDS if getattr(self, f) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequestError(
                f"give exactly one of {', '.join(_FIELDS)} (got {', '.join(given) or 'none'})",
                param="structured_outputs",
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StructuredOutput":
        """From vLLM's `structured_outputs` object ({"json": ...}, {"regex": ...}, {"choice": [...]}, ...)."""
        unknown = set(d) - set(_FIELDS)
        if unknown:
            raise InvalidRequestError(
                f"unknown field {sorted(unknown)[0]!r}; known: {', '.join(_FIELDS)}", param="structured_outputs"
            )
        return cls(**{k: v for k, v in d.items() if v is not None})

    def llguidance_grammar(self) -> str:
        """The constraint as an llguidance grammar (not yet checked: `compile_grammar` does that)."""
        from llguidance import LLMatcher

        if self.json is not None:
            return LLMatcher.grammar_from_json_schema(self.json, defaults=_JSON_STYLE)
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_STYLE)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.grammar is not None:
            return LLMatcher.grammar_from_lark(self.grammar)
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))

    @property
    def field(self) -> str:
        return next(f for f in _FIELDS if getattr(self, f) not in (None, False))


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"json is not valid JSON: {e}", param="structured_outputs.json") from None


def _canonical(schema: Any, name: str) -> str:
    if not isinstance(schema, Mapping):
        raise InvalidRequestError(f"{name} must be a JSON schema object", param=f"structured_outputs.{name}")
    try:
        return json.dumps(schema, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"{name} is not JSON-serialisable: {e}", param=f"structured_outputs.{name}") from None


# --- llguidance's view of our tokenizers -------------------------------------------------------------------------


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: every token's bytes (special tokens marked with a 0xff prefix, as
    llguidance's own llama.cpp adapter marks them), the special ids, EOS/BOS, and an encoder."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        n = tokenizer.vocab_size
        self.tokens = [
            (b"\xff" + tokenizer.id_to_token(i).encode()) if tokenizer.is_special(i) else tokenizer.token_bytes(i)
            for i in range(n)
        ] + [b""] * max(0, vocab_size - n)
        self.special_token_ids = [i for i in range(n) if tokenizer.is_special(i)]
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self._encode = tokenizer.encode

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._encode(text, add_special_tokens=False)


_tokenizers: "weakref.WeakKeyDictionary[Tokenizer, dict[int, Any]]" = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int):
    """llguidance's `LLTokenizer` for `tokenizer` with masks of `vocab_size` (the model's), built once."""
    from llguidance import LLTokenizer, TokenizerWrapper

    with _tokenizers_lock:
        per = _tokenizers.setdefault(tokenizer, {})
        if vocab_size not in per:
            eos = list(tokenizer.eos_token_ids) or None
            per[vocab_size] = LLTokenizer(
                TokenizerWrapper(_Vocabulary(tokenizer, vocab_size)), n_vocab=vocab_size, eos_token=eos
            )
        return per[vocab_size]


@functools.lru_cache(maxsize=256)
def _checked_grammar(spec: StructuredOutput, ll_tok) -> str:
    from llguidance import LLMatcher

    try:
        grammar = spec.llguidance_grammar()
    except ValueError as e:
        raise InvalidRequestError(f"{spec.field} is not valid: {e}", param=f"structured_outputs.{spec.field}") from None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, ll_tok)
    if is_error:
        raise InvalidRequestError(f"{spec.field} is not valid: {messages[0]}", param=f"structured_outputs.{spec.field}")
    return grammar


def compile_grammar(spec: StructuredOutput, tokenizer: Tokenizer, vocab_size: int) -> str:
    """The checked llguidance grammar of `spec`, cached per constraint and tokenizer; an invalid constraint is an
    `InvalidRequestError` naming its field."""
    return _checked_grammar(spec, ll_tokenizer(tokenizer, vocab_size))


class Matcher:
    """One request's position in its grammar: which tokens may come next, and the tokens it has taken."""

    def __init__(self, spec: StructuredOutput, tokenizer: Tokenizer, vocab_size: int):
        from llguidance import LLMatcher

        ll_tok = ll_tokenizer(tokenizer, vocab_size)
        self._m = LLMatcher(ll_tok, compile_grammar(spec, tokenizer, vocab_size), log_level=0)
        self.vocab_size = vocab_size

    def advance(self, token: int) -> None:
        """Takes the sampled token (one the last mask allowed)."""
        if not self._m.consume_token(int(token)):
            raise RuntimeError(f"the grammar refused token {token}: {self._m.get_error()}")

    def rollback(self, n: int) -> None:
        """Forgets the last n tokens (rejected speculative tokens)."""
        self._m.rollback(n)

    @property
    def done(self) -> bool:
        """The text is complete: the grammar accepts no token but EOS."""
        return self._m.is_stopped()

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        """Writes the allowed next tokens into row `row` of `bitmask` (int32 [rows, ceil(V / 32)])."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self._m, bitmask, row)


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


_executor = None


def fill_bitmasks(matchers: Sequence[tuple[Matcher, int]], bitmask: np.ndarray) -> None:
    """Fills the rows of `bitmask` for (matcher, row) pairs, the rows in parallel in llguidance's threads."""
    global _executor
    from llguidance import LLExecutor
    from llguidance.numpy import fill_next_token_bitmask_par

    if not matchers:
        return
    if _executor is None:
        _executor = LLExecutor()
    fill_next_token_bitmask_par(_executor, [(m._m, row) for m, row in matchers], bitmask)
