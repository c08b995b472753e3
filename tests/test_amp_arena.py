"""ArenaRouter routing and the host arena's swap out / swap in on real device storage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from novallm_jax.amp import Arena, ArenaRouter, MemoryPool, local_devices
from novallm_jax.errors import OutOfPagesError, PoolError


def storage(num_pages=10):
    k = jnp.arange(num_pages * 4, dtype=jnp.float32).reshape(num_pages, 2, 1, 2)
    return {"k": (k,), "v": (-k,)}


def host(tree):
    return jax.tree.map(np.array, tree)


def test_local_devices_lists_default_backend_first():
    devs = local_devices()
    assert devs[0] == jax.local_devices()[0]
    assert any(d.platform == "cpu" for d in devs)


def test_router_keeps_an_owner_on_one_arena():
    a, b = Arena("dev-a", 8), Arena("dev-b", 8)
    router = ArenaRouter([a, b])
    assert router.route("x") is a  # default
    b.allocate("y", 2)
    assert router.route("y") is b  # where it already lives
    with pytest.raises(PoolError, match="owner 'y' holds pages on dev-b, cannot allocate on dev-a"):
        router.route("y", "dev-a")
    assert router.route("z", "dev-b") is b
    with pytest.raises(PoolError, match="no arena for device dev-c"):
        router.arena("dev-c")
    with pytest.raises(PoolError, match="owner 'q' holds no pages"):
        router.arena_of("q")
    with pytest.raises(ValueError, match="two arenas for one device"):
        ArenaRouter([a, Arena("dev-a", 4)])


def test_pool_over_two_arenas():
    pool = MemoryPool(6, devices=["dev-a", "dev-b"])
    pool.allocate("x", 5)
    pool.allocate("y", 5, device="dev-b")
    assert pool.allocate("y", 0) == []
    with pytest.raises(OutOfPagesError, match="out of KV pages on dev-b: asked for 1, 0 free"):
        pool.allocate("y", 1)
    with pytest.raises(PoolError, match="holds pages on dev-b, cannot allocate on dev-a"):
        pool.share("x", "y")
    assert [a.owned for a in pool.stats().arenas] == [5, 5]
    pool.free_all("x")
    pool.free_all("y")
    assert pool.check_leaks() == []


def test_swap_out_and_in_restores_contents_in_page_table_order():
    st = storage()
    ref = host(st)
    pool = MemoryPool(storage=st)
    pages = pool.allocate("a", 3)
    handle = pool.swap_out("a")
    assert handle.pages == tuple(pages) and handle.num_pages == 3
    assert handle.nbytes == 2 * 3 * 2 * 1 * 2 * 4
    assert pool.pages_of("a") == [] and pool.num_free == 9
    # Another sequence takes the pages and overwrites them.
    other = pool.allocate("b", 9)
    pool.storage = jax.tree.map(lambda x: x.at[jnp.asarray(other)].set(0.0), pool.storage)
    with pytest.raises(OutOfPagesError, match="asked for 3, 0 free"):
        pool.swap_in(handle)
    assert pool.stats().swapped_pages == 3  # a failed swap-in keeps the handle
    pool.free("b", other[:4])
    new = pool.swap_in(handle)
    assert len(new) == 3 and pool.pages_of("a") == new
    out = host(pool.storage)
    for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(o[new], r[pages])
    with pytest.raises(PoolError, match=f"swap handle {handle.id} of owner 'a' was already swapped in or dropped"):
        pool.swap_in(handle)
    pool.free_all("a")
    pool.free_all("b")
    assert pool.check_leaks() == []


def test_swap_out_shared_pages_and_drop():
    pool = MemoryPool(storage=storage())
    pages = pool.allocate("a", 2)
    pool.share("a", "b")
    handle = pool.swap_out("b", pages[::-1])  # an explicit order is kept
    assert handle.pages == tuple(pages[::-1])
    assert [pool.router.default.heap.refcount(p) for p in pages] == [1, 1]  # still a's
    leaks = pool.check_leaks()
    assert f"swap handle {handle.id} of owner 'b' holds 2 page(s) ({handle.nbytes} bytes) on host" in leaks
    assert pool.free_all("b") == 2  # drops the host copy of a cancelled, swapped-out sequence
    pool.free_all("a")
    assert pool.check_leaks() == []
    pool.allocate("c", 1)
    dropped = pool.swap_out("c")
    pool.drop_swapped(dropped)
    assert pool.check_leaks() == []
    with pytest.raises(PoolError, match="already swapped in or dropped"):
        pool.swap_in(dropped)
    with pytest.raises(PoolError, match="holds no pages"):
        pool.swap_out("c")
