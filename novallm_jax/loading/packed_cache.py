"""Loaded params kept on disk, ready for the kernels, so a second start maps them instead of decoding and packing.

An entry holds the params pytree's leaves in one file and its structure beside them. Its key covers what the result
depends on: the model file (path, size, mtime, its first and last MiB), the package's code (every `.py` and `.cc` of
it: a change of layout must never meet old panels), jax, the load options and the CPU's kernel variant. A changed
file or version simply misses; an entry that does not read back is removed with a warning and written again. The
newest `MAX_ENTRIES` are kept. `NOVALLM_WEIGHTS_CACHE=0` turns it off. A GGUF file's tokenizer is kept the same
way, as a `tokenizer-KEY.json` file beside the entries (`cached_json`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from novallm_jax.config import ModelConfig
from novallm_jax.kernels.build import switched_off

MAX_ENTRIES = 3
_ENV = "NOVALLM_WEIGHTS_CACHE"
_PACKAGE = Path(__file__).resolve().parent.parent
_EDGE = 1 << 20


def enabled() -> bool:
    return not switched_off(_ENV)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "novallm-jax" / "packed"


@functools.cache
def _code_digest() -> bytes:
    h = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*")):
        if path.suffix in (".py", ".cc"):
            h.update(str(path.relative_to(_PACKAGE)).encode() + b"\0" + path.read_bytes())
    return h.digest()


def entry_key(path: str, options: tuple) -> str:
    """The key of `path` loaded with `options` (anything hashable by repr: dtype, keep_quantized, ...)."""
    from novallm_jax.kernels import native

    st = os.stat(path)
    h = hashlib.sha256()
    h.update(
        repr(
            (
                os.path.realpath(path),
                st.st_size,
                st.st_mtime_ns,
                options,
                jax.__version__,
                np.__version__,
                native.variant(),  # not the built library's ISA: that would wait for the build
            )
        ).encode()
    )
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        f.seek(max(0, st.st_size - _EDGE))
        h.update(f.read(_EDGE))
    h.update(_code_digest())
    return h.hexdigest()[:32]


def cached(path: str, options: tuple, load: Callable[[], tuple[ModelConfig, Any]]) -> tuple[ModelConfig, Any]:
    """`load()`'s (config, params) for the file at `path`, from the cache when an entry matches, else loaded and
    stored."""
    if not enabled():
        return load()
    key = entry_key(path, options)
    entry = cache_dir() / key
    if entry.is_dir():
        try:
            result = _read(entry)
            os.utime(entry)  # most recently used
            logging.info("weights of %s read from the packed-weights cache %s", path, entry)
            return result
        except Exception as e:  # any failure to read back: a broken entry, never a reason to fail the load
            logging.warning(
                "packed-weights cache entry %s is unreadable (%s: %s): removed, to be written again",
                entry,
                type(e).__name__,
                e,
            )
            shutil.rmtree(entry, ignore_errors=True)
    cfg, params = load()
    try:
        _write(entry, cfg, params)
        _evict(keep=entry)
    except OSError as e:  # a full or read-only disk costs the next start time, not this one its model
        logging.warning("could not write the packed-weights cache entry %s: %s", entry, e)
    return cfg, params


def _write(entry: Path, cfg: ModelConfig, params: Any) -> None:
    leaves, treedef = jax.tree.flatten(params)
    arrays = [np.asarray(leaf) for leaf in leaves]
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        with open(tmp / "leaves.bin", "wb") as f:
            for a in arrays:
                f.write(np.ascontiguousarray(a).data)
        index = [(a.dtype.name, a.shape) for a in arrays]  # by name: bfloat16's .str is an opaque '<V2'
        with open(tmp / "index.pkl", "wb") as f:
            pickle.dump({"config": cfg, "treedef": treedef, "leaves": index}, f)
        os.rename(tmp, entry)  # atomic: a reader sees no entry or a whole one
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not entry.is_dir():
            raise


def _read(entry: Path) -> tuple[ModelConfig, Any]:
    with open(entry / "index.pkl", "rb") as f:
        index = pickle.load(f)
    raw = np.memmap(entry / "leaves.bin", np.uint8, "r")
    dtypes = [jnp.dtype(name) for name, _ in index["leaves"]]
    sizes = [int(np.prod(shape)) * dt.itemsize for dt, (_, shape) in zip(dtypes, index["leaves"])]
    if sum(sizes) != raw.size:
        raise ValueError(f"leaves.bin holds {raw.size} bytes, the index {sum(sizes)}")
    leaves, offset = [], 0
    for dt, (_, shape), n in zip(dtypes, index["leaves"], sizes):
        # A copy (the file may change), made without compiling: jnp.asarray would build a program per shape and dtype.
        leaf = raw[offset : offset + n].view(dt).reshape(shape)
        leaves.append(jax.device_put(leaf, may_alias=False))
        offset += n
    return index["config"], jax.tree.unflatten(index["treedef"], leaves)


def cached_json(path: str, options: tuple, build: Callable[[], Any], decode: Callable[[Any], Any], what: str) -> Any:
    """`decode` of `build()`'s JSON-able value for the file at `path` (e.g. a tokenizer built from a GGUF file's
    vocabulary), from a `what-KEY.json` file beside the packed entries when one matches (the same key), else built and
    stored. An entry that does not decode is removed with a warning and written again."""
    if not enabled():
        return decode(build())
    root = cache_dir()
    entry = root / f"{what}-{entry_key(path, options)}.json"
    try:
        result = decode(json.loads(entry.read_text()))
        os.utime(entry)
        return result
    except FileNotFoundError:
        pass
    except Exception as e:  # a broken entry is never a reason to fail the load
        logging.warning("%s cache entry %s is unreadable (%s: %s): written again", what, entry, type(e).__name__, e)
    value = build()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=root, prefix=".tmp-", suffix=".json", delete=False) as f:
            json.dump(value, f)
        os.replace(f.name, entry)  # atomic: a reader sees no entry or a whole one
        for old in sorted(root.glob(f"{what}-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)[MAX_ENTRIES:]:
            old.unlink(missing_ok=True)
    except OSError as e:
        logging.warning("could not write the %s cache entry %s: %s", what, entry, e)
    return decode(value)


def _evict(keep: Path) -> None:
    """Removes all but the MAX_ENTRIES most recently used entries (and stale temporary directories)."""
    root = keep.parent
    entries = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in entries[MAX_ENTRIES:]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if tmp.stat().st_mtime < keep.stat().st_mtime - 3600:
                shutil.rmtree(tmp, ignore_errors=True)
