"""Weights in host memory that are read from their file only where a device asks for a slice.

On a mesh, each process places only its own devices' shards of each weight (`sharding.place` through
`jax.make_array_from_callback`, which asks for the slice each device holds). A loader inside
`assemble.on_host()` returns `HostSlices` leaves for the tensors it can read in slices (safetensors), and the
transposes, concatenations and column regroupings that turn checkpoint tensors into params (`assemble_params`,
`sharding.shard_layout`) stay lazy: a device's slice reads only the rows and columns of the file it needs. Any
other numpy operation reads the whole tensor (`__array__`), so what is not lazy stays correct.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import numpy as np

Index = tuple[slice, ...]

_READ = [0]  # bytes read through FileTensors, by this process
_LOCK = threading.Lock()


def bytes_read() -> int:
    """Bytes this process has read from files through `FileTensor`s (a measure for tests and logs)."""
    return _READ[0]


class HostSlices(np.lib.mixins.NDArrayOperatorsMixin):
    """An array of `shape` and `dtype` whose `[index]` (slices with step 1) reads only what that slice needs.
    Elsewhere it acts as the whole array (operators, numpy functions and ndarray methods read it all)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, index: Index) -> np.ndarray:
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def T(self) -> HostSlices:
        return _Transposed(self)

    def astype(self, dtype) -> HostSlices:
        return self if np.dtype(dtype) == self.dtype else _Cast(self, dtype)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > self.ndim or not all(isinstance(s, slice) and s.step in (None, 1) for s in index):
            return np.asarray(self)[index]
        index += (slice(None),) * (self.ndim - len(index))
        return self.read(tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, self.shape)))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self.read(tuple(slice(0, n) for n in self.shape))
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return getattr(ufunc, method)(*_whole(inputs), **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        return func(*_whole(args), **kwargs)

    def __getattr__(self, name: str):
        # ndarray's own methods and attributes only: a probe for anything else (`hasattr(w, "sharding")`) must not
        # read the tensor.
        if name.startswith("_") or not hasattr(np.ndarray, name):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(np.asarray(self), name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


class FileTensor(HostSlices):
    """A tensor of a file: `reader(index)` returns that slice of it."""

    def __init__(self, shape: Sequence[int], dtype, reader: Callable[[Index], np.ndarray]):
        self.shape, self.dtype, self._reader = tuple(shape), np.dtype(dtype), reader

    def read(self, index: Index) -> np.ndarray:
        out = np.asarray(self._reader(index))
        with _LOCK:
            _READ[0] += out.nbytes
        return out


class _Cast(HostSlices):
    def __init__(self, src: HostSlices, dtype):
        self.src, self.shape, self.dtype = src, src.shape, np.dtype(dtype)

    def read(self, index: Index) -> np.ndarray:
        return self.src.read(index).astype(self.dtype)


class _Transposed(HostSlices):
    def __init__(self, src: HostSlices):
        if src.ndim != 2:
            raise ValueError(f"lazy transposes are of 2-D tensors, not of shape {src.shape}")
        self.src, self.shape, self.dtype = src, src.shape[::-1], src.dtype

    def read(self, index: Index) -> np.ndarray:
        return self.src.read(index[::-1]).T


class _Concat(HostSlices):
    """`parts` joined along the last axis."""

    def __init__(self, parts: Sequence[HostSlices | np.ndarray]):
        self.parts = list(parts)
        lead = self.parts[0].shape[:-1]
        if any(p.shape[:-1] != lead for p in self.parts):
            raise ValueError(f"cannot join shapes {[p.shape for p in self.parts]} along the last axis")
        self.shape = (*lead, sum(p.shape[-1] for p in self.parts))
        self.dtype = np.result_type(*(p.dtype for p in self.parts))
        self._starts = np.cumsum([0] + [p.shape[-1] for p in self.parts])

    def read(self, index: Index) -> np.ndarray:
        lo, hi = index[-1].start, index[-1].stop
        pieces = []
        for p, start, end in zip(self.parts, self._starts[:-1], self._starts[1:]):
            a, b = max(lo, start), min(hi, end)
            if a < b:
                pieces.append(_read(p, index[:-1] + (slice(a - start, b - start),)).astype(self.dtype, copy=False))
        if not pieces:
            return np.zeros(tuple(s.stop - s.start for s in index), self.dtype)
        return np.concatenate(pieces, axis=-1)


class _Take(HostSlices):
    """`src` with its last axis gathered at `indices` (a permutation, or repeats of whole runs)."""

    def __init__(self, src: HostSlices, indices: np.ndarray):
        self.src, self.indices = src, np.asarray(indices, np.int64)
        self.shape, self.dtype = (*src.shape[:-1], len(self.indices)), src.dtype

    def read(self, index: Index) -> np.ndarray:
        wanted = self.indices[index[-1]]
        if not len(wanted):
            return np.zeros(tuple(s.stop - s.start for s in index), self.dtype)
        # Runs of consecutive columns, each read as one slice; many short runs read their cover once instead.
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        runs = np.split(wanted, breaks)
        if len(runs) > 16:
            lo, hi = int(wanted.min()), int(wanted.max()) + 1
            return np.take(_read(self.src, index[:-1] + (slice(lo, hi),)), wanted - lo, axis=-1)
        pieces = [_read(self.src, index[:-1] + (slice(int(r[0]), int(r[-1]) + 1),)) for r in runs]
        return np.concatenate(pieces, axis=-1)


def _whole(args):
    """`args` with every `HostSlices` (also inside lists and tuples) read whole."""
    if isinstance(args, HostSlices):
        return np.asarray(args)
    if isinstance(args, (list, tuple)):
        return type(args)(_whole(a) for a in args)
    return args


def _read(a: HostSlices | np.ndarray, index: Index) -> np.ndarray:
    return a.read(index) if isinstance(a, HostSlices) else np.asarray(a[index])


def concat_columns(parts: Sequence) -> np.ndarray | HostSlices:
    """`np.concatenate(parts, axis=-1)`, lazy when a part is `HostSlices`."""
    if any(isinstance(p, HostSlices) for p in parts):
        return _Concat(parts)
    return np.concatenate(parts, axis=-1)


def take_columns(a, indices: np.ndarray):
    """`a[..., indices]`: lazy for `HostSlices`, numpy for numpy, and for a jax.Array on the devices, keeping its
    sharding (a weight restored shard by shard stays split; XLA moves only the columns that change shards)."""
    if isinstance(a, HostSlices):
        return _Take(a, indices)
    if isinstance(a, np.ndarray):
        return np.take(a, indices, axis=-1)
    import jax
    import jax.numpy as jnp

    if len(a.sharding.device_set) == 1:
        return jnp.take(a, indices, axis=-1)
    return jax.jit(lambda w: jnp.take(w, indices, axis=-1), out_shardings=a.sharding)(a)
