"""MemoryPool: the engine's one handle on the AMP — arenas per device, a host swap arena and input buffers."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax

from novallm_jax.amp.arena import Arena, ArenaRouter, HostArena, SwapHandle
from novallm_jax.amp.buffers import BufferLease, BufferManager
from novallm_jax.amp.page_heap import Owner, copy_pages
from novallm_jax.amp.stats import PoolStats


class MemoryPool:
    """KV pages by owner (a request id), routed to per-device arenas; swap to host; leased host buffers.

    Without `devices` there is one arena, on the storage's device (or the default device). With `devices`, one
    arena per device, each of `num_pages` pages; `storage` belongs to the first (set the others' with
    `set_storage`). Exhaustion raises OutOfPagesError; a double free or foreign free raises PoolError.
    Operations on different owners may run on any threads; one owner's operations must not race each other.
    """

    def __init__(
        self,
        num_pages: int | None = None,
        storage: Any = None,
        *,
        devices: Sequence[jax.Device] | None = None,
        page_batch: int = 16,
        thread_cache_pages: int = 64,
        buffers: Sequence[tuple[Sequence[int], Any, int]] = (),
    ):
        kw = dict(page_batch=page_batch, thread_cache_pages=thread_cache_pages)
        if devices is None:
            arenas = [Arena(None, num_pages, storage, **kw)]
        else:
            arenas = [Arena(d, num_pages, storage if i == 0 else None, **kw) for i, d in enumerate(devices)]
        self.router = ArenaRouter(arenas)
        self.host = HostArena()
        self.buffers = BufferManager(buffers)
        # The operations on page contents (swaps, copies) in order, for processes that hold other shards of the
        # storage to repeat (a cluster's step plans carry them, `StepPlan.pool_ops`); None: not recorded.
        self.journal: list[list] | None = None

    def _note(self, *op) -> None:
        if self.journal is not None:
            self.journal.append(list(op))

    def take_journal(self) -> list[list]:
        """The operations noted since the last call (see `journal`), forgotten here."""
        if self.journal is None:
            return []
        ops, self.journal = self.journal, []
        return ops

    # ---- pages --------------------------------------------------------------------------------------------------

    def allocate(
        self, owner: Owner, n: int, *, contiguous: bool = False, device: jax.Device | None = None
    ) -> list[int]:
        """`n` new pages for `owner` on its device (or `device`, or the default one)."""
        return self.router.route(owner, device).allocate(owner, n, contiguous=contiguous)

    def free(self, owner: Owner, pages: Sequence[int]) -> None:
        """Drops `owner`'s reference to each of `pages`; a shared page stays allocated for its other owners."""
        if pages:
            self.router.arena_of(owner).free(owner, pages)

    def free_all(self, owner: Owner) -> int:
        """Frees everything `owner` holds, device pages and swapped-out copies; returns the number of pages."""
        arena = self.router.find(owner)
        n = arena.free_all(owner) if arena is not None else 0
        dropped = self.host.drop_owner(owner)
        if dropped:
            self._note("drop_owner", owner)
        return n + dropped

    def share(self, from_owner: Owner, new_owner: Owner, pages: Sequence[int] | None = None) -> list[int]:
        """`new_owner` also holds `pages` of `from_owner` (all of its pages by default), e.g. a common prefix."""
        arena = self.router.arena_of(from_owner)
        self.router.route(new_owner, arena.device)  # both must live on one device
        return arena.share(from_owner, new_owner, pages)

    def make_writable(self, owner: Owner, page: int, *, copy: bool = True) -> int:
        """Copy-on-write: `page` if `owner` holds it alone, else the id of its new private copy (its contents
        copied unless `copy` is False; see `PageHeap.make_writable`)."""
        return self.router.arena_of(owner).make_writable(owner, page, copy=copy)

    def copy_pages(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copies each (src, dst) page's device contents, in place (the copies `make_writable(copy=False)` left)."""
        if pairs:
            self.storage = copy_pages(self.storage, pairs)
            self._note("copy", [list(p) for p in pairs])

    def pages_of(self, owner: Owner) -> list[int]:
        arena = self.router.find(owner)
        return arena.heap.pages_of(owner) if arena is not None else []

    def swap_out(self, owner: Owner, pages: Sequence[int] | None = None) -> SwapHandle:
        """Copies `owner`'s pages (all, in page-table order, by default) to host and frees them on the device."""
        handle = self.host.swap_out(self.router.arena_of(owner), owner, pages)
        self._note("swap_out", handle.id, owner, list(handle.pages))
        return handle

    def swap_in(self, handle: SwapHandle, device: jax.Device | None = None) -> list[int]:
        """New pages with the swapped-out contents, in the handle's order: update the page table with them."""
        pages = self.host.swap_in(self.router.route(handle.owner, device or handle.device), handle)
        self._note("swap_in", handle.id, list(pages))  # a copy: the caller extends its page table
        return pages

    def drop_swapped(self, handle: SwapHandle) -> None:
        self.host.drop(handle)
        self._note("drop", handle.id)

    @property
    def num_free(self) -> int:
        """Free pages on the default device."""
        return self.router.default.num_free

    @property
    def num_pages(self) -> int:
        """Pages on the default device, including the null page."""
        return self.router.default.heap.num_pages

    @property
    def storage(self) -> Any:
        """The default device's page storage (the KV pytree); the engine replaces it after each donated step."""
        return self.router.default.heap.storage

    @storage.setter
    def storage(self, value: Any) -> None:
        self.router.default.heap.storage = value

    def set_storage(self, storage: Any, device: jax.Device) -> None:
        self.router.arena(device).heap.storage = storage

    def read_pages(self, pages: Sequence[int]) -> Any:
        """Host copies of `pages`' contents on the default device (`PageHeap.read_pages`); their bookkeeping is
        unchanged."""
        return self.router.default.heap.read_pages(pages)

    def write_pages(self, pages: Sequence[int], contents: Any) -> None:
        """Writes host contents (as from `read_pages`) into `pages` on the default device."""
        self.router.default.heap.write_pages(pages, contents)

    # ---- buffers ------------------------------------------------------------------------------------------------

    def lease(self, shape: Sequence[int], dtype: Any, *, owner: Hashable = None, fill: Any = None) -> BufferLease:
        return self.buffers.lease(shape, dtype, owner=owner, fill=fill)

    # ---- accounting ---------------------------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        handles = self.host.handles()
        return PoolStats(
            arenas=[a.stats() for a in self.router.arenas],
            swapped_handles=len(handles),
            swapped_pages=sum(h.num_pages for h in handles),
            swapped_bytes=sum(h.nbytes for h in handles),
            buffers=self.buffers.stats(),
            leases_outstanding=self.buffers.leases_outstanding,
        )

    def check_leaks(self) -> list[str]:
        """One line per page, host copy or buffer still held; empty when the pool is idle and clean."""
        out = [line for a in self.router.arenas for line in a.heap.check_leaks(a.name)]
        return out + self.host.check_leaks() + self.buffers.check_leaks()
