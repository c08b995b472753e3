"""ThreadCache: one worker's batch of reserved pages, so that its allocations and frees take no shared lock."""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable

from novallm_jax.amp.central_cache import CentralCache


class ThreadCache:
    """Unowned pages reserved for one thread; refilled from and drained to the central cache in batches.

    Only its thread calls `get` and `put`. Other threads may `drain` it (to reclaim pages when the pool runs short):
    the pages sit in a `collections.deque`, whose appends and pops are atomic, so each page leaves exactly once.
    """

    def __init__(self, central: CentralCache, *, batch_size: int = 16, max_size: int = 64):
        self.central = central
        self.batch_size = batch_size
        self.max_size = max(max_size, 1)
        self.thread = threading.current_thread()
        self._free: collections.deque[int] = collections.deque()

    def __len__(self) -> int:
        return len(self._free)

    def get(self, n: int) -> list[int]:
        """`n` unowned pages, or fewer when the central cache and the heap are both dry."""
        out: list[int] = []
        while len(out) < n:
            try:
                out.append(self._free.pop())
            except IndexError:
                got = self.central.get_upto(n - len(out) + self.batch_size)
                if not got:
                    break
                self._free.extend(got)
        return out

    def put(self, pages: Iterable[int]) -> None:
        """Takes unowned pages back; sends a batch to the central cache when over `max_size`."""
        self._free.extend(pages)
        excess = len(self._free) - self.max_size // 2
        if len(self._free) > self.max_size:
            self.central.put(self._pop_oldest(excess))

    def drain(self) -> list[int]:
        """Removes and returns every page (safe from any thread)."""
        return self._pop_oldest(len(self._free))

    def snapshot(self) -> list[int]:
        return list(self._free)

    def _pop_oldest(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            try:
                out.append(self._free.popleft())
            except IndexError:  # drained by another thread meanwhile
                break
        return out
