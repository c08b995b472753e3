"""Prefix caching: full KV pages of earlier prompts, found by a hash of every token up to the page's end.

The cache is an owner in the memory pool: it holds one reference to each cached page, and requests that reuse a page
take their own. A page whose only holder is the cache can be evicted (least recently used first).

A model with a window group (sliding layers in pages of their own, `kv_cache.window_groups`) caches with each page
the window group's page of the same tokens while its request still held it (pages behind the window go back to the
pool early). A prefix of m pages is reused only if the window pages that the query after it can see, those from
index (m * page_size - window + 1) // page_size to m, are cached too; else a shorter prefix is, down to none.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np

from novallm_jax.amp import MemoryPool
from novallm_jax.kv_cache import NULL_PAGE

OWNER = "prefix-cache"


def page_hashes(tokens: Sequence[int], page_size: int, max_pages: int, salt: bytes = b"") -> list[bytes]:
    """Chained hashes of the first `max_pages` full pages: page i's hash covers tokens [0, (i + 1) * page_size), and
    `salt` (what else the pages' contents depend on)."""
    out, h = [], salt
    for i in range(min(max_pages, len(tokens) // page_size)):
        chunk = np.asarray(tokens[i * page_size : (i + 1) * page_size], np.int64).tobytes()
        h = hashlib.blake2b(h + chunk, digest_size=16).digest()
        out.append(h)
    return out


class PrefixCache:
    """Maps page hashes to cached pages; LRU eviction of pages no request is using."""

    def __init__(
        self, pool: MemoryPool, page_size: int, window_pool: MemoryPool | None = None, window: int | None = None
    ):
        self.pool = pool
        self.page_size = page_size
        self.window_pool, self.window = window_pool, window
        self._pages: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._window: dict[bytes, int] = {}  # window-group pages, under the hash of their full-group page
        self.hits = 0  # pages reused
        self.queries = 0  # full prompt pages looked up

    def __len__(self) -> int:
        return len(self._pages)

    def match(self, owner, hashes: Sequence[bytes]) -> tuple[list[int], list[int]]:
        """The longest cached run of `hashes` from the start that can be reused (see the module docstring); `owner`
        takes a reference to each of its pages. Returns its pages, and its window-group page table (NULL_PAGE before
        the window; empty without a window group)."""
        pages = []
        for h in hashes:
            page = self._pages.get(h)
            if page is None:
                break
            pages.append(page)
        window_pages = []
        if self.window_pool is not None:
            while pages and not all(h in self._window for h in hashes[self.window_first(len(pages)) : len(pages)]):
                pages.pop()
            first = self.window_first(len(pages))
            window_pages = [NULL_PAGE] * first + [self._window[h] for h in hashes[first : len(pages)]]
            if len(pages) > first:
                self.window_pool.share(OWNER, owner, window_pages[first:])
        for h in hashes[: len(pages)]:
            self._pages.move_to_end(h)
        self.queries += len(hashes)
        self.hits += len(pages)
        if pages:
            self.pool.share(OWNER, owner, pages)
        return pages, window_pages

    def window_first(self, num_pages: int) -> int:
        """The first window-group page that the query at page `num_pages`'s start can see."""
        return max(0, num_pages * self.page_size - self.window + 1) // self.page_size

    def insert(self, owner, hashes: Sequence[bytes], pages: Sequence[int], window_pages: Sequence[int] = ()) -> None:
        """Caches `owner`'s full pages under their hashes (those not cached yet), with its window-group pages that
        are not back in the pool (NULL_PAGE in `window_pages`)."""
        new = [(h, p) for h, p in zip(hashes, pages) if h not in self._pages]
        if new:
            self.pool.share(owner, OWNER, [p for _, p in new])
            self._pages.update(new)
        new = [(h, p) for h, p in zip(hashes, window_pages) if p != NULL_PAGE and h not in self._window]
        if new:
            self.window_pool.share(owner, OWNER, [p for _, p in new])
            self._window.update(new)

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
            # A window page without its full-group page serves no match.
            self._drop_window([h for h, _ in victims if h in self._window])
        return len(victims)

    def evict_window(self, n: int) -> int:
        """Frees up to `n` window-group pages that only the cache holds, least recently used first (their full-group
        pages stay cached, for matches that do not need them); returns how many."""
        heap = self.window_pool.router.arena_of(OWNER).heap if self._window else None
        victims = [h for h in self._pages if h in self._window and heap.refcount(self._window[h]) == 1][:n]
        self._drop_window(victims)
        return len(victims)

    def _drop_window(self, hashes: list[bytes]) -> None:
        if hashes:
            self.window_pool.free(OWNER, [self._window.pop(h) for h in hashes])

    def clear(self) -> None:
        """Drops every cached page (pages still used by requests stay theirs)."""
        if self._pages:
            self.pool.free(OWNER, list(self._pages.values()))
        self._pages.clear()
        self._drop_window(list(self._window))

    def pages(self) -> set[int]:
        return set(self._pages.values())

    def window_pages(self) -> set[int]:
        return set(self._window.values())

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
