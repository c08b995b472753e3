"""A GGUF file is parsed once while `shared_readers()` runs (weights, then tokenizer), and never kept after."""

import os

from novallm_jax.loading.gguf_file import open_gguf
from novallm_jax.loading.gguf_readers import reader_for, shared_readers


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
    import gguf

    from novallm_jax.tokenizer import load_tokenizer

    calls = []
    real = gguf.GGUFReader

    def counting(path, *args, **kwargs):
        calls.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    with shared_readers():
        reader = open_gguf(default_gguf)
        tok = load_tokenizer(default_gguf)
        assert open_gguf(default_gguf) is reader
    assert len(calls) == 1
    assert tok.encode("Hello") == load_tokenizer(default_gguf).encode("Hello")
    assert len(calls) == 2
