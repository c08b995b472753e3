"""Native CPU kernels, compiled for the machine they run on and called through XLA's FFI.

`cpu_kernels.cc` (packed-weight matmuls, float32 or block-quantised, and a paged attention) is built with the system
C++ compiler (`-O3 -march=native`, see `build.py`) when pip installs the package, and, where that library does not fit
(another CPU, compiler or jaxlib), at first use into a cache directory keyed by the source, the compiler, the jaxlib
version and the CPU (~6 s, once per machine); `NOVALLM_INSTALLED_KERNELS=0` ignores the installed library. Where
there is no compiler, or `NOVALLM_NATIVE_KERNELS=0`, `available()` is False and callers keep XLA's own ops.
`NOVALLM_KERNEL_FLAGS` adds compiler flags (e.g. `-mno-avx512vnni` builds the AVX2 int8 path on a CPU that has VNNI).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import threading
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import logging

from novallm_jax.kernels import build
from novallm_jax.startup import phase

PANEL = 16  # output columns per weight panel; must match kPanel in cpu_kernels.cc
_MATMUL = "novallm_packed_matmul_f32"
_ATTENTION = "novallm_paged_attention_f32"
_LAYER = "novallm_decoder_layer_f32"
_HEAD_ARGMAX = "novallm_head_argmax_f32"
# The block-code kernels, as (bits, half, dot, sym): codes of `loading.gguf_quant.BlockQuant.bits` (5 in the
# int8-dot layout only), with the scales as float32 or, where they are float16 values (all but Q6_K's), as float16;
# `sym`: signed 8-bit codes without offsets (no m in the header).
_KINDS = [
    (bits, half, dot, sym)
    for dot in (False, True)
    for bits in ((4, 5, 6, 8) if dot else (4, 6, 8))
    for half in (False, True)
    for sym in (False, True)
    if not (half and bits == 6) and not (sym and bits in (4, 5))
]


def _target(bits: int, half: bool, dot: bool, sym: bool = False, expert: bool = False) -> str:
    return f"novallm_q{bits}{'h' * half}{'_sym' * sym}{'_dot' * dot}{'_expert' * expert}_matmul_f32"


def _symbol(bits: int, half: bool, dot: bool, sym: bool = False, expert: bool = False) -> str:
    return f"NovallmQ{bits}{'H' * half}{'Sym' * sym}{'Dot' * dot}{'Expert' * expert}MatmulF32"


_HALF_MATMUL = {False: "novallm_f16_matmul_f32", True: "novallm_bf16_matmul_f32"}  # by bfloat16
QUANT_BLOCK = 32  # k per (d, m) pair; must match kBlock in cpu_kernels.cc


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("NOVALLM_KERNEL_CACHE", os.path.join(base, "novallm-jax", "kernels")))


def variant() -> str:
    """What the kernels built here depend on besides their source (the CPU's flags, extra compiler flags), known
    without building them: a packed-weights cache key holds it, so a first start packs while the kernels compile."""
    return build.cpu_signature() + "\0" + os.environ.get("NOVALLM_KERNEL_FLAGS", "")


def _installed(key: str) -> Path | None:
    """The library pip built at install (setup.py) when it fits this machine, compiler and jaxlib (same key)."""
    if build.switched_off("NOVALLM_INSTALLED_KERNELS"):
        return None
    here = Path(__file__).parent
    found = [here / f"{build.INSTALLED_PREFIX}{key}{s}" for s in importlib.machinery.EXTENSION_SUFFIXES]
    return next((p for p in found if p.exists()), None)


def _library_path(compiler: str) -> Path:
    key = build.key(compiler, jaxlib.__version__)
    installed = _installed(key)
    if installed is not None:
        return installed
    out = _cache_dir() / f"cpu_kernels-{key}.so"
    if not out.exists():
        logging.info("compiling native CPU kernels with %s into %s", compiler, out.parent)
        build.compile_library(compiler, jax.ffi.include_dir(), out)
    return out


_LOCK = threading.Lock()
_LOADED: list = []  # [the library or None], once built or loaded


def buildable() -> bool:
    """Whether the kernels can be built here (or are): a C++ compiler, and not turned off. Does not build them."""
    return bool(_LOADED[0]) if _LOADED else build.compiler() is not None


def build_in_background() -> None:
    """Starts building (or loading) the kernels on a thread, so that the compiler runs while the caller reads weights
    (a first start's longest phase beside it); whoever needs them next waits for that build, not a second one."""
    if not _LOADED and build.compiler() is not None:
        threading.Thread(target=_library, name="novallm-kernel-build", daemon=True).start()


def _library() -> ctypes.CDLL | None:
    """The built kernels with their FFI targets registered, or None where they cannot be (see the log)."""
    with _LOCK:
        if not _LOADED:
            _LOADED.append(_load())
        return _LOADED[0]


def _load() -> ctypes.CDLL | None:
    compiler = build.compiler()
    if compiler is None:
        if not build.turned_off():
            logging.warning("no C++ compiler found: native CPU kernels are off, XLA's dots are used")
        return None
    try:
        with phase("native kernels: build or load"):
            lib = ctypes.CDLL(str(_library_path(compiler)))
        jax.ffi.register_ffi_target(_MATMUL, jax.ffi.pycapsule(lib.NovallmPackedMatmulF32), platform="cpu")
        jax.ffi.register_ffi_target(_ATTENTION, jax.ffi.pycapsule(lib.NovallmPagedAttentionF32), platform="cpu")
        jax.ffi.register_ffi_target(_LAYER, jax.ffi.pycapsule(lib.NovallmDecoderLayerF32), platform="cpu")
        jax.ffi.register_ffi_target(_HEAD_ARGMAX, jax.ffi.pycapsule(lib.NovallmHeadArgmaxF32), platform="cpu")
        for bf16, symbol in ((False, lib.NovallmF16MatmulF32), (True, lib.NovallmBf16MatmulF32)):
            jax.ffi.register_ffi_target(_HALF_MATMUL[bf16], jax.ffi.pycapsule(symbol), platform="cpu")
        for kind in _KINDS:
            for expert in (False, True):
                symbol = getattr(lib, _symbol(*kind, expert=expert))
                jax.ffi.register_ffi_target(_target(*kind, expert=expert), jax.ffi.pycapsule(symbol), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        logging.warning("native CPU kernels are off, XLA's dots are used: %s", e)
        return None
    return lib


def available() -> bool:
    """Whether the native kernels are built and registered (CPU only; False with NOVALLM_NATIVE_KERNELS=0)."""
    return _library() is not None


def int8_dot_available() -> bool:
    """Whether `QuantLinear.with_int8_activations` weights can run here (native kernels built with AVX2)."""
    lib = _library()
    return lib is not None and bool(lib.NovallmHasInt8Dot())


def int8_dot_isa() -> str | None:
    """The instructions of the int8-dot tiles: "avx512-vnni", "avx2", or None where they cannot run."""
    lib = _library()
    return {0: None, 1: "avx2", 2: "avx512-vnni"}[lib.NovallmInt8DotIsa()] if lib is not None else None


def pack(w, dtype=np.float32) -> np.ndarray:
    """[K, N] -> panels [ceil(N / 16), K, 16] (zero-padded columns), the layout `packed_matmul` reads (`dtype`
    uint16: the bits of 16-bit floats, for `half_matmul`)."""
    w = np.asarray(w, dtype)
    k, n = w.shape
    pad = -n % PANEL
    if pad:
        w = np.concatenate([w, np.zeros((k, pad), dtype)], axis=1)
    return np.ascontiguousarray(w.reshape(k, -1, PANEL).transpose(1, 0, 2))


def unpack(panels: np.ndarray, n: int) -> np.ndarray:
    """The inverse of `pack`: [N / 16, K, 16] -> [K, n]."""
    p, k, _ = panels.shape
    return np.asarray(panels).transpose(1, 0, 2).reshape(k, p * PANEL)[:, :n]


def _ffi_call(target: str, out, **kwargs):
    """`jax.ffi.ffi_call` of one of these kernels: registers them first (code may be traced before anything called
    `available()`), and says why where they cannot run instead of XLA's "no FFI handler registered"."""
    if not available():
        raise RuntimeError(
            f"native CPU kernel {target} is not available (no C++ compiler, or NOVALLM_NATIVE_KERNELS=0; see the log)"
        )
    if "_dot_" in target and not int8_dot_available():
        raise RuntimeError(f"native CPU kernel {target} needs a CPU with AVX2")
    return jax.ffi.ffi_call(target, out, **kwargs)


def packed_matmul(x: jax.Array, panels: jax.Array, n: int) -> jax.Array:
    """x [..., K] float32 @ the packed weight of `n` output columns -> [..., n]. Needs `available()`."""
    lead, k = x.shape[:-1], x.shape[-1]
    m = int(np.prod(lead, dtype=np.int64))
    y = _ffi_call(_MATMUL, jax.ShapeDtypeStruct((m, panels.shape[0] * PANEL), jnp.float32))(x.reshape(m, k), panels)
    return y[:, :n].reshape(*lead, n)


def _header_bytes(bits: int, half: bool = False, sym: bool = False) -> int:
    """Bytes of a panel block's scales: d[16] and m[16] (none with `sym`), and with bits=6 (two scales,
    `BlockQuant.d2`) d2[16] after them; float32, or float16 with `half`."""
    return (1 + (not sym) + (bits == 6)) * (2 if half else 4) * PANEL


def _header_scales(panels: np.ndarray, bits: int, half: bool, sym: bool = False) -> np.ndarray:
    """The panels' block scales as float32 [P, KB, rows, 16]: d, m (zeros with `sym`) and d2 for bits 6."""
    header = np.ascontiguousarray(panels[..., : _header_bytes(bits, half, sym)])
    rows = header.view(np.float16 if half else np.float32).astype(np.float32).reshape(*panels.shape[:2], -1, PANEL)
    return np.insert(rows, 1, 0.0, axis=2) if sym else rows


def _header(scales: list[np.ndarray], half: bool, sym: bool = False) -> np.ndarray:
    """Scale rows [P, KB, 16] each, d, m (and d2) -> the header bytes [P, KB, rows * 16 * (2 or 4)]; `sym` leaves m
    out."""
    dtype = np.float16 if half else np.float32
    rows = [a for i, a in enumerate(scales) if not (sym and i == 1)]
    return np.concatenate([np.ascontiguousarray(a.astype(dtype)).view(np.uint8) for a in rows], axis=-1)


def block_bytes(bits: int, half: bool = False, sym: bool = False) -> int:
    """Bytes of one panel block (16 columns x 32 k): the scales, then the codes (4 or 5 bits, or 8 for bits 6 and
    8; 5-bit codes are 4-bit ones and a plane of fifth bits)."""
    return _header_bytes(bits, half, sym) + QUANT_BLOCK * PANEL * {4: 4, 5: 5}.get(bits, 8) // 8


def fits_half(*scales: np.ndarray) -> bool:
    """Whether every value of `scales` is a float16 value (then `pack_quant(half=True)` stores it exactly)."""
    return all(np.array_equal(a.astype(np.float16).astype(np.float32), a) for a in scales)


def half_matmul(x: jax.Array, panels: jax.Array, n: int, bf16: bool) -> jax.Array:
    """x [..., K] float32 @ the weight of `n` output columns in panels of float16 (or `bf16`) bits -> [..., n]: the
    weights widened exactly, then `packed_matmul`'s arithmetic (the same bits as on the float32 weights)."""
    lead, k = x.shape[:-1], x.shape[-1]
    m = int(np.prod(lead, dtype=np.int64))
    y = _ffi_call(_HALF_MATMUL[bf16], jax.ShapeDtypeStruct((m, panels.shape[0] * PANEL), jnp.float32))(
        x.reshape(m, k).astype(jnp.float32), panels
    )
    return y[:, :n].reshape(*lead, n)


def widen_half(bits: np.ndarray, bf16: bool) -> np.ndarray:
    """float16 / bfloat16 bits (uint16) -> the float32 values they hold (exact)."""
    bits = np.asarray(bits, np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32) if bf16 else bits.view(np.float16).astype(np.float32)


def _layout_codes(c: np.ndarray, bits: int, int8: bool) -> np.ndarray:
    """Codes [P, KB, 32, 16] (k, column; bits 6 are 8-bit codes) -> the panels' code bytes [P, KB, block code
    bytes]: k-major for the float32 decode; for the int8-dot kernel, [8 k-quads][16 columns][4 k] (4-bit: 8 columns,
    c and c + 8 in one byte). 5-bit codes (int8-dot only) are their low 4 bits so laid out, then their fifth bits in
    the order of those nibbles, a bit each (little-endian): per k-quad 32 bits for the low nibbles' codes, then 32
    for the high ones'."""
    p, kb = c.shape[:2]
    fifth = None
    if bits == 5:
        if not int8:
            raise ValueError("5-bit codes are laid out for the int8-dot kernel only (the float32 decode reads 8 bits)")
        c, fifth = c & np.uint8(15), c >> np.uint8(4)
    if int8:
        c = c.reshape(p, kb, QUANT_BLOCK // 4, 4, PANEL).swapaxes(-1, -2)  # [P, KB, 8, 16, 4]
        if fifth is not None:
            fifth = fifth.reshape(c.shape[:3] + (4, PANEL)).swapaxes(-1, -2)
        if bits in (4, 5):
            c = c[..., : PANEL // 2, :] | (c[..., PANEL // 2 :, :] << np.uint8(4))
    elif bits in (4, 5):
        c = c[..., : PANEL // 2] | (c[..., PANEL // 2 :] << np.uint8(4))
    c = np.ascontiguousarray(c).view(np.uint8).reshape(p, kb, -1)
    if fifth is None:
        return c
    plane = np.packbits(fifth.reshape(p, kb, -1), axis=-1, bitorder="little")
    return np.concatenate([c, plane], axis=-1)


def _panel_codes(panels: np.ndarray, bits: int, int8: bool, half: bool = False, sym: bool = False) -> np.ndarray:
    """The inverse of `_layout_codes`: codes [P, KB, 32, 16], uint8 (4- and 5-bit) or int8."""
    p, kb, _ = panels.shape
    c = np.ascontiguousarray(panels[..., _header_bytes(bits, half, sym) :])
    if bits in (4, 5):
        nibbles = QUANT_BLOCK * PANEL // 2
        c, plane = c[..., :nibbles], c[..., nibbles:]
        c = c.reshape(p, kb, QUANT_BLOCK // 4, PANEL // 2, 4) if int8 else c.reshape(p, kb, QUANT_BLOCK, PANEL // 2)
        c = np.concatenate([c & np.uint8(15), c >> np.uint8(4)], axis=3 if int8 else -1)
        if bits == 5:  # int8-dot only
            c = c | (np.unpackbits(plane, axis=-1, bitorder="little").reshape(c.shape) << np.uint8(4))
    else:
        c = c.view(np.int8).reshape(p, kb, QUANT_BLOCK // 4, PANEL, 4) if int8 else c.view(np.int8)
    if int8:
        c = c.swapaxes(-1, -2)
    return c.reshape(p, kb, QUANT_BLOCK, PANEL)


def pack_quant(
    codes: np.ndarray,
    d: np.ndarray,
    m: np.ndarray,
    bits: int,
    int8: bool = False,
    d2: np.ndarray | None = None,
    half: bool = False,
    sym: bool = False,
) -> np.ndarray:
    """Block codes of w^T (`codes` [N, K], `d`, `m` (and with bits=6 `d2`) [N, K / 32], as in
    `loading.gguf_quant.BlockQuant`) -> panels [ceil(N / 16), K / 32, `block_bytes`] of {float d[16], float m[16],
    (float d2[16],) codes}, the layout `quant_matmul` reads (codes [32][16]; 4-bit codes hold column j in the low
    nibble and column j + 8 in the high one), or with `int8` the int8-dot kernel's (see `_layout_codes`); `half`
    stores the scales as float16 (they must be float16 values, `fits_half`); `sym` leaves m out (8-bit codes whose
    m is zero: w = d * code). Padding columns are zero."""
    n, k = codes.shape
    if (bits == 6) != (d2 is not None):
        raise ValueError("pack_quant: d2 (the second scale of each block) goes with bits=6, and only with it")
    if sym and (bits not in (6, 8) or np.any(m)):
        raise ValueError("pack_quant: sym=True needs 8-bit codes (bits 6 or 8) and m == 0")
    scales = (d, m) if d2 is None else (d, m, d2)
    if half and not fits_half(*scales):
        raise ValueError("pack_quant: half=True needs scales that are float16 values")
    pad = -n % PANEL
    if pad:
        codes, *scales = (np.concatenate([a, np.zeros((pad, a.shape[1]), a.dtype)]) for a in (codes, *scales))
    p, kb = codes.shape[0] // PANEL, k // QUANT_BLOCK
    c = codes.reshape(p, PANEL, kb, QUANT_BLOCK).transpose(0, 2, 3, 1)  # [P, KB, 32, 16]
    header = _header([a.reshape(p, PANEL, kb).transpose(0, 2, 1) for a in scales], half, sym)
    return np.concatenate([header, _layout_codes(c, bits, int8)], axis=-1)


def unpack_quant(
    panels: np.ndarray, n: int, bits: int, int8: bool = False, half: bool = False, sym: bool = False
) -> np.ndarray:
    """The float32 weight [K, n] that `pack_quant` panels decode to (the float32 kernel's arithmetic, in numpy)."""
    panels = np.asarray(panels)
    p, kb, _ = panels.shape
    scales = _header_scales(panels, bits, half, sym)
    d, m, d2 = (scales[..., i, :] for i in (0, 1, 2 if bits == 6 else 0))
    c = _panel_codes(panels, bits, int8, half, sym)
    d = np.repeat(d[:, :, None, :], QUANT_BLOCK, 2)
    d[:, :, QUANT_BLOCK // 2 :] = d2[:, :, None, :]
    w = d * c.astype(np.float32)  # [P, KB, 32, 16]
    if not sym:  # adding sym's zeros would turn -0 weights into +0, where the kernel keeps d * code
        w = w + m[:, :, None, :]
    return w.reshape(p, kb * QUANT_BLOCK, PANEL).transpose(1, 0, 2).reshape(kb * QUANT_BLOCK, p * PANEL)[:, :n]


def quant_matmul(
    x: jax.Array, panels: jax.Array, n: int, bits: int, int8: bool = False, half: bool = False, sym: bool = False
) -> jax.Array:
    """x [..., K] float32 @ the `pack_quant` weight of `n` output columns -> [..., n]. Needs `available()`; `int8`
    (the panels' layout) quantises x to int8 per block of 32 and runs integer dot products (`int8_dot_available()`);
    `half`: the panels' scales are float16; `sym`: they have no offsets."""
    lead, k = x.shape[:-1], x.shape[-1]
    m = int(np.prod(lead, dtype=np.int64))
    y = _ffi_call(_target(bits, half, int8, sym), jax.ShapeDtypeStruct((m, panels.shape[0] * PANEL), jnp.float32))(
        x.reshape(m, k).astype(jnp.float32), panels
    )
    return y[:, :n].reshape(*lead, n)


def expert_quant_matmul(
    x: jax.Array,
    experts: jax.Array,
    panels: jax.Array,
    n: int,
    bits: int,
    int8: bool = False,
    half: bool = False,
    sym: bool = False,
) -> jax.Array:
    """Row a of x [A, K] float32 @ expert experts[a]'s weight, `pack_quant` panels stacked [E, ...] -> [A, n]. Reads
    each expert with rows once and the others not at all; each row's result equals `quant_matmul` with its expert's
    panels."""
    a = x.shape[0]
    y = _ffi_call(
        _target(bits, half, int8, sym, expert=True), jax.ShapeDtypeStruct((a, panels.shape[1] * PANEL), jnp.float32)
    )(x.astype(jnp.float32), experts.astype(jnp.int32), panels)
    return y[:, :n]


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    positions: jax.Array,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Causal GQA attention of q [B, T, H, hd] over one layer's pages [P, ps, KV, hd] -> [B, T, H * hd].

    Query (b, t) sees the keys at positions <= positions[b, t] (and > it minus the window) through page_table [B, W];
    padding queries (negative positions) give zeros. q float32, pages float32 or bfloat16; head_dim a multiple of 8.
    `scale` multiplies the scores (default head_dim ** -0.5).
    """
    b, t, h, hd = q.shape
    kv = k_pages.shape[2]
    out = _ffi_call(_ATTENTION, jax.ShapeDtypeStruct((b, t, kv, h // kv, hd), jnp.float32))(
        q.reshape(b, t, kv, h // kv, hd).astype(jnp.float32),
        k_pages,
        v_pages,
        page_table.astype(jnp.int32),
        positions.astype(jnp.int32),
        window=np.int64(sliding_window or 0),
        scale=np.float32(hd**-0.5 if scale is None else scale),
    )
    return out.reshape(b, t, h * hd)


def supports_attention(head_dim: int, num_heads: int, num_kv_heads: int) -> bool:
    return head_dim % 8 == 0 and num_heads <= 256


def decoder_layer(
    p: dict,
    x: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    positions: jax.Array,
    rope_cs: tuple[jax.Array, jax.Array],
    cfg,
) -> tuple[jax.Array, ...]:
    """`model.decoder_layer` over x [B, T, D] with paged K/V in one native call (weights `fusable`): returns
    (x, k_pages, v_pages), the pages updated in place (aliased; donate the cache).

    One call instead of ~10 kernel calls and XLA ops per layer: its threads stay awake from phase to phase
    (see cpu_kernels.cc). Attention reads the pages as `paged_attention` does."""
    b, t, d = x.shape
    none = jnp.zeros((0,), jnp.float32)
    cos, sin = (a.reshape(b * t, cfg.head_dim).astype(jnp.float32) for a in rope_cs)
    pages = jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype)
    call = _ffi_call(
        _LAYER, (jax.ShapeDtypeStruct((b * t, d), jnp.float32), pages, pages), input_output_aliases={10: 1, 11: 2}
    )
    out, k_pages, v_pages = call(
        x.reshape(b * t, d).astype(jnp.float32),
        p["attn_norm"],
        p["wqkv"].panels,
        p.get("bqkv", none),
        p.get("q_norm", none),
        p.get("k_norm", none),
        p["wo"].panels,
        p["mlp_norm"],
        p["w_gate_up"].panels,
        p["w_down"].panels,
        k_pages,
        v_pages,
        page_table.astype(jnp.int32),
        positions.astype(jnp.int32),
        cos,
        sin,
        qkv_kind=_kind(p["wqkv"]),
        o_kind=_kind(p["wo"]),
        gate_up_kind=_kind(p["w_gate_up"]),
        down_kind=_kind(p["w_down"]),
        num_heads=np.int64(cfg.num_heads),
        num_kv_heads=np.int64(cfg.num_kv_heads),
        window=np.int64(cfg.sliding_window or 0),
        eps=np.float32(cfg.rms_norm_eps),
        scale=np.float32(cfg.head_dim**-0.5),
    )
    return out.reshape(b, t, d).astype(x.dtype), k_pages, v_pages


def _kind(w) -> np.int64:
    """A weight's `kind` attribute for the decoder-layer kernel: 0 float32 panels, bits, 16 + bits (int8 dot), either
    + 64 with float16 block scales and + 128 without offsets, or 32 (float16) / 33 (bfloat16) panels."""
    if isinstance(w, HalfLinear):
        return np.int64(32 + w.bf16)
    return np.int64(0 if isinstance(w, PackedLinear) else w.bits + 16 * w.int8 + 64 * w.half + 128 * w.sym)


def fusable(params: dict) -> bool:
    """Whether every layer of `params` can run as one `decoder_layer` call: every matmul weight native."""
    return all(isinstance(layer[k], NATIVE_LINEAR) for layer in params["layers"] for k in PACKED_WEIGHTS)


@flax.struct.dataclass
class PackedLinear:
    """A float32 weight [K, n] stored as `pack` panels, for `packed_matmul`; `linear` in model.py dispatches on it."""

    panels: jax.Array
    n: int = flax.struct.field(pytree_node=False)

    @classmethod
    def from_dense(cls, w) -> "PackedLinear":
        return cls(panels=jnp.asarray(pack(w)), n=int(w.shape[1]))

    def apply(self, x: jax.Array) -> jax.Array:
        return packed_matmul(x, self.panels, self.n)


@flax.struct.dataclass
class QuantLinear:
    """A block-quantised weight [K, n] (GGUF codes, see `loading.gguf_quant`; `bits` 4, 5, 8, or 6: Q6_K's 8-bit codes
    with two scales per block) stored as `pack_quant` panels.

    `int8`: the int8-dot layout, whose matmul quantises x to int8 per block of 32, as llama.cpp does: about 5x less
    arithmetic per weight than decoding it to float32, at the cost of x's rounding (results close to, not
    bit-identical with, the float32 weights'). `half`: the block scales are stored as float16 (a Q4_0/1, Q5_0/1 or
    Q8_0 file's are float16 values): 0.625 bytes a 4-bit weight instead of 0.75. `sym`: signed 8-bit codes without
    offsets (w = d * code: Q8_0, Q6_K, and Q5_0's and Q4_0's as `BlockQuant.centred` holds them), no m stored:
    1.0625 bytes an 8-bit weight instead of 1.125, what a batch-1 step of them, bound by the bus, reads."""

    panels: jax.Array
    n: int = flax.struct.field(pytree_node=False)
    bits: int = flax.struct.field(pytree_node=False)
    int8: bool = flax.struct.field(pytree_node=False, default=False)
    half: bool = flax.struct.field(pytree_node=False, default=False)
    sym: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def from_blocks(cls, bq) -> "QuantLinear":
        """From a `BlockQuant` of w^T ([n, K], the checkpoint's [out, in] layout); 5-bit codes in 8 bits (see
        `with_int8_activations`), without offsets where `BlockQuant.centred` takes them out, the scales in float16
        where they are float16 values."""
        bq = bq.to_8bit() if bq.bits == 5 else bq
        centred = bq.centred() if bq.bits in (6, 8) else None
        bq, sym = (centred, True) if centred is not None else (bq, False)
        half = bq.d2 is None and fits_half(bq.d, bq.m)
        panels = pack_quant(bq.codes, bq.d, bq.m, bq.bits, d2=bq.d2, half=half, sym=sym)
        return cls(panels=jnp.asarray(panels), n=int(bq.shape[0]), bits=bq.bits, half=half, sym=sym)

    def to_dense(self) -> np.ndarray:
        return unpack_quant(self.panels, self.n, self.bits, self.int8, self.half, self.sym)

    def _header_rows(self) -> list[np.ndarray]:
        """The header's scale rows [P, KB, 16] as float32: d, m (zeros where `sym`) and d2 for bits 6."""
        return list(_header_scales(np.asarray(self.panels), self.bits, self.half, self.sym).transpose(2, 0, 1, 3))

    def _code_bytes(self) -> np.ndarray:
        return np.asarray(self.panels)[..., _header_bytes(self.bits, self.half, self.sym) :]

    def with_int8_activations(self) -> "QuantLinear":
        """The same weight in the int8-dot layout. 8-bit codes that all fit 5 bits (a Q5_0/1/K file's; the float32
        decode reads them faster from 8) are laid out in 5: 0.75-0.875 bytes a weight instead of 1.0625-1.25 (a
        centred Q5_0 weight's, -16..15, as q + 16 with m = -16 d again)."""
        if self.int8:
            return self
        codes = _panel_codes(np.asarray(self.panels), self.bits, False, self.half, self.sym)
        rows, sym = self._header_rows(), self.sym
        if sym and self.bits == 8 and codes.min() >= -16 and codes.max() < 16:
            m = -16 * rows[0]
            if not self.half or fits_half(m):
                codes, sym, rows[1] = codes + np.int8(16), False, m
        bits = 5 if self.bits == 8 and not sym and codes.min() >= 0 and codes.max() < 32 else self.bits
        codes = _layout_codes(codes.astype(np.uint8) if bits == 5 else codes, bits, True)
        panels = np.concatenate([_header(rows, self.half, sym), codes], axis=-1)
        return QuantLinear(jnp.asarray(panels), self.n, bits, True, self.half, sym)

    def with_float32_scales(self) -> "QuantLinear":
        """The same weight with float32 block scales."""
        if not self.half:
            return self
        panels = np.concatenate([_header(self._header_rows(), False, self.sym), self._code_bytes()], -1)
        return QuantLinear(jnp.asarray(panels), self.n, self.bits, self.int8, sym=self.sym)

    def with_offsets(self) -> "QuantLinear":
        """The same weight with m in its header (zeros where it was `sym`)."""
        if not self.sym:
            return self
        panels = np.concatenate([_header(self._header_rows(), self.half), self._code_bytes()], -1)
        return QuantLinear(jnp.asarray(panels), self.n, self.bits, self.int8, self.half)

    def apply(self, x: jax.Array) -> jax.Array:
        return quant_matmul(x, self.panels, self.n, self.bits, self.int8, self.half, self.sym)


@flax.struct.dataclass
class HalfLinear:
    """A [K, n] weight of a float16 (or `bf16`) GGUF tensor, kept in 16 bits as `pack` panels of its bits: half the
    bytes of float32, the same results (`half_matmul`)."""

    panels: jax.Array
    n: int = flax.struct.field(pytree_node=False)
    bf16: bool = flax.struct.field(pytree_node=False)

    @classmethod
    def from_bits(cls, bits: np.ndarray, bf16: bool) -> "HalfLinear":
        """From the uint16 bits of w^T ([n, K], the checkpoint's [out, in] layout)."""
        return cls(panels=jnp.asarray(pack(np.asarray(bits).T, np.uint16)), n=int(bits.shape[0]), bf16=bf16)

    def to_dense(self) -> np.ndarray:
        return widen_half(unpack(np.asarray(self.panels), self.n), self.bf16)

    def apply(self, x: jax.Array) -> jax.Array:
        return half_matmul(x, self.panels, self.n, self.bf16)


@flax.struct.dataclass
class ExpertQuantLinear:
    """A mixture-of-experts weight [E, K, n] in GGUF block codes: each expert's `QuantLinear` panels, stacked. `apply`
    takes each row's expert; see `expert_quant_matmul`."""

    panels: jax.Array
    n: int = flax.struct.field(pytree_node=False)
    bits: int = flax.struct.field(pytree_node=False)
    int8: bool = flax.struct.field(pytree_node=False, default=False)
    half: bool = flax.struct.field(pytree_node=False, default=False)
    sym: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def from_experts(cls, weights: list[QuantLinear]) -> "ExpertQuantLinear":
        """The experts' weights stacked: one layout for all (float32 scales unless every expert's are float16, offsets
        unless none has any)."""
        if len({w.half for w in weights}) > 1:
            weights = [w.with_float32_scales() for w in weights]
        if len({w.sym for w in weights}) > 1:
            weights = [w.with_offsets() for w in weights]
        first = weights[0]
        return cls(jnp.stack([w.panels for w in weights]), first.n, first.bits, first.int8, first.half, first.sym)

    def expert(self, e: int) -> QuantLinear:
        return QuantLinear(self.panels[e], self.n, self.bits, self.int8, self.half, self.sym)

    def to_dense(self) -> np.ndarray:
        return np.stack([self.expert(e).to_dense() for e in range(self.panels.shape[0])])

    def with_int8_activations(self) -> "ExpertQuantLinear":
        if self.int8:
            return self
        return ExpertQuantLinear.from_experts(
            [self.expert(e).with_int8_activations() for e in range(self.panels.shape[0])]
        )

    def apply(self, x: jax.Array, experts: jax.Array) -> jax.Array:
        return expert_quant_matmul(x, experts, self.panels, self.n, self.bits, self.int8, self.half, self.sym)


NATIVE_LINEAR = (PackedLinear, QuantLinear, HalfLinear)
PACKED_WEIGHTS = ("wqkv", "wo", "w_gate_up", "w_down")
ARGMAX_ROWS = 16  # the most rows `ArgmaxHead.argmax` takes; must match kMaxArgmaxRows in cpu_kernels.cc


@flax.struct.dataclass
class ArgmaxHead:
    """An LM head that also gives a greedy row's token without the full logits: `argmax` computes approximate logits
    with an error bound per column and, exactly, only the panels whose columns the bounds cannot rule out (see
    HeadArgmax in cpu_kernels.cc); the same token as `jnp.argmax(exact.apply(x))`. `apply` is the exact weight's.

    A 16- or 32-bit head gets an int8 copy (a scale per vocabulary column): fewer bytes to read. A head in block
    codes without offsets (Q8_0, Q6_K) gets its int8-dot layout (`approx_kind`), which reads as many bytes but
    multiplies x rounded to int8 in integers: at one row the exact decode to float32 is the bound, not the bus."""

    exact: PackedLinear | QuantLinear | HalfLinear
    codes: jax.Array  # int8 panels [P, K, 16] of the columns' codes, or the exact weight's int8-dot panels
    scales: jax.Array  # float32 [P * 16]: the int8 column r is ~ scales[r] * codes (empty for an int8-dot layout)
    bounds: jax.Array  # float32 [P * 16]: see `of`
    approx_kind: int = flax.struct.field(pytree_node=False, default=-1)  # the int8-dot layout's kind; -1 int8 panels

    @classmethod
    def of(cls, head) -> "ArgmaxHead | None":
        """The head with its approximation, or None where none gains: int8 panels where they read at most 0.6x the
        head's bytes (bounds: |x . w_r - scales[r] * (x . q_r)| <= |x| bounds[r], rounding included), the int8-dot
        layout of a block-coded head without offsets where the int8 dot kernels run (bounds: |w_r|), and neither
        for an int8-dot head (int8 activations) or a weight that is not finite."""
        if not isinstance(head, NATIVE_LINEAR) or getattr(head, "int8", False):
            return None
        if isinstance(head, QuantLinear):
            return cls._int8_dot(head)
        k = head.panels.shape[1]
        if head.panels.shape[0] * k * PANEL > 0.6 * head.panels.nbytes:
            return None
        chunks = [_int8_copy(w) for w in _dense_panels(head)]
        if any(c is None for c in chunks):
            return None
        codes, scales, bounds = (np.concatenate(parts) for parts in zip(*chunks))
        return cls(exact=head, codes=jnp.asarray(codes), scales=jnp.asarray(scales), bounds=jnp.asarray(bounds))

    @classmethod
    def _int8_dot(cls, head: QuantLinear) -> "ArgmaxHead | None":
        panels = np.asarray(head.panels)
        scales = _header_scales(panels, head.bits, head.half, head.sym)  # [P, KB, d m (d2), 16]
        if not int8_dot_available() or scales[:, :, 1].any() or not np.isfinite(scales).all():
            return None
        approx = head.with_int8_activations()
        if approx._header_rows()[1].any():  # a centred Q5_0 head's q + 16: the bounds assume no m
            return None
        norms = _rounded_up(_code_norms(panels, head.bits, head.half, head.sym, scales) * (1 + 1e-6))
        return cls(head, approx.panels, jnp.zeros((0,), jnp.float32), jnp.asarray(norms), int(_kind(approx)))

    def apply(self, x: jax.Array) -> jax.Array:
        return self.exact.apply(x)

    def argmax(self, x: jax.Array) -> jax.Array:
        """The argmax of `apply(x)` over its last axis (the first maximum, or the first NaN), x [M <= ARGMAX_ROWS, K]
        -> int32 [M]."""
        if x.ndim != 2 or x.shape[0] > ARGMAX_ROWS:
            raise ValueError(f"ArgmaxHead.argmax takes x [M <= {ARGMAX_ROWS}, K]; got {x.shape}")
        call = _ffi_call(_HEAD_ARGMAX, jax.ShapeDtypeStruct((x.shape[0],), jnp.int32))
        return call(
            x.astype(jnp.float32),
            self.exact.panels,
            self.codes,
            self.scales,
            self.bounds,
            kind=_kind(self.exact),
            approx_kind=np.int64(self.approx_kind),
            n=np.int64(self.exact.n),
        )


def _rounded_up(a: np.ndarray) -> np.ndarray:
    """float64 a as float32 values no smaller."""
    b = a.astype(np.float32)
    return np.where(b < a, np.nextafter(b, np.float32(np.inf)), b)


def _dense_panels(w: HalfLinear | PackedLinear, chunk: int = 64):
    """A 16- or 32-bit weight's float32 values in `pack`'s panel layout [P, K, 16], `chunk` panels at a time (whole,
    the temporaries of `_int8_copy` took 4x as long, in page faults)."""
    panels = np.asarray(w.panels)
    for p in range(0, panels.shape[0], chunk):
        yield widen_half(panels[p : p + chunk], w.bf16) if isinstance(w, HalfLinear) else panels[p : p + chunk]


def _code_norms(
    panels: np.ndarray, bits: int, half: bool, sym: bool, scales: np.ndarray, chunk: int = 64
) -> np.ndarray:
    """The columns' Euclidean norms [P * 16] of block codes without offsets (w = d * code; Q6_K's second half of a
    block d2 * code), from the integer codes' squares: a third of decoding them to float32."""
    d, d2 = scales[:, :, 0].astype(np.float64), scales[:, :, 2 if bits == 6 else 0].astype(np.float64)
    out = []
    for p in range(0, panels.shape[0], chunk):
        c = _panel_codes(panels[p : p + chunk], bits, False, half, sym).astype(np.int32) ** 2  # [p, KB, 32, 16]
        lo, hi = c[:, :, : QUANT_BLOCK // 2].sum(2), c[:, :, QUANT_BLOCK // 2 :].sum(2)
        out.append((d[p : p + chunk] ** 2 * lo + d2[p : p + chunk] ** 2 * hi).sum(1))
    return np.sqrt(np.concatenate(out)).reshape(-1)


def _norms(w: np.ndarray) -> np.ndarray:
    """The columns' Euclidean norms [P, 16] of panels w [P, K, 16], summed in float64."""
    return np.sqrt(np.einsum("pkj,pkj->pj", w, w, dtype=np.float64))


def _int8_copy(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Panels w [P, K, 16] (float32) as int8 codes, their columns' scales [P * 16] and bounds [P * 16] (see
    `ArgmaxHead`); None if w is not finite."""
    if not np.isfinite(w).all():
        return None
    k = w.shape[1]
    scales = np.maximum(w.max(axis=1), -w.min(axis=1)) / 127  # [P, 16]
    scales[scales == 0] = 1
    codes = np.rint(w / scales[:, None, :])
    # The copy's error, and the float32 rounding of both dot products (K + 1 roundings of at most 2^-24 relative
    # each, doubled). The float32 arithmetic here errs by far less than the rounding term.
    rounding = (k + 2) * 2.0**-22 * (_norms(w) + scales * _norms(codes))
    bound = ((_norms(w - scales[:, None, :] * codes) + rounding) * (1 + 1e-6)).reshape(-1)
    return codes.astype(np.int8), scales.reshape(-1).astype(np.float32), _rounded_up(bound)


def with_argmax_head(params: dict) -> dict:
    """The params with `lm_head` an `ArgmaxHead` where `ArgmaxHead.of` makes one."""
    head = ArgmaxHead.of(params["lm_head"])
    return params if head is None else {**params, "lm_head": head}


def pack_params(params: dict) -> dict:
    """The params pytree with every float32 matmul weight (and `lm_head`) packed for the native kernel."""

    def maybe_pack(w):
        return PackedLinear.from_dense(w) if not isinstance(w, NATIVE_LINEAR) and w.dtype == np.float32 else w

    layers = [{k: maybe_pack(v) if k in PACKED_WEIGHTS else v for k, v in layer.items()} for layer in params["layers"]]
    return {**params, "layers": layers, "lm_head": maybe_pack(params["lm_head"])}


def int8_activations(params: dict) -> dict:
    """The params pytree with every `QuantLinear` in the int8-dot layout (`QuantLinear.with_int8_activations`)."""
    coded = (QuantLinear, ExpertQuantLinear)
    to_int8 = lambda w: w.with_int8_activations() if isinstance(w, coded) else w
    return jax.tree.map(to_int8, params, is_leaf=lambda w: isinstance(w, coded))


def dequantize_params(params: dict) -> dict:
    """The params pytree with every `QuantLinear` and `HalfLinear` decoded to its float32 weight (for XLA's own
    dots)."""
    kept = (QuantLinear, HalfLinear, ExpertQuantLinear)
    dense = lambda w: jnp.asarray(w.to_dense()) if isinstance(w, kept) else w
    return jax.tree.map(dense, params, is_leaf=lambda w: isinstance(w, kept))
