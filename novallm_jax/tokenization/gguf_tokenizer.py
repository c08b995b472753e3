"""Rebuilds the tokenizer a GGUF file describes, as llama.cpp tokenizes with it (its test vectors are exact)."""

from __future__ import annotations

import itertools
import os
from typing import Any

import tokenizers
from absl import logging
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers

from novallm_jax.errors import TokenizerError
from novallm_jax.tokenization.hf import HFTokenizer, bytes_to_unicode

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp, llm_tokenizer_bpe), applied in order: each splits every
# piece the previous one left into its matches and the text between them (tokenizers' Split "isolated"). Spelled
# as llama.cpp adapts them (contractions as '[sS] rather than (?i:'s), which would also take "'ſ").
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
    r"|\s+"
)
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK3 = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
# The letters and CJK ranges of DeepSeek's regexes, escaped: the literal characters are not all NFC-stable.
_DEEPSEEK_LETTERS = (
    "\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-"
    "\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-"
    "\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-"
    "\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-"
    "\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
    "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a"
    "-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-"
    "\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-"
    "\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-"
    "\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-"
    "\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_STARCODER = (r"\p{N}", _GPT2)
_BLOOM = (" ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+",)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

# `tokenizer.ggml.pre` -> the regexes above, as llama.cpp maps the names.
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": _DEFAULT,
    **dict.fromkeys(
        [
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
            "chatglm-bpe",
            "glm4",
            "glm5",
        ],
        (_LLAMA3,),
    ),
    "deepseek-llm": (
        r"[\r\n]",
        r"\s?[A-Za-z" + _DEEPSEEK_LETTERS + "]+",
        r"\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        r"\s+\z",  # std::regex's $ is the end of the piece; Oniguruma's would also match before a newline
        _DEEPSEEK_CJK,
        r"\p{N}+",
    ),
    **dict.fromkeys(["deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"], _DEEPSEEK3),
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}"),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    **dict.fromkeys(
        ["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"], _STARCODER
    ),
    **dict.fromkeys(
        [
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
            "jina-v1-en",
            "jina-v2-code",
            "roberta-bpe",
            "exaone4",
        ],
        (_GPT2,),
    ),
    **dict.fromkeys(
        ["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open", "grok-2"],
        (_QWEN2,),
    ),
    "qwen35": (_QWEN35,),
    **dict.fromkeys(["poro-chat", "bloom", "gpt3-finnish"], _BLOOM),
    "viking": (*_BLOOM, r"\p{N}"),
    "tekken": (_TEKKEN,),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], (_GPT4O,)),
    "seed-coder": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)"
        r"|\s+",
    ),
    "minicpm5": (
        r"\p{N}{1,3}",
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
}
# Names whose words llama.cpp looks up whole before merging (`ignore_merges`).
IGNORE_MERGES = frozenset(
    [
        "llama3",
        "llama-v3",
        "llama-bpe",
        "falcon3",
        "falcon-h1",
        "pixtral",
        "midm-2.0",
        "lfm2",
        "jina-v5-nano",
        "minicpm5",
        "glm4",
        "glm5",
        "tekken",
    ]
)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a piece into two pieces, best score first."""
    merges = []
    for piece, score in scores.items():
        local = [
            (piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _wordpiece(
    tokens: list[str], token_types: list[int], unk: str, lowercase: bool, strip_accents: bool
) -> tokenizers.Tokenizer:
    """llama.cpp's WPM (BERT): greedy longest match over "▁" + word, i.e. WordPiece with "▁x" -> "x", "x" -> "##x"."""
    vocab: dict[str, int] = {}
    for i, (t, k) in enumerate(itertools.zip_longest(tokens, token_types[: len(tokens)])):
        vocab.setdefault(t if k == _CONTROL else t[1:] if t.startswith("▁") else "##" + t, i)
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordPiece(
            vocab=vocab, unk_token=unk, continuing_subword_prefix="##", max_input_chars_per_word=1 << 30
        )
    )
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return tok


def _splits(regexes: tuple[str, ...]) -> list[pre_tokenizers.PreTokenizer]:
    return [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]


def _byte_level(
    tokens: list[str], token_types: list[int], merges: list[str], pre: str | None, name: str
) -> tokenizers.Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # A user-defined token keeps its raw text: llama.cpp matches it in the input before the regexes (MPT's runs of
    # spaces, DeepSeek's stray bytes), and a later id of the same text wins as in llama.cpp's text -> id map.
    vocab = {
        (t if (k == _USER_DEFINED or set(t) <= alphabet) else "".join(spelling[b] for b in t.encode("utf-8"))): i
        for i, (t, k) in enumerate(itertools.zip_longest(tokens, token_types[: len(tokens)]))
    }
    tok = tokenizers.Tokenizer(
        tokenizers.models.BPE(
            vocab=vocab,
            merges=[tuple(m.split(" ", 1)) for m in merges],
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            ignore_merges=pre in IGNORE_MERGES,
        )
    )
    regexes = PRE_TOKENIZER_SPLITS.get(pre or "default")
    if regexes is None:
        logging.warning(
            "%s: tokenizer.ggml.pre %r is not one llama.cpp knows; splitting words as GPT-2 does", name, pre
        )
        regexes = (_GPT2,)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        _splits(regexes) + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_decoder(strip_space: bool) -> decoders.Decoder:
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    return decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if strip_space else []))


def _sentencepiece(
    tokens: list[str], scores: list[float], merges: list[str] | None, add_space_prefix: bool
) -> tokenizers.Tokenizer:
    """llama.cpp's SPM tokenizer: spaces escaped as ▁, one ▁ before every piece of text, merges by piece score."""
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = (
        [tuple(m.split(" ", 1)) for m in merges]
        if merges is not None
        else generate_merges(vocab, dict(zip(tokens, scores)))
    )
    tok = tokenizers.Tokenizer(
        tokenizers.models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    # A normalizer, not Metaspace: Metaspace adds no ▁ to text that already starts with a space (" " must be "▁▁").
    # tokenizers normalizes each piece between added tokens, so text after a special token gets its ▁ as well.
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.decoder = _spm_decoder(add_space_prefix)
    return tok


def _gemma4(tokens: list[str], merges: list[str]) -> tokenizers.Tokenizer:
    """llama.cpp's "gemma4" model: BPE over raw UTF-8 with spaces as ▁, lines split apart, <0xXX> byte fallback."""
    tok = tokenizers.Tokenizer(
        tokenizers.models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=[tuple(m.split(" ", 1)) for m in merges],
            dropout=None,
            byte_fallback=True,
            fuse_unk=False,
        )
    )
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|[\n]+"), behavior="isolated")
    tok.decoder = _spm_decoder(False)
    return tok


# llama.cpp's own code for these (unicode.cpp), not a regex tokenizers can run.
_UNSUPPORTED_PRE = frozenset(
    [
        "kimi-k2",
        "afmoe",
        "tiny_aya",
        "cohere2moe",
        "superbpe",
        "jais-2",
        "chameleon",
        "youtu",
        "spark2_5",
        "bailingmoe",
        "bailingmoe2",
        "llada-moe",
        "ufakzeka",
        "laguna",
        "exaone-moe",
        "granite-embed-multi-97m",
        "whitespace",
        "sarvam-moe",
        "granite-embed-multi-311m",
        "stablelm2",
    ]
)
# Byte-level vocabularies llama.cpp gives a bos by default.
_ADDS_BOS = frozenset(
    [
        "llama3",
        "llama-v3",
        "llama-bpe",
        "falcon3",
        "falcon-h1",
        "pixtral",
        "midm-2.0",
        "lfm2",
        "jina-v5-nano",
        "tekken",
        "chameleon",
    ]
)


# Texts llama.cpp ends generation on in any vocabulary (llama_vocab::impl::load, special_eog_ids): a Gemma GGUF's eos
# is <eos> but its turns end with <end_of_turn>, Phi-3's with <|end|>.
_EOG_TEXTS = frozenset(
    [
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>",
        "[e~[",
    ]
)


def _end_of_generation(tokens: list[str]) -> list[int]:
    """Ids llama.cpp stops on, with its two exceptions (harmony's <|end|>, Gemma 4's plain </s>)."""
    ids = {t: i for i, t in enumerate(tokens) if t in _EOG_TEXTS}
    if ("<|return|>" in ids and "<|call|>" in ids) or ("<|calls|>" in ids and "<|flush|>" in ids):
        ids.pop("<|end|>", None)
    if "<|tool_response>" in ids:
        ids.pop("</s>", None)
    return sorted(ids.values())


def _rstrip_rule(model_name: str) -> Any:
    """llama.cpp strips the whitespace after Phi-3's special tokens (except <unk>, <s>, <|endoftext|>)."""
    lowered = model_name.lower()
    if "phi-3" in lowered or "phi3" in lowered:
        return lambda t: t not in ("<unk>", "<s>", "<|endoftext|>")
    return lambda t: False


def tokenizer_from_gguf(source: str | Any) -> HFTokenizer:
    """The tokenizer embedded in a GGUF file (a path or an open `gguf.GGUFReader`).

    Built from the file's vocabulary once (~0.3 s for 49k tokens) and kept in the packed-weights cache as a
    tokenizer.json with its settings (`packed_cache.cached_json`: the same key rules); later starts read it back."""
    if not isinstance(source, str):
        return _from_gguf(source)
    from novallm_jax.loading import packed_cache

    def decode(d: dict) -> HFTokenizer:
        return HFTokenizer(tokenizers.Tokenizer.from_str(d["tokenizer"]), **d["settings"])

    return packed_cache.cached_json(source, ("tokenizer",), lambda: _settings(_from_gguf(source)), decode, "tokenizer")


def _settings(tok: HFTokenizer) -> dict:
    return {
        "tokenizer": tok.backend.to_str(),
        "settings": {
            "bos_token_id": tok.bos_token_id,
            "eos_token_ids": list(tok.eos_token_ids),
            "pad_token_id": tok.pad_token_id,
            "unk_token_id": tok._unk_token_id,
            "add_bos": tok.add_bos,
            "add_eos": tok.add_eos,
            "chat_template": tok.chat_template,
            "name": tok.name,
        },
    }


def _from_gguf(source: str | Any) -> HFTokenizer:
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
    token_types = list(_field(reader, "tokenizer.ggml.token_type") or [])
    merges = _field(reader, "tokenizer.ggml.merges")
    pre = _field(reader, "tokenizer.ggml.pre")
    add_space_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", model == "llama"))
    alphabet = None
    if model == "gpt2":
        if merges is None:
            raise TokenizerError(f"{name}: byte-level BPE vocabulary without tokenizer.ggml.merges")
        if pre in _UNSUPPORTED_PRE:
            raise TokenizerError(
                f"{name}: tokenizer.ggml.pre {pre!r} (a hand-written llama.cpp pre-tokenizer) is not supported"
            )
        tok = _byte_level(tokens, token_types, merges, pre, name)
        alphabet = set(bytes_to_unicode().values())
        add_bos_default = pre in _ADDS_BOS
    elif model == "llama":
        scores = _field(reader, "tokenizer.ggml.scores")
        if scores is None and merges is None:
            raise TokenizerError(f"{name}: sentencepiece vocabulary without tokenizer.ggml.scores or merges")
        tok = _sentencepiece(tokens, scores, merges, add_space_prefix)
        add_bos_default = True  # llama.cpp adds bos to a sentencepiece vocabulary unless the file says otherwise
    elif model == "gemma4":
        if merges is None:
            raise TokenizerError(f"{name}: gemma4 vocabulary without tokenizer.ggml.merges")
        tok = _gemma4(tokens, merges)
        add_bos_default = True
    elif model == "bert":
        lowercase = bool(_field(reader, "tokenizer.ggml.normalizer.lowercase", True))
        unk_id = int(_field(reader, "tokenizer.ggml.unknown_token_id", 100))
        tok = _wordpiece(
            tokens,
            token_types,
            tokens[unk_id] if 0 <= unk_id < len(tokens) else "[UNK]",
            lowercase,
            bool(_field(reader, "tokenizer.ggml.normalizer.strip_accents", lowercase)),
        )
        add_bos_default = True  # [CLS] ... [SEP], as llama.cpp's WPM adds them
    else:
        raise TokenizerError(
            f"{name}: tokenizer.ggml.model {model!r} is not supported (supported: 'gpt2', 'llama', 'gemma4', 'bert')"
        )

    def token_id(key: str) -> int | None:
        value = _field(reader, f"tokenizer.ggml.{key}")
        return None if value is None or not 0 <= int(value) < len(tokens) else int(value)

    bos, eos, pad, unk = (token_id(k) for k in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id"))
    if model == "bert":  # [CLS] opens a sequence and [SEP] closes it
        bos, eos = bos if bos is not None else token_id("cls_token_id"), token_id("seperator_token_id")
    # Control tokens stay whole and are special; user-defined ones stay whole but are text (llama.cpp splits them
    # out even when it does not parse special tokens). A control token outside the byte alphabet of a byte-level
    # vocabulary is a llama.cpp mislabel and is left alone.
    rstrip = _rstrip_rule(_field(reader, "general.name") or "")
    control = [
        AddedToken(t, normalized=False, special=True, rstrip=rstrip(t))
        for t, k in zip(tokens, token_types)
        if k == _CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    named = [tokens[i] for i in (bos, eos, unk, pad) if i is not None]
    control += [
        AddedToken(t, normalized=False, special=True, rstrip=rstrip(t))
        for t in named
        if t not in {c.content for c in control}
    ]
    tok.add_special_tokens(control)
    user = [
        AddedToken(t, normalized=False, special=False, rstrip=rstrip(t))
        for t, k in zip(tokens, token_types)
        if k == _USER_DEFINED and t not in {c.content for c in control}
    ]
    if user:
        tok.add_tokens(user)
    extra_eos = [token_id(k) for k in ("eot_token_id", "eom_token_id")] + _end_of_generation(tokens)
    # llama.cpp always gives Gemma 4 its bos, whatever the file says.
    add_bos = model == "gemma4" or bool(_field(reader, "tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = model == "bert" or bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    return HFTokenizer(
        tok,
        bos_token_id=bos,
        eos_token_ids=[i for i in [eos, *extra_eos] if i is not None],
        pad_token_id=pad,
        unk_token_id=unk,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=_field(reader, "tokenizer.chat_template"),
        name=os.path.basename(name),
    )
