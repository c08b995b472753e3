"""GGUF weights kept in their block codes: decoding, packing, the native quantised matmul, loading and the model.

The contract under test: a `QuantLinear` computes exactly (bit for bit) what the float32 native kernel computes on
the weights that the `gguf` package dequantises; only the bytes read per weight change.
"""

import gguf
import gguf.quants
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from novallm_jax.engine.executor import Executor, ExecutorConfig, PrefillChunk
from novallm_jax.errors import NovaLLMError
from novallm_jax.kernels import native
from novallm_jax.loading import load_model
from novallm_jax.loading.gguf_export import hf_to_gguf
from novallm_jax.loading.gguf_quant import BlockQuant, decode_blocks
from tests.hf_models import build_hf_model, build_superblock_llama, save_hf_model

pytestmark = [
    pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native kernels are XLA:CPU custom calls"),
    pytest.mark.skipif(not native.available(), reason="no C++ compiler: the native kernel is not built"),
]


def _raw(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF bytes [rows, row bytes] of a random weight in `type_name`."""
    rng = np.random.default_rng(seed)
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    if not type_name.endswith("_K"):  # the gguf package quantises these
        return gguf.quants.quantize(rng.standard_normal((rows, cols), dtype=np.float32), qtype)
    # K-quants (the gguf package cannot quantise them): random codes, scales and mins with sane float16 d and dmin
    # (Q6_K: random signed 8-bit scales and its d at the end of the block).
    n = rows * cols // 256
    blocks = rng.integers(0, 256, (n, gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    where = slice(-2, None) if type_name == "Q6_K" else slice(0, 4)
    d = rng.uniform(0.001, 0.1, (n, 2 if type_name != "Q6_K" else 1)).astype(np.float16)
    blocks[:, where] = d.view(np.uint8).reshape(n, -1)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize(
    "type_name,bits",
    [("Q4_0", 4), ("Q4_1", 4), ("Q8_0", 8), ("Q4_K", 4), ("Q5_0", 5), ("Q5_1", 5), ("Q5_K", 5), ("Q6_K", 6)],
)
def test_decoded_blocks_are_bit_identical_to_gguf_dequantize(type_name, bits):
    rows, cols = 24, 512
    raw = _raw(type_name, rows, cols)
    ref = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, type_name)).astype(np.float32)
    bq = decode_blocks(raw, type_name, (rows, cols))
    assert bq.bits == bits and bq.shape == (rows, cols) and bq.d.shape == (rows, cols // 32)
    np.testing.assert_array_equal(bq.dequantize(), ref)
    perm = np.random.default_rng(1).permutation(rows)
    np.testing.assert_array_equal(
        BlockQuant.concat_rows([bq, bq.take_rows(perm)]).dequantize(), np.concatenate([ref, ref[perm]])
    )


@pytest.mark.parametrize("kinds", [("Q4_K", "Q6_K"), ("Q6_K", "Q8_0")])
def test_codes_beside_q6_k_concatenate_with_two_scales(kinds):
    """A Q4_K_M file's Q4_K q and k with its Q6_K v: one weight, bits=6, decoding to each part's gguf values."""
    parts = [decode_blocks(_raw(t, 16 * (i + 1), 256, seed=i), t, (16 * (i + 1), 256)) for i, t in enumerate(kinds)]
    both = BlockQuant.concat_rows(parts)
    assert both.bits == 6 and both.codes.dtype == np.int8
    np.testing.assert_array_equal(both.dequantize(), np.concatenate([p.dequantize() for p in parts]))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 256), dtype=np.float32))
    y = native.QuantLinear.from_blocks(both).apply(x)
    dense = native.PackedLinear.from_dense(both.dequantize().T)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(dense.apply(x)))


@pytest.mark.parametrize("kinds,bits", [(("Q4_K", "Q5_K"), 5), (("Q4_0", "Q8_0"), 8), (("Q5_0", "Q8_0"), 8)])
def test_codes_of_mixed_widths_concatenate_in_the_widest(kinds, bits):
    q4 = decode_blocks(_raw(kinds[0], 16, 256), kinds[0], (16, 256))
    q5 = decode_blocks(_raw(kinds[1], 8, 256, seed=1), kinds[1], (8, 256))
    both = BlockQuant.concat_rows([q4, q5])
    assert both.bits == bits and both.codes.dtype == (np.int8 if bits == 8 else np.uint8)
    np.testing.assert_array_equal(both.dequantize(), np.concatenate([q4.dequantize(), q5.dequantize()]))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 256), dtype=np.float32))
    y = native.QuantLinear.from_blocks(both).apply(x)
    dense = native.PackedLinear.from_dense(both.dequantize().T)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(dense.apply(x)))


@pytest.mark.parametrize(
    "kinds,block",
    [(("Q8_0",), 544), (("Q5_0",), 544), (("Q4_0",), 544), (("Q6_K",), 640), (("Q5_0", "Q8_0"), 544)]
    + [((t,), None) for t in ("Q4_1", "Q5_1", "Q4_K")],
)
def test_symmetric_codes_keep_no_offsets(kinds, block):
    """Codes whose every block's m is -c d for an integer c (Q8_0, Q6_K: 0; Q5_0: 16; Q4_0: 8, in 8 bits) are held
    as q - c without m (`sym`: 1.0625 bytes an 8-bit weight with float16 d, not 1.125), decoding and multiplying to
    the same bits; offsets that are no such multiple (Q4_1, Q5_1, Q4_K) keep them."""
    parts = [decode_blocks(_raw(t, 16 * (i + 1), 256, seed=i), t, (16 * (i + 1), 256)) for i, t in enumerate(kinds)]
    bq = BlockQuant.concat_rows(parts)
    centred = bq.centred()
    if block is None:
        assert centred is None and not native.QuantLinear.from_blocks(bq).sym
        q8 = bq.to_8bit()
        with pytest.raises(ValueError, match="sym=True needs"):
            native.pack_quant(q8.codes, q8.d, q8.m, q8.bits, d2=q8.d2, sym=True)
        return
    assert not centred.m.any() and centred.codes.dtype == np.int8
    np.testing.assert_array_equal(centred.dequantize(), bq.dequantize())
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 256), dtype=np.float32))
    apply = jax.jit(lambda x, w: w.apply(x))
    dense = apply(x, native.PackedLinear.from_dense(bq.dequantize().T))
    wide = bq.to_8bit() if bq.bits in (4, 5) else bq  # Q4_0's nibbles would stay nibbles
    w = native.QuantLinear.from_blocks(wide)
    assert w.sym and w.panels.shape[2] == block == native.block_bytes(w.bits, w.half, sym=True)
    offsets = w.with_offsets()
    assert not offsets.sym and offsets.panels.shape[2] == block + 32 * (1 + (not w.half))
    for v in (w, offsets, w.with_float32_scales()):
        np.testing.assert_array_equal(v.to_dense(), bq.dequantize().T)
        np.testing.assert_array_equal(np.asarray(apply(x, v)), np.asarray(dense))
    if native.int8_dot_available():
        dot = w.with_int8_activations()
        # a centred Q5_0 weight goes back to q with m = -16 d for the int8-dot layout's 5 bits: the layout, and the
        # results, of the codes as the file has them
        assert (dot.bits, dot.sym) == ((5, False) if kinds in (("Q5_0",), ("Q4_0",)) else (w.bits, True))
        np.testing.assert_array_equal(dot.to_dense(), bq.dequantize().T)
        if kinds in (("Q8_0",), ("Q5_0",), ("Q6_K",)):  # Q4_0's q - 8 comes back as q + 8 with m = -16 d
            uncentred = native.pack_quant(wide.codes, wide.d, wide.m, wide.bits, d2=wide.d2, half=w.half)
            as_read = native.QuantLinear(jnp.asarray(uncentred), w.n, w.bits, half=w.half).with_int8_activations()
            np.testing.assert_array_equal(np.asarray(apply(x, dot)), np.asarray(apply(x, as_read)))
    # experts with and without offsets stack with them; each row's matmul is its expert's
    experts = native.ExpertQuantLinear.from_experts([w, offsets])
    assert not experts.sym and native.ExpertQuantLinear.from_experts([w, w]).sym
    for e in (0, 1):
        rows = jax.jit(lambda x, e, w: w.apply(x, e))(x, jnp.full(3, e), experts)
        np.testing.assert_array_equal(np.asarray(rows), np.asarray(dense))


def test_unsupported_types_are_not_decoded():
    raw = np.zeros((4, 64 * 2), np.uint8)
    assert decode_blocks(raw, "F16", (4, 64)) is None
    assert decode_blocks(raw, "Q3_K", (4, 256)) is None
    assert decode_blocks(raw, "Q4_1", (4, 48)) is None  # rows that are not whole blocks


@pytest.mark.parametrize("type_name", ["Q4_1", "Q5_0", "Q8_0", "Q6_K"])
@pytest.mark.parametrize("n", [16, 50])
@pytest.mark.parametrize("int8", [False, True])
def test_pack_quant_round_trip(type_name, n, int8):
    k = 256 if type_name == "Q6_K" else 96
    bq = decode_blocks(_raw(type_name, n, k), type_name, (n, k))
    if bq.bits == 5 and not int8:  # the float32 decode reads Q5 codes from 8 bits (QuantLinear.from_blocks)
        with pytest.raises(ValueError, match="int8-dot kernel only"):
            native.pack_quant(bq.codes, bq.d, bq.m, bq.bits, d2=bq.d2)
        return
    panels = native.pack_quant(bq.codes, bq.d, bq.m, bq.bits, int8=int8, d2=bq.d2)
    scales, code_bits = (3, 8) if bq.bits == 6 else (2, bq.bits)
    assert panels.shape == (-(-n // 16), k // 32, scales * 4 * 16 + 32 * 16 * code_bits // 8)
    dense = native.unpack_quant(panels, -(-n // 16) * 16, bq.bits, int8=int8)
    np.testing.assert_array_equal(dense[:, :n], bq.dequantize().T)
    assert not dense[:, n:].any()  # padding columns decode to zero


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_0", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 13, 32, 100])
def test_quant_matmul_is_bit_identical_to_the_float32_kernel(type_name, m):
    k, n = 512, 72
    bq = decode_blocks(_raw(type_name, n, k, seed=m), type_name, (n, k))
    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k), dtype=np.float32))
    quant = native.QuantLinear.from_blocks(bq)
    dense = native.PackedLinear.from_dense(bq.dequantize().T)
    y = jax.jit(lambda x, w: w.apply(x))(x, quant)
    assert y.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.jit(lambda x, w: w.apply(x))(x, dense)))
    w = bq.dequantize().T.astype(np.float64)
    xs = np.asarray(x, np.float64)
    bound = 4 * k * np.finfo(np.float32).eps * (np.abs(xs) @ np.abs(w))  # float32 rounding of a K-term dot product
    assert (np.abs(np.asarray(y) - xs @ w) <= bound).all()


@pytest.mark.parametrize(
    "type_name,half", [("Q4_0", True), ("Q4_1", True), ("Q5_1", True), ("Q8_0", True), ("Q4_K", False), ("Q6_K", False)]
)
def test_float16_scales_are_stored_in_16_bits(type_name, half):
    """A Q4_0/1, Q5_0/1 or Q8_0 weight's d and m are float16 values: its panels hold them so (64 bytes a block
    fewer), and every layout and kernel gives the same values as float32 scales."""
    n, k = 40, 256
    bq = decode_blocks(_raw(type_name, n, k), type_name, (n, k))
    w = native.QuantLinear.from_blocks(bq)
    wide = w.with_float32_scales()
    assert w.half == half and not wide.half
    assert (
        w.panels.shape[2] == native.block_bytes(w.bits, half, w.sym) == wide.panels.shape[2] - 32 * half * (2 - w.sym)
    )
    for v in (w, wide, w.with_int8_activations(), wide.with_int8_activations()):
        np.testing.assert_array_equal(v.to_dense(), bq.dequantize().T)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, k), dtype=np.float32))
    apply = jax.jit(lambda x, w: w.apply(x))
    np.testing.assert_array_equal(np.asarray(apply(x, w)), np.asarray(apply(x, wide)))
    if native.int8_dot_available():
        np.testing.assert_array_equal(
            np.asarray(apply(x, w.with_int8_activations())), np.asarray(apply(x, wide.with_int8_activations()))
        )
    # experts of either kind stack with float32 scales; the matmul of each row is its expert's
    experts = native.ExpertQuantLinear.from_experts([w, wide])
    assert not experts.half
    for e in (0, 1):
        rows = jax.jit(lambda x, e, w: w.apply(x, e))(x, jnp.full(3, e), experts)
        np.testing.assert_array_equal(np.asarray(rows), np.asarray(apply(x, wide)))
    if not half:
        with pytest.raises(ValueError, match="float16 values"):
            native.pack_quant(bq.codes, bq.d, bq.m, bq.bits, d2=bq.d2, half=True)


def test_quant_matmul_rejects_a_mismatched_inner_dimension():
    bq = decode_blocks(_raw("Q8_0", 16, 64), "Q8_0", (16, 64))
    with pytest.raises(Exception, match="quantised matmul wants"):
        native.quant_matmul(
            jnp.zeros((2, 96), jnp.float32), jnp.asarray(native.pack_quant(bq.codes, bq.d, bq.m, bq.bits)), 16, 8
        ).block_until_ready()


def _logits(cfg, params, native_kernels=None, **config):
    """Prefill logits of two ragged prompts, then two decode steps' logits, through the executor."""
    ex = Executor(
        cfg,
        params,
        ExecutorConfig(page_size=8, num_pages=32, max_model_len=64, native_kernels=native_kernels, **config),
    )
    cache = ex.new_cache()
    prompts = [[3, 17, 42, 9, 11, 5, 8, 13, 21, 34, 55, 2], [7, 1, 4]]
    tables = [[1, 2, 3], [4, 5, 6]]
    out, cache = ex.prefill(cache, [PrefillChunk(p, 0, t) for p, t in zip(prompts, tables)])
    outs = [np.asarray(out)]
    for step in range(2):
        out, cache = ex.decode(cache, [4 + step, 9], [len(p) + step for p in prompts], tables)
        outs.append(np.asarray(out))
    return ex, np.concatenate([o.reshape(-1, o.shape[-1]) for o in outs])


@pytest.mark.parametrize("quant", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_quantized_gguf_keeps_its_codes_and_gives_the_float_logits(tmp_path, quant):
    model = build_hf_model("smollm2")  # tied embeddings, GQA: q/k rows are unpermuted in codes
    src = save_hf_model(model, str(tmp_path / "hf"))
    path = hf_to_gguf(src, str(tmp_path / f"model-{quant}.gguf"), quant=quant)
    cfg, dense = load_model(path, np.float32)
    _, coded = load_model(path, np.float32, keep_quantized=True)
    # Q5 codes are decoded from 8 bits and dotted with int8 activations from 5
    bits, dot_bits = {"Q4_0": (4, 4), "Q4_1": (4, 4), "Q5_0": (8, 5), "Q5_1": (8, 5), "Q8_0": (8, 8)}[quant]
    for w in (coded["layers"][0]["wqkv"], coded["layers"][1]["w_down"], coded["lm_head"]):
        assert isinstance(w, native.QuantLinear) and w.bits == bits
        assert not native.int8_dot_available() or w.with_int8_activations().bits == dot_bits
    np.testing.assert_array_equal(coded["layers"][0]["wqkv"].to_dense(), np.asarray(dense["layers"][0]["wqkv"]))
    np.testing.assert_array_equal(np.asarray(coded["embed"]), np.asarray(dense["embed"]))
    ex, got = _logits(cfg, coded)
    head = ex.params["lm_head"]  # Q8_0's, with the greedy head's int8-dot copy (`native.ArgmaxHead`)
    assert (head.exact if isinstance(head, native.ArgmaxHead) else head) is coded["lm_head"]
    assert isinstance(head, native.ArgmaxHead) == (quant == "Q8_0" and native.int8_dot_available())
    _, want = _logits(cfg, dense)
    np.testing.assert_array_equal(got, want)
    # Without the native kernels the codes are dequantised for XLA's dots: the same model, other summation order.
    ex_xla, xla = _logits(cfg, coded, native_kernels=False)
    assert isinstance(ex_xla.params["lm_head"], jax.Array)
    np.testing.assert_allclose(xla, want, rtol=0, atol=1e-5)


def test_default_model_runs_on_its_block_codes(default_gguf):
    cfg, dense = load_model(default_gguf, np.float32)
    _, coded = load_model(default_gguf, np.float32, keep_quantized=True)
    layer = coded["layers"][0]
    assert all(
        isinstance(layer[k], native.QuantLinear) and layer[k].bits == 4 for k in ("wqkv", "wo", "w_gate_up", "w_down")
    )
    assert coded["lm_head"].bits == 8  # the file's token_embd is Q8_0 (tied)
    matmul_bytes = lambda p: sum(x.nbytes for x in jax.tree.leaves(p)) - p["embed"].nbytes
    assert matmul_bytes(dense) > 3.8 * matmul_bytes(coded)
    np.testing.assert_array_equal(_logits(cfg, coded)[1], _logits(cfg, dense)[1])


def test_llm_rejects_unknown_weights_setting():
    from novallm_jax.llm import LLM

    with pytest.raises(ValueError, match="weights must be"):
        LLM("unused", weights="int4")
    with pytest.raises(NovaLLMError, match="needs float32 on CPU"):
        LLM("unused", weights="quantized", dtype="bfloat16")


def test_llm_keeps_the_default_models_codes_and_generates_what_float_weights_do(default_gguf):
    from novallm_jax.engine.engine import EngineConfig
    from novallm_jax.llm import LLM
    from novallm_jax.sampling_params import SamplingParams
    from tests.engine_fixtures import EXEC

    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    out = {}
    for weights, kind in (("auto", native.QuantLinear), ("float", native.PackedLinear)):
        with LLM(default_gguf, weights=weights, engine_config=EngineConfig(executor=EXEC)) as llm:
            assert isinstance(llm.engine.executor.params["layers"][0]["w_down"], kind)
            out[weights] = llm.generate(["The capital of France is"], params)[0].outputs[0].token_ids
            assert llm.engine.check_leaks() == []
    assert out["auto"] == out["float"] and len(out["auto"]) == 8


def test_a_checkpoint_of_coded_params_holds_their_float_values(tmp_path):
    from novallm_jax.loading.checkpoint import load_checkpoint, save_checkpoint

    src = save_hf_model(build_hf_model("llama2"), str(tmp_path / "hf"))
    path = hf_to_gguf(src, str(tmp_path / "model.gguf"), quant="Q4_1")
    cfg, dense = load_model(path, np.float32)
    _, coded = load_model(path, np.float32, keep_quantized=True)
    save_checkpoint(str(tmp_path / "ckpt"), cfg, coded)
    _, restored = load_checkpoint(str(tmp_path / "ckpt"), np.float32)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(dense)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _kquant_llama(tmp_path, layers: int = 8) -> str:
    return save_hf_model(build_superblock_llama(layers), str(tmp_path / "hf"))


def test_q4_k_m_gguf_runs_on_its_codes_with_the_float_logits(tmp_path, caplog):
    """A Q4_K_M file from our writer (Q4_K, with Q6_K attn_v / ffn_down on llama.cpp's layers and Q6_K output): every
    matmul weight stays in codes, each type's keeping is logged, and the logits equal the dequantised load's."""
    import logging

    path = hf_to_gguf(_kquant_llama(tmp_path), str(tmp_path / "model-Q4_K_M.gguf"), quant="Q4_K_M")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    six = {f"blk.{i}.{p}.weight" for i in (0, 3, 6, 7) for p in ("attn_v", "ffn_down")} | {"output.weight"}
    assert {n for n, t in types.items() if t == "Q6_K"} == six
    assert {t for n, t in types.items() if n not in six} == {"Q4_K", "F32"}
    cfg, dense = load_model(path, np.float32)
    caplog.set_level(logging.INFO, logger="absl")
    _, coded = load_model(path, np.float32, keep_quantized=True)
    lines = {r.getMessage() for r in caplog.records}
    assert {
        "Q4_K: 48 tensors kept in codes (exact), the embedding table as float32 (its rows are gathered)",
        "Q6_K: 9 tensors kept in codes (exact)",
        "F32: 17 norms",
    } <= lines
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "absl"]
    layers = coded["layers"]
    assert (layers[0]["wqkv"].bits, layers[1]["wqkv"].bits, layers[0]["w_down"].bits, coded["lm_head"].bits) == (
        6,
        4,
        6,
        6,
    )  # layer 0's Q4_K q/k with its Q6_K v: the two-scale form
    assert all(isinstance(layer[k], native.QuantLinear) for layer in layers for k in native.PACKED_WEIGHTS)
    np.testing.assert_array_equal(layers[0]["wqkv"].to_dense(), np.asarray(dense["layers"][0]["wqkv"]))
    _, want = _logits(cfg, dense)
    ex, got = _logits(cfg, coded)
    head = ex.params["lm_head"]  # Q6_K's, with the greedy head's int8-dot copy (two scales a block)
    assert isinstance(head, native.ArgmaxHead) == native.int8_dot_available()
    if native.int8_dot_available():
        assert head.exact is coded["lm_head"]
        x = jnp.asarray(np.random.default_rng(0).standard_normal((8, cfg.hidden_size), dtype=np.float32))
        full = jnp.argmax(jax.jit(lambda x: head.apply(x))(x), axis=-1)
        np.testing.assert_array_equal(np.asarray(jax.jit(head.argmax)(x)), np.asarray(full))
    np.testing.assert_array_equal(got, want)


def test_a_weight_widened_beside_codes_is_logged_as_a_warning():
    from novallm_jax.loading.gguf_file import kept_line

    assert kept_line("Q4_K", ["codes"] * 3 + ["dense"], "float32") == (
        "Q4_K: 3 tensors kept in codes (exact), 1 matmul weights dequantised to float32",
        True,
    )
    assert kept_line("F16", ["dense"] * 2 + ["vector"], "float32") == (
        "F16: 2 matmul weights widened to float32 (exact), 1 norms as float32",
        False,
    )


@pytest.mark.parametrize("quant", ["F16", "BF16"])
def test_16_bit_gguf_keeps_16_bits_and_gives_the_rounded_float_logits(tmp_path, quant, caplog):
    """An F16 / BF16 file from our writer: its matmul weights stay in 16 bits (`HalfLinear`), holding the float32
    file's weights rounded to 16 bits (norms stay float32), and the logits are those of the rounded float32 weights,
    bit for bit, with and without the fused layers."""
    import logging

    import ml_dtypes

    src = _kquant_llama(tmp_path, layers=2)
    _, f32 = load_model(hf_to_gguf(src, str(tmp_path / "model.gguf")), np.float32)
    caplog.set_level(logging.INFO, logger="absl")
    cfg, half = load_model(
        hf_to_gguf(src, str(tmp_path / f"model-{quant}.gguf"), quant=quant), np.float32, keep_quantized=True
    )
    assert f"{quant}: 15 tensors kept in 16 bits (exact), the embedding table as float32 (its rows are gathered)" in {
        r.getMessage() for r in caplog.records
    }
    assert all(
        isinstance(layer[k], native.HalfLinear) and layer[k].bf16 == (quant == "BF16")
        for layer in half["layers"]
        for k in native.PACKED_WEIGHTS
    )
    dtype = np.float16 if quant == "F16" else ml_dtypes.bfloat16
    rounded = jax.tree.map(lambda a: a if a.ndim == 1 else np.asarray(a).astype(dtype).astype(np.float32), f32)
    widened = native.dequantize_params(half)
    assert jax.tree.structure(widened) == jax.tree.structure(rounded)
    for a, b in zip(jax.tree.leaves(rounded), jax.tree.leaves(widened)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    for fused in (True, False):  # the fused layer sums its norms in another order: each against its own kind
        ex, got = _logits(cfg, half, fused_layers=fused)
        assert ex.fused_layers == fused and isinstance(ex.params["layers"][0]["w_down"], native.HalfLinear)
        np.testing.assert_array_equal(got, _logits(cfg, rounded, fused_layers=fused)[1])


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 13, 100])
def test_half_matmul_is_bit_identical_to_the_float32_kernel(bf16, m):
    import ml_dtypes

    k, n = 96, 72
    rng = np.random.default_rng(m)
    w = rng.standard_normal((n, k)).astype(ml_dtypes.bfloat16 if bf16 else np.float16)
    w.reshape(-1)[:3] = [0.0, -0.0, 1e-7 if not bf16 else 1e-40]  # zeros and a subnormal
    half = native.HalfLinear.from_bits(w.view(np.uint16), bf16)
    dense = native.PackedLinear.from_dense(w.astype(np.float32).T)
    np.testing.assert_array_equal(half.to_dense(), w.astype(np.float32).T)
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
    apply = jax.jit(lambda x, w: w.apply(x))
    np.testing.assert_array_equal(np.asarray(apply(x, half)), np.asarray(apply(x, dense)))
