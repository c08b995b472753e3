"""Rebuilds the tokenizer a GGUF file describes, as transformers' GGUF conversion does."""

from __future__ import annotations

import os
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers

from novallm_jax.errors import TokenizerError
from novallm_jax.tokenization.hf import HFTokenizer, bytes_to_unicode

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# `tokenizer.ggml.pre` -> split regex, as in transformers' GGUF_PRE_TOKENIZER_SPLITS. Names not listed (e.g.
# SmolLM2's "smollm") keep GPT-2's byte-level regex, which is what transformers does with them too.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a piece into two pieces, best score first."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _byte_level(tokens: list[str], merges: list[str], pre: str | None) -> tokenizers.Tokenizer:
    alphabet = set(bytes_to_unicode().values())
    spelling = bytes_to_unicode()
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None, continuing_subword_prefix="",
        end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(pre or "")
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(tokens: list[str], scores: list[float], merges: list[str] | None) -> tokenizers.Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = ([tuple(m.split(" ")) for m in merges] if merges is not None
             else generate_merges(vocab, dict(zip(tokens, scores))))
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True,
                                                     dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    return tok


def tokenizer_from_gguf(source: str | Any) -> HFTokenizer:
    """The tokenizer embedded in a GGUF file (a path or an open `gguf.GGUFReader`)."""
    from novallm_jax.loading.gguf_readers import FastReader, reader_for

    if isinstance(source, str):
        try:
            reader = reader_for(source, FastReader)
        except Exception as e:  # GGUFReader raises ValueError/struct errors on foreign files
            raise TokenizerError(f"{source} is not a readable GGUF file: {e}") from e
        name = source
    else:
        reader, name = source, str(getattr(source, "path", "GGUF"))
    model = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise TokenizerError(f"{name} has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    token_types = _field(reader, "tokenizer.ggml.token_type") or []
    merges = _field(reader, "tokenizer.ggml.merges")
    arch = _field(reader, "general.architecture")
    if model == "gpt2":
        if merges is None:
            raise TokenizerError(f"{name}: byte-level BPE vocabulary without tokenizer.ggml.merges")
        tok = _byte_level(tokens, merges, _field(reader, "tokenizer.ggml.pre"))
        alphabet = set(bytes_to_unicode().values())
        add_bos_default = False
    elif model == "llama":
        if arch in ("gemma", "gemma2", "gemma3", "phi3"):
            raise TokenizerError(f"{name}: the sentencepiece variant of architecture {arch!r} is not supported yet")
        scores = _field(reader, "tokenizer.ggml.scores")
        if scores is None and merges is None:
            raise TokenizerError(f"{name}: sentencepiece vocabulary without tokenizer.ggml.scores or merges")
        tok = _sentencepiece(tokens, scores, merges)
        alphabet = None
        add_bos_default = True  # llama.cpp adds bos to a sentencepiece vocabulary unless the file says otherwise
    else:
        raise TokenizerError(f"{name}: tokenizer.ggml.model {model!r} is not supported (supported: 'gpt2', 'llama')")

    def token_id(key: str) -> int | None:
        value = _field(reader, f"tokenizer.ggml.{key}")
        return None if value is None or not 0 <= int(value) < len(tokens) else int(value)

    bos, eos, pad, unk = (token_id(k) for k in ("bos_token_id", "eos_token_id", "padding_token_id",
                                                  "unknown_token_id"))
    # Control tokens stay whole and are special; user-defined ones stay whole but are text. A control token
    # outside the byte alphabet of a byte-level vocabulary is a llama.cpp mislabel and is left alone.
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, token_types)
               if k == _CONTROL and (alphabet is None or set(t) <= alphabet)]
    named = [tokens[i] for i in (bos, eos, unk, pad) if i is not None]
    control += [AddedToken(t, normalized=False, special=True) for t in named
                if t not in {c.content for c in control}]
    tok.add_special_tokens(control)
    vocab = tok.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, token_types)
            if k == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    extra_eos = [token_id(k) for k in ("eot_token_id", "eom_token_id")]
    return HFTokenizer(tok, bos_token_id=bos, eos_token_ids=[i for i in [eos, *extra_eos] if i is not None],
                       pad_token_id=pad, unk_token_id=unk,
                       add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", add_bos_default)),
                       add_eos=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
                       chat_template=_field(reader, "tokenizer.chat_template"), name=os.path.basename(name))
