"""Streaming text from token ids: each `add` returns only the new, complete text.

The concatenation of every piece plus `flush()` equals `tokenizer.decode(ids, skip_special_tokens)`. Bytes of an
unfinished UTF-8 character (or an unfinished run of sentencepiece byte tokens) are held back, never emitted as
U+FFFD. The cost per token is O(1) for byte-level and sentencepiece vocabularies (the tokenizer's `decode_mode`
says decoding is a per-token concatenation); other tokenizers fall back to vLLM's prefix/read-offset window.
"""

from __future__ import annotations

import codecs

from absl import logging

from novallm_jax.tokenization.base import REPLACEMENT_CHAR, DecodeMode, Tokenizer, decode_byte_run

# Tokens before the read offset that the GENERIC window re-decodes, so merges across the boundary still show.
_WINDOW = 6
_TAIL_CHARS = 1024


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text pieces for one sequence."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.mode = tokenizer.decode_mode
        self._strip_pending = tokenizer.strips_leading_space
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._run = bytearray()  # pending sentencepiece byte tokens
        self._ids: list[int] = []  # GENERIC only
        self._prefix_offset = 0
        self._read_offset = 0
        self._emitted: list[str] = []  # GENERIC only, to check flush against a full decode
        self._tail = ""  # GENERIC only: the last streamed characters
        self._closed = False

    def _out(self, text: str) -> str:
        if self._strip_pending and text:
            self._strip_pending = False
            if text[0] == " ":
                text = text[1:]
        return text

    def add(self, token_id: int) -> str:
        """Feeds one id; returns the text it completes (possibly "")."""
        if self._closed:
            raise RuntimeError("IncrementalDetokenizer.add after flush")
        token_id = int(token_id)
        tok = self.tokenizer
        if self.mode is DecodeMode.GENERIC:
            return self._add_generic(token_id)
        data = tok.token_bytes(token_id)  # also validates the id
        if self.skip_special_tokens and tok.is_special(token_id):
            return ""
        if self.mode is DecodeMode.BYTES:
            return self._out(self._utf8.decode(data))
        if tok.is_byte_token(token_id):
            self._run += data
            return ""
        text = data.decode("utf-8")
        if self._run:
            text = decode_byte_run(self._run) + text
            self._run.clear()
        return self._out(text)

    def flush(self) -> str:
        """Ends the sequence; returns whatever was held back (invalid trailing bytes become U+FFFD)."""
        if self._closed:
            return ""
        self._closed = True
        if self.mode is DecodeMode.BYTES:
            return self._out(self._utf8.decode(b"", final=True))
        if self.mode is DecodeMode.BYTE_FALLBACK:
            text = decode_byte_run(self._run) if self._run else ""
            self._run.clear()
            return self._out(text)
        full = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
        emitted = "".join(self._emitted)
        if not full.startswith(emitted):
            logging.warning("incremental detokenization diverged from a full decode after %d tokens", len(self._ids))
        return full[len(emitted) :]

    def _add_generic(self, token_id: int) -> str:
        # vLLM's scheme: decode a short window twice and emit the difference, unless it ends mid-character.
        self._ids.append(token_id)
        decode = self.tokenizer.decode
        window = self._ids[self._prefix_offset :]
        prefix_text = decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=self.skip_special_tokens
        )
        new_text = decode(window, skip_special_tokens=self.skip_special_tokens)
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        piece = new_text[len(prefix_text) :]
        self._read_offset = len(self._ids)
        self._emitted.append(piece)
        self._tail = (self._tail + piece)[-_TAIL_CHARS:]
        # Slide the window only to a boundary that decodes on its own to what was streamed (not mid-character,
        # not mid byte-run); otherwise keep the wider window.
        candidate = max(self._read_offset - _WINDOW, self._prefix_offset)
        if candidate > self._prefix_offset:
            text = decode(self._ids[candidate : self._read_offset], skip_special_tokens=self.skip_special_tokens)
            if REPLACEMENT_CHAR not in text and self._tail.endswith(text):
                self._prefix_offset = candidate
        return piece

    def add_many(self, token_ids: list[int]) -> str:
        """Feeds several ids; returns their joined text."""
        return "".join(self.add(i) for i in token_ids)
