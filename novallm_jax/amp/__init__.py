"""The Advanced Memory Pool (AMP): KV pages and host input buffers for the engine, in tcmalloc-style layers.

`MemoryPool` is the engine's facade. Below it, one layer per job: `ArenaRouter` picks a device's `Arena`; an arena's
`ThreadCache` (per worker, no shared lock) refills from its `CentralCache` (shared, locked), which refills from the
`PageHeap` (runs of pages, refcounts, copy-on-write, the storage pytree). `HostArena` holds swapped-out pages;
`BufferManager` leases preallocated host buffers.
"""

from novallm_jax.amp.arena import Arena, ArenaRouter, HostArena, SwapHandle, local_devices
from novallm_jax.amp.buffers import BufferLease, BufferLeaseError, BufferManager
from novallm_jax.amp.central_cache import CentralCache, SizeClassFreeLists
from novallm_jax.amp.page_heap import NULL_PAGE, PageHeap
from novallm_jax.amp.pool import MemoryPool
from novallm_jax.amp.stats import ArenaStats, PoolStats
from novallm_jax.amp.thread_cache import ThreadCache

__all__ = [
    "NULL_PAGE",
    "Arena",
    "ArenaRouter",
    "ArenaStats",
    "BufferLease",
    "BufferLeaseError",
    "BufferManager",
    "CentralCache",
    "HostArena",
    "MemoryPool",
    "PageHeap",
    "PoolStats",
    "SizeClassFreeLists",
    "SwapHandle",
    "ThreadCache",
    "local_devices",
]
