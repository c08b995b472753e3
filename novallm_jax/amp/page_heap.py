"""PageHeap: one device's KV pages — free runs (spans), owners and refcounts, and the page storage pytree.

The storage is any pytree whose array leaves all hold pages on axis 0 (e.g. a `PagedKVCache`). Page 0 is the null
page: padding and unused page-table entries point at it, so it is never handed out and never freed.

A page is in exactly one state: FREE (in one of the heap's free runs), CACHED (taken out of the heap by a central
or thread cache, owned by nobody) or OWNED (held by one or more owners; its refcount is the number of owners).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from novallm_jax.errors import OutOfPagesError, PoolError

Owner = Hashable
NULL_PAGE = 0

_FREE, _CACHED, _OWNED, _NULL = 0, 1, 2, 3
_STATE_NAMES = {_FREE: "free", _CACHED: "cached", _OWNED: "owned", _NULL: "the null page"}


@dataclasses.dataclass(frozen=True)
class LocalShards:
    """This process's shards of pages read from a storage array that spans several processes' devices
    (`jax.distributed`): every process reads and writes back its own, in the same order (the step plans carry the
    swaps to the other processes)."""

    shape: tuple[int, ...]
    sharding: jax.sharding.Sharding
    shards: list[tuple[jax.Device, np.ndarray]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for _, a in self.shards)

    def padded(self, size: int, pad) -> jax.Array:
        """The pages as a global array of `size` pages (`pad` extends each shard), to write into the storage."""
        shards = [jax.device_put(pad(a), d) for d, a in self.shards]
        return jax.make_array_from_single_device_arrays((size, *self.shape[1:]), self.sharding, shards)


@functools.partial(jax.jit, donate_argnums=0)
def _copy_leaves(leaves: list, src: jax.Array, dst: jax.Array) -> list:
    return [x.at[dst].set(x[src]) for x in leaves]


@jax.jit
def _gather_pages(storage: Any, idx: jax.Array) -> Any:
    return jax.tree.map(lambda x: x[idx], storage)


@functools.partial(jax.jit, donate_argnums=0)
def _scatter_leaves(leaves: list, idx: jax.Array, values: list) -> list:
    return [x.at[idx].set(v.astype(x.dtype)) for x, v in zip(leaves, values)]


def _on_nonempty(op, storage: Any, *args, values: Any = None) -> Any:
    """`op` (donating) over the storage's non-empty leaves. Empty ones (a layer that keeps no K/V of its own) pass
    through untouched: out of a program, an empty array would lose its sharding on a mesh."""
    leaves, treedef = jax.tree.flatten(storage)
    keep = [i for i, x in enumerate(leaves) if x.size]
    if values is not None:
        value_leaves = jax.tree.leaves(values)
        args = (*args, [value_leaves[i] for i in keep])
    for i, x in zip(keep, op([leaves[i] for i in keep], *args)):
        leaves[i] = x
    return jax.tree.unflatten(treedef, leaves)


def copy_pages(storage: Any, pairs: Sequence[tuple[int, int]]) -> Any:
    """`storage` (donated) with each (src, dst) page's contents copied from src to dst; padded to a bucket of pairs
    (null page to null page) so that compiles stay bounded."""
    idx = np.full((2, _bucket(len(pairs))), NULL_PAGE, np.int32)
    idx[:, : len(pairs)] = np.asarray(pairs, np.int32).reshape(-1, 2).T
    return _on_nonempty(_copy_leaves, storage, jnp.asarray(idx[0]), jnp.asarray(idx[1]))


def _bucket(n: int) -> int:
    """Next power of two: swap transfers pad to it so that compiles stay bounded."""
    return 1 << max(0, n - 1).bit_length()


def storage_num_pages(storage: Any) -> int:
    """Number of pages (axis 0) shared by every leaf of `storage`; raises ValueError when they disagree."""
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(storage)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"page storage leaves must all have the same page axis 0, got sizes {sorted(map(str, sizes))}")
    return sizes.pop()


class PageHeap:
    """Bookkeeping of `num_pages` pages of one device, and optionally their storage pytree.

    All methods are thread-safe (one lock). Runs of pages are handed out best-fit and coalesced with their free
    neighbours when they come back, so contiguous runs stay available.
    """

    def __init__(self, num_pages: int | None = None, storage: Any = None):
        if storage is not None:
            found = storage_num_pages(storage)
            if num_pages is not None and num_pages != found:
                raise ValueError(f"num_pages={num_pages} but the storage holds {found} pages")
            num_pages = found
        if num_pages is None or num_pages < 2:
            raise ValueError(f"a page heap needs at least 2 pages (page 0 is reserved), got {num_pages}")
        self.num_pages = num_pages
        self._lock = threading.Lock()
        self._storage = storage
        self._state = bytearray(num_pages)
        self._state[NULL_PAGE] = _NULL
        self._owners: dict[int, set[Owner]] = {}
        # Per owner its pages in acquisition order: the order of its page table.
        self._held: dict[Owner, dict[int, None]] = {}
        self._runs: dict[int, int] = {}  # start -> length
        self._run_ending: dict[int, int] = {}  # end (exclusive) -> start
        self._insert_run(1, num_pages - 1)
        self._num_free = num_pages - 1
        self._peak_owned = 0

    # ---- storage ------------------------------------------------------------------------------------------------

    @property
    def storage(self) -> Any:
        return self._storage

    @storage.setter
    def storage(self, value: Any) -> None:
        if value is not None and storage_num_pages(value) != self.num_pages:
            raise ValueError(f"new storage holds {storage_num_pages(value)} pages, the heap has {self.num_pages}")
        with self._lock:
            self._storage = value

    def read_pages(self, pages: Sequence[int]) -> Any:
        """Host copies of `pages`' contents: the storage pytree with leaves [len(pages), ...], numpy, or
        `LocalShards` where the storage spans several processes' devices (each process keeps its own shards)."""
        n = len(pages)
        idx = np.full(_bucket(n), NULL_PAGE, np.int32)
        idx[:n] = pages
        with self._lock:
            self._require_storage("read pages")
            out = _gather_pages(self._storage, jnp.asarray(idx))

        def host(x: jax.Array):
            if x.is_fully_addressable:
                # Own copies: a zero-copy view of a CPU device buffer would keep that buffer alive.
                return np.array(jax.device_get(x)[:n])
            return LocalShards(
                (n, *x.shape[1:]), x.sharding, [(s.device, np.array(s.data[:n])) for s in x.addressable_shards]
            )

        return jax.tree.map(host, out)

    def write_pages(self, pages: Sequence[int], contents: Any) -> None:
        """Writes host contents (as from `read_pages`) into `pages` on device, updating the storage in place."""
        n = len(pages)
        size = _bucket(n)
        idx = np.full(size, NULL_PAGE, np.int32)
        idx[:n] = pages

        def pad(x: np.ndarray) -> np.ndarray:
            # Padding rows go to the null page, whose contents are never read unmasked; zeros keep it finite.
            out = np.zeros((size,) + x.shape[1:], x.dtype)
            out[:n] = x
            return out

        values = jax.tree.map(lambda x: x.padded(size, pad) if isinstance(x, LocalShards) else pad(x), contents)
        with self._lock:
            self._require_storage("write pages")
            self._storage = _on_nonempty(_scatter_leaves, self._storage, jnp.asarray(idx), values=values)

    def _require_storage(self, what: str) -> None:
        if self._storage is None:
            raise PoolError(f"cannot {what}: this page heap has no storage (set `storage` first)")

    # ---- free runs ----------------------------------------------------------------------------------------------

    def _insert_run(self, start: int, length: int) -> None:
        """Adds a free run, merging it with a free run that ends where it starts or starts where it ends."""
        right = self._runs.pop(start + length, None)
        if right is not None:
            del self._run_ending[start + length + right]
            length += right
        left = self._run_ending.pop(start, None)
        if left is not None:
            length += self._runs.pop(left)
            start = left
        self._runs[start] = length
        self._run_ending[start + length] = start

    def _remove_run(self, start: int) -> int:
        length = self._runs.pop(start)
        del self._run_ending[start + length]
        return length

    def _take_locked(self, n: int, contiguous: bool, at_most: bool) -> list[int]:
        if n <= 0:
            return []
        if contiguous:
            fits = [(length, start) for start, length in self._runs.items() if length >= n]
            if not fits:
                largest = max(self._runs.values(), default=0)
                raise OutOfPagesError(
                    f"page heap: asked for a run of {n} contiguous pages, {self._num_free} free "
                    f"(largest free run {largest}); free or preempt sequences first"
                )
            length, start = min(fits)
            spans = [(start, length)]
        else:
            if n > self._num_free and not at_most:
                raise OutOfPagesError(
                    f"page heap: asked for {n} pages, {self._num_free} free; free or preempt sequences first"
                )
            # Smallest runs first, so that long runs stay whole for contiguous requests.
            spans = sorted(self._runs.items(), key=lambda run: (run[1], run[0]))
        out: list[int] = []
        for start, length in spans:
            k = min(length, n - len(out))
            if k <= 0:
                break
            self._remove_run(start)
            if k < length:
                self._runs[start + k] = length - k
                self._run_ending[start + length] = start + k
            out.extend(range(start, start + k))
        for p in out:
            self._state[p] = _CACHED
        self._num_free -= len(out)
        return out

    def take(self, n: int, *, contiguous: bool = False, at_most: bool = False) -> list[int]:
        """Takes `n` unowned pages out of the heap (for a cache, or to `assign`).

        `contiguous` asks for one run [p, p + n); `at_most` returns fewer instead of raising when short.
        Raises OutOfPagesError when the heap has too few free pages.
        """
        with self._lock:
            return self._take_locked(n, contiguous, at_most)

    def give_back(self, pages: Iterable[int]) -> None:
        """Returns unowned pages taken with `take` to the heap, coalescing them with their free neighbours."""
        pages = sorted(pages)
        with self._lock:
            for p in pages:
                self._check_state(p, _CACHED, "give back")
            i = 0
            while i < len(pages):
                j = i + 1
                while j < len(pages) and pages[j] == pages[j - 1] + 1:
                    j += 1
                self._insert_run(pages[i], j - i)
                i = j
            for p in pages:
                self._state[p] = _FREE
            self._num_free += len(pages)

    # ---- owners and refcounts -----------------------------------------------------------------------------------

    def _check_page(self, p: int, owner: Owner) -> None:
        if not 0 <= p < self.num_pages:
            raise PoolError(f"page {p} (owner {owner!r}) is out of range [0, {self.num_pages})")
        if p == NULL_PAGE:
            raise PoolError(f"page 0 (owner {owner!r}) is the reserved null page; it is never allocated or freed")

    def _check_state(self, p: int, want: int, what: str) -> None:
        if not 0 <= p < self.num_pages or self._state[p] != want:
            state = _STATE_NAMES.get(self._state[p], "?") if 0 <= p < self.num_pages else "out of range"
            raise PoolError(f"cannot {what} page {p}: it is {state}, expected {_STATE_NAMES[want]}")

    def _check_holds(self, owner: Owner, p: int, what: str) -> None:
        self._check_page(p, owner)
        owners = self._owners.get(p)
        if owners is None:
            raise PoolError(f"{what}: page {p} is not allocated (owner {owner!r}); double free?")
        if owner not in owners:
            raise PoolError(
                f"{what}: page {p} is not held by owner {owner!r}; its owners are {sorted(map(repr, owners))}"
            )

    def _own(self, owner: Owner, p: int) -> None:
        owners = self._owners.get(p)
        if owners is None:
            owners = self._owners[p] = set()
            self._state[p] = _OWNED
        owners.add(owner)
        self._held.setdefault(owner, {})[p] = None

    def _update_peak(self) -> None:
        self._peak_owned = max(self._peak_owned, len(self._owners))

    def assign(self, owner: Owner, pages: Sequence[int]) -> None:
        """Gives `owner` the unowned (taken) `pages`, each with refcount 1."""
        with self._lock:
            if len(set(pages)) != len(pages):
                raise PoolError(f"assign to owner {owner!r}: pages listed twice in {list(pages)}")
            for p in pages:
                self._check_state(p, _CACHED, f"assign to owner {owner!r}")
            for p in pages:
                self._own(owner, p)
            self._update_peak()

    def allocate(self, owner: Owner, n: int, *, contiguous: bool = False) -> list[int]:
        """Takes `n` pages straight from the heap and gives them to `owner` (no caches)."""
        with self._lock:
            pages = self._take_locked(n, contiguous, at_most=False)
            for p in pages:
                self._own(owner, p)
            self._update_peak()
            return pages

    def share(self, pages: Sequence[int], new_owner: Owner, *, from_owner: Owner | None = None) -> None:
        """Adds `new_owner` as an owner of `pages` (refcount + 1 each); `from_owner`, if given, must hold them."""
        with self._lock:
            for p in pages:
                self._check_page(p, new_owner)
                if from_owner is not None:
                    self._check_holds(from_owner, p, f"share to {new_owner!r}")
                owners = self._owners.get(p)
                if owners is None:
                    raise PoolError(f"cannot share page {p} with owner {new_owner!r}: it is not allocated")
                if new_owner in owners:
                    raise PoolError(f"cannot share page {p} with owner {new_owner!r}: it already holds it")
            if len(set(pages)) != len(pages):
                raise PoolError(f"share to owner {new_owner!r}: pages listed twice in {list(pages)}")
            for p in pages:
                self._own(new_owner, p)

    def release(self, owner: Owner, pages: Sequence[int]) -> list[int]:
        """Drops `owner`'s reference to each page; returns the pages nobody holds any more (now unowned).

        The caller puts the returned pages in a cache or `give_back`s them. Raises PoolError — and changes
        nothing — on a double free or a page the owner does not hold.
        """
        with self._lock:
            seen: set[int] = set()
            for p in pages:
                if p in seen:
                    raise PoolError(f"double free: page {p} listed twice by owner {owner!r}")
                seen.add(p)
                self._check_holds(owner, p, "free")
            freed = []
            held = self._held[owner] if pages else {}
            for p in pages:
                owners = self._owners[p]
                owners.discard(owner)
                del held[p]
                if not owners:
                    del self._owners[p]
                    self._state[p] = _CACHED
                    freed.append(p)
            if pages and not held:
                del self._held[owner]
            return freed

    def free(self, owner: Owner, pages: Sequence[int]) -> None:
        """`release` and give the pages nobody holds back to the heap (no caches)."""
        self.give_back(self.release(owner, pages))

    def make_writable(self, owner: Owner, page: int, fresh: int | None = None, *, copy: bool = True) -> int:
        """Copy-on-write: `page` itself if `owner` holds it alone, else a private copy of it.

        The copy is `fresh` (an unowned, taken page) or a page taken from the heap; its device contents are copied
        from `page` (unless `copy` is False: then the caller copies, e.g. as part of a step plan that every process
        of a cluster executes), `owner`'s reference moves from `page` to it (same place in the owner's page order),
        and its id is returned. A caller that passed `fresh` and got another id back still holds `fresh`.
        """
        with self._lock:
            self._check_holds(owner, page, "make_writable")
            owners = self._owners[page]
            if len(owners) == 1:
                return page
            if fresh is None:
                fresh = self._take_locked(1, contiguous=False, at_most=False)[0]
            else:
                self._check_state(fresh, _CACHED, "copy into")
            if copy and self._storage is not None:
                self._storage = copy_pages(self._storage, [(page, fresh)])
            owners.discard(owner)
            self._owners[fresh] = {owner}
            self._state[fresh] = _OWNED
            self._held[owner] = {(fresh if q == page else q): None for q in self._held[owner]}
            self._update_peak()
            return fresh

    # ---- queries ------------------------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Pages in the heap's free runs (not counting pages parked in caches)."""
        return self._num_free

    @property
    def num_owned(self) -> int:
        return len(self._owners)

    @property
    def peak_owned(self) -> int:
        """High-water mark of pages owned at once."""
        return self._peak_owned

    def largest_free_run(self) -> int:
        with self._lock:
            return max(self._runs.values(), default=0)

    def free_runs(self) -> list[tuple[int, int]]:
        """The free runs as sorted (start, length) pairs."""
        with self._lock:
            return sorted(self._runs.items())

    def refcount(self, page: int) -> int:
        with self._lock:
            return len(self._owners.get(page, ()))

    def owners(self, page: int) -> frozenset:
        with self._lock:
            return frozenset(self._owners.get(page, ()))

    def is_exclusive(self, owner: Owner, page: int) -> bool:
        """True if `owner` holds `page` alone; raises PoolError if it does not hold it."""
        with self._lock:
            self._check_holds(owner, page, "make_writable")
            return len(self._owners[page]) == 1

    def holds(self, owner: Owner) -> bool:
        with self._lock:
            return owner in self._held

    def pages_of(self, owner: Owner) -> list[int]:
        """`owner`'s pages in the order it got them (page-table order)."""
        with self._lock:
            return list(self._held.get(owner, ()))

    def owned_pages(self) -> dict[int, frozenset]:
        """Every owned page and its owners."""
        with self._lock:
            return {p: frozenset(o) for p, o in self._owners.items()}

    def pages_per_owner(self) -> dict[Owner, int]:
        with self._lock:
            return {owner: len(pages) for owner, pages in self._held.items()}

    def check_leaks(self, where: str = "heap") -> list[str]:
        """One line per owner that still holds pages; empty when every page is free or cached."""
        with self._lock:
            return [
                f"owner {owner!r} holds {len(pages)} page(s) on {where}: {sorted(pages)}"
                for owner, pages in self._held.items()
            ]
