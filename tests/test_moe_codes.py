"""Mixture-of-experts weights kept in GGUF block codes: the native expert matmul, and MoE GGUF files whose
`ffn_*_exps` stacks stay in their codes with the float logits (the same contract as tests/test_quantized_weights.py:
bit for bit what the float32 kernel computes on the `gguf` package's dequantisation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from novallm_jax.kernels import native
from novallm_jax.loading.gguf_quant import decode_blocks
from tests.test_quantized_weights import _raw

pytestmark = [
    pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native kernels are XLA:CPU custom calls"),
    pytest.mark.skipif(not native.available(), reason="no C++ compiler: the native kernel is not built"),
]


def _experts(type_name: str, num_experts: int, n: int, k: int, seed: int = 0) -> list[native.QuantLinear]:
    bq = decode_blocks(_raw(type_name, num_experts * n, k, seed), type_name, (num_experts * n, k))
    return [native.QuantLinear.from_blocks(bq.take_rows(slice(e * n, (e + 1) * n))) for e in range(num_experts)]


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 7, 40])
def test_expert_matmul_equals_each_experts_own_matmul(type_name, rows, int8):
    """Each row through its expert, bit for bit what that expert's own matmul gives its rows; idle experts and
    experts with many rows alike."""
    if int8 and not native.int8_dot_available():
        pytest.skip("int8 dot products need AVX2")
    num_experts, n, k = 6, 40, 512
    experts = _experts(type_name, num_experts, n, k, seed=rows)
    if int8:
        experts = [w.with_int8_activations() for w in experts]
    stacked = native.ExpertQuantLinear.from_experts(experts)
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    which = rng.integers(0, num_experts - 1, rows).astype(np.int32)  # the last expert idle
    got = np.asarray(jax.jit(lambda x, e, w: w.apply(x, e))(jnp.asarray(x), jnp.asarray(which), stacked))
    assert got.shape == (rows, n)
    for e in set(which.tolist()):
        sel = np.flatnonzero(which == e)
        np.testing.assert_array_equal(got[sel], np.asarray(experts[e].apply(jnp.asarray(x[sel]))))
    np.testing.assert_array_equal(stacked.to_dense()[2], experts[2].to_dense())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_moe_gguf_keeps_its_expert_codes(tmp_path, family, quant, caplog):
    """Every expert stack of a MoE GGUF stays in its codes, decoding to the dequantised load's float32 weights bit
    for bit. Logits agree with that load to float32 rounding, not bit for bit: there XLA's dot runs the float
    experts, here the native kernel (whose results equal each expert's own `QuantLinear`, tested above)."""
    import logging

    import gguf

    from novallm_jax.loading import load_model
    from novallm_jax.loading.gguf_export import hf_to_gguf
    from tests.hf_models import build_superblock_moe, save_hf_model
    from tests.test_quantized_weights import _logits

    src = save_hf_model(build_superblock_moe(family), str(tmp_path / "hf"))
    path = hf_to_gguf(src, str(tmp_path / f"model-{quant}.gguf"), quant=quant)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_up_exps.weight"] == ("Q8_0" if quant == "Q8_0" else "Q4_K")
    cfg, dense = load_model(path, np.float32)
    caplog.set_level(logging.INFO, logger="absl")
    _, coded = load_model(path, np.float32, keep_quantized=True)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "absl"]
    assert not [r.getMessage() for r in caplog.records if "dequantised to" in r.getMessage()]
    for layer, ref in zip(coded["layers"], dense["layers"]):
        for key in ("experts_gate_up", "experts_down"):
            assert isinstance(layer[key], native.ExpertQuantLinear)
            np.testing.assert_array_equal(layer[key].to_dense(), np.asarray(ref[key]))
    matmul_bytes = lambda p: sum(
        x.nbytes
        for layer in p["layers"]
        for k in ("experts_gate_up", "experts_down")
        for x in jax.tree.leaves(layer[k])
    )
    assert matmul_bytes(dense) > (3.0 if quant == "Q8_0" else 4.0) * matmul_bytes(coded)
    _, want = _logits(cfg, dense)
    _, got = _logits(cfg, coded)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    assert (got.argmax(-1) == want.argmax(-1)).all()
