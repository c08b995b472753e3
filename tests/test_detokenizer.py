"""Incremental detokenization: streamed pieces always add up to a full decode, and never split a character."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from novallm_jax.detokenizer import IncrementalDetokenizer
from novallm_jax.tokenizer import DecodeMode, Tokenizer, load_tokenizer
from test_tokenizer import CORPUS, mistral_spm_path, smollm2_gguf_path

FFFD = "\ufffd"

_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(name: str) -> Tokenizer:
    # Module-level cache: hypothesis re-runs the test body many times, and fixtures do not mix well with @given.
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = load_tokenizer(smollm2_gguf_path() if name == "smollm2" else mistral_spm_path())
    return _TOKENIZERS[name]


class _Generic(Tokenizer):
    """Forces the vLLM-style window path by hiding the per-token decoding rule of a real tokenizer."""

    decode_mode = DecodeMode.GENERIC

    def __init__(self, inner: Tokenizer):
        self.inner, self.calls = inner, []
        self.strips_leading_space = False
        super().__init__(
            bos_token_id=inner.bos_token_id,
            eos_token_ids=inner.eos_token_ids,
            pad_token_id=inner.pad_token_id,
            add_bos=inner.add_bos,
            add_eos=inner.add_eos,
            chat_template=None,
            name="generic",
        )

    vocab_size = property(lambda self: self.inner.vocab_size)
    id_to_token = lambda self, i: self.inner.id_to_token(i)  # noqa: E731
    token_to_id = lambda self, t: self.inner.token_to_id(t)  # noqa: E731
    is_special = lambda self, i: self.inner.is_special(i)  # noqa: E731
    _encode_plain = lambda self, s: self.inner.encode(s, add_special_tokens=False)  # noqa: E731

    def decode(self, ids, skip_special_tokens=False):
        ids = list(ids)
        self.calls.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def _stream(tok: Tokenizer, ids: list[int], skip: bool) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


def _check_stream(tok: Tokenizer, ids: list[int], skip: bool) -> None:
    full = tok.decode(ids, skip_special_tokens=skip)
    pieces = _stream(tok, ids, skip)
    assert "".join(pieces) == full
    offset = 0
    for k, piece in enumerate(pieces):
        for j, ch in enumerate(piece):
            if ch == FFFD:
                assert full[offset + j] == FFFD
        offset += len(piece)
        # Nothing streamed is ever revised: the text so far is a prefix of the decode of the ids so far.
        if k < len(ids):
            assert full.startswith("".join(pieces[: k + 1]))
            assert tok.decode(ids[: k + 1], skip_special_tokens=skip).startswith("".join(pieces[: k + 1]))


_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", ["smollm2", "spm"])
@pytest.mark.parametrize("skip", [False, True])
@_SETTINGS
@given(data=st.data())
def test_random_ids_stream_to_full_decode(name, skip, data):
    tok = _tokenizer(name)
    n = tok.vocab_size
    # Mix uniform ids with the low ids where byte tokens and specials live, so runs of raw bytes are common.
    id_strategy = st.one_of(st.integers(0, n - 1), st.integers(0, 300))
    ids = data.draw(st.lists(id_strategy, max_size=40))
    _check_stream(tok, ids, skip)


@pytest.mark.parametrize("name", ["smollm2", "spm"])
@_SETTINGS
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_encoded_text_streams_without_replacement_chars(name, text):
    tok = _tokenizer(name)
    ids = tok.encode(text, add_special_tokens=False)
    pieces = _stream(tok, ids, skip=True)
    full = tok.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == full
    if FFFD not in full:
        assert all(FFFD not in p for p in pieces)


@pytest.mark.parametrize("name", ["smollm2", "spm"])
def test_corpus_streams_token_by_token(name):
    tok = _tokenizer(name)
    for s in CORPUS[:200]:
        ids = tok.encode(s)
        for skip in (False, True):
            pieces = _stream(tok, ids, skip)
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
            assert all(FFFD not in p for p in pieces)


def test_multibyte_character_is_held_back():
    tok = _tokenizer("smollm2")
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # the emoji is split into byte tokens in this vocabulary
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids] == [""] * (len(ids) - 1) + ["😀"]
    assert detok.flush() == ""


def test_sentencepiece_leading_space_rule():
    tok = _tokenizer("spm")
    ids = tok.encode("Hello world")
    assert tok.id_to_token(ids[1]).startswith("▁")
    pieces = _stream(tok, ids, skip=True)
    assert pieces[:3] == ["", "Hello", " world"]
    assert "".join(_stream(tok, ids, skip=False)) == "<s> Hello world"


@pytest.mark.parametrize("name", ["smollm2", "spm"])
def test_fast_paths_never_call_decode(name, monkeypatch):
    tok = _tokenizer(name)
    assert tok.decode_mode is not DecodeMode.GENERIC
    ids = tok.encode(" ".join(CORPUS[:40]))
    expected = tok.decode(ids, skip_special_tokens=True)

    def fail(*args, **kwargs):
        raise AssertionError("the fast path must not decode whole sequences")

    monkeypatch.setattr(tok, "decode", fail)
    assert "".join(_stream(tok, ids, skip=True)) == expected


@pytest.mark.parametrize("name", ["smollm2", "spm"])
def test_generic_window_path(name):
    inner = _tokenizer(name)
    tok = _Generic(inner)
    for s in CORPUS[:150]:
        ids = inner.encode(s)
        tok.calls.clear()
        pieces = _stream(tok, ids, skip=True)
        assert "".join(pieces) == inner.decode(ids, skip_special_tokens=True), s
    # On a long sequence each step decodes a short window; only flush decodes the whole sequence.
    ids = inner.encode(" ".join(CORPUS[:80]))
    tok.calls.clear()
    assert "".join(_stream(tok, ids, skip=False)) == inner.decode(ids)
    assert len(ids) > 1000 and tok.calls[-1] == len(ids)
    assert max(tok.calls[:-1]) <= 48
