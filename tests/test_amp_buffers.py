"""BufferManager: preallocated host buffers leased by size class."""

import numpy as np
import pytest

from novallm_jax.amp import BufferLeaseError, BufferManager
from novallm_jax.errors import PoolError


def test_lease_is_a_context_manager_and_reuses_buffers():
    bm = BufferManager([((4, 8), np.int32, 2)])
    with bm.lease((4, 8), np.int32, owner="step-1") as buf:
        assert buf.shape == (4, 8) and buf.dtype == np.int32
        buf[:] = 7
        assert bm.leases_outstanding == 1
    assert bm.leases_outstanding == 0 and bm.check_leaks() == []
    # The same preallocated arrays come back (no new allocation), with fill applied when asked.
    a, b = bm.lease((4, 8), "int32"), bm.lease([4, 8], np.dtype("int32"), fill=-1)
    assert any(x.array is buf for x in (a, b))
    assert (b.array == -1).all()
    a.release()
    b.release()


def test_leasing_more_than_exist_raises():
    bm = BufferManager()
    bm.reserve((3,), np.float32, 1)
    held = bm.lease((3,), np.float32, owner="x")
    with pytest.raises(BufferLeaseError, match=r"no free buffer of shape \(3,\) float32: 1 reserved, 1 leased"):
        bm.lease((3,), np.float32)
    with pytest.raises(BufferLeaseError, match=r"shape \(3,\) int64: 0 reserved, 0 leased"):
        bm.lease((3,), np.int64)
    assert bm.check_leaks() == [f"buffer lease {held.id} ((3,) float32) of owner 'x' is outstanding"]
    held.release()
    with pytest.raises(PoolError, match="already returned"):
        held.release()
    assert bm.check_leaks() == []


def test_stats_count_totals_leases_and_peaks():
    bm = BufferManager([((2,), np.int32, 3), ((5, 5), np.float32, 1)])
    leases = [bm.lease((2,), np.int32) for _ in range(3)]
    for lease in leases[:2]:
        lease.release()
    stats = bm.stats()
    assert stats[((2,), "int32")].total == 3
    assert stats[((2,), "int32")].leased == 1
    assert stats[((2,), "int32")].peak_leased == 3
    assert stats[((5, 5), "float32")].leased == 0
    leases[2].release()
