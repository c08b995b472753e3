"""CentralCache, ThreadCache and the arena's use of them: batching, draining, reclaiming stranded pages."""

import threading

import pytest

from novallm_jax.amp import Arena, CentralCache, PageHeap, SizeClassFreeLists, ThreadCache
from novallm_jax.errors import OutOfPagesError


def test_central_cache_refills_in_batches_and_returns_excess():
    heap = PageHeap(101)
    central = CentralCache(heap, batch_size=8, max_free=20)
    got = central.get_upto(3)
    assert len(got) == 3 and len(central) == 8  # one batch beyond the demand
    assert heap.num_free == 100 - 11
    central.get_upto(8)
    assert len(central) == 0 and heap.num_free == 89  # served from the list, the heap untouched
    central.put(got)
    assert len(central) == 3 and heap.num_free == 89
    more = heap.take(30)
    central.put(more)  # 33 > max_free: all but max_free // 2 go back to the heap
    assert len(central) == 10 and heap.num_free == 89 - 30 + 23
    central.flush()
    assert len(central) == 0 and heap.num_free == 89 - 30 + 33


def test_central_cache_gives_fewer_when_heap_is_dry():
    heap = PageHeap(5)
    central = CentralCache(heap, batch_size=8)
    assert sorted(central.get_upto(10)) == [1, 2, 3, 4]
    assert central.get_upto(1) == []


def test_thread_cache_hot_path_does_not_touch_central():
    heap = PageHeap(101)
    central = CentralCache(heap, batch_size=8)
    calls = []
    real = central.get_upto
    central.get_upto = lambda n: calls.append(n) or real(n)
    cache = ThreadCache(central, batch_size=8, max_size=16)
    for _ in range(200):
        pages = cache.get(2)
        cache.put(pages)
    assert calls == [10]  # one refill: the demand plus a batch


def test_thread_cache_drains_half_when_over_max():
    heap = PageHeap(101)
    central = CentralCache(heap, batch_size=4, max_free=1000)
    cache = ThreadCache(central, batch_size=4, max_size=10)
    pages = heap.take(11)
    cache.put(pages)
    assert len(cache) == 5 and len(central) == 6
    assert central.snapshot() == pages[:6]  # the oldest pages leave, the newest stay hot
    assert cache.snapshot() == pages[6:]
    assert cache.drain() == pages[6:] and len(cache) == 0


def test_arena_reclaims_pages_stranded_in_other_threads_caches():
    arena = Arena("dev", 33, page_batch=16, thread_cache_pages=64)

    def worker():
        arena.free("w", arena.allocate("w", 4))  # leaves ~20 pages in the worker's cache

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert arena.heap.num_free + len(arena.central) < 32
    assert arena.num_free == 32
    pages = arena.allocate("main", 32)  # needs the dead worker's pages
    assert sorted(pages) == list(range(1, 33))
    with pytest.raises(OutOfPagesError, match=r"out of KV pages on dev: asked for 1, 0 free \(of 32 usable\)"):
        arena.allocate("main", 1)
    arena.free_all("main")
    arena.drain_caches()
    assert arena.heap.free_runs() == [(1, 32)]
    assert len(arena._caches) == 1  # the dead, empty worker cache is forgotten


def test_contiguous_allocation_drains_caches_first():
    arena = Arena("dev", 17, page_batch=4)
    arena.free("a", arena.allocate("a", 3))  # pages now cached, breaking the heap's run
    assert arena.heap.largest_free_run() < 16
    assert arena.allocate("b", 16, contiguous=True) == list(range(1, 17))
    arena.free_all("b")
    with pytest.raises(OutOfPagesError, match=r"asked for 17 contiguous \(largest free run 16\), 16 free"):
        arena.allocate("b", 17, contiguous=True)


def test_size_class_free_lists():
    lists = SizeClassFreeLists()
    lists.put("a", 1)
    lists.put("a", 2)
    lists.put("b", 3)
    assert lists.count("a") == 2 and lists.get("a") == 2 and lists.get("a") == 1
    assert lists.get("a") is None and lists.get("zzz") is None and lists.get("b") == 3
