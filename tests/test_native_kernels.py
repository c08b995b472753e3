"""The native CPU matmul kernel (kernels/native.py) against numpy in float64, and its use by the executor."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from novallm_jax import model
from novallm_jax.config import ModelConfig
from novallm_jax.engine.executor import Executor, ExecutorConfig
from novallm_jax.kernels import build, native

pytestmark = [
    pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native kernels are XLA:CPU custom calls"),
    pytest.mark.skipif(not native.available(), reason="no C++ compiler: the native kernel is not built"),
]


@pytest.mark.parametrize("k,n", [(1, 16), (7, 50), (64, 960), (577, 33)])
def test_pack_round_trip(k, n):
    w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    panels = native.pack(w)
    assert panels.shape == (-(-n // native.PANEL), k, native.PANEL)
    np.testing.assert_array_equal(native.unpack(panels, n), w)
    assert not panels[-1, :, n % native.PANEL or native.PANEL :].any()  # padding columns are zero


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 11, 13, 16, 22, 29, 32, 100])
@pytest.mark.parametrize("k,n", [(1, 16), (64, 50), (577, 960)])
def test_packed_matmul_matches_float64(m, k, n):
    rng = np.random.default_rng(m * 1000 + k)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    y = jax.jit(native.packed_matmul, static_argnums=2)(jnp.asarray(x), jnp.asarray(native.pack(w)), n)
    ref = x.astype(np.float64) @ w
    # float32 rounding bound of a K-term dot product, with room for the summation order.
    bound = 4 * k * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(w)) + 1e-30
    assert y.shape == (m, n)
    assert (np.abs(np.asarray(y) - ref) <= bound).all()


def test_linear_keeps_leading_dims_and_matches_dense():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 40), dtype=np.float32))
    w = rng.standard_normal((40, 70), dtype=np.float32)
    packed = native.PackedLinear.from_dense(w)
    y = jax.jit(model.linear)(x, packed)
    assert y.shape == (2, 3, 70)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ w, rtol=1e-5, atol=1e-5)


CFG = ModelConfig(
    model_type="llama",
    vocab_size=300,
    hidden_size=64,
    intermediate_size=100,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=128,
)


def _decode_logits(native_kernels: bool) -> tuple[Executor, np.ndarray]:
    params = model.init_params(CFG, jax.random.key(0))
    ex = Executor(
        CFG, params, ExecutorConfig(page_size=8, num_pages=16, max_model_len=64, native_kernels=native_kernels)
    )
    cache = ex.new_cache()
    logits, cache = ex.decode(cache, [5, 7, 9], [0, 0, 0], [[1], [2], [3]])
    return ex, np.asarray(logits)


def test_executor_packs_weights_and_agrees_with_xla_dots():
    ex_native, native_logits = _decode_logits(True)
    ex_xla, xla_logits = _decode_logits(False)
    assert isinstance(ex_native.params["layers"][0]["wqkv"], native.PackedLinear)
    head = ex_native.params["lm_head"]  # with an int8 copy for greedy steps (`native.ArgmaxHead`)
    assert isinstance(head, native.ArgmaxHead) and isinstance(head.exact, native.PackedLinear)
    assert isinstance(ex_xla.params["layers"][0]["wqkv"], jax.Array)
    np.testing.assert_allclose(native_logits, xla_logits, rtol=0, atol=1e-5)
    auto = Executor(
        CFG, model.init_params(CFG, jax.random.key(0)), ExecutorConfig(page_size=8, num_pages=16, max_model_len=64)
    )
    assert auto.native_kernels  # float32 on CPU: on by default


def _probe(env: dict, installed: bool = False, load: bool = True) -> str:
    code = (
        textwrap.dedent("""
        import jaxlib
        from absl import logging
        logging.set_verbosity(logging.WARNING)
        from novallm_jax.kernels import build, native
        if INSTALLED:
            print("installed", native._installed(build.key(build.compiler(), jaxlib.__version__)))
        if LOAD:
            print("available", native.available())
    """)
        .replace("INSTALLED", str(installed))
        .replace("LOAD", str(load))
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_switched_off_by_environment():
    assert "available False" in _probe({"NOVALLM_NATIVE_KERNELS": "0"})


def test_the_library_pip_built_is_loaded_and_nothing_compiled(tmp_path):
    # pip (setup.py) built the kernels at install for this machine, compiler and jaxlib: a first start uses them.
    out = _probe({"NOVALLM_KERNEL_CACHE": str(tmp_path)}, installed=True)
    # After an edit of cpu_kernels.cc, `pip install -e .` again builds the library of the new source.
    assert "installed None" not in out and build.INSTALLED_PREFIX in out, f"no installed library fits: {out}"
    assert "available True" in out
    assert not list(tmp_path.iterdir())  # nothing compiled into the cache


def test_the_installed_library_can_be_ignored():
    assert "installed None" in _probe({"NOVALLM_INSTALLED_KERNELS": "0"}, installed=True, load=False)


def test_a_failing_compiler_falls_back_to_xla(tmp_path):
    # Another compiler is another key: the installed library is not loaded, and this one fails to build.
    out = _probe({"CXX": "/bin/false", "NOVALLM_KERNEL_CACHE": str(tmp_path)}, installed=True)
    assert "installed None" in out
    assert "available False" in out
    assert "native CPU kernels are off" in out
    assert not list(tmp_path.glob("*.so"))


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("t", [1, 7])
def test_paged_attention_matches_the_xla_path(t, window):
    _check_paged_attention(t, window, head_dim=8, page_size=4, width=6)


# Deeper rows: several 32-key blocks with ragged tails, and head dims of one and of 1.5 64-float output tiles;
# t = 13: a prefill chunk at that depth.
@pytest.mark.parametrize("t", [1, 13])
@pytest.mark.parametrize("head_dim", [64, 96])
@pytest.mark.parametrize("window", [None, 40])
def test_paged_attention_over_long_contexts(t, head_dim, window):
    # Up to 112 keys summed in float32 in another order than XLA's: outputs of size ~1 agree to ~1e-5.
    _check_paged_attention(t, window, head_dim=head_dim, page_size=16, width=7, scale=4.0, atol=1e-5)


# The kernel takes the query heads of a kv head three (or, of four, two) at a time: every grouping and its remainders.
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2), (5, 1), (7, 1), (9, 3)])
def test_paged_attention_over_every_grouping_of_query_heads(heads, kv_heads):
    _check_paged_attention(
        1, None, head_dim=64, page_size=16, width=4, scale=4.0, atol=1e-5, heads=heads, kv_heads=kv_heads
    )


@pytest.mark.parametrize("t", [1, 13])
def test_paged_attention_reads_bfloat16_pages(t):
    # The same bfloat16 keys and values as XLA's path reads them (widened exactly): float32 rounding apart.
    _check_paged_attention(t, None, head_dim=64, page_size=16, width=7, scale=4.0, atol=1e-5, dtype=jnp.bfloat16)


def _check_paged_attention(
    t, window, head_dim, page_size, width, scale=1.0, atol=2e-6, heads=6, kv_heads=2, dtype=jnp.float32
):
    from novallm_jax.kv_cache import PagedKVCache

    hd = head_dim
    cfg = ModelConfig(
        model_type="mistral" if window else "llama",
        vocab_size=10,
        hidden_size=heads * hd,
        intermediate_size=8,
        num_layers=1,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hd,
        sliding_window=window,
    )
    rng = np.random.default_rng(t + hd)
    b, ps = 3, page_size
    cache = PagedKVCache.create(cfg, 1 + b * width, ps, dtype)
    cache = cache.replace(
        k=(jnp.asarray(rng.standard_normal(cache.k[0].shape, np.float32), dtype),),
        v=(jnp.asarray(rng.standard_normal(cache.v[0].shape, np.float32), dtype),),
    )
    table = jnp.asarray(1 + np.arange(b * width).reshape(b, width)[:, rng.permutation(width)], jnp.int32)
    # Row 0 decodes deep into its pages, row 1 prefills a chunk from its start, row 2 is padding but one query.
    depth = ps * width
    starts = [depth - t, 0, depth // 2 - 3]
    positions = np.stack([np.arange(s, s + t) for s in starts]).astype(np.int32)
    positions[2, 1:] = -1
    k_new = jnp.asarray(rng.standard_normal((b, t, kv_heads, hd), np.float32))
    v_new = jnp.asarray(rng.standard_normal((b, t, kv_heads, hd), np.float32))
    # `scale` spreads the scores, so that the softmax weights span many orders of magnitude.
    q = jnp.asarray(scale * rng.standard_normal((b, t, heads, hd), np.float32))
    pos = jnp.asarray(positions)
    _, keys, values = cache.update(0, k_new, v_new, pos, table)
    want = np.asarray(model.attention(q, keys, values, pos, cfg))
    _, k_pages, v_pages = cache.write(0, k_new, v_new, pos, table)
    got = np.asarray(jax.jit(native.paged_attention, static_argnums=5)(q, k_pages, v_pages, table, pos, window))
    real = positions >= 0
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=atol)
    assert not got[~real].any()  # padding queries give zeros
