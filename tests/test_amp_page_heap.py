"""PageHeap: runs, coalescing, refcounts, copy-on-write on real device storage, error messages."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from novallm_jax.amp.page_heap import NULL_PAGE, PageHeap
from novallm_jax.errors import OutOfPagesError, PoolError


def make_storage(num_pages=8, page_size=2, heads=1, dim=3, layers=2):
    """A small KV-like pytree: per layer K and V [pages, page_size, heads, dim], every element distinct."""
    size = num_pages * page_size * heads * dim

    def leaf(i):
        return jnp.arange(size, dtype=jnp.float32).reshape(num_pages, page_size, heads, dim) + 1000 * i

    return {"k": tuple(leaf(2 * l) for l in range(layers)), "v": tuple(leaf(2 * l + 1) for l in range(layers))}


def maximal_runs(free):
    """Reference: the maximal runs of consecutive integers in a set."""
    runs, start, prev = [], None, None
    for p in sorted(free):
        if start is not None and p == prev + 1:
            prev = p
            continue
        if start is not None:
            runs.append((start, prev - start + 1))
        start = prev = p
    if start is not None:
        runs.append((start, prev - start + 1))
    return runs


def test_allocate_and_free_never_hand_out_null_page():
    heap = PageHeap(8)
    pages = heap.allocate("a", 7)
    assert sorted(pages) == list(range(1, 8))
    assert heap.num_free == 0 and heap.num_owned == 7
    assert heap.pages_of("a") == pages
    heap.free("a", pages[:3])
    assert heap.num_free == 3 and heap.pages_of("a") == pages[3:]
    heap.free("a", pages[3:])
    assert heap.num_free == 7 and heap.check_leaks() == []
    assert heap.free_runs() == [(1, 7)]
    assert heap.peak_owned == 7


def test_exhaustion_message_says_asked_and_free():
    heap = PageHeap(6)
    heap.allocate("a", 3)
    with pytest.raises(OutOfPagesError, match=r"asked for 4 pages, 2 free"):
        heap.allocate("b", 4)
    assert heap.num_free == 2 and not heap.holds("b")  # nothing taken on failure


def test_double_free_and_foreign_free_messages():
    heap = PageHeap(8)
    a = heap.allocate("a", 2)
    b = heap.allocate("b", 1)
    heap.free("a", [a[0]])
    with pytest.raises(PoolError, match=rf"page {a[0]} is not allocated \(owner 'a'\); double free"):
        heap.free("a", [a[0]])
    with pytest.raises(PoolError, match=rf"page {b[0]} is not held by owner 'a'; its owners are \[\"'b'\"\]"):
        heap.free("a", [b[0]])
    with pytest.raises(PoolError, match=rf"double free: page {a[1]} listed twice by owner 'a'"):
        heap.free("a", [a[1], a[1]])
    with pytest.raises(PoolError, match=r"page 0 \(owner 'a'\) is the reserved null page"):
        heap.free("a", [NULL_PAGE])
    with pytest.raises(PoolError, match=r"page 99 \(owner 'a'\) is out of range"):
        heap.free("a", [99])
    # A failing call changes nothing, even when its first pages were valid.
    with pytest.raises(PoolError):
        heap.free("a", [a[1], b[0]])
    assert heap.pages_of("a") == [a[1]] and heap.refcount(a[1]) == 1


def test_refcounts_and_sharing():
    heap = PageHeap(8)
    pages = heap.allocate("a", 3)
    heap.share(pages[:2], "b", from_owner="a")
    heap.share(pages[:1], "c")
    assert [heap.refcount(p) for p in pages] == [3, 2, 1]
    assert heap.owners(pages[0]) == {"a", "b", "c"}
    with pytest.raises(PoolError, match="already holds it"):
        heap.share(pages[:1], "b")
    with pytest.raises(PoolError, match=rf"page {pages[2]} is not held by owner 'b'"):
        heap.share(pages[2:], "d", from_owner="b")
    free_before = heap.num_free
    heap.free("a", pages)  # shared pages stay allocated for their other owners
    assert heap.num_free == free_before + 1
    assert [heap.refcount(p) for p in pages] == [2, 1, 0]
    heap.free("b", pages[:2])
    heap.free("c", pages[:1])
    assert heap.num_free == 7 and heap.check_leaks() == []
    with pytest.raises(PoolError, match="not allocated"):
        heap.share(pages[:1], "d")


def test_copy_on_write_copies_device_contents():
    storage = make_storage()
    # np.array copies: a zero-copy view would pin the buffer and stop its donation.
    reference = jax.tree.map(np.array, storage)
    heap = PageHeap(storage=storage)
    assert heap.num_pages == 8
    pages = heap.allocate("a", 2)
    heap.share(pages, "b")
    # Alone on a page: no copy.
    solo = heap.allocate("a", 1)[0]
    assert heap.make_writable("a", solo) == solo
    new = heap.make_writable("b", pages[1])
    assert new not in pages + [solo, NULL_PAGE]
    assert heap.pages_of("b") == [pages[0], new]  # same place in b's page order
    assert heap.owners(pages[1]) == {"a"} and heap.owners(new) == {"b"}
    out = jax.tree.map(np.asarray, heap.storage)
    for got, ref in zip(jax.tree.leaves(out), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(got[new], ref[pages[1]])
        untouched = [p for p in range(8) if p != new]
        np.testing.assert_array_equal(got[untouched], ref[untouched])
    # The old storage was donated to the copy.
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(storage))
    # Now exclusive: writable in place.
    assert heap.make_writable("a", pages[1]) == pages[1]
    with pytest.raises(PoolError, match=r"make_writable: page \d+ is not held by owner 'c'"):
        heap.make_writable("c", pages[0])


def test_contiguous_runs_best_fit_and_coalescing():
    heap = PageHeap(17)
    a = heap.allocate("a", 4, contiguous=True)
    assert a == [1, 2, 3, 4]
    b = heap.allocate("b", 6, contiguous=True)
    assert b == list(range(5, 11))
    c = heap.allocate("c", 6, contiguous=True)
    assert c == list(range(11, 17))
    heap.free("a", a)
    heap.free("c", c)
    assert heap.free_runs() == [(1, 4), (11, 6)]
    # Best fit: a run of 3 comes from the run of 4, leaving the run of 6 whole.
    assert heap.allocate("d", 3, contiguous=True) == [1, 2, 3]
    with pytest.raises(OutOfPagesError, match=r"run of 7 contiguous pages, 7 free \(largest free run 6\)"):
        heap.allocate("e", 7, contiguous=True)
    # Freeing the middle coalesces both neighbours into one run.
    heap.free("b", b)
    assert heap.free_runs() == [(4, 13)]
    assert heap.allocate("e", 13, contiguous=True) == list(range(4, 17))


def test_random_take_give_back_keeps_maximal_runs():
    rng = random.Random(0)
    heap = PageHeap(200)
    free = set(range(1, 200))
    taken = []
    for _ in range(2000):
        if taken and rng.random() < 0.5:
            batch = rng.sample(taken, rng.randint(1, min(len(taken), 10)))
            heap.give_back(batch)
            for p in batch:
                taken.remove(p)
            free.update(batch)
        else:
            n = rng.randint(1, 12)
            contiguous = rng.random() < 0.3
            try:
                got = heap.take(n, contiguous=contiguous)
            except OutOfPagesError:
                assert n > len(free) or (contiguous and max((l for _, l in maximal_runs(free)), default=0) < n)
                continue
            assert len(got) == n and free.issuperset(got)
            if contiguous:
                assert got == list(range(got[0], got[0] + n))
            free.difference_update(got)
            taken += got
        assert heap.free_runs() == maximal_runs(free)
        assert heap.num_free == len(free)


def test_state_checks_on_give_back_and_assign():
    heap = PageHeap(8)
    pages = heap.allocate("a", 1)
    with pytest.raises(PoolError, match=rf"cannot give back page {pages[0]}: it is owned, expected cached"):
        heap.give_back(pages)
    with pytest.raises(PoolError, match=r"cannot assign to owner 'b' page 5: it is free, expected cached"):
        heap.assign("b", [5])
    taken = heap.take(2)
    heap.assign("b", taken)
    assert heap.owners(taken[0]) == {"b"}


def test_read_and_write_pages_roundtrip():
    storage = make_storage(num_pages=12)
    heap = PageHeap(storage=storage)
    ref = jax.tree.map(np.asarray, storage)
    got = heap.read_pages([3, 7, 1])
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert isinstance(g, np.ndarray)
        np.testing.assert_array_equal(g, r[[3, 7, 1]])
    heap.write_pages([9, 10, 11], got)
    out = jax.tree.map(np.asarray, heap.storage)
    for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(o[[9, 10, 11]], r[[3, 7, 1]])
        np.testing.assert_array_equal(o[1:9], r[1:9])  # page 0 takes the padding rows


def test_storage_validation():
    with pytest.raises(ValueError, match="same page axis 0"):
        PageHeap(storage={"k": jnp.zeros((4, 2)), "v": jnp.zeros((5, 2))})
    with pytest.raises(ValueError, match="num_pages=6 but the storage holds 4"):
        PageHeap(6, storage={"k": jnp.zeros((4, 2))})
    heap = PageHeap(storage={"k": jnp.zeros((4, 2))})
    with pytest.raises(ValueError, match="new storage holds 3 pages, the heap has 4"):
        heap.storage = {"k": jnp.zeros((3, 2))}
    with pytest.raises(PoolError, match="no storage"):
        PageHeap(4).read_pages([1])
