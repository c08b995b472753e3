"""One decoder layer as one native call (`native.decoder_layer`, `ExecutorConfig.fused_layers`).

The contract: the fused call computes what `model.decoder_layer` computes through the separate native kernels (the
same matmuls and attention), for every weight kind, ragged rows with padding, biases, q/k norms and sliding windows;
it writes each row's keys and values into its pages in place; and bad shapes get an error, not a crash.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from novallm_jax.config import ModelConfig, rope_inv_freq
from novallm_jax.kernels import native
from novallm_jax.kv_cache import PagedKVCache
from novallm_jax.loading.gguf_quant import BlockQuant
from novallm_jax.model import decoder_layer, rope_tables

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not native.available(), reason="the native kernels are XLA:CPU custom calls"
)


def _cfg(**kw) -> ModelConfig:
    base = dict(
        model_type="llama",
        vocab_size=10,
        hidden_size=96,
        intermediate_size=136,
        num_layers=1,
        num_heads=6,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
    )
    return ModelConfig(**{**base, **kw})


def _weight(kind: str, k: int, n: int, rng) -> native.PackedLinear | native.QuantLinear:
    """A random [k, n] matmul weight: float32 panels, or block codes (`q4`, `q6` (two scales a block, as Q6_K's),
    `q8`; `int8-q4`, ...; `-sym`: without offsets, as Q8_0's and Q6_K's)."""
    if kind == "f32":
        return native.PackedLinear.from_dense(rng.standard_normal((k, n)).astype(np.float32) * 0.1)
    sym = kind.endswith("-sym")
    bits = int(kind.removesuffix("-sym")[-1])
    lo, hi = {4: (0, 16), 6: (-32, 32), 8: (-128, 128)}[bits]
    codes = rng.integers(lo, hi, (n, k)).astype(np.uint8 if bits == 4 else np.int8)
    d = rng.uniform(0.001, 0.02, (n, k // 32)).astype(np.float32) * (8 / 2**bits)
    m = rng.uniform(-0.05, 0.05, (n, k // 32)).astype(np.float32) * (not sym)
    d2 = rng.uniform(-0.02, 0.02, (n, k // 32)).astype(np.float32) * (8 / 2**bits) if bits == 6 else None
    w = native.QuantLinear.from_blocks(BlockQuant(codes, d, m, bits, d2))
    assert w.sym == sym
    return w.with_int8_activations() if kind.startswith("int8") else w


def _layer(cfg: ModelConfig, kind: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    d, f, qkv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size + 2 * cfg.kv_size
    p = {
        "attn_norm": jnp.asarray(rng.uniform(0.5, 1.5, d).astype(np.float32)),
        "wqkv": _weight(kind, d, qkv, rng),
        "wo": _weight(kind, cfg.q_size, d, rng),
        "mlp_norm": jnp.asarray(rng.uniform(0.5, 1.5, d).astype(np.float32)),
        "w_gate_up": _weight(kind, d, 2 * f, rng),
        "w_down": _weight(kind, f, d, rng),
    }
    if cfg.attention_bias:
        p["bqkv"] = jnp.asarray(rng.standard_normal(qkv).astype(np.float32) * 0.1)
    if cfg.qk_norm:
        p["q_norm"], p["k_norm"] = (
            jnp.asarray(rng.uniform(0.5, 1.5, cfg.head_dim).astype(np.float32)) for _ in range(2)
        )
    return p


def _batch(cfg: ModelConfig, rows: list[tuple[int, int]], ps: int, width: int, seed: int):
    """Rows (start, length) padded to the longest: x [B, T, D], positions [B, T] (-1 padding), page tables [B, W]
    of distinct shuffled pages, and a pool whose pages already hold random keys and values."""
    rng = np.random.default_rng(seed)
    t = max(n for _, n in rows)
    positions = np.full((len(rows), t), -1, np.int32)
    for i, (start, n) in enumerate(rows):
        positions[i, :n] = np.arange(start, start + n)
    num_pages = 1 + len(rows) * width
    table = (1 + rng.permutation(len(rows) * width)).reshape(len(rows), width).astype(np.int32)
    shape = (num_pages, ps, cfg.num_kv_heads, cfg.head_dim)
    pages = [jnp.asarray(rng.standard_normal(shape).astype(np.float32)) for _ in range(2)]
    x = jnp.asarray(rng.standard_normal((len(rows), t, cfg.hidden_size)).astype(np.float32))
    return x, positions, table, pages


def _run(cfg, p, x, positions, table, pages, fused: bool):
    cache = PagedKVCache(k=(pages[0],), v=(pages[1],), native_attention=True, fused_layers=fused)
    rope_cs = (rope_tables(positions, rope_inv_freq(cfg), xp=np),)
    fn = jax.jit(
        lambda p, x, cache: decoder_layer(p, x, jnp.asarray(positions), cache, 0, cfg, rope_cs, jnp.asarray(table))
    )
    out, cache = fn(p, x, cache)
    return np.asarray(out), np.asarray(cache.k[0]), np.asarray(cache.v[0])


def _check_fused_equals_separate(cfg, p, rows, seed):
    """The fused call against the separate kernels on the same batch: outputs of the real rows to 1e-5, and the same
    pages written (and no other), to float32 rounding."""
    x, positions, table, pages = _batch(cfg, rows, ps=8, width=9, seed=seed)
    want = _run(cfg, p, x, positions, table, pages, fused=False)
    got = _run(cfg, p, x, positions, table, pages, fused=True)
    real = positions >= 0
    np.testing.assert_allclose(got[0][real], want[0][real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-6)
    assert np.array_equal(got[1] != np.asarray(pages[0]), want[1] != np.asarray(pages[0]))


ROWS = [(0, 1), (37, 1), (5, 12), (60, 3)]  # decode rows, a prefill chunk crossing pages, padding


@pytest.mark.parametrize(
    "kind", ["f32", "q4", "q6", "q8", "int8-q4", "int8-q6", "int8-q8", "q6-sym", "q8-sym", "int8-q6-sym", "int8-q8-sym"]
)
@pytest.mark.parametrize("rows", [[(29, 1)], [(29, 1), (70, 1), (0, 1)], ROWS], ids=["batch1", "batch3", "ragged"])
def test_fused_layer_equals_the_separate_kernels(kind, rows):
    if kind.startswith("int8") and not native.int8_dot_available():
        pytest.skip("no int8-dot kernels (AVX2)")
    cfg = _cfg(intermediate_size=136 if kind == "f32" else 160)  # f32: a padded panel; codes: K in blocks of 32
    _check_fused_equals_separate(cfg, _layer(cfg, kind, seed=1), rows, seed=2)


def test_fused_layer_quantises_x_per_256_for_q6_k_codes():
    """With K a multiple of 256, two-scale (Q6_K) int8-dot weights meet x scaled per 256 values (llama.cpp's q8_K),
    in the fused call as in the separate kernel."""
    if not native.int8_dot_available():
        pytest.skip("no int8-dot kernels (AVX2)")
    cfg = _cfg(hidden_size=256, intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=64)
    _check_fused_equals_separate(cfg, _layer(cfg, "int8-q6", seed=1), ROWS, seed=2)


@pytest.mark.parametrize(
    "variant",
    [dict(attention_bias=True), dict(qk_norm=True), dict(model_type="mistral", sliding_window=5)],
    ids=["bias", "qk_norm", "window"],
)
def test_fused_layer_covers_the_model_variants(variant):
    cfg = _cfg(**variant)
    _check_fused_equals_separate(cfg, _layer(cfg, "f32", seed=3), ROWS, seed=4)


@pytest.mark.parametrize("rows", [[(29, 1), (70, 1), (0, 1)], ROWS], ids=["batch3", "ragged"])
def test_fused_layer_on_bfloat16_pages(rows):
    """bfloat16 pages (`kv_cache_dtype="bfloat16"`): the fused call writes each key and value rounded as XLA rounds
    them (bit for bit against the float32 pages it writes from the same start), touches no other slot, and gives
    the separate kernels' outputs, which read the same rounded keys and values."""
    cfg = _cfg()
    p = _layer(cfg, "f32", seed=7)
    x, positions, table, pages = _batch(cfg, rows, ps=8, width=9, seed=8)
    start = [pg.astype(jnp.bfloat16) for pg in pages]
    wide = _run(cfg, p, x, positions, table, [pg.astype(jnp.float32) for pg in start], fused=True)
    got = _run(cfg, p, x, positions, table, start, fused=True)
    want = _run(cfg, p, x, positions, table, start, fused=False)
    for i in (1, 2):
        assert got[i].dtype == jnp.bfloat16
        rounded = np.asarray(jnp.asarray(wide[i]).astype(jnp.bfloat16))
        np.testing.assert_array_equal(got[i].view(np.uint16), rounded.view(np.uint16))
        written = got[i].view(np.uint16) != np.asarray(start[i - 1]).view(np.uint16)
        assert np.array_equal(written, (want[i].view(np.uint16) != np.asarray(start[i - 1]).view(np.uint16)))
    real = positions >= 0
    np.testing.assert_allclose(got[0][real], want[0][real], rtol=0, atol=1e-4)  # measured: 1e-6
    assert np.abs(got[0][real] - wide[0][real]).max() > 1e-3  # the new keys and values were rounded before use (5e-3)


def test_fused_layer_rejects_weights_that_disagree_with_the_config():
    cfg = _cfg()
    p = _layer(cfg, "f32", seed=5)
    x, positions, table, pages = _batch(cfg, [(3, 1)], ps=8, width=2, seed=6)
    rope_cs = rope_tables(positions, rope_inv_freq(cfg), xp=np)
    wrong = _cfg(num_heads=4)  # the weights hold 6 query heads
    with pytest.raises(Exception, match="decoder_layer: "):
        jax.block_until_ready(
            native.decoder_layer(p, x, pages[0], pages[1], jnp.asarray(table), jnp.asarray(positions), rope_cs, wrong)
        )
