"""The tokenizer interface every backend implements, and the decoding rules the detokenizer relies on."""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from novallm_jax.errors import TokenizerError
from novallm_jax.tokenization.chat_template import render_chat_template

REPLACEMENT_CHAR = "\ufffd"


class DecodeMode(enum.Enum):
    """How `decode` turns ids into text; tells the incremental detokenizer which shortcut is exact.

    BYTES: concatenate `token_bytes` of every id, then decode as UTF-8 with U+FFFD for invalid bytes
      (byte-level BPE: GPT-2, Llama 3, Qwen2, SmolLM2).
    BYTE_FALLBACK: sentencepiece pieces; each maximal run of byte tokens (`<0xAB>`) is decoded as a whole,
      and becomes one U+FFFD per byte if it is not valid UTF-8 (tokenizers' `ByteFallback` decoder).
    GENERIC: anything else; only `decode` itself is authoritative.
    """

    BYTES = "bytes"
    BYTE_FALLBACK = "byte_fallback"
    GENERIC = "generic"


def decode_byte_run(run: bytes | bytearray) -> str:
    """A run of byte-fallback tokens: its UTF-8 text, or one U+FFFD per byte when invalid."""
    try:
        return bytes(run).decode("utf-8")
    except UnicodeDecodeError:
        return REPLACEMENT_CHAR * len(run)


class Tokenizer(abc.ABC):
    """Text <-> token ids, special tokens, and chat templates for one model."""

    #: How `decode` is built from per-token pieces (see `DecodeMode`).
    decode_mode: DecodeMode = DecodeMode.GENERIC
    #: Whether `decode` drops one leading space of the decoded text (sentencepiece's dummy prefix).
    strips_leading_space: bool = False

    def __init__(
        self,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        pad_token_id: int | None,
        add_bos: bool,
        add_eos: bool,
        chat_template: str | None,
        name: str,
    ) -> None:
        self._bos_token_id = bos_token_id
        self._eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self._pad_token_id = pad_token_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_template = chat_template
        self.name = name

    # ---- vocabulary -------------------------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` as the tokenizer spells it (e.g. 'Ġthe', '▁the', '<0x0A>')."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, or None."""

    @abc.abstractmethod
    def is_special(self, token_id: int) -> bool:
        """Whether `decode(..., skip_special_tokens=True)` drops this id."""

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this token contributes to decoded text (the detokenizer's unit).

        In BYTE_FALLBACK mode a byte token gives its single byte; see `is_byte_token`.
        """
        raise TokenizerError(f"{type(self).__name__} decodes only whole sequences (decode_mode GENERIC)")

    def is_byte_token(self, token_id: int) -> bool:
        """Whether this is a byte-fallback token like `<0xE6>` (only meaningful in BYTE_FALLBACK mode)."""
        return False

    # ---- special ids ------------------------------------------------------------------------------------------

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_ids[0] if self._eos_token_ids else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All ids that end generation (the configured eos first)."""
        return self._eos_token_ids

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_token_id

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.id_to_token(token_id)

    @property
    def special_tokens_map(self) -> dict[str, str | None]:
        """bos/eos/pad tokens as text, for chat templates."""
        return {
            "bos_token": self._token_text(self.bos_token_id),
            "eos_token": self._token_text(self.eos_token_id),
            "pad_token": self._token_text(self.pad_token_id),
        }

    # ---- text <-> ids -----------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _encode_plain(self, text: str) -> list[int]:
        """Ids of `text` without bos/eos."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, bos/eos as this model's tokenizer config asks."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        ids = self._encode_plain(text)
        if add_special_tokens:
            if self.add_bos and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self.add_eos and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise TokenizerError(f"token id {i} is outside the vocabulary [0, {n}) of {self.name}")
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, by this tokenizer's `decode_mode` rule."""
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if not self.is_special(i)]
        if self.decode_mode is DecodeMode.BYTES:
            text = b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
        elif self.decode_mode is DecodeMode.BYTE_FALLBACK:
            parts: list[str] = []
            run = bytearray()
            for i in ids:
                if self.is_byte_token(i):
                    run += self.token_bytes(i)
                    continue
                if run:
                    parts.append(decode_byte_run(run))
                    run.clear()
                parts.append(self.token_bytes(i).decode("utf-8"))
            if run:
                parts.append(decode_byte_run(run))
            text = "".join(parts)
        else:
            raise TokenizerError(f"{type(self).__name__} must implement decode for decode_mode GENERIC")
        if self.strips_leading_space and text.startswith(" "):
            text = text[1:]
        return text

    # ---- chat -------------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Renders `messages` with the model's chat template (as transformers does); ids if `tokenize`.

        Raises `ChatTemplateError` when the model has no template.
        """
        template = kwargs.pop("chat_template", None) or self.chat_template
        text = render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens_map,
            model_name=self.name,
            **kwargs,
        )
        # The template writes bos itself where the model wants it, so encode adds none.
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size})"
