"""Backend over a `tokenizers.Tokenizer`: HF `tokenizer.json` directories, and GGUF vocabularies rebuilt as one."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tokenizers
from absl import logging

from novallm_jax.errors import TokenizerError
from novallm_jax.tokenization.base import DecodeMode, Tokenizer

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}


def _decode_mode(decoder: Mapping[str, Any] | None) -> tuple[DecodeMode, bool]:
    """Recognises the decoders whose output the detokenizer can reproduce token by token."""
    if not decoder:
        return DecodeMode.GENERIC, False
    if decoder.get("type") == "ByteLevel":
        return DecodeMode.BYTES, False
    if decoder.get("type") == "Sequence":
        steps = decoder.get("decoders", [])
        kinds = [d.get("type") for d in steps]
        if (
            kinds[:3] == ["Replace", "ByteFallback", "Fuse"]
            and steps[0].get("pattern") == {"String": "▁"}
            and steps[0].get("content") == " "
        ):
            rest = steps[3:]
            if not rest:
                return DecodeMode.BYTE_FALLBACK, False
            if (
                len(rest) == 1
                and rest[0].get("type") == "Strip"
                and rest[0].get("content") == " "
                and rest[0].get("start") == 1
                and rest[0].get("stop") == 0
            ):
                return DecodeMode.BYTE_FALLBACK, True
    return DecodeMode.GENERIC, False


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus the special-token settings that transformers keeps beside it."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        pad_token_id: int | None,
        unk_token_id: int | None = None,
        add_bos: bool,
        add_eos: bool,
        chat_template: str | None,
        name: str,
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id,
            add_bos=add_bos,
            add_eos=add_eos,
            chat_template=chat_template,
            name=name,
        )
        self._tok = tok
        self._unk_token_id = unk_token_id
        self._vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self._clean_up = clean_up_tokenization_spaces
        decoder = None if tok.decoder is None else json.loads(tok.decoder.__getstate__())  # not the whole JSON
        self.decode_mode, self.strips_leading_space = _decode_mode(decoder)
        if self._clean_up:
            self.decode_mode = DecodeMode.GENERIC
        self._bytes: list[bytes] | None = None

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def save_pretrained(self, directory: str) -> None:
        """Writes tokenizer.json, tokenizer_config.json and generation_config.json (extra eos ids) in HF layout."""
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        text = lambda i: None if i is None else self.id_to_token(i)
        config = {
            "bos_token": text(self.bos_token_id),
            "eos_token": text(self.eos_token_id),
            "pad_token": text(self.pad_token_id),
            "unk_token": text(self._unk_token_id),
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": self._clean_up,
            "chat_template": self.chat_template,
        }
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
        if len(self.eos_token_ids) > 1:
            with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
                json.dump({"eos_token_id": list(self.eos_token_ids)}, f)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def id_to_token(self, token_id: int) -> str:
        token = self._tok.id_to_token(int(token_id))
        if token is None:
            raise TokenizerError(
                f"token id {token_id} is outside the vocabulary [0, {self._vocab_size}) of {self.name}"
            )
        return token

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special

    @property
    def special_tokens_map(self) -> dict[str, str | None]:
        return {**super().special_tokens_map, "unk_token": self._token_text(self._unk_token_id)}

    def _piece_bytes(self, token: str) -> bytes:
        if self.decode_mode is DecodeMode.BYTES:
            # tokenizers' ByteLevel decoder maps a token through the byte table only if every char is in it.
            if all(c in _BYTE_DECODER for c in token):
                return bytes(_BYTE_DECODER[c] for c in token)
            return token.encode("utf-8")
        m = _BYTE_TOKEN.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace("▁", " ").encode("utf-8")

    def token_bytes(self, token_id: int) -> bytes:
        if self.decode_mode is DecodeMode.GENERIC:
            return super().token_bytes(token_id)
        if self._bytes is None:
            self._bytes = [self._piece_bytes(self._tok.id_to_token(i) or "") for i in range(self._vocab_size)]
        try:
            return self._bytes[token_id]
        except IndexError:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary of {self.name}") from None

    def is_byte_token(self, token_id: int) -> bool:
        return self.decode_mode is DecodeMode.BYTE_FALLBACK and bool(_BYTE_TOKEN.match(self.id_to_token(token_id)))

    def _encode_plain(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        text = self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self._clean_up else text


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: drops spaces before punctuation and in English contractions."""
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text


def _token_content(value: Any) -> str | None:
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_tokenizer_config(directory: str) -> dict[str, Any]:
    """tokenizer_config.json (plus chat_template.jinja/json and generation_config eos ids) of an HF directory."""
    path = os.path.join(directory, "tokenizer_config.json")
    config = read_json(path) if os.path.isfile(path) else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_path = os.path.join(directory, "chat_template.jinja")
    json_path = os.path.join(directory, "chat_template.json")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
    elif template is None and os.path.isfile(json_path):
        template = read_json(json_path).get("chat_template")
    config["chat_template"] = template
    gen_path = os.path.join(directory, "generation_config.json")
    if os.path.isfile(gen_path):
        eos = read_json(gen_path).get("eos_token_id")
        config["_generation_eos_ids"] = [eos] if isinstance(eos, int) else list(eos or [])
    return config


def load_hf_tokenizer_json(path: str, config: Mapping[str, Any]) -> HFTokenizer:
    """An `HFTokenizer` from a `tokenizer.json` and its (possibly empty) tokenizer_config."""
    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{path} is not a valid tokenizers JSON file: {e}") from e

    def lookup(key: str) -> int | None:
        content = _token_content(config.get(key))
        if content is None:
            return None
        token_id = tok.token_to_id(content)
        if token_id is None:
            raise TokenizerError(f"{key} {content!r} from tokenizer_config.json is not in the vocabulary of {path}")
        return token_id

    bos, eos, pad, unk = lookup("bos_token"), lookup("eos_token"), lookup("pad_token"), lookup("unk_token")
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        # No flag: the tokenizer.json post-processor decides, as it does in transformers.
        probe = tok.encode("a", add_special_tokens=True).ids
        add_bos = bos is not None and bool(probe) and probe[0] == bos
        if add_bos:
            logging.info("%s: post-processor adds bos %d", path, bos)
    eos_ids = ([eos] if eos is not None else []) + list(config.get("_generation_eos_ids", []))
    return HFTokenizer(
        tok,
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        pad_token_id=pad,
        unk_token_id=unk,
        add_bos=bool(add_bos),
        add_eos=bool(config.get("add_eos_token", False)),
        chat_template=config.get("chat_template"),
        name=os.path.dirname(os.path.abspath(path)),
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
    )
