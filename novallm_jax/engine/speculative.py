"""Speculative decoding by prompt lookup: drafts from the text itself, and the rule that accepts them.

A request with `SamplingParams.speculative = k` gets up to k drafted tokens per step: the tokens that followed the
latest earlier occurrence of its text's last n-gram (n from `MAX_NGRAM` down to `MIN_NGRAM`), as vLLM's n-gram
proposer and transformers' prompt lookup draft; how many of them it drafts follows its recent acceptance
(`draft_length`), and after drafts rejected at their first token or lookups that found nothing it drafts nothing for a
while (`pause_after`), so a text that does not repeat itself pays for few rejected drafts. A request whose drafts have
been kept at `COPYING` or better copies: its lookups take the occurrence nearest where its last drafts came from
(`lookup`'s `near`; the latest one is often an earlier copy of the same words), and a miss (a word the copy changed)
neither pauses it nor shortens its next draft; until then its drafts need a 3-gram (`UNPROVEN_MIN_NGRAM`), and a
lookup known to miss (`may_find`) does not make its step wait for the last token. The step computes the
request's last token and the drafts as one row, with a logits row per position, and samples every position as the
slot's next tokens (`sampling.sample_slots` with `offsets`: independent draws). Drafted token j is accepted while
each draw equals it; the first draw that differs (or the draw after the last draft) is the step's last token. For a
deterministic draft this is the standard speculative-sampling rule: accept with probability p(draft), and on
rejection the draw conditioned on differing from the draft follows p without the draft, renormalised. Greedy rows
draw the argmax, so their output is unchanged.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MAX_NGRAM, MIN_NGRAM = 4, 2  # a single repeated token predicts little: its drafts mostly cost a wider step
# Until a request copies, its drafts need a 3-gram: the 2-gram matches of an answer that does not repeat its input
# (the benchmark's prose) were kept 1 token in 12.
UNPROVEN_MIN_NGRAM = 3
NEAR = 2  # tokens a copy's next occurrence may lie off where the copy was expected (insertions, deletions)
COPYING = 0.5  # a request whose drafts have been kept at this rate drafts k again after a rejection
MAX_DOUBLINGS = 3  # of a pause after misses; longer pauses missed where a text starts repeating itself


def propose(
    tokens: Sequence[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int | None = None, near: int | None = None
) -> tuple[int, ...]:
    """Up to k tokens that followed an earlier occurrence of the longest suffix n-gram of `tokens` (n from max_ngram
    down to min_ngram, default `MIN_NGRAM`): the latest, or the one whose continuation starts nearest `near`."""
    return lookup(tokens, k, max_ngram, min_ngram, near)[1]


def lookup(
    tokens: Sequence[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int | None = None, near: int | None = None
) -> tuple[int, tuple[int, ...]]:
    """`propose`'s draft and where in `tokens` it starts (-1: none). With `near`, an occurrence whose continuation
    starts within `NEAR` tokens of it comes first (the longest n, then the nearest), down to a lone last token."""
    if k <= 0 or len(tokens) < 2:
        return -1, ()
    min_ngram = MIN_NGRAM if min_ngram is None else min_ngram
    a = np.asarray(tokens, np.int64)
    latest = close = None
    for n in range(min(max_ngram, len(a) - 1), 0 if near is not None else min_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(a[:-1], n)  # each earlier n-gram with a token after it
        starts = np.flatnonzero((windows == a[-n:]).all(axis=1)) + n
        if latest is None and starts.size and n >= min_ngram:
            latest = int(starts[-1])
        if near is not None:
            starts = starts[np.abs(starts - near) <= NEAR]
            if starts.size:
                close = int(starts[np.argmin(np.abs(starts - near))])
                break
        elif latest is not None:
            break
    start = close if close is not None else latest
    return (-1, ()) if start is None else (start, tuple(int(t) for t in a[start : start + k]))


def may_find(tokens: Sequence[int]) -> bool:
    """Whether `propose` may find a draft once one more token follows `tokens`: its n-grams (`MIN_NGRAM` tokens or
    more) end in tokens[-1] and that token, so tokens[-1] must have occurred before."""
    return len(tokens) > 1 and tokens.index(tokens[-1]) < len(tokens) - 1


def draft_length(k: int, last_drafted: int, last_accepted: int, copying: bool = False) -> int:
    """Drafts for the next step: double after a draft accepted whole, back to what was accepted plus one after a
    rejection (at least 1, at most k); k again after a rejection where the request is `copying` (its next draft is
    taken from another occurrence)."""
    if last_drafted == 0 or (copying and last_accepted < last_drafted):
        return k
    grown = 2 * last_drafted if last_accepted == last_drafted else last_accepted + 1
    return max(1, min(k, grown))


def pause_after(misses: int, first: int) -> int:
    """How many tokens longer a request's text grows before it drafts again, after `misses` misses in a row: `first`,
    doubling with each further miss up to `MAX_DOUBLINGS` times. The scheduler passes 2 per running request after a
    draft rejected at its first token (alone: 2, 4, 8, then 16, counted from the step's last token), and 1 per
    running request after a prompt lookup that found no earlier occurrence of the last n-gram (alone: 1, 2, 4, then
    8, counted from the lookup, so the next step looks again). On two cores a step verifying one draft costs
    1.3-1.5x a plain one, and a step that may draft waits for its rows' last tokens on the host where a plain step is
    planned while the previous one runs: drafting at every step ran prose, whose n-grams recur with other
    continuations, at 0.86-0.89x plain decoding; with these pauses 0.96-0.99x, prompt-copying tasks level. With 4
    requests sampling word lists (bench_serving), pauses of a lone request's length ran 0.94-0.95x plain decoding,
    these 0.98-0.99x."""
    return first << min(misses - 1, MAX_DOUBLINGS) if misses > 0 else 0


def accepted(draws: Sequence[int], draft: Sequence[int]) -> int:
    """How many drafted tokens the step's draws accept: the leading ones equal to their draw."""
    n = 0
    while n < len(draft) and int(draws[n]) == int(draft[n]):
        n += 1
    return n
