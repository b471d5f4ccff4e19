"""K-quant blocks for GGUF: Q4_K, Q5_K and Q6_K, packed as llama.cpp lays them out and quantized as its reference
quantizer does without an importance matrix (what `llama-quantize` runs when no imatrix is given). The `gguf`
package only dequantizes these types; this module writes them, in numpy, every block of a tensor at once.

The layouts (ggml-common.h), per super-block of 256 weights:
- Q4_K (144 bytes): fp16 d, fp16 dmin, 12 bytes holding eight 6-bit scales and eight 6-bit mins, 128 bytes of 4-bit
  codes. Sub-block s (32 weights) decodes as d * scale_s * q - dmin * min_s.
- Q5_K (176 bytes): as Q4_K plus 32 bytes holding the fifth bit of every code (bit s of byte j: weight j of
  sub-block s).
- Q6_K (210 bytes): 128 bytes of low 4 bits, 64 bytes of high 2 bits, sixteen int8 scales (one per 16 weights),
  fp16 d; weight decodes as d * scale * (q - 32).

How the codes are chosen (ggml-quants.c, `quantize_row_q{4,5,6}_K_ref`): each 32-weight sub-block of Q4_K/Q5_K gets
an affine fit (scale, min <= 0) searched over a small grid of inverse scales, each candidate's codes refitted by
weighted least squares (weights |x| + rms of the sub-block), the best weighted squared error kept; the eight
scales and mins are then quantized to 6 bits against the super-block's largest, and the codes recomputed with the
rounded scales. Q6_K fits a symmetric scale per 16 weights (19 candidate scales, weights x^2), quantizes the 16
scales to int8 against the largest, and recomputes the codes. Every arithmetic step is float32 in the order
llama.cpp's C performs it (sums accumulate left to right), so the bytes match its reference quantizer's;
`tests/interop/test_kquants.py` checks that against llama.cpp's own `ggml_quantize_chunk` where the xllamacpp
wheel is installed, and checks that `gguf.quants.dequantize` of the bytes equals `dequantize_blocks` of the codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK_K = 256
TYPE_SIZE = {"q4_k": 144, "q5_k": 176, "q6_k": 210}  # bytes per super-block of 256 weights
K_TYPES = tuple(TYPE_SIZE)
GROUP_MAX_EPS = np.float32(1e-15)  # below this largest |x| (or |scale|) a group is all zeros, as in ggml

_F32 = np.float32
# (codes 0..nmax, grid start, grid step, grid steps) of the affine search, as the reference quantizers call it
_AFFINE = {"q4_k": (15, -1.0, 0.1, 20), "q5_k": (31, -0.5, 0.1, 15)}
_CHUNK = 4096  # super-blocks quantized together: bounds the temporary arrays to a few tens of MB


@dataclass
class KBlocks:
    """The codes of S super-blocks of one K-quant type, before packing.

    d, dmin: (S,) float16 super-block scales (dmin None for Q6_K); scales: (S, 8) uint8 6-bit sub-block scales
    (Q4_K/Q5_K) or (S, 16) int8 (Q6_K); mins: (S, 8) uint8 6-bit sub-block mins (None for Q6_K); q: (S, 256)
    uint8 codes in weight order (0..15, 0..31 or 0..63)."""

    kind: str
    d: np.ndarray
    dmin: np.ndarray | None
    scales: np.ndarray
    mins: np.ndarray | None
    q: np.ndarray


def _nearest(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even (it adds 1.5 * 2^23 in float32)."""
    return np.rint(v).astype(np.int32)


def _sum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis in float32, left to right, as ggml's C loops add (numpy's own sum is pairwise)."""
    return np.add.accumulate(a, axis=-1, dtype=_F32)[..., -1]


def _affine_search(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants on each row of x (B, n) with weights w: (scale, -min, codes) minimising the weighted
    squared error of scale * code + min, min <= 0, codes 0..nmax."""
    low = np.minimum(x.min(axis=1), _F32(0))
    hi = x.max(axis=1)
    flat = hi == low
    start = low
    hi = np.where(flat, low + _F32(1), hi)  # flat rows are answered below; keep the divisions finite
    sum_w, sum_x = _sum(w), _sum(w * x)

    def codes(iscale: np.ndarray, low: np.ndarray) -> np.ndarray:
        return np.clip(_nearest(iscale[:, None] * (x - low[:, None])), 0, nmax).astype(_F32)

    def error(scale: np.ndarray, low: np.ndarray, q: np.ndarray) -> np.ndarray:
        diff = scale[:, None] * q + low[:, None] - x
        return _sum(w * (diff * diff))

    iscale = _F32(nmax) / (hi - low)
    scale = _F32(1) / iscale
    best_q = codes(iscale, low)
    best = error(scale, low, best_q)
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(nstep + 1):
            # the grid is laid over [current min, max]: ggml moves `min` to each better fit as it goes
            iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / (hi - low)
            q = codes(iscale, low)
            wq = w * q
            sum_l, sum_l2, sum_xl = _sum(wq), _sum(wq * q), _sum(wq * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive, _F32(0), this_min)
            current = error(this_scale, this_min, q)
            better = (det > 0) & (current < best)
            best = np.where(better, current, best)
            scale = np.where(better, this_scale, scale)
            low = np.where(better, this_min, low)
            best_q = np.where(better[:, None], q, best_q)
    scale, low = np.where(flat, _F32(0), scale), np.where(flat, start, low)
    best_q = np.where(flat[:, None], _F32(0), best_q)
    return scale.astype(_F32), (-low).astype(_F32), best_q.astype(np.uint8)


def _symmetric_search(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants (weights x^2, 19 candidate scales) on each row of x (B, n): (scale, codes 0..2 nmax - 1)
    minimising the weighted squared error of scale * (code - nmax)."""
    rows = np.arange(x.shape[0])
    peak = x[rows, np.argmax(np.abs(x), axis=1)]  # the first value of largest magnitude, sign kept
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(zero, _F32(1), peak)
    w = x * x

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        level = np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1).astype(_F32)
        return level, _sum(w * x * level), _sum(w * level * level)

    level, sumlx, suml2 = fit(_F32(-nmax) / peak)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0))
        best = scale * sumlx
        for step in (*range(-9, 0), *range(1, 10)):
            candidate, slx, sl2 = fit(-(_F32(nmax) + _F32(0.1) * _F32(step)) / peak)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            level = np.where(better[:, None], candidate, level)
            scale = np.where(better, slx / sl2, scale)
            best = np.where(better, scale * slx, best)
    codes = np.where(zero[:, None], _F32(0), level + _F32(nmax))
    return np.where(zero, _F32(0), scale).astype(_F32), codes.astype(np.uint8)


def _largest(values: np.ndarray) -> np.ndarray:
    """ggml's running `if (v > best) best = v` from 0 over the last axis: max(values), or +0 when none is above 0."""
    top = values.max(axis=-1)
    return np.where(top > 0, top, _F32(0)).astype(_F32)


def _quantize_affine(x: np.ndarray, kind: str) -> KBlocks:
    """Q4_K / Q5_K codes of x (S, 256) float32 (quantize_row_q4_K_ref / quantize_row_q5_K_ref)."""
    nmax, rmin, rdelta, nstep = _AFFINE[kind]
    s = x.shape[0]
    sub = x.reshape(s * 8, 32)
    av_x = np.sqrt(_sum(sub * sub) / _F32(32))
    scales, mins, q = _affine_search(sub, av_x[:, None] + np.abs(sub), nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(s, 8), mins.reshape(s, 8)
    max_scale, max_min = _largest(scales), _largest(mins)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0))
        inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0))
    # nearest_int into a uint8_t, then MIN(63, .)
    ls = np.minimum(_nearest(inv_scale[:, None] * scales) % 256, 63).astype(np.uint8)
    lm = np.minimum(_nearest(inv_min[:, None] * mins) % 256, 63).astype(np.uint8)
    d = (max_scale / _F32(63)).astype(np.float16)
    dmin = (max_min / _F32(63)).astype(np.float16)
    step = d.astype(_F32)[:, None] * ls.astype(_F32)  # (S, 8)
    offset = dmin.astype(_F32)[:, None] * lm.astype(_F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = _nearest((sub.reshape(s, 8, 32) + offset[..., None]) / step[..., None])
    again = np.clip(again, 0, nmax).astype(np.uint8)
    q = np.where((step != 0)[..., None], again, q.reshape(s, 8, 32))  # a zero scale keeps the search's codes
    return KBlocks(kind, d, dmin, ls, lm, q.reshape(s, QK_K))


def _quantize_q6(x: np.ndarray) -> KBlocks:
    """Q6_K codes of x (S, 256) float32 (quantize_row_q6_K_ref)."""
    s = x.shape[0]
    sub = x.reshape(s * 16, 16)
    scales, q = _symmetric_search(sub, 32)
    scales, q = scales.reshape(s, 16), q.reshape(s, 16, 16)
    rows = np.arange(s)
    max_scale = scales[rows, np.argmax(np.abs(scales), axis=1)]  # first of largest magnitude, sign kept
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = _F32(-128) / np.where(empty, _F32(1), max_scale)
        d = (_F32(1) / iscale).astype(np.float16)
        sc = np.minimum(_nearest(iscale[:, None] * scales), 127).astype(np.int8)
        step = d.astype(_F32)[:, None] * sc.astype(_F32)
        again = _nearest(sub.reshape(s, 16, 16) / step[..., None])
    again = (np.clip(again, -32, 31) + 32).astype(np.uint8)
    q = np.where((step != 0)[..., None], again, q)
    # an all-zero super-block is written as zero bytes (d = 0, scales 0, codes 0)
    d = np.where(empty, np.float16(0), d)
    sc = np.where(empty[:, None], np.int8(0), sc)
    q = np.where(empty[:, None, None], np.uint8(0), q)
    return KBlocks("q6_k", d, None, sc, None, q.reshape(s, QK_K))


def quantize_blocks(x: np.ndarray, kind: str) -> KBlocks:
    """The K-quant codes of x (any shape whose last axis is a multiple of 256), one super-block per 256 weights of
    each row, in row-major order."""
    if kind not in TYPE_SIZE:
        raise ValueError(f"{kind!r} is not a K-quant type ({', '.join(K_TYPES)})")
    if x.shape[-1] % QK_K:
        raise ValueError(f"rows of {x.shape[-1]} do not split into super-blocks of {QK_K}")
    flat = np.ascontiguousarray(x, dtype=_F32).reshape(-1, QK_K)
    parts = [
        _quantize_q6(flat[i : i + _CHUNK]) if kind == "q6_k" else _quantize_affine(flat[i : i + _CHUNK], kind)
        for i in range(0, flat.shape[0], _CHUNK)
    ]

    def join(field: str) -> np.ndarray | None:
        values = [getattr(p, field) for p in parts]
        return None if values[0] is None else np.concatenate(values)

    return KBlocks(kind, join("d"), join("dmin"), join("scales"), join("mins"), join("q"))  # type: ignore[arg-type]


def _pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> the 12 bytes of Q4_K/Q5_K: bytes 0-3 scales 0-3, 4-7 mins 0-3 (top two bits:
    the high bits of scales/mins 4-7), 8-11 the low nibbles of scales 4-7 and mins 4-7."""
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def pack(blocks: KBlocks) -> np.ndarray:
    """(S, type size) uint8: the super-blocks' bytes in llama.cpp's layout."""
    s = blocks.q.shape[0]
    d = blocks.d.astype(np.float16).view(np.uint8).reshape(s, 2)
    if blocks.kind == "q6_k":
        q = blocks.q.reshape(s, 2, 4, 32)  # (half of 128, quarter of 32, weight)
        ql = np.concatenate([q[:, :, 0] & 0xF | (q[:, :, 2] & 0xF) << 4, q[:, :, 1] & 0xF | (q[:, :, 3] & 0xF) << 4], 2)
        qh = (q[:, :, 0] >> 4) | (q[:, :, 1] >> 4) << 2 | (q[:, :, 2] >> 4) << 4 | (q[:, :, 3] >> 4) << 6
        parts = [ql.reshape(s, 128), qh.reshape(s, 64), blocks.scales.astype(np.int8).view(np.uint8), d]
    else:
        assert blocks.dmin is not None and blocks.mins is not None
        dmin = blocks.dmin.astype(np.float16).view(np.uint8).reshape(s, 2)
        q = blocks.q.reshape(s, 4, 2, 32)  # (pair of sub-blocks, which of the pair, weight)
        low = (q[:, :, 0] & 0xF) | (q[:, :, 1] & 0xF) << 4
        parts = [d, dmin, _pack_scales(blocks.scales, blocks.mins)]
        if blocks.kind == "q5_k":
            high = (blocks.q.reshape(s, 8, 32) >> 4) & 1  # (sub-block, weight): bit s of byte j
            qh = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
            parts.append(qh)
        parts.append(low.reshape(s, 128))
    return np.concatenate(parts, axis=1).astype(np.uint8)


def dequantize_blocks(blocks: KBlocks) -> np.ndarray:
    """(S, 256) float32 weights the codes stand for, computed as llama.cpp's dequantize_row_q*_K does."""
    s = blocks.q.shape[0]
    d = blocks.d.astype(_F32)
    if blocks.kind == "q6_k":
        step = d[:, None] * blocks.scales.astype(_F32)  # (S, 16)
        levels = (blocks.q.astype(np.int16) - 32).astype(_F32).reshape(s, 16, 16)
        return (step[..., None] * levels).reshape(s, QK_K)
    assert blocks.dmin is not None and blocks.mins is not None
    step = d[:, None] * blocks.scales.astype(_F32)
    offset = blocks.dmin.astype(_F32)[:, None] * blocks.mins.astype(_F32)
    return (step[..., None] * blocks.q.astype(_F32).reshape(s, 8, 32) - offset[..., None]).reshape(s, QK_K)


def quantize(x: np.ndarray, kind: str) -> np.ndarray:
    """x (..., K), K a multiple of 256 -> uint8 (..., K / 256 * type size): the tensor's GGUF data of type kind."""
    packed = pack(quantize_blocks(x, kind))
    return packed.reshape(*x.shape[:-1], x.shape[-1] // QK_K * TYPE_SIZE[kind])
