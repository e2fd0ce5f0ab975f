"""ds4d.quants: every layout is decoded by gguf.quants (the oracle), error bounds on Gaussian data, edge rows.

The error bounds sit a little above what the quantizers measure on this fixed seed (relative RMS: Q4_K 0.0712,
Q2_K 0.269, IQ2_XXS 0.329); the baselines are what a search-free quantizer or random bits would give.
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from ds4d import quants

SEARCHED = (T.Q2_K, T.Q4_K, T.IQ2_XXS)


def decode(b: np.ndarray, qtype: T, shape: tuple[int, int]) -> np.ndarray:
    assert b.dtype == np.uint8 and b.shape == (shape[0], quants.row_bytes(qtype, shape[1]))
    out = dequantize(b, qtype).reshape(shape)
    assert np.isfinite(out).all()
    return out


def rel_rms(approx: np.ndarray, w: np.ndarray) -> float:
    return float(np.sqrt(np.mean((approx - w) ** 2) / np.mean(w ** 2)))


@pytest.fixture(scope="module")
def gaussian() -> np.ndarray:
    return np.random.default_rng(1234).standard_normal((64, 4096)).astype(np.float32)


def naive_affine(w: np.ndarray, sub: int, nmax: int) -> np.ndarray:
    """Min-max K-quant with exact float sub-block scales (flattered: no 6/4-bit scale coding), decoded."""
    x = w.reshape(-1, sub)
    lo = np.minimum(x.min(axis=1, keepdims=True), 0)
    a = (x.max(axis=1, keepdims=True) - lo) / nmax
    return (a * np.clip(np.rint((x - lo) / a), 0, nmax) + lo).reshape(w.shape)


# ---------------------------------------------------------------------------------------------------------------
# Types delegated to gguf.quants
# ---------------------------------------------------------------------------------------------------------------


def test_float_and_q8_0_round_trip(gaussian):
    w = gaussian[:7]
    assert np.array_equal(decode(quants.quantize(w, T.F32), T.F32, w.shape), w)
    assert np.array_equal(decode(quants.quantize(w, T.F16), T.F16, w.shape), w.astype(np.float16).astype(np.float32))
    assert np.abs(decode(quants.quantize(w, T.BF16), T.BF16, w.shape) - w).max() <= np.abs(w).max() * 2.0 ** -8
    q8 = decode(quants.quantize(w, T.Q8_0), T.Q8_0, w.shape)
    amax = np.abs(w).reshape(-1, 32).max(axis=1, keepdims=True)
    # Half a step of d = amax / 127, plus the f16 rounding of d over 127 steps.
    assert (np.abs(q8 - w).reshape(-1, 32) <= amax * (0.5 / 127 + 2.0 ** -11)).all()


# ---------------------------------------------------------------------------------------------------------------
# Searched types: error bounds and baselines
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype, bound, sub, nmax", [(T.Q4_K, 0.075, 32, 15), (T.Q2_K, 0.28, 16, 3)])
def test_k_quant_error_beats_min_max(gaussian, qtype, bound, sub, nmax):
    err = rel_rms(decode(quants.quantize(gaussian, qtype), qtype, gaussian.shape), gaussian)
    naive = rel_rms(naive_affine(gaussian, sub, nmax), gaussian)   # Q4_K 0.078, Q2_K 0.327
    assert err < bound
    assert err < 0.95 * naive


def test_iq2_xxs_error_beats_random_blocks(gaussian):
    err = rel_rms(decode(quants.quantize(gaussian, T.IQ2_XXS), T.IQ2_XXS, gaussian.shape), gaussian)
    rand = quants.random_blocks(*gaussian.shape, T.IQ2_XXS, np.random.default_rng(0), 1.0)
    baseline = rel_rms(decode(rand, T.IQ2_XXS, gaussian.shape), gaussian)   # ~1.44: independent noise
    assert err < 0.34
    assert err < 0.3 * baseline


def test_iq2_xxs_signs_and_parity(gaussian):
    # Every 8-run must keep the signs of its weights except at most one (the parity flip), on the cheapest weight.
    w = gaussian[:8]
    out = decode(quants.quantize(w, T.IQ2_XXS, np.ones(w.shape[1])), T.IQ2_XXS, w.shape)   # cheapest = smallest
    wrong = (np.sign(out) != np.sign(w)).reshape(-1, 8)
    assert wrong.sum(axis=1).max() <= 1
    odd = (w < 0).reshape(-1, 8).sum(axis=1) % 2 == 1
    assert np.array_equal(wrong.any(axis=1), odd)
    flipped = np.abs(w).reshape(-1, 8)[wrong]
    assert np.array_equal(flipped, np.abs(w).reshape(-1, 8)[odd].min(axis=1))


@pytest.mark.parametrize("qtype", SEARCHED)
def test_importance_moves_error_to_unimportant_columns(gaussian, qtype):
    w = gaussian[:16]
    imp = np.ones(w.shape[1], np.float32)
    imp[::2] = 100.0                                              # even columns matter 100x more
    plain = decode(quants.quantize(w, qtype, np.ones_like(imp)), qtype, w.shape)
    weighted = decode(quants.quantize(w, qtype, imp), qtype, w.shape)
    # Measured ratios: Q2_K 0.86, Q4_K 0.91, IQ2_XXS 0.65.
    assert rel_rms(weighted[:, ::2], w[:, ::2]) < 0.95 * rel_rms(plain[:, ::2], w[:, ::2])


# ---------------------------------------------------------------------------------------------------------------
# Edge rows
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", SEARCHED)
@pytest.mark.parametrize("rows, cols", [(1, 256), (3, 512), (7, 768)])
def test_edge_rows(gaussian, qtype, rows, cols):
    w = gaussian[:rows, :cols].copy()
    w[0] = 0                                                      # a zero row beside ordinary ones
    out = decode(quants.quantize(w, qtype), qtype, w.shape)
    assert not out[0].any()
    if rows > 1:
        # Loose: with 2-6 rows the default IQ2_XXS importance (column sums of w^2) is far from uniform.
        assert rel_rms(out[1:], w[1:]) < 0.5


@pytest.mark.parametrize("qtype", SEARCHED)
@pytest.mark.parametrize("value", [0.0, 0.37, -2.5, 1e-3])
def test_constant_matrix(qtype, value):
    w = np.full((3, 512), value, np.float32)
    out = decode(quants.quantize(w, qtype), qtype, w.shape)
    assert np.allclose(out, value, rtol=0.01, atol=0)           # f16 d and 6/4-bit codes: exact to ~1e-3


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        quants.quantize(np.zeros((2, 100), np.float32), T.Q4_K)   # not a whole number of blocks
    with pytest.raises(ValueError):
        quants.quantize(np.full((1, 256), np.nan, np.float32), T.Q2_K)
    with pytest.raises(ValueError):
        quants.quantize(np.zeros((1, 256), np.float32), T.IQ2_XXS, importance=np.ones(255))
    with pytest.raises(ValueError):
        quants.quantize(np.zeros((1, 256), np.float32), T.Q5_K)


# ---------------------------------------------------------------------------------------------------------------
# random_blocks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", quants.SUPPORTED)
@pytest.mark.parametrize("scale", [1e-3, 0.02, 1e3])
def test_random_blocks_magnitude(qtype, scale):
    rows, cols = 33, 1024
    out = decode(quants.random_blocks(rows, cols, qtype, np.random.default_rng(7), scale), qtype, (rows, cols))
    rms = np.sqrt(np.mean(out.astype(np.float64) ** 2)) / scale
    lo, hi = (0.7, 1.42) if quants.block_size(qtype) == 1 else (0.85, 1.15)   # float types: power-of-two steps
    assert lo < rms < hi
    assert abs(out.mean()) < 0.1 * scale


@pytest.mark.parametrize("qtype", [T.Q2_K, T.F16])
def test_random_blocks_chunked_and_deterministic(monkeypatch, qtype):
    # Chunks of a few blocks that straddle rows: every chunk must still get its d fields / exponents.
    monkeypatch.setattr(quants, "_RANDOM_CHUNK_BYTES", 1000)
    rows, cols = 5, 768
    a = quants.random_blocks(rows, cols, qtype, np.random.default_rng(3), 0.05)
    assert np.array_equal(a, quants.random_blocks(rows, cols, qtype, np.random.default_rng(3), 0.05))
    mag = np.abs(decode(a, qtype, (rows, cols))).reshape(-1, 256).max(axis=1)
    assert (mag > 0.01).all() and (mag < 1.0).all()             # no block left with random d bits


def test_random_blocks_rejects_out_of_range_scale():
    with pytest.raises(ValueError):
        quants.random_blocks(1, 256, T.Q4_K, np.random.default_rng(0), 1e-6)
