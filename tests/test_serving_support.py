"""Shared by the serving tests (no tests here): one tiny-model LLM per process, servers over it, OpenAI-shape checks.

Every serving test module uses the same `LLM` (the tiny random model with the real SmolLM2 tokenizer), so its two
step shapes compile once per process; each module starts its own servers over it on 127.0.0.1, ephemeral ports.
"""

from __future__ import annotations

import functools
import time

from novallm_jax.llm import LLM
from tests.engine_fixtures import make_engine

MODEL = "tiny-llama"
# One bucket per dimension: one or two compiled step shapes in all, which keeps the whole serving suite's compile
# short, and every token is computed in a step of the same shape however requests share steps. Results move in
# the last bits with a step's shape (measured: one sequence's logits differ by ~7e-6 between a 16- and a 64-token
# ragged step, and are bitwise equal in another row of the same shape); at a near-tie of this random model a seeded
# sample then differs, while these tests compare the server's text with the SDK's. Ragged steps (where they run)
# carry 16 tokens each.
ENGINE = dict(
    decode_batch_buckets=(16,),
    prefill_batch_buckets=(4,),
    prefill_len_buckets=(64,),
    page_table_buckets=(32,),
    token_buckets=(16,),
)


@functools.lru_cache(maxsize=None)
def shared_tokenizer():
    from novallm_jax.loading import default_model_path
    from novallm_jax.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path())


@functools.lru_cache(maxsize=None)
def shared_llm() -> LLM:
    """The process's serving LLM; its engine thread is a daemon, so it needs no closing.

    Prefix caching is off: a prompt prefilled from cached pages is not bit-identical to a full prefill (different
    summation order), and a seeded sample at a near-tie can then differ, while these tests compare the server's
    text with the SDK's for prompts that the other run has just cached.
    """
    return LLM.from_engine(make_engine(shared_tokenizer(), enable_prefix_caching=False, **ENGINE), MODEL)


def is_openai_error(body) -> bool:
    """Exactly {"error": {"message": str, "type": str, "param": str|None, "code": str|None}}."""
    if not isinstance(body, dict) or set(body) != {"error"}:
        return False
    err = body["error"]
    return (
        isinstance(err, dict)
        and set(err) == {"message", "type", "param", "code"}
        and isinstance(err["message"], str)
        and err["message"]
        and isinstance(err["type"], str)
        and (err["param"] is None or isinstance(err["param"], str))
        and (err["code"] is None or isinstance(err["code"], str))
    )


def wait_idle(llm: LLM, timeout: float = 20.0) -> dict:
    """Waits until the engine has nothing running or waiting; returns its stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = llm.engine.stats()
        if not llm.engine.has_work():
            return stats
        if time.monotonic() > deadline:
            raise TimeoutError(f"engine still busy after {timeout} s: {stats}")
        time.sleep(0.02)
