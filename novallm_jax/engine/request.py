"""A request's state inside the engine, and the outputs it streams to its caller."""

from __future__ import annotations

import dataclasses
import enum
import queue
import time
from typing import Callable, Sequence

import numpy as np

from novallm_jax.detokenizer import IncrementalDetokenizer
from novallm_jax.engine.stop import StopStringMatcher
from novallm_jax.sampling_params import SamplingParams


# How an embedding request pools its prompt's final hidden states: the last token's, or their mean.
POOLINGS = ("last", "mean")


class Status(enum.Enum):
    WAITING = "waiting"  # queued, holds no pages
    RUNNING = "running"  # holds a slot and pages
    SWAPPED = "swapped"  # preempted: its pages are on the host
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclasses.dataclass
class Metrics:
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prefilled from the prefix cache
    prefilled_tokens: int = 0  # tokens run through prefill (recomputation included)
    preemptions: int = 0
    draft_tokens: int = 0  # speculative decoding: tokens drafted for this request, and how many the model accepted
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]  # top-N token id -> logprob (empty unless N > 0)


@dataclasses.dataclass
class RequestOutput:
    """What a step produced for a request: the new text and ids (`delta_*`), and the totals so far."""

    request_id: str
    delta_text: str
    delta_token_ids: list[int]
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprob] | None
    metrics: Metrics
    error: str | None = None
    # An embedding request's pooled final hidden state [D] (float32, not normalised), once finished.
    embedding: np.ndarray | None = None

    @property
    def tokens_per_second(self) -> float | None:
        m = self.metrics
        if m.first_token is None or m.finished is None or len(self.token_ids) < 2 or m.finished <= m.first_token:
            return None
        return (len(self.token_ids) - 1) / (m.finished - m.first_token)


class Request:
    """Engine-side state of one sequence. Only the engine thread mutates it."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        detokenizer: IncrementalDetokenizer,
        eos_token_ids: Sequence[int],
        on_output: Callable[[RequestOutput], None] | None = None,
        pooling: str | None = None,
    ):
        self.id = request_id
        self.prompt = list(prompt_token_ids)
        self.params = params
        self.tokens = list(prompt_token_ids)  # prompt + generated; KV exists for tokens[:num_computed]
        self.num_computed = 0
        self.pending = 0  # tokens drawn on the device and not yet read back (a pipelined step is in flight)
        self.pages: list[int] = []
        # Its page table of the window group (sliding layers; `scheduler.Scheduler`), NULL_PAGE behind the window,
        # and while swapped out: (index of its first page still held, the swap handle of those pages or None).
        self.window_pages: list[int] = []
        self.window_swap = None
        self.page_hashes: list[bytes] = []  # of the prompt's full pages, for the prefix cache
        self.num_cached_pages = 0  # pages of page_hashes registered in (or taken from) the prefix cache
        self.slot: int | None = None
        self.status = Status.WAITING
        self.swap_handle = None
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.cancel_requested = False
        self.text = ""
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.detokenizer = detokenizer
        self.stop = StopStringMatcher(params.stop)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(eos_token_ids)
        self.stop_token_ids = frozenset(stop_ids)
        self.metrics = Metrics(arrival=time.monotonic(), prompt_tokens=len(self.prompt))
        self.outputs: queue.Queue[RequestOutput] = queue.Queue()
        self.on_output = on_output
        self.matcher = None  # structured.Matcher of a constrained request (set by the engine)
        self.draft: tuple[int, ...] = ()  # tokens drafted after tokens[-1] in the step in flight (speculative)
        self.last_draft = (0, 0)  # (drafted, accepted) of its latest verified draft
        # Speculative: drafts in a row rejected at their first token, prompt lookups in a row that found nothing, and
        # the length the text must reach before it drafts again (`speculative.pause_after`).
        self.draft_misses = self.lookup_misses = self.draft_resume = 0
        # Prompt lookup: where the drafts in flight start in `tokens`, and where the text copies from, counted from its
        # end (its next token's source is tokens[num_tokens + copy_shift]; None: it has not drafted by lookup).
        self.draft_source = -1
        self.copy_shift: int | None = None
        # An embedding request ("last" or "mean"; None: generation): its prompt runs and nothing is sampled; `pooled`
        # gathers its final hidden states as the steps compute them (the last one's, or their float64 sum).
        self.pooling = pooling
        self.pooled: np.ndarray | None = None
        self.embedding: np.ndarray | None = None  # the pooled state [D], once the prompt's last token's is in

    @property
    def num_tokens(self) -> int:
        """Prompt and generated tokens, counting those still on the device."""
        return len(self.tokens) + self.pending

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def emit(self, delta_text: str, delta_ids: list[int]) -> RequestOutput:
        out = RequestOutput(
            request_id=self.id,
            delta_text=delta_text,
            delta_token_ids=delta_ids,
            text=self.text,
            token_ids=list(self.output_ids),
            prompt_token_ids=self.prompt,
            finished=self.finished,
            finish_reason=self.finish_reason,
            logprobs=self.logprobs,
            metrics=self.metrics,
            error=self.error,
            embedding=self.embedding,
        )
        self.outputs.put(out)
        if self.on_output is not None:
            self.on_output(out)
        return out
