"""8 threads x 10,000 mixed pool operations; afterwards every page is accounted for exactly."""

import collections
import random
import sys
import threading

import pytest

from novallm_jax.amp import MemoryPool
from novallm_jax.errors import OutOfPagesError, PoolError

THREADS, OPS, NUM_PAGES = 8, 10_000, 768
PREFIXES = [f"prefix-{j}" for j in range(4)]


def worker(pool, tid, model, errors, counts):
    """Random operations on this thread's owners; `model` mirrors owner -> pages exactly."""
    rng = random.Random(tid)
    seq = 0

    def new_owner():
        nonlocal seq
        seq += 1
        return f"t{tid}-{seq}"

    try:
        for _ in range(OPS):
            mine = [o for o in model if not o.startswith("prefix")]
            op = rng.choices(
                ["alloc", "free", "share", "free_shared", "cow", "bad_free"], weights=[30, 20, 20, 15, 10, 5]
            )[0]
            if len(mine) > 40:  # keep the pool from staying full: most ops should succeed
                op = "free_shared"
            if op == "alloc" or not mine:
                owner = rng.choice(mine) if mine and rng.random() < 0.3 else new_owner()
                try:
                    model.setdefault(owner, []).extend(pool.allocate(owner, rng.randint(1, 6)))
                except OutOfPagesError:
                    counts["oom"] += 1
                    if not model.get(owner):
                        model.pop(owner, None)
            elif op == "free":
                owner = rng.choice(mine)
                pages = rng.sample(model[owner], rng.randint(1, len(model[owner])))
                pool.free(owner, pages)
                model[owner] = [p for p in model[owner] if p not in pages]
                if not model[owner]:
                    del model[owner]
            elif op == "share":
                # Prefix pages are shared by every thread: their refcounts change concurrently.
                src = rng.choice(PREFIXES + mine)
                pages = rng.sample(model[src], rng.randint(1, len(model[src])))
                dst = new_owner()
                pool.share(src, dst, pages)
                model[dst] = list(pages)
            elif op == "free_shared":
                owner = rng.choice(mine)
                assert pool.free_all(owner) == len(model.pop(owner))
            elif op == "cow":
                owner = rng.choice(mine)
                i = rng.randrange(len(model[owner]))
                try:
                    model[owner][i] = pool.make_writable(owner, model[owner][i])
                except OutOfPagesError:
                    counts["oom"] += 1
            else:  # a page this owner does not hold: must be refused and change nothing
                owner = rng.choice(mine)
                foreign = rng.choice(model[rng.choice(PREFIXES)])
                if foreign not in model[owner]:
                    with pytest.raises(PoolError, match=f"page {foreign} is not held by owner '{owner}'"):
                        pool.free(owner, [foreign])
                    counts["refused"] += 1
            counts["ops"] += 1
    except BaseException as e:  # surfaced by the main thread
        errors.append((tid, repr(e)))


def test_eight_threads_mixed_operations_keep_invariants():
    pool = MemoryPool(NUM_PAGES, page_batch=8, thread_cache_pages=32)
    prefix_model = {name: pool.allocate(name, 4) for name in PREFIXES}
    models = [dict(prefix_model) for _ in range(THREADS)]  # each thread's view includes the prefixes
    errors, counts = [], [collections.Counter() for _ in range(THREADS)]
    threads = [threading.Thread(target=worker, args=(pool, t, models[t], errors, counts[t])) for t in range(THREADS)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so that a missing lock shows up as a broken invariant
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert sum(c["ops"] for c in counts) == THREADS * OPS
    assert sum(c["refused"] for c in counts) > 0

    # The reference: page -> owners, from every thread's model.
    expected = collections.defaultdict(set)
    for name, pages in prefix_model.items():
        for p in pages:
            expected[p].add(name)
    for model in models:
        for owner, pages in model.items():
            if not owner.startswith("prefix"):
                assert len(set(pages)) == len(pages)
                for p in pages:
                    expected[p].add(owner)

    arena = pool.router.default
    owned = arena.heap.owned_pages()
    assert owned == {p: frozenset(o) for p, o in expected.items()}
    for p, owners in expected.items():  # refcount = number of owners
        assert arena.heap.refcount(p) == len(owners)
    free = arena.free_page_ids()
    assert len(free) == len(set(free))  # no page in two free lists
    assert not set(free) & set(owned)  # no page both free and owned
    assert len(free) + len(owned) == NUM_PAGES - 1  # free + owned = total
    assert 0 not in free and 0 not in owned
    assert pool.stats().owned == len(owned) and pool.num_free == len(free)

    for model in models:
        for owner in model:
            if not owner.startswith("prefix"):
                pool.free_all(owner)
    for name in PREFIXES:
        pool.free_all(name)
    assert pool.check_leaks() == []
    assert pool.num_free == NUM_PAGES - 1
    arena.drain_caches()
    assert arena.heap.free_runs() == [(1, NUM_PAGES - 1)]  # every page back and fully coalesced
