"""BufferManager: preallocated, fixed-shape host input buffers (token ids, positions, page tables) leased to steps.

A buffer's size class is its (shape, dtype). Buffers are made once by `reserve`; `lease` hands one out and the
lease gives it back (a context manager, or `release()`). Leasing more than were reserved raises.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from novallm_jax.amp.central_cache import SizeClassFreeLists
from novallm_jax.errors import PoolError

SizeClass = tuple[tuple[int, ...], str]


class BufferLeaseError(PoolError):
    """No free buffer of the size class asked for, or a lease returned twice."""


def size_class(shape: Sequence[int], dtype: Any) -> SizeClass:
    return tuple(int(d) for d in shape), np.dtype(dtype).name


class BufferLease:
    """One leased buffer; `array` is the numpy buffer. `with lease as array:` returns it on exit."""

    def __init__(self, manager: BufferManager, lease_id: int, key: SizeClass, array: np.ndarray, owner: Hashable):
        self._manager = manager
        self.id = lease_id
        self.size_class = key
        self.array = array
        self.owner = owner
        self.released = False

    def release(self) -> None:
        self._manager._give_back(self)

    def __enter__(self) -> np.ndarray:
        return self.array

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclasses.dataclass(frozen=True)
class SizeClassStats:
    total: int
    leased: int
    peak_leased: int


class BufferManager:
    """Preallocated numpy buffers by size class, leased and returned."""

    def __init__(self, reserve: Sequence[tuple[Sequence[int], Any, int]] = ()):
        self._free: SizeClassFreeLists[np.ndarray] = SizeClassFreeLists()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._leases: dict[int, BufferLease] = {}
        self._total: dict[SizeClass, int] = {}
        self._peak: dict[SizeClass, int] = {}
        for shape, dtype, count in reserve:
            self.reserve(shape, dtype, count)

    def reserve(self, shape: Sequence[int], dtype: Any, count: int) -> None:
        """Preallocates `count` more buffers of this shape and dtype."""
        key = size_class(shape, dtype)
        for _ in range(count):
            self._free.put(key, np.zeros(key[0], key[1]))
        with self._lock:
            self._total[key] = self._total.get(key, 0) + count

    def lease(self, shape: Sequence[int], dtype: Any, *, owner: Hashable = None, fill: Any = None) -> BufferLease:
        """Leases a buffer (its old contents, or `fill` everywhere); raises BufferLeaseError when none is free."""
        key = size_class(shape, dtype)
        array = self._free.get(key)
        if array is None:
            with self._lock:
                total, leased = self._total.get(key, 0), self._leased_locked(key)
            raise BufferLeaseError(
                f"no free buffer of shape {key[0]} {key[1]}: {total} reserved, {leased} leased; "
                f"return leases or reserve more"
            )
        if fill is not None:
            array.fill(fill)
        lease = BufferLease(self, next(self._ids), key, array, owner)
        with self._lock:
            self._leases[lease.id] = lease
            self._peak[key] = max(self._peak.get(key, 0), self._leased_locked(key))
        return lease

    def _give_back(self, lease: BufferLease) -> None:
        with self._lock:
            if self._leases.pop(lease.id, None) is None:
                raise BufferLeaseError(
                    f"buffer lease {lease.id} ({lease.size_class[0]} {lease.size_class[1]}, owner {lease.owner!r}) "
                    f"was already returned"
                )
            lease.released = True
        self._free.put(lease.size_class, lease.array)

    def _leased_locked(self, key: SizeClass) -> int:
        return sum(1 for lease in self._leases.values() if lease.size_class == key)

    @property
    def leases_outstanding(self) -> int:
        with self._lock:
            return len(self._leases)

    def stats(self) -> dict[SizeClass, SizeClassStats]:
        with self._lock:
            return {
                key: SizeClassStats(total, self._leased_locked(key), self._peak.get(key, 0))
                for key, total in self._total.items()
            }

    def check_leaks(self) -> list[str]:
        """One line per outstanding lease; empty when every buffer is back."""
        with self._lock:
            return [
                f"buffer lease {lease.id} ({lease.size_class[0]} {lease.size_class[1]}) of owner "
                f"{lease.owner!r} is outstanding"
                for lease in self._leases.values()
            ]
