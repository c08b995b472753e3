"""Prefix caching: full KV pages of earlier prompts, found by a hash of every token up to the page's end.

The cache is an owner in the memory pool: it holds one reference to each cached page, and requests that reuse a page
take their own. A page whose only holder is the cache can be evicted (least recently used first).
"""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np

from novallm_jax.amp import MemoryPool

OWNER = "prefix-cache"


def page_hashes(tokens: Sequence[int], page_size: int, max_pages: int, salt: bytes = b"") -> list[bytes]:
    """Chained hashes of the first `max_pages` full pages: page i's hash covers tokens [0, (i + 1) * page_size), and
    `salt` (what else the pages' contents depend on)."""
    out, h = [], salt
    for i in range(min(max_pages, len(tokens) // page_size)):
        chunk = np.asarray(tokens[i * page_size:(i + 1) * page_size], np.int64).tobytes()
        h = hashlib.blake2b(h + chunk, digest_size=16).digest()
        out.append(h)
    return out


class PrefixCache:
    """Maps page hashes to cached pages; LRU eviction of pages no request is using."""

    def __init__(self, pool: MemoryPool, page_size: int):
        self.pool = pool
        self.page_size = page_size
        self._pages: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self.hits = 0  # pages reused
        self.queries = 0  # full prompt pages looked up

    def __len__(self) -> int:
        return len(self._pages)

    def match(self, owner, hashes: Sequence[bytes]) -> list[int]:
        """The longest cached run of `hashes` from the start; `owner` takes a reference to each of those pages."""
        pages = []
        for h in hashes:
            page = self._pages.get(h)
            if page is None:
                break
            self._pages.move_to_end(h)
            pages.append(page)
        self.queries += len(hashes)
        self.hits += len(pages)
        if pages:
            self.pool.share(OWNER, owner, pages)
        return pages

    def insert(self, owner, hashes: Sequence[bytes], pages: Sequence[int]) -> None:
        """Caches `owner`'s full pages under their hashes (those not cached yet)."""
        new = [(h, p) for h, p in zip(hashes, pages) if h not in self._pages]
        if new:
            self.pool.share(owner, OWNER, [p for _, p in new])
            self._pages.update(new)

    def evict(self, n: int) -> int:
        """Frees up to `n` pages that only the cache holds, least recently used first; returns how many."""
        heap = self.pool.router.arena_of(OWNER).heap if self._pages else None
        victims = []
        for h, p in self._pages.items():
            if len(victims) == n:
                break
            if heap.refcount(p) == 1:
                victims.append((h, p))
        for h, _ in victims:
            del self._pages[h]
        if victims:
            self.pool.free(OWNER, [p for _, p in victims])
        return len(victims)

    def clear(self) -> None:
        """Drops every cached page (pages still used by requests stay theirs)."""
        if self._pages:
            self.pool.free(OWNER, list(self._pages.values()))
        self._pages.clear()

    def pages(self) -> set[int]:
        return set(self._pages.values())

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
