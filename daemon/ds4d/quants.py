"""Weight quantizers: float32 matrices -> exact GGML block bytes, for the tiny-model generator (`ds4d make-tiny`).

Owns: encoding (rows, cols) float32 matrices into the GGML byte layouts of the types a ds4 GGUF uses (F32, F16, BF16,
Q8_0, Q2_K, Q4_K, IQ2_XXS; MODEL.md §2.2), and `random_blocks`, which fills full-size tensors with valid random
blocks fast when the values do not matter. F32/F16/BF16/Q8_0 are delegated to `gguf.quants`; Q2_K, Q4_K and
IQ2_XXS are encoded here, because `gguf.quants` only decodes them (it is the oracle the tests decode with).

Does not own: decoding (gguf.quants in Python, the native kernels at run time), GGUF writing, tensor names or
types per tensor (the generator decides), or matching llama.cpp's quantizers bit for bit: these are our own
least-squares searches, good enough that tiny models behave like quantized ones, not a production quantizer.

Every quantizer works on the flattened list of blocks, in chunks of about `_CHUNK_WEIGHTS`, so memory stays
bounded whatever the matrix shape (one row of 4096 or a 4096 x 2048 expert slice alike).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import IQ2_XXS as _GGUF_IQ2_XXS
from gguf.quants import dequantize as _gguf_dequantize
from gguf.quants import quantize as _gguf_quantize

SUPPORTED = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q2_K, T.Q4_K, T.IQ2_XXS)
QK_K = 256  # super-block size of the K and IQ types

# Weights per quantizer chunk: the candidate searches hold a few hundred bytes of temporaries per weight, so this
# keeps them at a few MB (measured fastest between 2^14 and 2^17 here).
_CHUNK_WEIGHTS = 1 << 15
# Bytes per random_blocks chunk: big enough to amortize numpy call overhead, small enough to stay cache-friendly.
_RANDOM_CHUNK_BYTES = 4 << 20


def block_size(qtype: int) -> int:
    """Weights per block (1 for the float types)."""
    return GGML_QUANT_SIZES[T(qtype)][0]


def row_bytes(qtype: int, cols: int) -> int:
    """Bytes of one row of `cols` weights; `cols` must be a multiple of the block size."""
    bs, ts = GGML_QUANT_SIZES[T(qtype)]
    if cols % bs:
        raise ValueError(f"{T(qtype).name}: row length {cols} is not a multiple of the block size {bs}")
    return cols // bs * ts


def quantize(w: np.ndarray, qtype: int, importance: np.ndarray | None = None) -> np.ndarray:
    """Encode `w` (rows, cols) as `qtype`; returns uint8 (rows, row_bytes(qtype, cols)).

    `importance` (cols,) weights the squared error per column (an imatrix). It is used by Q2_K, Q4_K and IQ2_XXS
    and ignored by the others (they have nothing to search). IQ2_XXS needs one; without it the fallback is
    importance[col] = sum over rows of w[row, col]**2 (MODEL.md §2.2).
    """
    qtype = T(qtype)
    if qtype not in SUPPORTED:
        raise ValueError(f"unsupported type {qtype.name}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {w.shape}")
    rows, cols = w.shape
    nbytes = row_bytes(qtype, cols)
    if not np.isfinite(w).all():
        raise ValueError("cannot quantize non-finite weights")
    if qtype in (T.F32, T.F16, T.BF16, T.Q8_0):
        # Copied because F32 comes back as `w` itself: the bytes must never alias the caller's matrix.
        return np.array(_gguf_quantize(w, qtype), copy=True).view(np.uint8).reshape(rows, nbytes)

    if importance is None and qtype == T.IQ2_XXS:
        importance = (w.astype(np.float64) ** 2).sum(axis=0)
    if importance is None:
        imp = np.ones(cols, np.float32)
    else:
        imp = np.asarray(importance, dtype=np.float32).reshape(-1)
        if imp.shape != (cols,) or not np.isfinite(imp).all() or (imp < 0).any():
            raise ValueError(f"importance must be {cols} finite non-negative values")
        # A zero importance would leave a block's fit undetermined (0/0); floor it far below anything that matters.
        imp = np.maximum(imp, np.float32(1e-6) * imp.mean()) if imp.max() > 0 else np.ones(cols, np.float32)

    encode = {T.Q2_K: _encode_q2_k, T.Q4_K: _encode_q4_k, T.IQ2_XXS: _encode_iq2_xxs}[qtype]
    xb = w.reshape(-1, QK_K)                                     # (n_blocks, 256), row-major so rows stay contiguous
    ib = np.broadcast_to(imp, w.shape).reshape(-1, QK_K)
    step = max(1, _CHUNK_WEIGHTS // QK_K)
    out = np.concatenate([encode(xb[i:i + step], ib[i:i + step]) for i in range(0, len(xb), step)])
    return out.reshape(rows, nbytes)


# ---------------------------------------------------------------------------------------------------------------
# K-quants (Q2_K, Q4_K)
#
# A super-block of 256 is cut into sub-blocks (16 of 16 for Q2_K, 8 of 32 for Q4_K), each decoded as
# a*L - b with L in [0, nmax] and a, b >= 0. Per sub-block we try a fan of step sizes around the min-max one,
# round to L, refit (a, b) by weighted least squares for those L, and keep the best. The sub-block a's and b's
# are then quantized against one f16 super-block scale each (d, dmin: 6-bit codes for Q4_K, 4-bit for Q2_K) and
# L is re-rounded against the quantized values, which recovers most of what the coarse scales cost.
# ---------------------------------------------------------------------------------------------------------------


def _fit_affine(x: np.ndarray, wt: np.ndarray, nmax: int, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best (a, b) per sub-block for x ~ a*L - b, L integer in [0, nmax], a >= 0, b >= 0 (weighted squares)."""
    lo = np.minimum(x.min(axis=1), 0)                            # the offset -b can't be positive: keep 0 reachable
    span = x.max(axis=1) - lo
    inv = (nmax + steps) / np.where(span > 0, span, 1)[:, None]  # (N, K) 1 / step size; span 0 means all L = 0
    L = np.clip(np.rint((x - lo[:, None])[:, None, :] * inv[:, :, None]), 0, nmax)       # (N, K, n)

    w3 = wt[:, None, :]
    sw = wt.sum(axis=1)[:, None]
    sx = (wt * x).sum(axis=1)[:, None]
    sl = (w3 * L).sum(axis=2)
    sll = (w3 * L * L).sum(axis=2)
    slx = (w3 * L * x[:, None, :]).sum(axis=2)
    det = sw * sll - sl * sl
    ok = det > 0
    safe = np.where(ok, det, 1)
    # det = 0 means all L are equal: fit the offset alone (the mean), then let the check below handle a positive one.
    a = np.where(ok, (sw * slx - sl * sx) / safe, 0)             # >= 0: L never decreases as x grows
    c = np.where(ok, (sll * sx - sl * slx) / safe, sx / sw)
    # A positive offset is not representable (it decodes as -dmin * m, m >= 0): refit the slope through the origin.
    pos = c > 0
    a = np.where(pos, slx / np.where(sll > 0, sll, 1), a)
    c = np.where(pos, 0, c)
    err = (w3 * (a[:, :, None] * L + c[:, :, None] - x[:, None, :]) ** 2).sum(axis=2)
    k = err.argmin(axis=1)[:, None]
    return np.take_along_axis(a, k, 1)[:, 0], -np.take_along_axis(c, k, 1)[:, 0]


def _quantize_scales(v: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per super-block f16 scale and integer codes in [0, levels] for non-negative v (n_blocks, n_sub)."""
    d = (v.max(axis=1) / levels).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    q = np.where(df > 0, np.rint(v / np.where(df > 0, df, 1)), 0)
    return d, np.clip(q, 0, levels).astype(np.uint8)


def _k_quant(x: np.ndarray, imp: np.ndarray, sub: int, nmax: int, levels: int, steps: np.ndarray):
    """Shared K-quant search: returns d, dmin (f16), scale codes, min codes (n_blocks, n_sub) and L (n_blocks, 256)."""
    n = len(x)
    xs, ws = x.reshape(-1, sub), imp.reshape(-1, sub)
    a, b = _fit_affine(xs, ws, nmax, steps)
    d, sc = _quantize_scales(a.reshape(n, -1), levels)
    dmin, mn = _quantize_scales(b.reshape(n, -1), levels)
    aq = (d.astype(np.float32)[:, None] * sc).reshape(-1, 1)    # (n_sub_total, 1) decoded step
    bq = (dmin.astype(np.float32)[:, None] * mn).reshape(-1, 1)
    L = np.where(aq > 0, np.rint((xs + bq) / np.where(aq > 0, aq, 1)), 0)
    return d, dmin, sc, mn, np.clip(L, 0, nmax).astype(np.uint8).reshape(n, QK_K)


# Step-size fans, as multiples of the min-max step: nmax + delta levels across the sub-block's range.
_Q4_K_STEPS = np.arange(-1.0, 1.05, 0.1, dtype=np.float32)
_Q2_K_STEPS = np.arange(-0.5, 1.05, 0.1, dtype=np.float32)


def _encode_q4_k(x: np.ndarray, imp: np.ndarray) -> np.ndarray:
    """block_q4_K {d f16, dmin f16, scales[12] (8 x 6-bit scale + 8 x 6-bit min), qs[128] (4-bit L)} = 144 B."""
    d, dmin, sc, mn, L = _k_quant(x, imp, 32, 15, 63, _Q4_K_STEPS)
    # 6-bit packing: bytes 0-3 / 4-7 hold scales / mins 0-3 plus the top 2 bits of 4-7; bytes 8-11 the low nibbles.
    scales = np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4) << 6,
                             mn[:, :4] | (mn[:, 4:] >> 4) << 6,
                             (sc[:, 4:] & 0xF) | (mn[:, 4:] & 0xF) << 4], axis=1)
    L = L.reshape(-1, 4, 2, 32)                                  # sub-blocks 2c and 2c+1 share byte column c
    qs = (L[:, :, 0] | L[:, :, 1] << 4).reshape(-1, 128)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], axis=1)


def _encode_q2_k(x: np.ndarray, imp: np.ndarray) -> np.ndarray:
    """block_q2_K {scales[16] (low nibble scale, high nibble min), qs[64] (2-bit L), d f16, dmin f16} = 84 B."""
    d, dmin, sc, mn, L = _k_quant(x, imp, 16, 3, 15, _Q2_K_STEPS)
    L = L.reshape(-1, 2, 4, 32)                                  # weight 128h + 32s + l lives in byte 32h + l, bits 2s
    qs = (L[:, :, 0] | L[:, :, 1] << 2 | L[:, :, 2] << 4 | L[:, :, 3] << 6).reshape(-1, 64)
    return np.concatenate([sc | mn << 4, qs, d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2)],
                          axis=1)


# ---------------------------------------------------------------------------------------------------------------
# IQ2_XXS
#
# A block of 256 is 8 groups of 32; a group is 4 runs of 8 weights, each decoded as s * grid[i] * signs, where
# grid is GGML's iq2xxs_grid (256 points of 8 magnitudes in {8, 25, 43}), 7 sign bits are stored and the 8th
# makes the count of minus signs even (ksigns_iq2xs), and s = d * (0.5 + ls) / 4 with a 4-bit group code ls and
# an f16 block d. Signs come from the weights (an odd run flips its cheapest weight); for a fixed sign pattern the
# weighted error of grid point g at scale s is C - 2 s A[g] + s^2 B[g] with A = (w*y) . g, B = w . g^2, so the
# search over all 256 points at any scale is one (R, 16) x (16, 256) matmul and an argmin. Per group we try a fan
# of scales, refit s by least squares for the chosen points, keep the best, then code the 8 group scales against
# d and re-pick the points.
# ---------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _iq2_xxs_tables() -> tuple[np.ndarray, np.ndarray]:
    """(grid (256, 8) float32 magnitudes, sign-pattern byte -> 7-bit ksigns index), both from gguf's own data."""
    _GGUF_IQ2_XXS.init_grid()
    grid = np.asarray(_GGUF_IQ2_XXS.grid, dtype=np.float32).reshape(256, 8)
    ksigns = np.frombuffer(_GGUF_IQ2_XXS.ksigns, dtype=np.uint8)
    index_of = np.zeros(256, np.uint32)                         # odd-parity patterns are never looked up
    index_of[ksigns] = np.arange(128, dtype=np.uint32)
    return grid, index_of


# Group-scale fan: the group's largest |w| lands on these grid magnitudes. 43 is the top of the grid; starting
# beyond it clips the group's largest weight for finer steps everywhere else, which wins on most groups. 8 is the
# bottom, where the all-8 point lives: it makes constant runs exact.
_IQ2_XXS_TARGETS = np.array([70, 60, 50, 43, 8], dtype=np.float32)


def _encode_iq2_xxs(x: np.ndarray, imp: np.ndarray) -> np.ndarray:
    """block_iq2_xxs {d f16, qs u16[32]}: per group of 32, u32 grid indices (4 bytes) + u32 signs/scale = 66 B."""
    grid, index_of = _iq2_xxs_tables()
    n = len(x)
    x8, w8 = x.reshape(-1, 8), imp.reshape(-1, 8)                # runs of 8, (R, 8)
    neg = x8 < 0
    odd = np.flatnonzero(neg.sum(axis=1) & 1)
    cheapest = (w8[odd] * x8[odd] ** 2).argmin(axis=1)          # flipping it costs the least weighted error
    neg[odd, cheapest] ^= True
    wy = w8 * np.where(neg, -x8, x8)                             # w * (what the unsigned grid point approximates)
    g2g = np.concatenate([grid * grid, grid], axis=1).T          # (16, 256)

    def pick(s):                                                 # s: (G,) group scales -> (R,) best points
        s8 = np.repeat(s, 4)[:, None]
        return (np.concatenate([w8 * s8, -2 * wy], axis=1) @ g2g).argmin(axis=1)   # s B - 2 A: (R, 256)

    def moments(idx):                                            # A, B at the points, summed over a group's 4 runs
        g = grid[idx]
        return (wy * g).sum(axis=1).reshape(-1, 4).sum(axis=1), (w8 * g * g).sum(axis=1).reshape(-1, 4).sum(axis=1)

    amax = np.abs(x).reshape(-1, 32).max(axis=1)                 # (G,)
    best_gain = np.full(len(amax), -np.inf, np.float32)
    best_s = np.zeros_like(amax)
    for t in _IQ2_XXS_TARGETS:
        sa, sb = moments(pick(amax / t))
        s = np.where(sa > 0, sa / sb, 0)                         # least-squares scale for these points
        gain = np.where(sa > 0, sa * s, 0)                       # error reduction C - err = A^2 / B
        better = gain > best_gain
        best_gain, best_s = np.where(better, gain, best_gain), np.where(better, s, best_s)

    # Code the group scales: s = d * (ls + 0.5) / 4, with d sized so the largest group gets ls = 15.
    gs = best_s.reshape(n, 8)
    d = (gs.max(axis=1) * 4 / 15.5).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    ls = np.clip(np.rint(np.where(df > 0, gs * 4 / np.where(df > 0, df, 1), 0) - 0.5), 0, 15).astype(np.uint32)
    idx = pick((df * (ls + 0.5) / 4).reshape(-1)).astype(np.uint32).reshape(-1, 4)

    bits = (neg << np.arange(8, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)
    sidx = index_of[bits].reshape(-1, 4)                         # (G, 4) 7-bit sign codes
    aux0 = idx[:, 0] | idx[:, 1] << 8 | idx[:, 2] << 16 | idx[:, 3] << 24
    aux1 = sidx[:, 0] | sidx[:, 1] << 7 | sidx[:, 2] << 14 | sidx[:, 3] << 21 | ls.reshape(-1) << 28
    qs = np.stack([aux0, aux1], axis=1).astype("<u4").view(np.uint8).reshape(n, 64)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), qs], axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Random valid blocks
#
# Full-size tensors only need finite values of a plausible magnitude, so a chunk is raw generator bits (the
# bit generator's random_raw: ~2.5 GB/s, eight times integers(uint8)) with the few fields that could go wrong
# overwritten: for the block types every bit pattern of the codes is valid, only d (and dmin) are set, to an f16
# jittered around a base value; for the float types the exponent field is fixed, so every value is
# +-2^e * (1 + mantissa), never NaN, inf or subnormal. The base is scaled by the RMS that gguf.quants decodes
# from the same generator at base 1, so the requested scale holds for every layout without per-type algebra.
# ---------------------------------------------------------------------------------------------------------------

# Float types: (unsigned view, mantissa bits, exponent bits, bias).
_FLOAT_BITS = {T.F32: (np.uint32, 23, 8, 127), T.F16: (np.uint16, 10, 5, 15), T.BF16: (np.uint16, 7, 8, 127)}
# Block types: (byte offset of d, byte offset of dmin or None, top code of L, which sizes dmin against d).
_D_FIELDS = {T.Q8_0: (0, None, 0), T.IQ2_XXS: (0, None, 0), T.Q2_K: (80, 82, 3), T.Q4_K: (0, 2, 15)}


def random_blocks(rows: int, cols: int, qtype: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Valid random `qtype` rows, uint8 (rows, row_bytes), decoding to finite values of RMS ~ `scale`.

    Block types land within ~10% of `scale`; float types within a factor sqrt(2) (a power-of-two step). `scale`
    must lie in [1e-3, 1e3]: there every type's f16 d/dmin (and the f16 exponent) holds it without flushing to zero.
    """
    qtype = T(qtype)
    if qtype not in SUPPORTED:
        raise ValueError(f"unsupported type {qtype.name}")
    if not 1e-3 <= scale <= 1e3:
        raise ValueError(f"scale {scale} outside [1e-3, 1e3]")
    out = np.empty((rows, row_bytes(qtype, cols)), np.uint8)
    flat = out.reshape(-1)
    base = scale / _unit_rms(qtype)
    unit = GGML_QUANT_SIZES[qtype][1]
    step = _RANDOM_CHUNK_BYTES // unit * unit                    # whole blocks per chunk
    for i in range(0, flat.size, step):
        _fill_random(flat[i:i + step], qtype, rng, base)
    return out


@lru_cache(maxsize=None)
def _unit_rms(qtype: T) -> float:
    """RMS of what gguf.quants decodes from random blocks of `qtype` generated at base 1 (fixed seed)."""
    buf = np.empty(64 * row_bytes(qtype, QK_K), np.uint8)
    _fill_random(buf, qtype, np.random.default_rng(0), 1.0)
    return float(np.sqrt(np.mean(_gguf_dequantize(buf, qtype).astype(np.float64) ** 2)))


def _fill_random(buf: np.ndarray, qtype: T, rng: np.random.Generator, base: float) -> None:
    """Fill `buf` (whole blocks of `qtype`, 1-D uint8) with random valid blocks around `base`."""
    buf[:] = rng.bit_generator.random_raw(-(-buf.size // 8)).view(np.uint8)[:buf.size]
    if qtype in _FLOAT_BITS:
        utype, mant, ebits, bias = _FLOAT_BITS[qtype]
        e = int(np.clip(bias + np.rint(np.log2(base)), 1, (1 << ebits) - 2))   # a normal, finite exponent
        v = buf.view(utype)
        v &= utype(~(((1 << ebits) - 1) << mant) & np.iinfo(utype).max)
        v |= utype(e << mant)
        return
    off_d, off_dmin, nmax = _D_FIELDS[qtype]
    blocks = buf.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    d = (base * rng.uniform(0.5, 1.5, len(blocks))).astype(np.float16)   # per-block jitter: blocks differ
    blocks[:, off_d:off_d + 2] = d.view(np.uint8).reshape(-1, 2)
    if off_dmin is not None:
        # With uniform codes, mean(dmin * m) = mean(d * sc * L) when dmin = d * nmax / 2: zero-mean weights.
        dmin = (d.astype(np.float32) * (nmax / 2)).astype(np.float16)
        blocks[:, off_dmin:off_dmin + 2] = dmin.view(np.uint8).reshape(-1, 2)
