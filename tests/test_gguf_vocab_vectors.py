"""GGUF tokenizers against llama.cpp's own test vectors (models/ggml-vocab-*.gguf with .inp/.out).

llama.cpp's tests/test-tokenizer-0.cpp encodes each text with no bos/eos and without parsing control tokens
(user-defined ones are still matched); every case of every vocabulary we accept must give its ids exactly.
"""

from __future__ import annotations

import glob
import os

import pytest
from llama_cpp_sdist import llama_cpp_dir, read_vocab_tests

from novallm_jax.errors import TokenizerError
from novallm_jax.tokenizer import load_tokenizer

ACCEPTED = [
    "bert-bge",
    "command-r",
    "deepseek-coder",
    "deepseek-llm",
    "falcon",
    "gemma-4",
    "gpt-2",
    "llama-bpe",
    "llama-spm",
    "mpt",
    "phi-3",
    "qwen2",
    "qwen35",
    "refact",
    "starcoder",
]
# BERT lowercases and strips accents: its texts do not come back.
LOSSY = {"bert-bge"}


def _vocab_path(name: str) -> str:
    return os.path.join(llama_cpp_dir(), "models", f"ggml-vocab-{name}.gguf")


_loaded: dict[str, object] = {}


def _tokenizer(name: str):
    if name not in _loaded:
        tok = load_tokenizer(_vocab_path(name))
        tok.backend.encode_special_tokens = True  # llama.cpp's test passes parse_special=false
        _loaded[name] = tok
    return _loaded[name]


def test_every_vocabulary_with_vectors_is_listed():
    models = os.path.join(llama_cpp_dir(), "models")
    with_vectors = {
        os.path.basename(p)[len("ggml-vocab-") : -len(".gguf")]
        for p in glob.glob(os.path.join(models, "ggml-vocab-*.gguf"))
        if os.path.isfile(p + ".inp") and os.path.isfile(p + ".out")
    }
    assert with_vectors == set(ACCEPTED)


@pytest.mark.parametrize("name", ACCEPTED)
def test_vectors_exact(name):
    tok = _tokenizer(name)
    cases = read_vocab_tests(_vocab_path(name))
    assert len(cases) >= 40
    wrong = [(text, got, ids) for text, ids in cases if (got := tok.encode(text, add_special_tokens=False)) != ids]
    assert not wrong, "\n".join(f"{t!r}: ours {g} llama.cpp {i}" for t, g, i in wrong[:5])


@pytest.mark.parametrize("name", sorted(set(ACCEPTED) - LOSSY))
def test_vectors_round_trip(name):
    """decode(encode(text)) gives the text back: these vocabularies lose nothing on these texts."""
    tok = _tokenizer(name)
    wrong = [
        text
        for text, _ in read_vocab_tests(_vocab_path(name))
        if tok.decode(tok.encode(text, add_special_tokens=False)) != text
    ]
    assert not wrong, f"{len(wrong)} texts do not round-trip, e.g. {wrong[:3]!r}"


def _vocab_only_gguf(path: str, model: str, pre: str | None = None) -> str:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(path, "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_merges(["a b"])
    writer.add_tensor("w", np.zeros((2, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "model,pre,message",
    [
        ("t5", None, "tokenizer.ggml.model 't5' is not supported"),
        ("rwkv", None, "tokenizer.ggml.model 'rwkv' is not supported"),
        ("gpt2", "kimi-k2", "tokenizer.ggml.pre 'kimi-k2' .* is not supported"),
    ],
)
def test_refused_with_one_line_error(tmp_path, model, pre, message):
    """Tokenizer models and llama.cpp pre-tokenizers we do not reproduce are refused, never approximated."""
    with pytest.raises(TokenizerError, match=message) as info:
        load_tokenizer(_vocab_only_gguf(str(tmp_path / "v.gguf"), model, pre))
    assert "\n" not in str(info.value)


def test_llama_spm_tokens_and_code_points_round_trip():
    """llama.cpp's test-tokenizer-1-spm: each token's text, and each code point, detokenize back to themselves."""
    tok = load_tokenizer(_vocab_path("llama-spm"))  # parses special tokens, as that test does
    backend = tok.backend
    pieces = [tok.decode([i]) for i in range(tok.vocab_size)]
    again = backend.decode_batch(
        [e.ids for e in backend.encode_batch(pieces, add_special_tokens=False)], skip_special_tokens=False
    )
    bad = [(i, p, a) for i, (p, a) in enumerate(zip(pieces, again)) if p != a]
    assert not bad, f"{len(bad)} tokens do not round-trip, e.g. {bad[:3]!r}"
    # Surrogates cannot be encoded; llama.cpp skips 0x40000-0xE0000 (unassigned) and U+2581 (its own space mark).
    points = [chr(c) for c in range(0x110000) if not (0xD800 <= c <= 0xDFFF or 0x40000 <= c <= 0xE0000 or c == 0x2581)]
    texts = backend.decode_batch([e.ids for e in backend.encode_batch(points, add_special_tokens=False)])
    bad = [(hex(ord(p)), t) for p, t in zip(points, texts) if p != t]
    assert not bad, f"{len(bad)} code points do not round-trip, e.g. {bad[:3]!r}"


@pytest.mark.parametrize("name", ["gemma-4", "phi-3", "llama-spm", "mpt", "deepseek-llm", "llama-bpe"])
def test_vector_ids_stream_as_they_decode(name):
    """The incremental detokenizer's pieces of each vector's ids add up to the full decode, never revised."""
    from test_detokenizer import _check_stream

    tok = _tokenizer(name)
    for _, ids in read_vocab_tests(_vocab_path(name)):
        for skip in (False, True):
            _check_stream(tok, ids, skip)


def test_end_of_generation_ids():
    """As llama.cpp: turns end generation (Gemma's <turn|>, Phi-3's <|end|>, Llama 3's <|eot_id|>) beside eos."""
    expected = {
        "gemma-4": ["<eos>", "<|tool_response>", "<turn|>"],
        "phi-3": ["<|endoftext|>", "</s>", "<|end|>"],
        "llama-bpe": ["<|end_of_text|>", "<|eot_id|>"],
        "llama-spm": ["</s>"],
    }
    for name, texts in expected.items():
        tok = _tokenizer(name)
        assert sorted(tok.id_to_token(i) for i in tok.eos_token_ids) == sorted(texts), name
        assert tok.add_bos  # all four get a bos from llama.cpp (Gemma 4 whatever its file says)


def test_every_pre_tokenizer_regex_compiles():
    """Each llama.cpp pre-tokenizer name we map builds (Oniguruma refuses ranges that NFC or a typo broke)."""
    from novallm_jax.tokenization.gguf_tokenizer import PRE_TOKENIZER_SPLITS, _splits

    for pre, regexes in PRE_TOKENIZER_SPLITS.items():
        for split in _splits(regexes):
            assert split.pre_tokenize_str("Hello, wörld 123 日本語 \n\n  x") is not None, pre


def test_phi3_special_tokens_strip_what_follows():
    """llama.cpp strips the whitespace after Phi-3's special tokens; the text after one gets its own '▁'."""
    tok = _tokenizer("phi-3")
    ids = load_tokenizer(_vocab_path("phi-3")).encode("<|user|>\n  Hi<|end|>\n<|assistant|>", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids] == ["<|user|>", "▁Hi", "<|end|>", "<|assistant|>"]


@pytest.mark.parametrize("name", ["phi-3", "mpt", "deepseek-llm", "bert-bge"])
def test_saved_as_tokenizer_json_encodes_the_same(tmp_path, name):
    """novallm-convert writes a GGUF's tokenizer as tokenizer.json: read back, it gives llama.cpp's ids still."""
    load_tokenizer(_vocab_path(name)).save_pretrained(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    tok.backend.encode_special_tokens = True
    wrong = [text for text, ids in read_vocab_tests(_vocab_path(name)) if tok.encode(text, False) != ids]
    assert not wrong, f"{len(wrong)} cases differ after the round trip through tokenizer.json, e.g. {wrong[:2]!r}"
