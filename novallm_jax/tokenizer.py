"""Tokenizers for NovaLLM-JAX: one interface, three backends, and `load_tokenizer(path)` to pick one.

Backends: a sentencepiece `.model` (the `sentencepiece` library), an HF `tokenizer.json` (the `tokenizers`
library, special tokens and chat template from `tokenizer_config.json`), and the vocabulary embedded in a GGUF
file (rebuilt as a `tokenizers.Tokenizer` the way transformers does).
"""

from __future__ import annotations

import glob
import os

from novallm_jax.errors import ModelLoadError, TokenizerError
from novallm_jax.tokenization.base import DecodeMode, Tokenizer
from novallm_jax.tokenization.chat_template import ChatTemplateError, render_chat_template
from novallm_jax.tokenization.gguf_tokenizer import tokenizer_from_gguf
from novallm_jax.tokenization.hf import HFTokenizer, load_hf_tokenizer_json, read_tokenizer_config
from novallm_jax.tokenization.spm import SentencePieceTokenizer

__all__ = [
    "ChatTemplateError",
    "DecodeMode",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "render_chat_template",
    "tokenizer_from_gguf",
]

_GGUF_MAGIC = b"GGUF"


def _is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e


def _load_dir(directory: str) -> Tokenizer:
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return load_hf_tokenizer_json(os.path.join(directory, "tokenizer.json"), read_tokenizer_config(directory))
    if os.path.isfile(os.path.join(directory, "tokenizer.model")):
        return SentencePieceTokenizer(os.path.join(directory, "tokenizer.model"), read_tokenizer_config(directory))
    ggufs = sorted(glob.glob(os.path.join(directory, "*.gguf")))
    if len(ggufs) == 1:
        return tokenizer_from_gguf(ggufs[0])
    found = ", ".join(sorted(os.listdir(directory))[:10]) or "nothing"
    hint = f"; it holds {len(ggufs)} GGUF files, pass one" if ggufs else ""
    raise TokenizerError(f"{directory} has no tokenizer.json, tokenizer.model or single *.gguf (found: {found}){hint}")


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer at `path`: a GGUF file, an HF directory, a `tokenizer.json`, or a sentencepiece `.model`.

    Raises `ModelLoadError` if `path` does not exist and `TokenizerError` if it holds no usable tokenizer.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(
            f"tokenizer path {path!r} does not exist; pass a GGUF file, an HF model directory, "
            "a tokenizer.json or a sentencepiece .model file"
        )
    if os.path.isdir(path):
        return _load_dir(path)
    if _is_gguf(path):
        return tokenizer_from_gguf(path)
    if path.endswith(".json"):
        return load_hf_tokenizer_json(path, read_tokenizer_config(os.path.dirname(os.path.abspath(path))))
    directory = os.path.dirname(os.path.abspath(path))
    config = read_tokenizer_config(directory) if os.path.basename(path) == "tokenizer.model" else {}
    return SentencePieceTokenizer(path, config)
