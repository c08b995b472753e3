"""Host weights read from their file slice by slice: the lazy ops equal numpy's, and a device's shard of a
safetensors checkpoint reads only that shard's bytes (what lets each host of a cluster read only its shards)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from novallm_jax import sharding
from novallm_jax.loading.assemble import on_host
from novallm_jax.loading.hf import load_hf
from novallm_jax.loading.host_slices import FileTensor, HostSlices, bytes_read, concat_columns, take_columns


def _lazy(a: np.ndarray) -> FileTensor:
    return FileTensor(a.shape, a.dtype, lambda index: a[index])


def _slices(shape, rng):
    out = []
    for n in shape:
        lo = int(rng.integers(0, n))
        out.append(slice(lo, int(rng.integers(lo + 1, n + 1))))
    return tuple(out)


def test_lazy_ops_equal_numpys_on_every_slice():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((n, 8)).astype(np.float32) for n in (12, 4, 4))
    eager = np.concatenate([q.T, k.T, v.T], axis=1)
    lazy = concat_columns([_lazy(q).T, _lazy(k).T, _lazy(v).T])
    # A regrouping with repeats (KV heads copied) and one with many short runs.
    for columns in (np.r_[0:6, 12:14, 12:14, 16:18, 6:12, 14:16, 14:16, 18:20], rng.permutation(20)):
        want, got = np.take(eager, columns, axis=-1), take_columns(lazy, columns).astype(np.float64)
        assert isinstance(got, HostSlices) and got.shape == want.shape and got.dtype == np.float64
        for _ in range(50):
            index = _slices(want.shape, rng)
            np.testing.assert_array_equal(got[index], want[index])
        np.testing.assert_array_equal(np.asarray(got), want)
    # Anything else acts on the whole array.
    np.testing.assert_array_equal(lazy + 1, eager + 1)
    np.testing.assert_array_equal(np.stack([lazy, lazy]), np.stack([eager, eager]))
    np.testing.assert_array_equal(lazy.reshape(-1), eager.reshape(-1))
    np.testing.assert_array_equal(lazy[1], eager[1])


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    from tests.hf_models import build_hf_model, save_hf_model

    return save_hf_model(build_hf_model("qwen3"), str(tmp_path_factory.mktemp("qwen3")))


@pytest.mark.parametrize("m", [2, 4])
def test_a_devices_shard_reads_only_its_bytes_of_the_file(qwen3_dir, m):
    cfg, eager = load_hf(qwen3_dir, np.float32)
    with on_host():
        _, lazy = load_hf(qwen3_dir, np.float32)
    for name, shard, want, read in _shards(cfg, eager, lazy, m, layers=range(cfg.num_layers)):
        np.testing.assert_array_equal(shard, want, err_msg=name)
        assert read == shard.nbytes, f"{name}: read {read} bytes for a slice of {shard.nbytes}"


@pytest.mark.slow
def test_a_gguf_files_shards_are_read_in_slices():
    # The default model: Q4_1 and Q8_0 blocks, Q/K rows that llama.cpp permuted, 3 KV heads over model=3.
    from novallm_jax.loading import default_model_path
    from novallm_jax.loading.gguf_file import load_gguf

    cfg, eager = load_gguf(default_model_path(), np.float32)
    with on_host():
        _, lazy = load_gguf(default_model_path(), np.float32)
    for name, shard, want, _ in _shards(cfg, eager, lazy, 3, layers=[0, cfg.num_layers - 1]):
        np.testing.assert_array_equal(shard, want, err_msg=name)


def _shards(cfg, eager, lazy, m, layers):
    """(name, a device's shard read lazily, the same shard of the eager load, bytes read) for each split leaf
    of `layers` and the vocabulary-split embedding and lm_head, on a model=m layout."""
    assert isinstance(lazy["layers"][0]["wqkv"], HostSlices)
    mesh = types.SimpleNamespace(shape={"data": 1, "model": m})  # shard_layout reads only the axis sizes
    host = lambda tree: {k: v if isinstance(v, (list, dict)) else np.asarray(v) for k, v in tree.items()}
    want = sharding.shard_layout(cfg, {**host(eager), "layers": [host(layer) for layer in eager["layers"]]}, mesh)
    got = sharding.shard_layout(cfg, lazy, mesh)
    split = {"wqkv": 1, "wo": 0, "w_gate_up": 1, "w_down": 0}
    leaves = [
        (f"layers.{i}.{k}", got["layers"][i][k], want["layers"][i][k], axis)
        for i in layers
        for k, axis in split.items()
    ]
    leaves += [("embed", got["embed"], want["embed"], 0), ("lm_head", got["lm_head"], want["lm_head"], 1)]
    for name, lazy_leaf, eager_leaf, axis in leaves:
        n = eager_leaf.shape[axis] // m
        for j in range(m):
            index = [slice(None)] * eager_leaf.ndim
            index[axis] = slice(j * n, (j + 1) * n)
            before = bytes_read()
            shard = lazy_leaf[tuple(index)]
            yield f"{name} shard {j}", shard, eager_leaf[tuple(index)], bytes_read() - before
