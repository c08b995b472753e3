"""Backend over a sentencepiece `.model` file, decoding as transformers' fast Llama-style tokenizers do."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import sentencepiece

from novallm_jax.errors import TokenizerError
from novallm_jax.tokenization.base import DecodeMode, Tokenizer


class SentencePieceTokenizer(Tokenizer):
    """Encodes with the sentencepiece library; `decode` shows control tokens unless skipped (like transformers)."""

    decode_mode = DecodeMode.BYTE_FALLBACK

    def __init__(self, path: str, config: Mapping[str, Any] | None = None) -> None:
        config = dict(config or {})
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            with open(path, "rb") as f:
                proto = f.read()
            self._sp.LoadFromSerializedProto(proto)
        except OSError as e:
            raise TokenizerError(f"cannot read sentencepiece model {path}: {e}") from e
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on a foreign file
            raise TokenizerError(f"{path} is not a sentencepiece model: {e}") from e
        self.strips_leading_space = _adds_dummy_prefix(proto, self._sp)
        sp = self._sp
        n = sp.get_piece_size()
        pieces = [sp.id_to_piece(i) for i in range(n)]
        self._special = frozenset(i for i in range(n) if sp.is_control(i) or sp.is_unknown(i))
        self._byte = frozenset(i for i in range(n) if sp.is_byte(i))
        self._bytes = [
            bytes([int(p[3:5], 16)])
            if i in self._byte
            else p.encode("utf-8")
            if i in self._special
            else p.replace("▁", " ").encode("utf-8")
            for i, p in enumerate(pieces)
        ]
        self._piece_to_id = {p: i for i, p in enumerate(pieces)}
        ids = {
            name: (i if i >= 0 else None)
            for name, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id()), ("unk", sp.unk_id()))
        }
        self._unk_token_id = ids["unk"]
        super().__init__(
            bos_token_id=ids["bos"],
            eos_token_ids=[ids["eos"]] if ids["eos"] is not None else [],
            pad_token_id=ids["pad"],
            add_bos=bool(config.get("add_bos_token", True)),
            add_eos=bool(config.get("add_eos_token", False)),
            chat_template=config.get("chat_template"),
            name=os.path.basename(path),
        )

    @property
    def processor(self) -> sentencepiece.SentencePieceProcessor:
        return self._sp

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    def id_to_token(self, token_id: int) -> str:
        self._check_ids([token_id])
        return self._sp.id_to_piece(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._piece_to_id.get(token)

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special

    def is_byte_token(self, token_id: int) -> bool:
        return int(token_id) in self._byte

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < len(self._bytes):
            self._check_ids([token_id])
        return self._bytes[token_id]

    @property
    def special_tokens_map(self) -> dict[str, str | None]:
        return {**super().special_tokens_map, "unk_token": self._token_text(self._unk_token_id)}

    def _encode_plain(self, text: str) -> list[int]:
        return list(self._sp.encode(text))


def _adds_dummy_prefix(proto: bytes, sp: sentencepiece.SentencePieceProcessor) -> bool:
    try:
        from sentencepiece import sentencepiece_model_pb2

        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(proto)
        return bool(model.normalizer_spec.add_dummy_prefix)
    except Exception:  # protobuf missing or too old: ask the model itself
        pieces = sp.encode("a", out_type=str)
        return bool(pieces) and pieces[0].startswith("▁")
