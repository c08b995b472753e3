"""Arenas: one per device (page heap + central cache + thread caches), a router over them, and a host arena.

The host arena keeps host (numpy) copies of the pages of preempted sequences, so their device pages can be reused.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Sequence
from typing import Any

import jax
from absl import logging

from novallm_jax.amp.central_cache import CentralCache
from novallm_jax.amp.page_heap import Owner, PageHeap
from novallm_jax.amp.stats import ArenaStats
from novallm_jax.amp.thread_cache import ThreadCache
from novallm_jax.errors import OutOfPagesError, PoolError
from novallm_jax.sharding import bytes_per_device


def local_devices() -> list[jax.Device]:
    """This process's devices, the default backend's (GPU/TPU/…) first, then the CPU ones if different."""
    out = list(jax.local_devices())
    if out[0].platform != "cpu":
        out += jax.local_devices(backend="cpu")
    return out


class Arena:
    """The pages of one device: heap, central cache and per-thread caches, behind an owner-level API."""

    def __init__(
        self,
        device: jax.Device | None = None,
        num_pages: int | None = None,
        storage: Any = None,
        *,
        page_batch: int = 16,
        thread_cache_pages: int = 64,
    ):
        self.heap = PageHeap(num_pages, storage)
        if device is None:
            leaves = jax.tree.leaves(storage)
            device = min(leaves[0].devices(), key=lambda d: d.id) if leaves else jax.devices()[0]
        self.device = device
        self.central = CentralCache(self.heap, batch_size=page_batch)
        self._thread_cache_pages = thread_cache_pages
        self._local = threading.local()
        self._caches: list[ThreadCache] = []
        self._caches_lock = threading.Lock()  # guards the registry only, never a page

    def __repr__(self) -> str:
        return f"Arena({self.device}, {self.heap.num_pages} pages)"

    @property
    def name(self) -> str:
        return str(self.device)

    def thread_cache(self) -> ThreadCache:
        """The calling thread's cache (created on first use)."""
        cache = getattr(self._local, "cache", None)
        if cache is None:
            cache = ThreadCache(self.central, batch_size=self.central.batch_size, max_size=self._thread_cache_pages)
            self._local.cache = cache
            with self._caches_lock:
                self._caches.append(cache)
        return cache

    @property
    def num_free(self) -> int:
        """Unowned pages: in the heap, the central cache and every thread cache."""
        with self._caches_lock:
            cached = sum(len(c) for c in self._caches)
        return self.heap.num_free + len(self.central) + cached

    def _reclaim(self, keep: ThreadCache | None = None) -> None:
        """Moves other threads' cached pages to the central cache; forgets caches of finished threads."""
        with self._caches_lock:
            caches = list(self._caches)
        for cache in caches:
            if cache is not keep:
                self.central.put(cache.drain())
        with self._caches_lock:
            self._caches = [c for c in self._caches if c.thread.is_alive() or len(c)]

    def drain_caches(self) -> None:
        """Returns every cached page (all threads and the central cache) to the heap, where runs coalesce."""
        self._reclaim()
        self.central.flush()

    def _out_of_pages(self, n: int, what: str = "") -> OutOfPagesError:
        return OutOfPagesError(
            f"out of KV pages on {self.name}: asked for {n}{what}, {self.num_free} free "
            f"(of {self.heap.num_pages - 1} usable); free or preempt sequences, or make the pool larger"
        )

    def allocate(self, owner: Owner, n: int, *, contiguous: bool = False) -> list[int]:
        """`n` new pages for `owner` (refcount 1), one contiguous run if asked."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if contiguous:
            try:
                return self.heap.allocate(owner, n, contiguous=True)
            except OutOfPagesError:
                self.drain_caches()
                try:
                    return self.heap.allocate(owner, n, contiguous=True)
                except OutOfPagesError:
                    raise self._out_of_pages(
                        n, f" contiguous (largest free run {self.heap.largest_free_run()})"
                    ) from None
        pages = self.allocate_unowned(n)
        self.heap.assign(owner, pages)
        return pages

    def free(self, owner: Owner, pages: Sequence[int]) -> None:
        """Drops `owner`'s reference to `pages`; pages nobody holds go back to this thread's cache."""
        freed = self.heap.release(owner, pages)
        if freed:
            self.thread_cache().put(freed)

    def free_all(self, owner: Owner) -> int:
        """Frees every page `owner` holds here; returns how many it held."""
        pages = self.heap.pages_of(owner)
        self.free(owner, pages)
        return len(pages)

    def share(self, from_owner: Owner, new_owner: Owner, pages: Sequence[int] | None = None) -> list[int]:
        """`new_owner` also holds `pages` of `from_owner` (all of them by default); returns the pages shared."""
        pages = self.heap.pages_of(from_owner) if pages is None else list(pages)
        self.heap.share(pages, new_owner, from_owner=from_owner)
        return pages

    def make_writable(self, owner: Owner, page: int, *, copy: bool = True) -> int:
        """Copy-on-write through the caches: see `PageHeap.make_writable`."""
        if self.heap.is_exclusive(owner, page):
            return page
        fresh = self.allocate_unowned(1)[0]
        new = self.heap.make_writable(owner, page, fresh=fresh, copy=copy)
        if new != fresh:  # the other owners let go meanwhile
            self.thread_cache().put([fresh])
        return new

    def allocate_unowned(self, n: int) -> list[int]:
        """`n` unowned pages from this thread's cache (reclaiming other threads' caches when short)."""
        if n > self.num_free:
            raise self._out_of_pages(n)
        cache = self.thread_cache()
        pages = cache.get(n)
        if len(pages) < n:
            self._reclaim(keep=cache)
            pages += cache.get(n - len(pages))
            if len(pages) < n:
                cache.put(pages)
                raise self._out_of_pages(n)
        return pages

    def stats(self) -> ArenaStats:
        owned = self.heap.owned_pages()
        free = self.num_free
        return ArenaStats(
            device=self.name,
            num_pages=self.heap.num_pages,
            free=free,
            cached=free - self.heap.num_free,
            owned=len(owned),
            shared=sum(1 for o in owned.values() if len(o) > 1),
            peak_owned=self.heap.peak_owned,
            largest_free_run=self.heap.largest_free_run(),
            pages_per_owner=self.heap.pages_per_owner(),
            bytes_per_device=bytes_per_device(self.heap.storage),
        )

    def free_page_ids(self) -> list[int]:
        """Every unowned page (heap runs, central and thread caches), duplicates kept; exact when quiescent."""
        out = [p for start, length in self.heap.free_runs() for p in range(start, start + length)]
        out += self.central.snapshot()
        with self._caches_lock:
            for cache in self._caches:
                out += cache.snapshot()
        return out


class ArenaRouter:
    """Routes each owner's allocations to one arena: its current one, else the device asked for, else the default."""

    def __init__(self, arenas: Sequence[Arena]):
        if not arenas:
            raise ValueError("an ArenaRouter needs at least one arena")
        self.arenas = list(arenas)
        self._by_device = {a.device: a for a in self.arenas}
        if len(self._by_device) != len(self.arenas):
            raise ValueError(f"two arenas for one device in {self.arenas}")
        self.default = self.arenas[0]

    def arena(self, device: jax.Device | None = None) -> Arena:
        if device is None:
            return self.default
        try:
            return self._by_device[device]
        except KeyError:
            raise PoolError(f"no arena for device {device}; arenas: {[a.name for a in self.arenas]}") from None

    def find(self, owner: Owner) -> Arena | None:
        """The arena where `owner` holds pages, if any."""
        for arena in self.arenas:
            if arena.heap.holds(owner):
                return arena
        return None

    def arena_of(self, owner: Owner) -> Arena:
        arena = self.find(owner)
        if arena is None:
            raise PoolError(f"owner {owner!r} holds no pages")
        return arena

    def route(self, owner: Owner, device: jax.Device | None = None) -> Arena:
        """The arena for a new allocation of `owner`: a sequence's pages all live on one device."""
        current = self.find(owner)
        if current is not None:
            if device is not None and device != current.device:
                raise PoolError(f"owner {owner!r} holds pages on {current.name}, cannot allocate on {device}")
            return current
        return self.arena(device)


@dataclasses.dataclass(frozen=True)
class SwapHandle:
    """A swapped-out set of pages: `pages` are the device ids they had, in the order given to `swap_out`."""

    id: int
    owner: Owner
    device: jax.Device
    pages: tuple[int, ...]
    nbytes: int

    @property
    def num_pages(self) -> int:
        return len(self.pages)


class HostArena:
    """Host copies of swapped-out pages, keyed by handle."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._held: dict[int, tuple[SwapHandle, Any]] = {}

    def swap_out(self, arena: Arena, owner: Owner, pages: Sequence[int] | None = None) -> SwapHandle:
        """Copies `owner`'s `pages` (all, by default) to host and frees them on the device."""
        pages = arena.heap.pages_of(owner) if pages is None else list(pages)
        for p in pages:  # fail before copying anything
            if owner not in arena.heap.owners(p):
                raise PoolError(f"swap_out: page {p} is not held by owner {owner!r}")
        contents = arena.heap.read_pages(pages) if arena.heap.storage is not None and pages else None
        arena.free(owner, pages)
        nbytes = sum(x.nbytes for x in jax.tree.leaves(contents))
        handle = SwapHandle(next(self._ids), owner, arena.device, tuple(pages), nbytes)
        with self._lock:
            self._held[handle.id] = (handle, contents)
        logging.vlog(1, "swapped out %d pages (%d bytes) of %r from %s", len(pages), nbytes, owner, arena.name)
        return handle

    def swap_in(self, arena: Arena, handle: SwapHandle) -> list[int]:
        """New device pages for the handle's owner with the saved contents; their ids, in the saved order.

        On OutOfPagesError the handle stays valid and can be retried.
        """
        with self._lock:
            if handle.id not in self._held:
                raise PoolError(f"swap handle {handle.id} of owner {handle.owner!r} was already swapped in or dropped")
            _, contents = self._held[handle.id]
        pages = arena.allocate(handle.owner, handle.num_pages)
        try:
            if contents is not None:
                arena.heap.write_pages(pages, contents)
        except BaseException:
            arena.free(handle.owner, pages)
            raise
        with self._lock:
            del self._held[handle.id]
        logging.vlog(1, "swapped in %d pages of %r to %s", len(pages), handle.owner, arena.name)
        return pages

    def drop(self, handle: SwapHandle) -> None:
        """Forgets a handle's host copy (its sequence was cancelled while swapped out)."""
        with self._lock:
            if self._held.pop(handle.id, None) is None:
                raise PoolError(f"swap handle {handle.id} of owner {handle.owner!r} was already swapped in or dropped")

    def drop_owner(self, owner: Owner) -> int:
        """Drops every handle of `owner`; returns how many pages they held."""
        with self._lock:
            ids = [i for i, (h, _) in self._held.items() if h.owner == owner]
            return sum(self._held.pop(i)[0].num_pages for i in ids)

    def handles(self) -> list[SwapHandle]:
        with self._lock:
            return [h for h, _ in self._held.values()]

    def check_leaks(self) -> list[str]:
        return [
            f"swap handle {h.id} of owner {h.owner!r} holds {h.num_pages} page(s) ({h.nbytes} bytes) on host"
            for h in self.handles()
        ]
