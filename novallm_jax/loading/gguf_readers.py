"""GGUF readers: `FastReader`, a `gguf.GGUFReader` whose metadata parse takes milliseconds, and one parsed reader per
file while a `shared_readers()` block runs (an `LLM` opens its file twice: weights, then tokenizer).
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import threading
from typing import Any, Callable, Iterator

import numpy as np


def _import_gguf():
    """`import gguf`, without letting its vocab module import mistral_common: when that is installed, it costs every
    start 0.2-0.4 s, for gguf's MistralVocab, a conversion helper we never call. gguf sees it as not installed; the
    block is lifted at once, so anyone may import mistral_common afterwards."""
    if "gguf" in sys.modules or "mistral_common" in sys.modules:
        import gguf

        return gguf
    sys.modules["mistral_common"] = None  # makes `import mistral_common...` raise ImportError, which gguf catches
    try:
        import gguf
    finally:
        if sys.modules.get("mistral_common", 0) is None:
            del sys.modules["mistral_common"]
    return gguf


gguf = _import_gguf()

_lock = threading.Lock()
_readers: dict[tuple, Any] | None = None


@contextlib.contextmanager
def shared_readers() -> Iterator[None]:
    """Within the block, `reader_for` parses each file once; the readers are released when the outermost block ends."""
    global _readers
    with _lock:
        outermost = _readers is None
        if outermost:
            _readers = {}
    try:
        yield
    finally:
        if outermost:
            with _lock:
                _readers = None


def reader_for(path: str, open_reader: Callable[[str], Any]) -> Any:
    """`open_reader(path)`, or the reader already parsed for this file (same path, size and mtime) in the block."""
    if _readers is None:
        return open_reader(path)
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _lock:
        cached = None if _readers is None else _readers.get(key)
    if cached is not None:
        return cached
    reader = open_reader(path)
    with _lock:
        if _readers is not None:
            _readers[key] = reader
    return reader


_SCALARS = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}


_U64 = struct.Struct("<Q")


class _Field:
    """A metadata field, decoded once: the subset of `gguf.ReaderField` that readers of metadata use."""

    __slots__ = ("offset", "name", "types", "value", "parts")

    def __init__(self, offset: int, name: str, types: list, value: Any):
        self.offset, self.name, self.types, self.value = offset, name, types, value
        self.parts = [np.asarray([value])] if not isinstance(value, list) else []  # `general.alignment`'s check

    def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
        return self.value[index_or_slice] if isinstance(self.value, list) else self.value


class FastReader(gguf.GGUFReader):
    """`gguf.GGUFReader` with its metadata parsed by `struct` instead of a numpy view per value.

    The base class makes a memmap view of every string of a vocabulary, ~3.5 s for SmolLM2's 49k tokens on this
    project's machines and ~170 MB of views; this parse takes ~50 ms. Tensors are the base class's (views of the
    mapped file), and `fields[key].contents()` gives the same values.
    """

    def _build_fields(self, offs: int, count: int) -> int:
        if self.byte_order == "S":  # a file of the other byte order: the base class handles it
            return super()._build_fields(offs, count)
        buf = memoryview(self.data)
        for _ in range(int(count)):
            start = offs
            name, offs = _string(buf, offs)
            (raw,) = struct.unpack_from("<I", buf, offs)
            kind = gguf.GGUFValueType(raw)
            value, types, offs = _value(buf, offs + 4, kind)
            self._push_field(_Field(start, name, [kind, *types], value), skip_sum=True)
        return offs


def _string(buf: memoryview, offs: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, offs)
    return str(buf[offs + 8 : offs + 8 + n], "utf-8"), offs + 8 + n


def _value(buf: memoryview, offs: int, kind) -> tuple[Any, list, int]:
    """(value, the element types after `kind` for arrays, offset past it)."""
    if kind == gguf.GGUFValueType.STRING:
        value, offs = _string(buf, offs)
        return value, [], offs
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack_from(fmt, buf, offs)[0], [], offs + struct.calcsize(fmt)
    if kind != gguf.GGUFValueType.ARRAY:
        raise ValueError(f"unknown GGUF value type {kind}")
    sub, n = struct.unpack_from("<IQ", buf, offs)
    sub = gguf.GGUFValueType(sub)
    offs += 12
    if sub in _SCALARS:
        dtype = np.dtype(_SCALARS[sub])
        return np.frombuffer(buf, dtype, n, offs).tolist(), [sub], offs + n * dtype.itemsize
    if sub == gguf.GGUFValueType.STRING:  # a vocabulary: the hot loop of a load
        items, length = [], _U64.unpack_from
        for _ in range(n):
            (k,) = length(buf, offs)
            items.append(str(buf[offs + 8 : offs + 8 + k], "utf-8"))
            offs += 8 + k
        return items, [sub], offs
    items, types = [], [sub]
    for _ in range(n):
        item, inner, offs = _value(buf, offs, sub)
        items.append(item)
        types = [sub, *inner]
    return items, types, offs
