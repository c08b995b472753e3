"""The packed-weights cache: a second load reads it and gives the same params; changes miss it; broken entries are
rebuilt."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging

from novallm_jax.loading import gguf_file, load_model, packed_cache, quantized_by_default


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from novallm_jax.loading.gguf_export import hf_to_gguf
    from tests.hf_models import build_hf_model, save_hf_model

    tmp = tmp_path_factory.mktemp("packed")
    src = save_hf_model(build_hf_model("llama2"), str(tmp / "hf"))
    return hf_to_gguf(src, str(tmp / "tiny-q8.gguf"), quant="Q8_0")


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Loads with the cache under tmp_path, counting the loads that decoded the file."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("NOVALLM_WEIGHTS_CACHE", raising=False)
    calls = []
    real = gguf_file.load_gguf

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_file, "load_gguf", counting)
    return calls


def _same(a, b) -> None:
    (la, ta), (lb, tb) = jax.tree.flatten(a), jax.tree.flatten(b)
    assert ta == tb
    assert all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _entries(tmp_path) -> list:
    root = tmp_path / "novallm-jax" / "packed"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".tmp-")) if root.exists() else []


@pytest.mark.parametrize("keep_quantized", [True, False])
def test_second_load_reads_the_cache_and_gives_the_same_params(tiny_gguf, counted, tmp_path, keep_quantized):
    if keep_quantized and not quantized_by_default(jnp.float32):
        pytest.skip("block codes need the native CPU kernels")
    cfg, params = load_model(tiny_gguf, jnp.float32, keep_quantized=keep_quantized)
    cfg2, params2 = load_model(tiny_gguf, jnp.float32, keep_quantized=keep_quantized)
    assert len(counted) == 1 and cfg2 == cfg and len(_entries(tmp_path)) == 1
    _same(params, params2)


def test_a_changed_file_or_jax_version_misses(tiny_gguf, counted, tmp_path, monkeypatch):
    load_model(tiny_gguf, jnp.float32)
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(open(tiny_gguf, "rb").read())
    load_model(str(copy), jnp.float32)
    assert len(counted) == 2  # another file
    data, mtime = bytearray(copy.read_bytes()), os.stat(copy).st_mtime_ns
    data[-1] ^= 1  # the last weight byte
    copy.write_bytes(bytes(data))
    os.utime(copy, ns=(mtime, mtime))  # even with its old size and mtime, the changed bytes miss
    load_model(str(copy), jnp.float32)
    assert len(counted) == 3
    monkeypatch.setattr(jax, "__version__", "0.0.1")
    load_model(tiny_gguf, jnp.float32)
    assert len(counted) == 4
    assert len(_entries(tmp_path)) == packed_cache.MAX_ENTRIES  # the oldest evicted


def test_a_corrupt_entry_is_removed_with_a_warning_and_rebuilt(tiny_gguf, counted, tmp_path, monkeypatch):
    _, params = load_model(tiny_gguf, jnp.float32)
    (entry,) = _entries(tmp_path)
    leaves = tmp_path / "novallm-jax" / "packed" / entry / "leaves.bin"
    with open(leaves, "r+b") as f:
        f.truncate(leaves.stat().st_size // 2)
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
    _, again = load_model(tiny_gguf, jnp.float32)
    assert len(counted) == 2 and any("is unreadable" in w for w in warnings)
    _same(params, again)
    load_model(tiny_gguf, jnp.float32)
    assert len(counted) == 2  # written anew, read back


def test_the_cache_can_be_turned_off(tiny_gguf, counted, tmp_path, monkeypatch):
    monkeypatch.setenv("NOVALLM_WEIGHTS_CACHE", "0")
    load_model(tiny_gguf, jnp.float32)
    load_model(tiny_gguf, jnp.float32)
    assert len(counted) == 2 and _entries(tmp_path) == []


def test_a_gguf_tokenizer_is_kept_and_reads_back_the_same(default_gguf, tmp_path, monkeypatch):
    """The tokenizer built from a GGUF vocabulary (49k tokens, merges, special tokens) is kept beside the packed
    weights: a second load reads it, encodes and decodes as the built one, and a broken entry is rebuilt."""
    from novallm_jax.tokenization import gguf_tokenizer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("NOVALLM_WEIGHTS_CACHE", raising=False)
    built = []
    real = gguf_tokenizer._from_gguf
    monkeypatch.setattr(gguf_tokenizer, "_from_gguf", lambda s: built.append(s) or real(s))
    first = gguf_tokenizer.tokenizer_from_gguf(default_gguf)
    kept = gguf_tokenizer.tokenizer_from_gguf(default_gguf)
    assert len(built) == 1
    texts = [
        "Hello world",
        "  spaces\tand\nnewlines ",
        "<|im_start|>user\nHi<|im_end|>",
        "émoji 🤖 日本語",
        "x=y+z 1234",
    ]
    for text in texts:
        assert kept.encode(text) == first.encode(text) and kept.encode(text, False) == first.encode(text, False)
        ids = first.encode(text)
        assert kept.decode(ids) == first.decode(ids) and kept.decode(ids, True) == first.decode(ids, True)
    settings = lambda t: (
        t.bos_token_id,
        t.eos_token_ids,
        t.pad_token_id,
        t.add_bos,
        t.add_eos,
        t.chat_template,
        t.name,
        t.vocab_size,
        t.decode_mode,
    )
    assert settings(kept) == settings(first)

    (entry,) = (tmp_path / "novallm-jax" / "packed").glob("tokenizer-*.json")
    entry.write_text('{"tokenizer": "not a tokenizer"')
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
    rebuilt = gguf_tokenizer.tokenizer_from_gguf(default_gguf)
    assert len(built) == 2 and any("is unreadable" in w for w in warnings)
    assert rebuilt.encode(texts[2]) == first.encode(texts[2])
    gguf_tokenizer.tokenizer_from_gguf(default_gguf)
    assert len(built) == 2  # written again, read back
