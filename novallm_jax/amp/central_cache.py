"""CentralCache: the shared, lock-protected free lists — one heap's pages, and leased buffers by size class."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

from novallm_jax.amp.page_heap import PageHeap

T = TypeVar("T")


class CentralCache:
    """Free pages of one `PageHeap` shared by all workers; talks to the heap in batches.

    A short list is refilled from the heap `batch_size` pages beyond the demand at a time; a list longer than
    `max_free` gives its oldest half back to the heap, where the pages coalesce into runs again.
    """

    def __init__(self, heap: PageHeap, *, batch_size: int = 16, max_free: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.heap = heap
        self.batch_size = batch_size
        self.max_free = max_free if max_free is not None else 4 * batch_size
        self._lock = threading.Lock()
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._free)

    def get_upto(self, n: int) -> list[int]:
        """Up to `n` free pages (fewer only when the heap runs dry too); never raises for lack of pages."""
        with self._lock:
            short = n - len(self._free)
            if short > 0:
                self._free.extend(self.heap.take(short + self.batch_size, at_most=True))
            k = min(n, len(self._free))
            out = self._free[len(self._free) - k :]
            del self._free[len(self._free) - k :]
            return out

    def put(self, pages: Iterable[int]) -> None:
        """Takes unowned pages back; returns a batch to the heap when the list grows past `max_free`."""
        with self._lock:
            self._free.extend(pages)
            if len(self._free) > self.max_free:
                keep = self.max_free // 2
                # The oldest pages go back: the newest are the likeliest to be reused soon.
                excess = self._free[: len(self._free) - keep]
                del self._free[: len(self._free) - keep]
                self.heap.give_back(excess)

    def flush(self) -> None:
        """Gives every cached page back to the heap (e.g. before a contiguous request, or at shutdown)."""
        with self._lock:
            pages, self._free = self._free, []
            self.heap.give_back(pages)

    def snapshot(self) -> list[int]:
        with self._lock:
            return list(self._free)


class SizeClassFreeLists(Generic[T]):
    """Lock-protected free lists of preallocated objects, one list per size class (any hashable key)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lists: dict[Hashable, list[T]] = {}

    def put(self, size_class: Hashable, item: T) -> None:
        with self._lock:
            self._lists.setdefault(size_class, []).append(item)

    def get(self, size_class: Hashable) -> T | None:
        """An object of `size_class`, or None when its list is empty."""
        with self._lock:
            items = self._lists.get(size_class)
            return items.pop() if items else None

    def count(self, size_class: Hashable) -> int:
        with self._lock:
            return len(self._lists.get(size_class, ()))
