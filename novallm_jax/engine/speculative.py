"""Speculative decoding by prompt lookup: drafts from the text itself, and the rule that accepts them.

A request with `SamplingParams.speculative = k` gets up to k drafted tokens per step: the tokens that followed the
latest earlier occurrence of its text's last n-gram (n from `MAX_NGRAM` down to 1), as vLLM's n-gram proposer and
transformers' prompt lookup draft. The step computes the request's last token and the drafts as one row, with a
logits row per position, and samples every position as the slot's next tokens (`sampling.sample_slots` with
`offsets`: independent draws). Drafted token j is accepted while each draw equals it; the first draw that differs
(or the draw after the last draft) is the step's last token. For a deterministic draft this is the standard
speculative-sampling rule: accept with probability p(draft), and on rejection the draw conditioned on differing from
the draft follows p without the draft, renormalised. Greedy rows draw the argmax, so their output is unchanged.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MAX_NGRAM = 4


def propose(tokens: Sequence[int], k: int, max_ngram: int = MAX_NGRAM) -> tuple[int, ...]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix n-gram of `tokens`."""
    if k <= 0 or len(tokens) < 2:
        return ()
    a = np.asarray(tokens, np.int64)
    for n in range(min(max_ngram, len(a) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(a[:-1], n)  # each earlier n-gram with a token after it
        hits = np.flatnonzero((windows == a[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tuple(int(t) for t in a[start:start + k])
    return ()


def accepted(draws: Sequence[int], draft: Sequence[int]) -> int:
    """How many drafted tokens the step's draws accept: the leading ones equal to their draw."""
    n = 0
    while n < len(draft) and int(draws[n]) == int(draft[n]):
        n += 1
    return n
