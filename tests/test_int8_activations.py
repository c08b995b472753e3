"""int8 activations (`activations="int8"`): block-coded matmuls that quantise x to int8 per block of 32 and run
integer dot products, as llama.cpp does.

The contract under test: the kernel computes exactly its stated arithmetic (x rounded to int8 per block, exact
integer sums, a float32 epilogue), so its error against the float32 weights is bounded by x's rounding alone; the
int8-dot layout holds the same weights; the SDK and the loaders accept the setting and reject what cannot run it.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from novallm_jax.errors import NovaLLMError
from novallm_jax.kernels import native
from novallm_jax.loading import load_model, with_activations
from novallm_jax.loading.gguf_export import hf_to_gguf
from novallm_jax.loading.gguf_quant import BlockQuant
from tests.hf_models import build_hf_model, save_hf_model

pytestmark = [
    pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native kernels are XLA:CPU custom calls"),
    pytest.mark.skipif(not native.int8_dot_available(), reason="no native int8-dot kernels (C++ compiler, AVX2)"),
]


def _weight(bits: int, n: int, k: int, seed: int) -> BlockQuant:
    """Random codes over their whole range (4-bit 0..15, 5-bit 0..31, 8-bit -128..127, 6: Q6_K's -32..31), random
    scales (bits 6: a second one per block, signed as Q6_K's) and offsets (none for Q6_K alone, but a Q4_K beside it
    has them)."""
    rng = np.random.default_rng(seed)
    lo, hi = {4: (0, 16), 5: (0, 32), 6: (-32, 32), 8: (-128, 128)}[bits]
    codes = rng.integers(lo, hi, (n, k)).astype(np.uint8 if bits in (4, 5) else np.int8)
    d = rng.uniform(0.001, 0.02, (n, k // 32)).astype(np.float32)
    m = rng.uniform(-0.05, 0.05, (n, k // 32)).astype(np.float32)
    d2 = rng.uniform(-0.08, 0.08, (n, k // 32)).astype(np.float32) if bits == 6 else None
    return BlockQuant(codes, d, m, bits, d2)


def _x(m: int, k: int, seed: int) -> np.ndarray:
    """Activations with an all-zero block, an outlier, and rows of mixed scales."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.1, 10, (m, 1)).astype(np.float32)
    x[0, :32] = 0.0
    x[-1, 40] = 300.0
    return x


def _emulate(x: np.ndarray, bq: BlockQuant) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's arithmetic in numpy, with a float64 epilogue (qx = round(x * 127 / amax) per block of 32; for
    bits 6, amax of 256 values), and the sum of its terms' sizes (what the float32 epilogue's rounding scales with)."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    amax = np.abs(xb).max(-1)
    if bq.bits == 6 and k % 256 == 0:  # Q6_K codes meet x scaled per 256 values, as llama.cpp's q8_K
        amax = np.repeat(np.abs(x).reshape(m, k // 256, 256).max(-1), 8, -1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(xb * inv[..., None]).astype(np.int64).reshape(m, k // 16, 16)
    # Exact integer sums per 16 k (the scale of bits=6 changes at 16; other kinds' two halves have one scale).
    isum = np.einsum("mbk,nbk->mnb", q, bq.codes.astype(np.int64).reshape(bq.shape[0], k // 16, 16))
    d2 = bq.d if bq.d2 is None else bq.d2
    scale = np.stack([bq.d, d2], -1).reshape(bq.shape[0], k // 16).astype(np.float64)
    dx = np.repeat((amax / np.float32(127)).astype(np.float64), 2, -1)
    terms = (
        (isum * (scale[None] * dx[:, None])).reshape(m, bq.shape[0], k // 32, 2).sum(-1),
        bq.m[None] * xb.sum(-1, dtype=np.float64)[:, None],
    )
    return sum(terms).sum(-1), sum(np.abs(t) for t in terms).sum(-1)


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
@pytest.mark.parametrize("n", [16, 40])
def test_int8_layout_holds_the_same_weights(bits, n):
    bq = _weight(bits, n, 96, seed=n)
    exact = native.QuantLinear.from_blocks(bq)
    dot = exact.with_int8_activations()
    # 5-bit codes: decoded to float32 from 8 bits, dotted from 5 (0.875 bytes a weight instead of 1.25)
    assert (exact.bits, dot.bits) == ((8, 5) if bits == 5 else (bits, bits))
    assert dot.int8 and dot.panels.shape[:2] == exact.panels.shape[:2]
    assert dot.panels.shape[2] == native.block_bytes(bits) == (448 if bits == 5 else exact.panels.shape[2])
    np.testing.assert_array_equal(
        np.asarray(dot.panels), native.pack_quant(bq.codes, bq.d, bq.m, bits, int8=True, d2=bq.d2)
    )
    np.testing.assert_array_equal(dot.to_dense(), exact.to_dense())
    np.testing.assert_array_equal(dot.to_dense(), bq.dequantize().T)
    assert dot.with_int8_activations() is dot


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 32])
def test_int8_matmul_computes_its_stated_arithmetic(bits, m):
    k, n = 256, 40  # 40 columns: a padded panel
    bq = _weight(bits, n, k, seed=m)
    x = _x(m, k, seed=m)
    w = native.QuantLinear.from_blocks(bq).with_int8_activations()
    y = np.asarray(jax.jit(lambda x, w: w.apply(x))(jnp.asarray(x), w))
    assert y.shape == (m, n)
    want, size = _emulate(x, bq)
    # Integer sums are exact; only the float32 epilogue rounds (a few ulps of the sum of the block terms' sizes).
    assert (np.abs(y - want) <= 4 * np.finfo(np.float32).eps * size).all()
    # Against the float32 weights, the error is x's rounding: at most amax / 254 per element (amax of x's group).
    dense = bq.dequantize().T.astype(np.float64)
    group = 256 if bits == 6 else 32
    xb = np.repeat(np.abs(x).reshape(m, -1, group).max(-1), group // 32, -1) / 254
    bound = np.einsum("mb,bkn->mn", xb, np.abs(dense).reshape(k // 32, 32, n))
    assert (np.abs(y - x.astype(np.float64) @ dense) <= bound * 1.001 + 1e-4).all()


def test_int8_matmul_rejects_a_mismatched_inner_dimension():
    bq = _weight(8, 16, 64, seed=0)
    panels = jnp.asarray(native.pack_quant(bq.codes, bq.d, bq.m, 8, int8=True))
    with pytest.raises(Exception, match="int8-dot matmul wants"):
        native.quant_matmul(jnp.zeros((2, 96), jnp.float32), panels, 16, 8, int8=True).block_until_ready()


def test_int8_logits_of_a_quantized_gguf_stay_close_to_the_float_ones(tmp_path):
    from tests.test_quantized_weights import _logits

    src = save_hf_model(build_hf_model("smollm2"), str(tmp_path / "hf"))
    path = hf_to_gguf(src, str(tmp_path / "model.gguf"), quant="Q4_1")
    cfg, coded = load_model(path, np.float32, keep_quantized=True)
    fast = with_activations(coded, "int8")
    assert all(
        w.int8
        for w in jax.tree.leaves(fast, is_leaf=lambda w: isinstance(w, native.QuantLinear))
        if isinstance(w, native.QuantLinear)
    )
    _, want = _logits(cfg, coded)
    ex, got = _logits(cfg, fast)
    assert ex.params["lm_head"].int8
    assert not np.array_equal(got, want)  # really the other arithmetic
    np.testing.assert_allclose(got, want, rtol=0, atol=0.05 * np.abs(want).max())
    # Without the native kernels, the int8 layout is dequantised for XLA's dots like any block codes.
    _, xla = _logits(cfg, fast, native_kernels=False)
    np.testing.assert_allclose(xla, want, rtol=0, atol=1e-5)


def test_with_activations_rejects_what_cannot_run_int8(tmp_path):
    params = {"lm_head": jnp.zeros((4, 4)), "layers": []}
    assert with_activations(params, "float32") is params
    with pytest.raises(NovaLLMError, match="needs matmul weights in GGUF block codes"):
        with_activations(params, "int8")
    with pytest.raises(ValueError, match="activations must be one of"):
        with_activations(params, "int4")


def test_llm_generates_with_int8_activations(default_gguf):
    from novallm_jax.engine.engine import EngineConfig
    from novallm_jax.llm import LLM
    from novallm_jax.sampling_params import SamplingParams
    from tests.engine_fixtures import EXEC

    with pytest.raises(ValueError, match="activations must be one of"):
        LLM("unused", activations="int4")
    with pytest.raises(NovaLLMError, match="needs matmul weights in GGUF block codes"):
        LLM(default_gguf, weights="float", activations="int8")
    with LLM(default_gguf, activations="int8", engine_config=EngineConfig(executor=EXEC)) as llm:
        assert llm.engine.executor.params["layers"][0]["w_down"].int8
        out = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=8))[0]
        assert "Paris" in out.text
        assert llm.engine.check_leaks() == []


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_int8_matmul_rows_do_not_depend_on_their_batch(bits):
    """Each row is quantised and summed on its own, in the same order in every tile: a request's results do not
    depend on which rows share its step (the engine's batch invariance)."""
    k, n, m = 192, 48, 11
    w = native.QuantLinear.from_blocks(_weight(bits, n, k, seed=7)).with_int8_activations()
    x = jnp.asarray(_x(m, k, seed=7))
    apply = jax.jit(lambda x, w: w.apply(x))
    batched = np.asarray(apply(x, w))
    for i in range(m):
        np.testing.assert_array_equal(np.asarray(apply(x[i : i + 1], w))[0], batched[i])
    np.testing.assert_array_equal(np.asarray(apply(x[3:5], w)), batched[3:5])


def test_kernels_say_why_they_cannot_run(monkeypatch):
    w = native.QuantLinear.from_blocks(_weight(8, 16, 64, seed=0))
    x = jnp.ones((1, 64), jnp.float32)
    monkeypatch.setattr(native, "int8_dot_available", lambda: False)
    with pytest.raises(RuntimeError, match="novallm_q8_dot_matmul_f32 needs a CPU with AVX2"):
        w.with_int8_activations().apply(x)
    w.apply(x).block_until_ready()  # the exact kernel does not need AVX2
    monkeypatch.setattr(native, "available", lambda: False)
    with pytest.raises(RuntimeError, match="novallm_q8_matmul_f32 is not available"):
        w.apply(x)


def _int8_outputs() -> dict[str, np.ndarray]:
    """int8-dot outputs of this process's kernel build on fixed weights and inputs, 4-, 5-, 6- and 8-bit codes."""
    out = {}
    for bits in (4, 5, 6, 8):
        w = native.QuantLinear.from_blocks(_weight(bits, 40, 256, seed=bits)).with_int8_activations()
        out[f"y{bits}"] = np.asarray(jax.jit(lambda x, w: w.apply(x))(jnp.asarray(_x(9, 256, seed=bits)), w))
    return out


_OTHER_BUILD = """
import sys
import numpy as np
from novallm_jax.kernels import native
from tests.test_int8_activations import _int8_outputs
np.savez(sys.argv[1], isa=np.array(native.int8_dot_isa()), **_int8_outputs())
"""


@pytest.mark.skipif(native.int8_dot_isa() != "avx512-vnni", reason="the CPU has no AVX-512 VNNI")
def test_the_vnni_and_avx2_tiles_give_the_same_results(tmp_path):
    """Where the CPU has VNNI, the AVX2 tiles are built too (`-mno-avx512vnni`): their integer sums are exact and
    the float epilogue is the same, so both give the same bits."""
    env = {**os.environ, "NOVALLM_KERNEL_FLAGS": "-mno-avx512vnni", "NOVALLM_KERNEL_CACHE": str(tmp_path / "cache")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", _OTHER_BUILD, str(tmp_path / "avx2.npz")],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    avx2 = np.load(tmp_path / "avx2.npz")
    assert str(avx2["isa"]) == "avx2"
    for name, y in _int8_outputs().items():
        np.testing.assert_array_equal(y, avx2[name])


@pytest.mark.parametrize("quant,kinds", [("Q4_K_M", {(6, True), (4, True)}), ("Q5_0", {(5, True)})])
def test_int8_logits_of_a_coded_gguf_stay_close_to_the_exact_ones(tmp_path, quant, kinds):
    """Q4_K_M: Q4_K and Q6_K weights (and layer 0's q/k/v in the two-scale form); Q5_0: 5-bit codes (8 bits in the
    exact load). Through the fused decoder layer, with int8 activations."""
    from tests.hf_models import build_superblock_llama
    from tests.test_quantized_weights import _logits

    src = save_hf_model(build_superblock_llama(layers=2), str(tmp_path / "hf"))
    cfg, coded = load_model(hf_to_gguf(src, str(tmp_path / "model.gguf"), quant=quant), np.float32, keep_quantized=True)
    fast = with_activations(coded, "int8")
    assert {(w.bits, w.int8) for w in (fast["layers"][0]["wqkv"], fast["layers"][1]["wqkv"], fast["lm_head"])} == kinds
    _, want = _logits(cfg, coded)
    _, got = _logits(cfg, fast)
    assert not np.array_equal(got, want)
    np.testing.assert_allclose(got, want, rtol=0, atol=0.05 * np.abs(want).max())
