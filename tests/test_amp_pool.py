"""MemoryPool facade: the engine's API end to end, with its stats and leak report."""

import jax.numpy as jnp
import numpy as np
import pytest

from novallm_jax.amp import MemoryPool
from novallm_jax.errors import OutOfPagesError, PoolError


def test_allocate_free_and_errors_through_the_caches():
    pool = MemoryPool(16, page_batch=4, thread_cache_pages=8)
    assert pool.num_pages == 16 and pool.num_free == 15
    a = pool.allocate("req-1", 5)
    b = pool.allocate(7, 3)  # int owners work too
    assert len(set(a + b)) == 8 and 0 not in a + b
    assert pool.num_free == 7
    with pytest.raises(OutOfPagesError, match=r"asked for 8, 7 free \(of 15 usable\)"):
        pool.allocate("req-2", 8)
    pool.free("req-1", a[:2])
    with pytest.raises(PoolError, match=rf"page {a[0]} is not allocated \(owner 'req-1'\); double free"):
        pool.free("req-1", [a[0]])
    with pytest.raises(PoolError, match=rf"page {b[0]} is not held by owner 'req-1'"):
        pool.free("req-1", [b[0]])
    with pytest.raises(PoolError, match="owner 'nobody' holds no pages"):
        pool.free("nobody", [a[2]])
    assert pool.free_all("req-1") == 3
    assert pool.free_all("req-1") == 0  # idempotent: a cancel after a finish is harmless
    assert pool.check_leaks() == [f"owner 7 holds 3 page(s) on {pool.router.default.name}: {sorted(b)}"]
    pool.free(7, b)
    assert pool.check_leaks() == [] and pool.num_free == 15


def test_share_prefix_then_copy_on_write():
    num_pages = 8
    kv = {"k": jnp.arange(num_pages * 6, dtype=jnp.float32).reshape(num_pages, 3, 2)}
    ref = np.array(kv["k"])
    pool = MemoryPool(storage=kv)
    prompt = pool.allocate("parent", 3)
    shared = pool.share("parent", "child", prompt[:2])  # the common prefix
    assert shared == prompt[:2]
    stats = pool.stats().arenas[0]
    assert stats.owned == 3 and stats.shared == 2 and stats.pages_per_owner == {"parent": 3, "child": 2}
    last = pool.make_writable("child", prompt[1])
    assert last not in prompt and pool.pages_of("child") == [prompt[0], last]
    np.testing.assert_array_equal(np.asarray(pool.storage["k"][last]), ref[prompt[1]])
    assert pool.make_writable("parent", prompt[1]) == prompt[1]  # now the parent's alone
    assert pool.stats().arenas[0].shared == 1
    pool.free_all("parent")
    assert pool.pages_of("child") == [prompt[0], last]
    pool.free_all("child")
    assert pool.check_leaks() == []
    assert pool.stats().arenas[0].peak_owned == 4


def test_make_writable_out_of_pages():
    pool = MemoryPool(4)
    pages = pool.allocate("a", 3)
    pool.share("a", "b")
    with pytest.raises(OutOfPagesError, match="asked for 1, 0 free"):
        pool.make_writable("b", pages[0])
    assert pool.router.default.heap.refcount(pages[0]) == 2  # unchanged


def test_stats_and_leaks_cover_pages_swaps_and_buffers():
    pool = MemoryPool(storage={"k": jnp.zeros((6, 2))}, buffers=[((4,), np.int32, 1)])
    pool.allocate("a", 2)
    pool.allocate("b", 1)
    handle = pool.swap_out("b")
    lease = pool.lease((4,), np.int32, owner="step")
    stats = pool.stats()
    assert (stats.owned, stats.free) == (2, 3)
    assert (stats.swapped_handles, stats.swapped_pages, stats.swapped_bytes) == (1, 1, 8)
    assert stats.leases_outstanding == 1
    assert len(pool.check_leaks()) == 3
    lease.release()
    pool.swap_in(handle)
    pool.free_all("a")
    pool.free_all("b")
    assert pool.check_leaks() == [] and pool.stats().free == 5
    assert pool.stats().arenas[0].peak_owned == 3


def test_storage_is_replaced_by_the_engine():
    pool = MemoryPool(storage={"k": jnp.zeros((4, 2))})
    new = {"k": jnp.ones((4, 2))}
    pool.storage = new
    assert pool.storage is new
    with pytest.raises(ValueError, match="holds 5 pages"):
        pool.storage = {"k": jnp.ones((5, 2))}
