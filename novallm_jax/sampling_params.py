"""`SamplingParams`: one request's decoding settings, validated on construction.

Ranges follow vLLM's `SamplingParams` (a superset of OpenAI's where the two differ, e.g. temperature is any value
>= 0, not just [0, 2]); the HTTP layer may narrow them further. Every invalid value raises `InvalidRequestError`
with `param` set to the field's name and a message giving the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from novallm_jax.errors import InvalidRequestError
from novallm_jax.structured import StructuredOutput
from novallm_jax.text_checks import lone_surrogate_problem

# The most top-N logprobs one request may ask for (OpenAI's `top_logprobs` limit, vLLM's default `max_logprobs`).
MAX_DRAFT_TOKENS = 8  # speculative decoding: drafted tokens a step verifies per row
MAX_LOGPROBS = 20
# Temperatures below this are treated as greedy, as in vLLM: dividing by them overflows float32 logits.
GREEDY_TEMPERATURE_EPS = 1e-5
# Seeds are reduced to 64 bits; negative seeds (OpenAI allows any int64) wrap around.
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64  # exclusive


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request.

    temperature: 0 (or below 1e-5) means greedy; otherwise logits are divided by it.
    top_k: keep the k most likely tokens; 0 or -1 turns it off.
    top_p: nucleus sampling, in (0, 1]; 1 turns it off.
    min_p: keep tokens whose probability is >= min_p * the top probability, in [0, 1]; 0 turns it off.
    repetition_penalty: transformers/CTRL penalty on tokens seen in the prompt or output, > 0; 1 is off.
    presence_penalty, frequency_penalty: OpenAI penalties on output tokens, in [-2, 2].
    logit_bias: token id -> bias added to the logit, in [-100, 100] (OpenAI semantics; string keys are accepted).
    seed: makes the request's tokens reproducible; None gets a random seed at admission (`with_resolved_seed`).
    max_tokens: most tokens to generate (>= 1); None means until the context is full.
    min_tokens: EOS and `stop_token_ids` are banned until this many tokens have been generated.
    stop: strings that end generation (not included in the output).
    stop_token_ids: token ids that end generation, besides EOS.
    ignore_eos: keep generating after EOS.
    logprobs: None for none, 0 for the chosen token's logprob only, N in 1..20 for the top N as well.
    n: number of completions for the prompt.
    structured: the text must match a JSON schema, a regex, a Lark grammar or a choice (`StructuredOutput`; a dict of
      its fields is accepted), enforced token by token while sampling.
    prompt_logprobs: None, or k in 0..20: the logprob of each prompt token given the ones before it (and the top k),
      computed by a prefill-only forward beside the request (vLLM's field; `GenerationResult.prompt_logprobs`).
    skip_special_tokens: leave special tokens out of the text (default); tool calling keeps them, since some
      families' call markers ([TOOL_CALLS], <|tool_call>) are special tokens.
    speculative: draft up to this many tokens per step by prompt lookup (the continuation of the latest earlier
      occurrence of the text's last n-gram) and verify them in one step (0 = off, at most 8). Lossless: greedy output
      is unchanged and sampled tokens follow the same distribution. Needs an engine started with
      `max_draft_tokens`; not with penalties, logit bias, min_tokens or structured outputs (each position's
      distribution would depend on the drafts before it).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    structured: StructuredOutput | None = None
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    speculative: int = 0

    def __post_init__(self) -> None:
        self._check_real("temperature", lo=0.0)
        self._check_top_k()
        self._check_real("top_p", lo=0.0, lo_open=True, hi=1.0)
        self._check_real("min_p", lo=0.0, hi=1.0)
        self._check_real("repetition_penalty", lo=0.0, lo_open=True)
        self._check_real("presence_penalty", lo=-2.0, hi=2.0)
        self._check_real("frequency_penalty", lo=-2.0, hi=2.0)
        self._check_logit_bias()
        self._check_seed()
        self._check_lengths()
        self._check_stop()
        self._check_stop_token_ids()
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}", param="ignore_eos")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidRequestError(
                f"logprobs must be null or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}", param="logprobs"
            )
        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            raise InvalidRequestError(
                f"prompt_logprobs must be null or an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}",
                param="prompt_logprobs",
            )
        if not isinstance(self.skip_special_tokens, bool):
            raise InvalidRequestError(
                f"skip_special_tokens must be a boolean, got {self.skip_special_tokens!r}", param="skip_special_tokens"
            )
        if not _is_int(self.n) or self.n < 1:
            raise InvalidRequestError(f"n must be an integer >= 1, got {self.n!r}", param="n")
        self._check_speculative()
        if isinstance(self.structured, Mapping):
            self._set("structured", StructuredOutput.from_dict(self.structured))
        elif self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise InvalidRequestError(
                "structured must be a StructuredOutput (or its fields as a dict)", param="structured"
            )

    def __hash__(self) -> int:
        # The generated hash would fail on the logit_bias dict; hash its sorted items instead.
        fields = dataclasses.astuple(dataclasses.replace(self, logit_bias=None))
        return hash((fields, tuple(sorted((self.logit_bias or {}).items()))))

    # -- validation helpers -------------------------------------------------------------------------------------

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _check_real(self, name: str, lo: float, hi: float | None = None, lo_open: bool = False) -> None:
        value = getattr(self, name)
        left = "(" if lo_open else "["
        allowed = f"in {left}{lo:g}, {hi:g}]" if hi is not None else f"{'>' if lo_open else '>='} {lo:g}"
        if not _is_real(value) or not math.isfinite(value):
            raise InvalidRequestError(f"{name} must be a finite number {allowed}, got {value!r}", param=name)
        too_low = value <= lo if lo_open else value < lo
        if too_low or (hi is not None and value > hi):
            raise InvalidRequestError(f"{name} must be {allowed}, got {value!r}", param=name)
        self._set(name, float(value))

    def _check_top_k(self) -> None:
        if not _is_int(self.top_k) or self.top_k < -1:
            raise InvalidRequestError(
                f"top_k must be an integer >= 1, or 0 or -1 to disable it, got {self.top_k!r}", param="top_k"
            )

    def _check_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, Mapping):
            raise InvalidRequestError(
                f"logit_bias must be a map from token id to bias, got {type(self.logit_bias).__name__}",
                param="logit_bias",
            )
        bias: dict[int, float] = {}
        for key, value in self.logit_bias.items():
            token = key
            # ASCII digits only, and few of them: int() takes other scripts' digits but not "²", and refuses past
            # 4300 digits, with ValueErrors of its own.
            if isinstance(key, str) and key.strip().isascii() and key.strip().isdigit() and len(key.strip()) < 20:
                token = int(key)
            if not _is_int(token) or token < 0:
                raise InvalidRequestError(
                    f"logit_bias keys must be token ids (integers >= 0), got {key!r}", param="logit_bias"
                )
            if not _is_real(value) or not -100.0 <= value <= 100.0:
                raise InvalidRequestError(
                    f"logit_bias values must be in [-100, 100], got {value!r} for token {token}", param="logit_bias"
                )
            bias[token] = float(value)
        self._set("logit_bias", bias)

    def _check_seed(self) -> None:
        if self.seed is None:
            return
        if not _is_int(self.seed) or not _SEED_MIN <= self.seed < _SEED_MAX:
            raise InvalidRequestError(
                f"seed must be null or an integer in [-2**63, 2**64), got {self.seed!r}", param="seed"
            )

    def _check_lengths(self) -> None:
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise InvalidRequestError(
                f"max_tokens must be null or an integer >= 1, got {self.max_tokens!r}", param="max_tokens"
            )
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise InvalidRequestError(
                f"min_tokens must be an integer >= 0, got {self.min_tokens!r}", param="min_tokens"
            )
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}", param="min_tokens"
            )

    def _check_speculative(self) -> None:
        if not _is_int(self.speculative) or not 0 <= self.speculative <= MAX_DRAFT_TOKENS:
            raise InvalidRequestError(
                f"speculative must be an integer in [0, {MAX_DRAFT_TOKENS}] (draft tokens per "
                f"step), got {self.speculative!r}",
                param="speculative",
            )
        if not self.speculative:
            return
        clashes = self._drafting_clashes()
        if clashes:
            raise InvalidRequestError(
                f"speculative decoding does not combine with {', '.join(clashes)}: each "
                f"drafted position's distribution would depend on the drafts before it",
                param="speculative",
            )

    def _drafting_clashes(self) -> list[str]:
        return [
            name
            for name, on in (
                ("repetition_penalty", self.repetition_penalty != 1.0),
                ("presence_penalty", self.presence_penalty != 0),
                ("frequency_penalty", self.frequency_penalty != 0),
                ("logit_bias", bool(self.logit_bias)),
                ("min_tokens", self.min_tokens > 0),
                ("structured", self.structured is not None),
            )
            if on
        ]

    def with_default_drafts(self, k: int) -> SamplingParams:
        """These settings drafting k tokens per step where they set none and allow drafting (a server's default)."""
        if self.speculative or not k or self._drafting_clashes():
            return self
        return dataclasses.replace(self, speculative=k)

    def _check_stop(self) -> None:
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequestError(
                f"stop must be a string or a list of non-empty strings, got {self.stop!r}", param="stop"
            )
        for s in stop:
            problem = lone_surrogate_problem(s)
            if problem is not None:
                raise InvalidRequestError(f"stop string {s!r} {problem}", param="stop")
        self._set("stop", tuple(stop))

    def _check_stop_token_ids(self) -> None:
        ids = self.stop_token_ids if self.stop_token_ids is not None else ()
        if (
            isinstance(ids, (str, bytes))
            or not isinstance(ids, Sequence)
            or not all(_is_int(t) and t >= 0 for t in ids)
        ):
            raise InvalidRequestError(
                f"stop_token_ids must be a list of token ids (integers >= 0), got {self.stop_token_ids!r}",
                param="stop_token_ids",
            )
        self._set("stop_token_ids", tuple(ids))

    # -- public helpers -----------------------------------------------------------------------------------------

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Checks what needs the model: token ids in logit_bias and stop_token_ids must be < vocab_size."""
        if vocab_size is None:
            return self
        for name, ids in (("logit_bias", (self.logit_bias or {}).keys()), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"{name} has token id {bad[0]}, out of range: token ids must be in [0, {vocab_size})",
                    param=name,
                )
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    def with_resolved_seed(self) -> SamplingParams:
        """This request with a concrete seed: its own, or a fresh random one from the OS.

        The engine calls this once at admission so that a request keeps one seed for its whole life: a preempted
        and recomputed request then draws the same tokens again.
        """
        if self.seed is not None:
            return self
        return dataclasses.replace(self, seed=secrets.randbits(63))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields (lists for tuples, string keys for `logit_bias`); `from_dict` reads them back."""
        d = dataclasses.asdict(self)
        d["stop"], d["stop_token_ids"] = list(self.stop), list(self.stop_token_ids)
        d["logit_bias"] = None if self.logit_bias is None else {str(k): v for k, v in self.logit_bias.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplingParams:
        structured = d.get("structured")
        return cls(
            **{
                **d,
                "stop": tuple(d.get("stop") or ()),
                "stop_token_ids": tuple(d.get("stop_token_ids") or ()),
                "structured": None
                if structured is None
                else StructuredOutput.from_dict({k: v for k, v in structured.items() if v not in (None, False)}),
            }
        )

    def for_child(self, index: int) -> SamplingParams:
        """Settings of completion `index` of an n > 1 request: n=1 and, as in vLLM, seed + index when seeded."""
        seed = None if self.seed is None else (self.seed + index) % _SEED_MAX
        return dataclasses.replace(self, n=1, seed=seed)
