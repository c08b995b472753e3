"""A GGUF file is parsed once while `shared_readers()` runs (weights, then tokenizer), and never kept after; the fast
reader gives what `gguf.GGUFReader` gives."""

import os

import gguf
import numpy as np
import pytest

from novallm_jax.loading.gguf_file import open_gguf
from novallm_jax.loading.gguf_readers import FastReader, reader_for, shared_readers


def test_one_reader_per_file_inside_the_block_only(tmp_path):
    opened = []

    def open_reader(path):
        opened.append(path)
        return object()

    f = tmp_path / "a.gguf"
    f.write_bytes(b"GGUF" + bytes(8))
    assert reader_for(str(f), open_reader) is not reader_for(str(f), open_reader)  # no block: nothing is kept
    with shared_readers():
        first = reader_for(str(f), open_reader)
        with shared_readers():  # nested blocks share the outermost one's readers
            assert reader_for(str(f), open_reader) is first
        assert reader_for(str(f), open_reader) is first
        f.write_bytes(b"GGUF" + bytes(16))  # the file changed: parsed again
        assert reader_for(str(f), open_reader) is not first
    assert len(opened) == 4
    reader_for(str(f), open_reader)
    assert len(opened) == 5  # released with the block


def test_llm_style_loading_parses_the_default_gguf_once(default_gguf, monkeypatch):
    from novallm_jax.loading import gguf_readers
    from novallm_jax.tokenizer import load_tokenizer

    monkeypatch.setenv("NOVALLM_WEIGHTS_CACHE", "0")  # else the tokenizer comes from its cache entry, parsing nothing
    calls = []
    real_init = gguf_readers.FastReader.__init__

    def counting(self, path, *args, **kwargs):
        calls.append(os.path.basename(path))
        real_init(self, path, *args, **kwargs)

    monkeypatch.setattr(gguf_readers.FastReader, "__init__", counting)
    with shared_readers():
        reader = open_gguf(default_gguf)
        tok = load_tokenizer(default_gguf)
        assert open_gguf(default_gguf) is reader
    assert len(calls) == 1
    assert tok.encode("Hello") == load_tokenizer(default_gguf).encode("Hello")
    assert len(calls) == 2


def _same_as_gguf(path: str) -> None:
    ref, fast = gguf.GGUFReader(path), FastReader(path)
    assert list(fast.fields) == list(ref.fields)
    for key, f in ref.fields.items():
        g = fast.fields[key]
        assert g.types == f.types, key
        assert g.contents() == f.contents(), key
        if f.types[0] == gguf.GGUFValueType.ARRAY and f.contents():
            assert g.contents(0) == f.contents(0) and g.contents(slice(1, 3)) == f.contents(slice(1, 3)), key
    assert fast.data_offset == ref.data_offset and fast.alignment == ref.alignment
    assert [(t.name, t.tensor_type, t.shape.tolist()) for t in fast.tensors] == [
        (t.name, t.tensor_type, t.shape.tolist()) for t in ref.tensors
    ]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(fast.tensors, ref.tensors))


def test_fast_reader_reads_every_value_type_as_gguf_does(tmp_path):
    path = str(tmp_path / "kinds.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("k.u8", 250), w.add_int8("k.i8", -5), w.add_uint16("k.u16", 65000), w.add_int16("k.i16", -300)
    w.add_uint32("k.u32", 4_000_000_000), w.add_int32("k.i32", -7), w.add_float32("k.f32", 0.1)
    w.add_uint64("k.u64", 2**63 + 5), w.add_int64("k.i64", -(2**40)), w.add_float64("k.f64", 1e-300)
    w.add_bool("k.bool", True), w.add_string("k.str", "héllo ▁ 🙂"), w.add_string("k.empty", "")
    w.add_array("k.strs", ["a", "", "ü" * 300]), w.add_array("k.ints", [1, -2, 3]), w.add_array("k.floats", [0.5, 2.25])
    w.add_array("k.bools", [True, False]), w.add_array("k.none", [])
    w.add_custom_alignment(64)
    w.add_tensor("t.f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor(
        "t.q8",
        gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), gguf.GGMLQuantizationType.Q8_0),
        raw_dtype=gguf.GGMLQuantizationType.Q8_0,
    )
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    _same_as_gguf(path)
    assert FastReader(path).fields["k.str"].contents() == "héllo ▁ 🙂"


def test_fast_reader_reads_the_default_model_as_gguf_does(default_gguf):
    _same_as_gguf(default_gguf)


def test_a_truncated_file_is_a_clear_error(tmp_path, default_gguf):
    from novallm_jax.errors import ModelLoadError

    bad = tmp_path / "cut.gguf"
    with open(default_gguf, "rb") as f:
        bad.write_bytes(f.read(200_000))  # inside the vocabulary
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        open_gguf(str(bad))
