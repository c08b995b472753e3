"""Memory pool statistics: what is held, where, and by whom."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

from novallm_jax.amp.buffers import SizeClass, SizeClassStats


@dataclasses.dataclass(frozen=True)
class ArenaStats:
    """One device's pages. `free` counts heap and cached pages; `cached` only those in central/thread caches."""

    device: str
    num_pages: int  # including the null page
    free: int
    cached: int
    owned: int
    shared: int  # owned pages with more than one owner
    peak_owned: int
    largest_free_run: int
    pages_per_owner: dict[Hashable, int]
    # The page storage's bytes on each device it spans (a mesh holds 1/model of every page's heads per device).
    bytes_per_device: int = 0


@dataclasses.dataclass(frozen=True)
class PoolStats:
    arenas: list[ArenaStats]
    swapped_handles: int
    swapped_pages: int
    swapped_bytes: int
    buffers: dict[SizeClass, SizeClassStats]
    leases_outstanding: int

    @property
    def free(self) -> int:
        return sum(a.free for a in self.arenas)

    @property
    def owned(self) -> int:
        return sum(a.owned for a in self.arenas)
