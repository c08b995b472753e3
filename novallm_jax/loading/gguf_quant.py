"""GGUF block-quantised tensors kept in their own codes: w = d * code + m per block of 32 weights of a row.

Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K and Q8_0 have that form, with per-block scales `d` and offsets `m` that decode
exactly to the float32 values the `gguf` package dequantises (`BlockQuant.dequantize` is bit-identical to it). The
native CPU matmul (kernels/native.py, `QuantLinear`) reads these codes with the same arithmetic as the float32
weights, so a Q4 weight costs 0.625-0.75 bytes of memory traffic instead of float32's 4. Q4_0's and Q5_0's signed
codes q - 8 and q - 16 are held as q with m = -8d and -16d: d * q + m is exact and equals d * (q - 8) (both
products and their difference fit float32's mantissa), so they keep 4 and 5 bits too; `BlockQuant.centred` gives
the signed form back where the native kernels read 8-bit codes (no m to store). Q6_K's sub-blocks are 16
weights: its codes (q - 32) are held in 8 bits with a second scale `d2` for the last 16 weights of each block of 32
(`bits=6`); other types load as float32.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from novallm_jax.kernels.native import fits_half

BLOCK = 32  # weights per (d, m) pair
SUPPORTED = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")


@dataclasses.dataclass
class BlockQuant:
    """A [rows, cols] weight as codes [rows, cols] (uint8 0..15 for bits=4, 0..31 for bits=5, int8 for bits=8 and 6)
    and float32 d, m [rows, cols / 32]: w[r, c] = d[r, c // 32] * codes[r, c] + m[r, c // 32] (a product, then a
    sum). bits=6 (Q6_K's sub-blocks of 16): int8 codes, and the last 16 weights of each block of 32 are scaled by d2
    instead of d."""

    codes: np.ndarray
    d: np.ndarray
    m: np.ndarray
    bits: int
    d2: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def dequantize(self) -> np.ndarray:
        rows, cols = self.codes.shape
        codes = self.codes.astype(np.float32).reshape(rows, cols // BLOCK, BLOCK)
        d = np.repeat(self.d[..., None], BLOCK, -1)
        if self.d2 is not None:
            d[..., BLOCK // 2 :] = self.d2[..., None]
        return ((d * codes) + self.m[..., None]).reshape(rows, cols)

    def take_rows(self, index: np.ndarray) -> "BlockQuant":
        return BlockQuant(
            self.codes[index], self.d[index], self.m[index], self.bits, None if self.d2 is None else self.d2[index]
        )

    def to_8bit(self) -> "BlockQuant":
        """The same weights with their codes held in 8 bits (4-bit codes are 0..15)."""
        return self if self.bits in (6, 8) else BlockQuant(self.codes.astype(np.int8), self.d, self.m, 8)

    def centred(self) -> "BlockQuant | None":
        """The same weights as signed 8-bit codes q - c with m = 0, where every block's m is -c d for an integer c (0
        for Q8_0 and Q6_K; Q4_0's 8 and Q5_0's 16, with float16 d) and every q - c fits int8; None otherwise. d (q - c)
        is what d q + m computes: with float16 d both products and their difference are exact in float32."""
        q = self.to_8bit()
        if not self.m.any():
            return BlockQuant(q.codes.astype(np.int8), self.d, self.m, q.bits, self.d2)
        d = self.d.astype(np.float64)
        c = np.divide(-self.m, d, out=np.zeros_like(d), where=d != 0)
        if (
            self.d2 is not None
            or not fits_half(self.d)
            or not np.array_equal(c, np.rint(c))
            or not np.array_equal(-c * d, self.m)
        ):
            return None
        codes = q.codes.astype(np.int16).reshape(*c.shape, BLOCK) - c.astype(np.int16)[..., None]
        codes[self.d == 0] = 0  # what they decode to whatever they are, and the 8-bit layout may fit 5 bits again
        if codes.min() < -128 or codes.max() > 127:
            return None
        return BlockQuant(codes.reshape(q.codes.shape).astype(np.int8), self.d, np.zeros_like(self.m), q.bits)

    def to_5bit(self) -> "BlockQuant":
        """The same weights with 4-bit codes held as 5-bit ones (the same values)."""
        return BlockQuant(self.codes, self.d, self.m, 5) if self.bits == 4 else self

    def to_two_scales(self) -> "BlockQuant":
        """The same weights in the bits=6 form (8-bit codes, d2 = d)."""
        return self if self.bits == 6 else BlockQuant(self.to_8bit().codes, self.d, self.m, 6, self.d.copy())

    @staticmethod
    def concat_rows(parts: list["BlockQuant"]) -> "BlockQuant":
        """Rows of several weights; codes of mixed widths go to the widest: a Q4_K q beside a Q5_K v to 5 bits, beside
        a Q8_0 v to 8, and beside Q6_K codes (a Q4_K_M file's Q4_K q and k with a Q6_K v) to the two-scale form."""
        widths = {p.bits for p in parts}
        if len(widths) != 1:
            widen = {6: BlockQuant.to_two_scales, 8: BlockQuant.to_8bit, 5: BlockQuant.to_5bit}[
                next(b for b in (6, 8, 5) if b in widths)
            ]
            parts = [widen(p) for p in parts]
        cat = [np.concatenate([getattr(p, f) for p in parts]) for f in ("codes", "d", "m")]
        return BlockQuant(*cat, parts[0].bits, None if parts[0].d2 is None else np.concatenate([p.d2 for p in parts]))


@dataclasses.dataclass
class HalfWeight:
    """A [rows, cols] float16 (or `bf16`) GGUF weight as its uint16 bits, for `native.HalfLinear`."""

    bits: np.ndarray
    bf16: bool

    @property
    def shape(self) -> tuple[int, int]:
        return self.bits.shape

    def dequantize(self) -> np.ndarray:
        from novallm_jax.kernels.native import widen_half

        return widen_half(self.bits, self.bf16)

    def take_rows(self, index: np.ndarray) -> "HalfWeight":
        return HalfWeight(self.bits[index], self.bf16)


def half_bits(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> HalfWeight | None:
    """The bits of an F16 / BF16 tensor's raw data (numpy shape `shape`), or None for other types."""
    if type_name not in ("F16", "BF16"):
        return None
    return HalfWeight(np.ascontiguousarray(raw).view(np.uint16).reshape(shape), type_name == "BF16")


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """Bytes [n, groups * group] -> codes [n, 2 * groups * group]: each group's low nibbles, then its high ones."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, 1, group) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (qs & np.uint8(0x0F)).reshape(n, -1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 4 bytes of fifth bits -> [n, 32] bits (a little-endian uint32, bit i for weight i)."""
    qh = np.ascontiguousarray(qh).view(np.uint32).reshape(-1, 1) >> np.arange(32, dtype=np.uint32)
    return (qh & np.uint32(1)).astype(np.uint8)


def _q4_k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes of 6-bit sub-block scales and mins -> two [n, 8] arrays (as in llama.cpp's get_scale_min_k4)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def decode_blocks(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> BlockQuant | None:
    """The codes of a GGUF tensor's raw bytes (`ReaderTensor.data`, numpy shape `shape`), or None if its type is
    not one of `SUPPORTED`."""
    rows, cols = shape
    if type_name not in SUPPORTED or cols % BLOCK:
        return None
    import gguf

    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][1]
    blocks = np.ascontiguousarray(raw, np.uint8).reshape(-1, block_bytes)
    if type_name == "Q8_0":
        d, codes, m, bits = _f16(blocks[:, :2]), blocks[:, 2:].view(np.int8), None, 8
    elif type_name == "Q4_0":
        d, bits = _f16(blocks[:, :2]), 4
        codes, m = _nibbles(blocks[:, 2:], 16), -8 * d
    elif type_name == "Q4_1":
        d, m, bits = _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), 4
        codes = _nibbles(blocks[:, 4:], 16)
    elif type_name == "Q5_0":
        d, bits = _f16(blocks[:, :2]), 5
        codes, m = _nibbles(blocks[:, 6:], 16) | (_high_bits(blocks[:, 2:6]) << np.uint8(4)), -16 * d
    elif type_name == "Q5_1":
        d, m, bits = _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), 5
        codes = _nibbles(blocks[:, 8:], 16) | (_high_bits(blocks[:, 4:8]) << np.uint8(4))
    elif type_name == "Q6_K":  # ql [128], qh [64], int8 scales [16] of sub-blocks of 16, d: as gguf decodes them
        ql = _nibbles(blocks[:, :128], 64)
        qh = blocks[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        qh = (qh & np.uint8(3)).reshape(-1, 256)
        codes, bits = (ql | (qh << np.uint8(4))).astype(np.int8) - np.int8(32), 6
        sub = _f16(blocks[:, 208:210])[:, None] * blocks[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]
        d, d2 = sub[:, 0::2], sub[:, 1::2].reshape(rows, cols // BLOCK)
        m = None
    else:  # Q4_K, Q5_K: super-blocks of 256 = 8 sub-blocks of 32 with 6-bit scales and mins
        sc, mn = _q4_k_scales(blocks[:, 4:16])
        d = _f16(blocks[:, :2])[:, None] * sc.astype(np.float32)
        m = -(_f16(blocks[:, 2:4])[:, None] * mn.astype(np.float32))  # d * q + (-dm) == d * q - dm exactly
        if type_name == "Q4_K":
            codes, bits = _nibbles(blocks[:, 16:], 32), 4
        else:  # 32 bytes of fifth bits (bit i of each byte for sub-block i), then the nibbles
            high = blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
            high = (high & np.uint8(1)).reshape(-1, 256)
            codes, bits = _nibbles(blocks[:, 48:], 32) | (high << np.uint8(4)), 5
    d = np.asarray(d, np.float32).reshape(rows, cols // BLOCK)
    m = np.zeros_like(d) if m is None else np.asarray(m, np.float32).reshape(rows, cols // BLOCK)
    return BlockQuant(np.ascontiguousarray(codes.reshape(rows, cols)), d, m, bits, d2 if bits == 6 else None)
