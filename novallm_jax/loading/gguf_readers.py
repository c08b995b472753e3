"""One parsed `gguf.GGUFReader` per file while a `shared_readers()` block runs.

The reader parses every metadata field when it opens a file, ~3.5 s for SmolLM2's 49k-token vocabulary on this
project's machines, and an `LLM` opens its file twice (weights, then tokenizer). Outside such a block nothing is
kept: a reader holds ~170 MB of parsed fields.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Callable, Iterator

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
