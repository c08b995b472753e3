"""Numpy quantisers for the GGUF K-quants the `gguf` package cannot write (Q4_K, Q5_K, Q6_K).

They write valid blocks, in llama.cpp's layout (ggml-common.h's block_q4_K / block_q5_K / block_q6_K), that
llama.cpp and `gguf.quants.dequantize` read; the scales come from each sub-block's range in one pass, not from
llama.cpp's iterative search (make_qkx2_quants / make_qx_quants), so the rounding error is somewhat larger than
llama-quantize's. Good for test and benchmark files, not for publishing a model.
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _f16(a: np.ndarray) -> np.ndarray:
    """float16 values of `a` (as stored), back in float32."""
    return a.astype(np.float16).astype(np.float32)


def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, 0 where b is 0."""
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape, np.float32), where=b != 0)


def _scale_min_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """[n, 8] 6-bit scales and mins -> the 12 bytes that llama.cpp's get_scale_min_k4 reads back."""
    d = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    m = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    md = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([d, m, md], axis=1).astype(np.uint8)


def _affine_codes(x: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Super-blocks x [n, 256] -> (d, dmin [n] float16 bytes, packed scales [n, 12], codes q [n, 256] in
    0..levels-1) for x ~ d * sc * q - dmin * mn per sub-block of 32 (Q4_K: 16 levels, Q5_K: 32)."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    offset = np.maximum(0.0, -sub.min(-1))  # subtracted: the sub-block minimum, if negative
    scale = (sub.max(-1) + offset) / (levels - 1)
    d, dmin = _f16(scale.max(-1) / 63), _f16(offset.max(-1) / 63)
    sc = np.clip(np.rint(_divide(scale, d[:, None])), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(_divide(offset, dmin[:, None])), 0, 63).astype(np.uint8)
    eff_scale, eff_min = d[:, None] * sc, dmin[:, None] * mn
    q = np.clip(np.rint(_divide(sub + eff_min[..., None], eff_scale[..., None])), 0, levels - 1).astype(np.uint8)
    head = np.stack([d, dmin], 1).astype(np.float16).view(np.uint8)
    return head, _scale_min_k4(sc, mn), q.reshape(n, QK_K)


def _low_nibbles(q: np.ndarray) -> np.ndarray:
    """Codes [n, 256] -> 128 bytes: per 64 weights, byte l holds weight l (low nibble) and weight 32 + l (high)."""
    q = (q & 0x0F).reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """x [..., cols] (cols a multiple of 256) -> Q4_K blocks [..., cols / 256 * 144] (d, dmin, scales, qs)."""
    lead = np.shape(x)[:-1]
    head, scales, q = _affine_codes(np.asarray(x, np.float32).reshape(-1, QK_K), 16)
    return np.concatenate([head, scales, _low_nibbles(q)], axis=1).reshape(*lead, -1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """x [..., cols] -> Q5_K blocks [..., cols / 256 * 176] (d, dmin, scales, qh: bit i of byte l is the fifth bit
    of weight 32 i + l, qs)."""
    lead = np.shape(x)[:-1]
    head, scales, q = _affine_codes(np.asarray(x, np.float32).reshape(-1, QK_K), 32)
    high = (q >> 4).reshape(-1, 8, 32) << np.arange(8, dtype=np.uint8)[:, None]
    qh = np.bitwise_or.reduce(high, axis=1).astype(np.uint8)
    return np.concatenate([head, scales, qh, _low_nibbles(q)], axis=1).reshape(*lead, -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """x [..., cols] -> Q6_K blocks [..., cols / 256 * 210] (ql, qh, int8 scales of 16 sub-blocks of 16, d):
    x ~ d * sc * (q - 32), the sub-block's largest magnitude at code 0 (q - 32 = -32) as llama.cpp places it."""
    lead = np.shape(x)[:-1]
    sub = np.asarray(x, np.float32).reshape(-1, 16, 16)
    n = sub.shape[0]
    peak = np.take_along_axis(sub, np.abs(sub).argmax(-1)[..., None], -1)[..., 0]
    scale = peak / -32
    d = _f16(np.abs(scale).max(-1) / 127)
    sc = np.clip(np.rint(_divide(scale, d[:, None])), -128, 127).astype(np.int8)
    eff = d[:, None] * sc
    q = (np.clip(np.rint(_divide(sub, eff[..., None])), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)
    # Per half of 128: ql byte l holds weights l (low nibble) and 64 + l; qh byte l bits 2s, 2s+1 of weight 32 s + l.
    ql = ((q[:, :, :64] & 0x0F) | ((q[:, :, 64:] & 0x0F) << 4)).reshape(n, 128)
    hi = (q >> 4).reshape(n, 2, 4, 32) << (2 * np.arange(4, dtype=np.uint8))[:, None]
    qh = np.bitwise_or.reduce(hi, axis=2).astype(np.uint8).reshape(n, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.astype(np.float16).view(np.uint8)[:, None].reshape(n, 2)], 1)
    return out.reshape(*lead, -1)


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
