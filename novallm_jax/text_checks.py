"""Checks on text before it reaches a tokenizer or a chat template.

A Python `str` can hold a lone UTF-16 surrogate (U+D800..U+DFFF without its pair): JSON's `"\\ud800"` escape decodes
to one, and so can a notebook. Such a string has no UTF-8 form, so the tokenizers fail on it with errors of their
own (a `TypeError` from `tokenizers`, a `UnicodeEncodeError` elsewhere). We refuse it where it enters — the SDK's
arguments, the REST bodies, the gRPC messages — with an `InvalidRequestError` naming the field, rather than replace
it with U+FFFD: a silently altered prompt is worse than a clear error, and valid surrogate pairs (`"\\ud83d\\ude00"`)
already decode to the one character they stand for.
"""

from __future__ import annotations

from novallm_jax.errors import InvalidRequestError


def lone_surrogate_problem(text: str) -> str | None:
    """None if `text` is valid Unicode; else what is wrong, e.g. "holds a lone UTF-16 surrogate U+D800 at ..."."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"holds a lone UTF-16 surrogate U+{ord(text[e.start]):04X} at character {e.start}, which is not "
            "valid Unicode; send UTF-8 text (a surrogate pair such as \\ud83d\\ude00 is fine)"
        )
    return None


def check_text(text: str, param: str) -> str:
    """Returns `text` if it is valid Unicode; else raises `InvalidRequestError` naming `param`."""
    problem = lone_surrogate_problem(text)
    if problem is not None:
        raise InvalidRequestError(f"{param} {problem}", param=param)
    return text
