"""The faithful number formats: FP8 E4M3 and FP4 E2M1 rounding bit-exact against ml_dtypes on every representable
value, every tie, subnormals and saturation; the block scaling and the Hadamard rotation of MODEL.md §3.9."""

from __future__ import annotations

import numpy as np
import pytest

from ds4d.ops.reference import (fp4_e2m1_roundtrip, fp8_e4m3_roundtrip, hadamard_matrix, pow2_ceil_log2,
                                round_minifloat)
from conftest import require

# (ml_dtypes name, mantissa bits, smallest normal exponent, largest finite value)
FORMATS = {"e4m3": ("float8_e4m3fn", 3, -6, 448.0), "e2m1": ("float4_e2m1fn", 1, 0, 6.0)}


def representable(fmt: str) -> np.ndarray:
    """Every finite non-negative value of the format, from ml_dtypes' own bit patterns."""
    md = require("ml_dtypes")
    name, *_ = FORMATS[fmt]
    dt = getattr(md, name)
    bits = np.arange(1 << (8 if fmt == "e4m3" else 4), dtype=np.uint8)
    if fmt == "e4m3":
        vals = bits.view(dt).astype(np.float64)
    else:   # float4 is stored one value per byte in ml_dtypes
        vals = bits.view(dt).astype(np.float64)
    vals = vals[np.isfinite(vals) & (vals >= 0)]
    return np.unique(vals)


def ml_round(v: np.ndarray, fmt: str) -> np.ndarray:
    md = require("ml_dtypes")
    return v.astype(np.float32).astype(getattr(md, FORMATS[fmt][0])).astype(np.float64)


@pytest.mark.parametrize("fmt", ["e4m3", "e2m1"])
def test_rounding_matches_ml_dtypes_on_values_ties_and_subnormals(fmt):
    _, mant, emin, vmax = FORMATS[fmt]
    grid = representable(fmt)
    assert grid.max() == vmax
    mids = (grid[:-1] + grid[1:]) / 2                                   # exact ties between neighbours
    quarter = np.concatenate([grid[:-1] + (grid[1:] - grid[:-1]) / 4, grid[:-1] + 3 * (grid[1:] - grid[:-1]) / 4])
    rng = np.random.default_rng(0)
    rand = rng.uniform(0, vmax, 20000)
    tiny = rng.uniform(0, 2.0 ** emin, 2000)                           # the subnormal range
    for values in (grid, mids, quarter, rand, tiny):
        v = np.concatenate([values, -values])
        for dtype in (np.float32, np.float64):
            got = round_minifloat(v.astype(dtype), mant, emin).astype(np.float64)
            assert np.array_equal(got, ml_round(v, fmt)), (fmt, dtype)
    assert np.all(np.isin(round_minifloat(mids, mant, emin), grid))


def test_pow2_ceil_log2_is_exact():
    y = np.array([1.0, 2.0, 0.5, 3.0, 1e-4 / 448, 448.0, 1.0000001, 0.9999999, 2.0 ** -30, 6.0, 7.0 ** 9])
    expect = 2.0 ** np.ceil(np.log2(y))
    # log2 rounds; the binary exponent doesn't: check against exact integer reasoning instead.
    got = pow2_ceil_log2(y)
    assert np.all(got >= y) and np.all(got / 2 < y)
    assert np.array_equal(got[:2], [1.0, 2.0]) and got[2] == 0.5 and got[5] == 512.0
    assert np.allclose(got, expect)


def _scaled_reference(x: np.ndarray, fmt: str, block: int, floor: float) -> np.ndarray:
    """The block-scaled round trip built from ml_dtypes' rounding (saturating at the format's maximum)."""
    _, _, _, vmax = FORMATS[fmt]
    xb = x.reshape(-1, block)
    amax = np.maximum(np.abs(xb).max(axis=1, keepdims=True), floor)
    scale = 2.0 ** np.ceil(np.log2(amax / vmax))
    return (ml_round(np.clip(xb / scale, -vmax, vmax), fmt) * scale).reshape(x.shape)


def test_fp8_kv_block_roundtrip():
    rng = np.random.default_rng(1)
    # float32 input: ml_dtypes converts from float32, and a float64 value would be rounded twice on the way.
    x = np.concatenate([rng.standard_normal((64, 448)) * 10.0 ** rng.integers(-6, 4, (64, 1)),
                        np.zeros((1, 448)), np.full((1, 448), 1e-7)]).astype(np.float32)
    got = fp8_e4m3_roundtrip(x)
    assert np.array_equal(got, _scaled_reference(x, "e4m3", 64, 1e-4))
    # The block maximum lands on or under 448 after scaling; relative error of E4M3 is at most 2^-4.
    big = np.abs(x) > 1e-3
    assert np.all(np.abs(got - x)[big] <= np.abs(x)[big] * 2.0 ** -4 + 1e-12)


def test_fp4_indexer_block_roundtrip():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((32, 128)) * 10.0 ** rng.integers(-3, 3, (32, 1))).astype(np.float32)
    got = fp4_e2m1_roundtrip(x)
    assert np.array_equal(got, _scaled_reference(x, "e2m1", 32, 7.052966104933725e-38))
    scale = got.reshape(-1, 32) / np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    assert np.all(np.abs(scale) <= 6.0 * 2)   # values stay on the scaled FP4 grid


def test_hadamard_is_orthogonal_sylvester():
    h = hadamard_matrix(128)
    assert set(np.unique(h)) == {-1.0, 1.0}
    assert np.array_equal(h @ h.T, 128 * np.eye(128))
    assert np.array_equal(h[1, :4], [1, -1, 1, -1]) and np.array_equal(h[:, 0], np.ones(128))
