"""Tests of the native CPU kernels (ds4d._cpu): dequantization, matrix products, activation quantizers.

References: gguf.quants.dequantize for every weight format; float64 numpy for the f32-activation product (within
a summation-order error bound) plus bitwise batch / row / thread invariance; and, for the integer "act8" product,
an integer numpy model of the formulas in native/include/ds4_quant.h and native/cpu/isa/matmul_act8.cpp that
must match bit for bit. Every test runs at every ISA level this machine and build support.
"""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from gguf import GGMLQuantizationType as Q
from gguf.quants import IQ2_XXS, Q4_K, dequantize as gguf_dequantize

from ds4d import _cpu

F32, F16, Q8_0, Q2_K, Q4_K_T, IQ2_XXS_T, BF16 = 0, 1, 8, 10, 12, 16, 30
QUANT_TYPES = [Q8_0, Q2_K, Q4_K_T, IQ2_XXS_T]
ALL_TYPES = [F32, F16, BF16] + QUANT_TYPES
BLOCK = {F32: 1, F16: 1, BF16: 1, Q8_0: 32, Q2_K: 256, Q4_K_T: 256, IQ2_XXS_T: 256}
# byte offsets of the f16 scales inside a block: (block bytes, offsets)
SCALES = {Q8_0: (34, [0]), Q2_K: (84, [80, 82]), Q4_K_T: (144, [0, 2]), IQ2_XXS_T: (66, [0])}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---- random weights -------------------------------------------------------------------------------------------


def rand_f16_bits(rng, shape, log10_range):
    """Finite f16 values of both signs with magnitudes 10**U(log10_range) (the low end reaches subnormals)."""
    mag = 10.0 ** rng.uniform(*log10_range, size=shape)
    v = np.clip(mag * rng.choice([-1.0, 1.0], size=shape), -65504, 65504).astype(np.float16)
    return v.view(np.uint16)


def make_weights(rng, type_, rows, cols, log10_range=(-8, 4.8), lead=()):
    """Raw uint8 rows (*lead, rows, row_bytes) of `type_`: random bytes, f16 fields set to finite scales."""
    rb = _cpu.row_bytes(type_, cols)
    shape = (*lead, rows)
    if type_ == F32:
        vals = (rng.standard_normal((*shape, cols)) * 10.0 ** rng.uniform(-3, 3, (*shape, 1))).astype(np.float32)
        return vals.view(np.uint8)
    if type_ == F16:
        return rand_f16_bits(rng, (*shape, cols), log10_range).view(np.uint8)
    if type_ == BF16:
        vals = (rng.standard_normal((*shape, cols)) * 10.0 ** rng.uniform(-20, 20, (*shape, 1))).astype(np.float32)
        return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, size=(*shape, rb), dtype=np.uint8)
    bb, offs = SCALES[type_]
    blocks = raw.reshape(*shape, rb // bb, bb)
    for off in offs:
        blocks[..., off : off + 2] = rand_f16_bits(rng, blocks.shape[:-1], log10_range).view(np.uint8).reshape(
            *blocks.shape[:-1], 2
        )
    return raw


def ref_dequantize(raw, type_):
    return gguf_dequantize(raw, Q(type_))


def assert_bits_equal(got, ref):
    assert got.shape == ref.shape and got.dtype == np.float32
    bad = got.view(np.uint32) != np.ascontiguousarray(ref, dtype=np.float32).view(np.uint32)
    assert not bad.any(), f"{bad.sum()} of {bad.size} values differ, first at {np.argwhere(bad)[0]}"


# ---- dequantize -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_", ALL_TYPES)
def test_dequantize_matches_gguf(isa, rng, type_):
    col_choices = [256, 512, 4096] + ([1, 7, 33, 100] if BLOCK[type_] == 1 else [])
    col_choices += [32, 96] if type_ == Q8_0 else []
    for rows in (1, 3, 7, 33):
        for cols in col_choices:
            raw = make_weights(rng, type_, rows, cols)
            assert_bits_equal(_cpu.dequantize(raw, type_, cols), ref_dequantize(raw, type_))


def test_dequantize_every_half_and_bfloat(isa):
    """All 65536 bit patterns of F16 and BF16, subnormals, infinities and NaN payloads included. The one
    allowed difference: F16C hardware (the SIMD levels) quiets signaling NaNs, setting their quiet bit."""
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    row = bits.view(np.uint8).reshape(1, -1)
    assert_bits_equal(_cpu.dequantize(row, BF16, 65536), ref_dequantize(row, BF16).reshape(1, -1))
    got = _cpu.dequantize(row, F16, 65536)[0].view(np.uint32)
    ref = ref_dequantize(row, F16).reshape(-1).view(np.uint32)
    signaling = ((bits & 0x7C00) == 0x7C00) & ((bits & 0x3FF) != 0) & ((bits & 0x200) == 0)
    assert np.array_equal(got[~signaling], ref[~signaling])
    assert np.array_equal(got[signaling] | 0x400000, ref[signaling] | 0x400000)


@pytest.mark.parametrize("type_", ALL_TYPES)
def test_dequantize_natural_dtypes_and_flat(isa, rng, type_):
    raw = make_weights(rng, type_, 5, 512)
    ref = ref_dequantize(raw, type_)
    views = [raw.reshape(-1)]
    if type_ == F32:
        views.append(raw.view(np.float32))
    if type_ == F16:
        views.append(raw.view(np.float16))
    if type_ == BF16:
        views.append(raw.view(np.uint16))
    for v in views:
        assert_bits_equal(_cpu.dequantize(v, type_, 512), ref)


@pytest.mark.parametrize("type_", ALL_TYPES)
def test_dequantize_expert_slices_of_readonly_memmap(isa, rng, tmp_path, type_):
    n_expert, rows, cols = 4, 7, 512
    raw = make_weights(rng, type_, rows, cols, lead=(n_expert,))
    path = tmp_path / "experts.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=raw.shape)
    assert not mm.flags.writeable
    for e in range(n_expert):
        assert_bits_equal(_cpu.dequantize(mm[e], type_, cols), ref_dequantize(raw[e], type_))
    frozen = raw.copy()
    frozen.setflags(write=False)
    assert_bits_equal(_cpu.dequantize(frozen[2], type_, cols), ref_dequantize(raw[2], type_))


# ---- f32-activation matmul ------------------------------------------------------------------------------------

MATMUL_SCALES = (-3, 0)  # weight scales for products: finite sums, no overflow


def f32_bound(wd, x):
    """Error bound of an f32 dot of length n summed over 8+ lanes: (n / 8 + 6) units of rounding times sum |w x|."""
    cols = wd.shape[1]
    return (cols / 8 + 6) * 2.0**-24 * (np.abs(x).astype(np.float64) @ np.abs(wd).astype(np.float64).T)


@pytest.mark.parametrize("type_", ALL_TYPES)
def test_matmul_f32_matches_float64(isa, rng, type_):
    odd = ((5, 77, 2), (3, 1000, 6)) if BLOCK[type_] == 1 else ((4, 13 * 32 if type_ == Q8_0 else 11 * 256, 5),)
    for rows, cols, T in ((13, 1024, 3), (40, 4096, 1)) + odd:
        raw = make_weights(rng, type_, rows, cols, MATMUL_SCALES)
        wd = ref_dequantize(raw, type_)
        x = rng.standard_normal((T, cols)).astype(np.float32)
        got = _cpu.matmul(raw, type_, cols, x)
        ref = x.astype(np.float64) @ wd.astype(np.float64).T
        assert got.shape == (T, rows) and got.dtype == np.float32
        assert np.all(np.abs(got - ref) <= f32_bound(wd, x))
        # act8 is ignored for unquantized weights
        if BLOCK[type_] == 1:
            assert_bits_equal(_cpu.matmul(raw, type_, cols, x, act8=True), got)


@pytest.mark.parametrize("type_, act8", [(t, False) for t in ALL_TYPES] + [(t, True) for t in QUANT_TYPES])
def test_matmul_batch_row_thread_invariance(isa, rng, type_, act8):
    rows, cols, T = 37, 768 if BLOCK[type_] < 256 else 1024, 64
    raw = make_weights(rng, type_, rows, cols, MATMUL_SCALES)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    threads = _cpu.threads()
    try:
        _cpu.set_threads(2)
        full = _cpu.matmul(raw, type_, cols, x, act8=act8)
        for t in (0, 1, 17, 63):
            assert_bits_equal(_cpu.matmul(raw, type_, cols, x[t : t + 1], act8=act8), full[t : t + 1])
            assert_bits_equal(_cpu.matmul(raw, type_, cols, x[t], act8=act8), full[t])
        for a, b in ((0, 1), (3, 11), (8, 37), (30, 37)):
            assert_bits_equal(_cpu.matmul(raw[a:b], type_, cols, x, act8=act8), full[:, a:b])
        for n in (3, 5, 9):
            assert_bits_equal(_cpu.matmul(raw, type_, cols, x[:n], act8=act8), full[:n])
        _cpu.set_threads(1)
        assert_bits_equal(_cpu.matmul(raw, type_, cols, x, act8=act8), full)
    finally:
        _cpu.set_threads(threads)


@pytest.mark.parametrize("act8", [False, True])
@pytest.mark.parametrize("type_", [F16, Q8_0, Q4_K_T])
def test_matmul_strided_views(isa, rng, type_, act8):
    rows, cols, T = 19, 512, 6
    raw = make_weights(rng, type_, rows, cols, MATMUL_SCALES)
    wide = rng.standard_normal((T, cols + 300)).astype(np.float32)
    x = wide[:, 100 : 100 + cols]  # a column slice: strided rows
    ref = _cpu.matmul(raw, type_, cols, np.ascontiguousarray(x), act8=act8)
    assert_bits_equal(_cpu.matmul(raw, type_, cols, x, act8=act8), ref)
    big = np.full((T, 3 * rows), 7.0, np.float32)
    res = _cpu.matmul(raw, type_, cols, x, out=big[:, rows : 2 * rows], act8=act8)
    assert res.base is big or res is not None
    assert_bits_equal(big[:, rows : 2 * rows], ref)
    assert np.all(big[:, :rows] == 7.0) and np.all(big[:, 2 * rows :] == 7.0)
    every_other = np.zeros((2 * T, rows), np.float32)[::2]  # strided rows of out
    _cpu.matmul(raw, type_, cols, x, out=every_other, act8=act8)
    assert_bits_equal(every_other, ref)


def test_matmul_empty_and_zero_tokens(rng):
    raw = make_weights(rng, Q8_0, 4, 64, MATMUL_SCALES)
    out = _cpu.matmul(raw, Q8_0, 64, np.zeros((0, 64), np.float32))
    assert out.shape == (0, 4)
    out = _cpu.matmul(raw[:0], Q8_0, 64, np.ones((2, 64), np.float32), act8=True)
    assert out.shape == (2, 0)


# ---- act8: activation quantizers and the integer product ------------------------------------------------------


def model_q8_0_act(x):
    T, cols = x.shape
    xb = x.reshape(T, cols // 32, 32)
    d = np.abs(xb).max(axis=-1) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.rint(xb * inv[..., None]), -127, 127).astype(np.int8)
    return d.astype(np.float32), q.reshape(T, cols)


def model_q8_k_act(x):
    T, cols = x.shape
    xb = x.reshape(T, cols // 256, 256)
    m = np.take_along_axis(xb, np.abs(xb).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    nz = m != 0
    iscale = np.divide(np.float32(-127), m, out=np.zeros_like(m), where=nz)
    q = np.minimum(127, np.rint(iscale[..., None] * xb)).astype(np.int8)
    d = np.divide(np.float32(1), iscale, out=np.zeros_like(m), where=nz)
    bsums = q.reshape(T, -1, 16).astype(np.int32).sum(axis=-1).astype(np.int16)
    return d.astype(np.float32), q.reshape(T, cols), bsums.reshape(T, cols // 16)


def f16_field(blocks, off):
    return blocks[..., off : off + 2].copy().view(np.float16)[..., 0].astype(np.float32)


IQ2_XXS.init_grid()
IQ2_GRID = IQ2_XXS.grid.reshape(256, 8).astype(np.int64)
IQ2_SIGNS = np.frombuffer(IQ2_XXS.ksigns, dtype=np.uint8)


def model_act8(raw, type_, cols, x):
    """The act8 product: exact integer sums per block, one f32 value per block, summed block by block in f32."""
    rows, T = raw.shape[0], x.shape[0]
    if type_ == Q8_0:
        nb = cols // 32
        blk = raw.reshape(rows, nb, 34)
        dw = f16_field(blk, 0)
        qw = blk[..., 2:].view(np.int8).astype(np.int64)
        dx, qx = model_q8_0_act(x)
        isum = np.einsum("rbi,tbi->trb", qw, qx.reshape(T, nb, 32).astype(np.int64))
        v = (dw[None] * dx[:, None, :]) * isum.astype(np.float32)
    else:
        nb = cols // 256
        dx, qx, bsums = model_q8_k_act(x)
        qx = qx.reshape(T, nb, 256).astype(np.int64)
        bsums = bsums.reshape(T, 1, nb, 16).astype(np.int64)
        dxr = dx[:, None, :]
        if type_ == Q2_K:
            blk = raw.reshape(rows, nb, 84)
            dw, dmin = f16_field(blk, 80), f16_field(blk, 82)
            sc = blk[..., :16].astype(np.int64)
            shifts = np.array([0, 2, 4, 6]).reshape(1, 1, 1, 4, 1)
            q = ((blk[..., 16:80].reshape(rows, nb, 2, 1, 32).astype(np.int64) >> shifts) & 3).reshape(rows, nb, 16, 16)
            s = np.einsum("rbji,tbji->trbj", q, qx.reshape(T, nb, 16, 16))
            isum = (s * (sc & 15)[None]).sum(-1)
            msum = ((sc >> 4)[None] * bsums).sum(-1)
        elif type_ == Q4_K_T:
            blk = raw.reshape(rows, nb, 144)
            dw, dmin = f16_field(blk, 0), f16_field(blk, 2)
            sc, mn = Q4_K.get_scale_min(blk[..., 4:16].reshape(-1, 12))
            sc, mn = sc.reshape(rows, nb, 8).astype(np.int64), mn.reshape(rows, nb, 8).astype(np.int64)
            shifts = np.array([0, 4]).reshape(1, 1, 1, 2, 1)
            q = ((blk[..., 16:].reshape(rows, nb, 4, 1, 32).astype(np.int64) >> shifts) & 15).reshape(rows, nb, 8, 32)
            s = np.einsum("rbji,tbji->trbj", q, qx.reshape(T, nb, 8, 32))
            isum = (s * sc[None]).sum(-1)
            msum = (mn[None] * bsums.reshape(T, 1, nb, 8, 2).sum(-1)).sum(-1)
        else:
            blk = raw.reshape(rows, nb, 66)
            dw = f16_field(blk, 0)
            aux = blk[..., 2:].copy().view(np.uint32).reshape(rows, nb, 8, 2).astype(np.int64)
            idx = blk[..., 2:].reshape(rows, nb, 8, 8)[..., :4].astype(np.int64)
            mag = IQ2_GRID[idx]  # (rows, nb, 8, 4, 8)
            sidx = (aux[..., 1:2] >> np.array([0, 7, 14, 21])) & 127
            bits = (IQ2_SIGNS[sidx][..., None] >> np.arange(8)) & 1
            gv = (mag * (1 - 2 * bits.astype(np.int64))).reshape(rows, nb, 8, 32)
            ls = 2 * (aux[..., 1] >> 28) + 1
            s = np.einsum("rbgi,tbgi->trbg", gv, qx.reshape(T, nb, 8, 32))
            isum = (s * ls[None]).sum(-1)
            v = ((dw[None] * dxr) * isum.astype(np.float32)) * np.float32(0.125)
        if type_ in (Q2_K, Q4_K_T):
            v = (dw[None] * dxr) * isum.astype(np.float32) - (dmin[None] * dxr) * msum.astype(np.float32)
    y = np.zeros((T, rows), np.float32)
    for b in range(v.shape[-1]):
        y = y + v[..., b]
    return y


def act_rows(rng, T, cols):
    """Activations with the awkward cases: zero blocks, ties of |x|, exact .5 quotients, tiny and huge values."""
    x = (rng.standard_normal((T, cols)) * 10.0 ** rng.integers(-3, 3, (T, 1))).astype(np.float32)
    x[0, :256] = 0  # an all-zero block of either kind
    if T > 1:
        x[1, :32] = np.arange(-16, 16) + 0.5  # with amax 127 below: x * id lands exactly on .5
        x[1, 32] = 127.0
        x[1, 33:64] = np.arange(31) - 15.5
        x[1, 64:256] = rng.integers(-127, 128, 192)
        x[1, 7] = -127.0  # a tie of |x| (the first, +127.0 at 32, comes later)
        x[1, 256:512:3] = -3.0e-30
    if T > 2:
        x[2, ::5] = 1e30
    return x


@pytest.mark.parametrize("kind", ["q8_0", "q8_k"])
def test_quantize_act_matches_model(isa, rng, kind):
    x = act_rows(rng, 5, 1024)
    got = _cpu.quantize_act(x, kind)
    ref = model_q8_0_act(x) if kind == "q8_0" else model_q8_k_act(x)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape
        assert np.array_equal(g.view(np.uint8), r.view(np.uint8))
    # strided rows, 1-D
    wide = np.zeros((5, 2048), np.float32)
    wide[:, 512:1536] = x
    for g, r in zip(_cpu.quantize_act(wide[:, 512:1536], kind), ref):
        assert np.array_equal(g, r)
    for g, r in zip(_cpu.quantize_act(x[3], kind), ref):
        assert np.array_equal(g, r[3])


@pytest.mark.parametrize("type_", QUANT_TYPES)
def test_matmul_act8_matches_integer_model(isa, rng, type_):
    # block counts below, at and above the kernels' 8-block groups, with and without a partial last group
    odd_cols = 13 * 32 if type_ == Q8_0 else 11 * 256
    for rows, cols, T in ((21, 1024, 5), (8, 512, 1), (3, 256, 2), (5, odd_cols, 3)):
        raw = make_weights(rng, type_, rows, cols, MATMUL_SCALES)
        x = act_rows(rng, T, cols)
        got = _cpu.matmul(raw, type_, cols, x, act8=True)
        assert_bits_equal(got, model_act8(raw, type_, cols, x))


@pytest.mark.parametrize("type_", QUANT_TYPES)
def test_matmul_act8_extreme_weights(isa, rng, type_):
    """All-0xff / all-0x80 quant bytes (Q8_0's -1 and -128, the largest 2/4-bit codes, scales and signs)."""
    rows, cols, T = 9, 512, 3
    for fill in (0xFF, 0x80, 0x7F):
        raw = make_weights(rng, type_, rows, cols, MATMUL_SCALES)
        bb, offs = SCALES[type_]
        blocks = raw.reshape(rows, -1, bb)
        keep = {o + k for o in offs for k in (0, 1)}
        for byte in range(bb):
            if byte not in keep:
                blocks[..., byte] = fill
        x = act_rows(rng, T, cols)
        x[1] = 127.0 * np.sign(rng.standard_normal(cols)).astype(np.float32)  # every q at +-127
        assert_bits_equal(_cpu.matmul(raw, type_, cols, x, act8=True), model_act8(raw, type_, cols, x))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    type_=st.sampled_from(ALL_TYPES),
    rows=st.integers(1, 19),
    blocks=st.integers(1, 19),
    tokens=st.integers(1, 9),
    split=st.integers(0, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_matmul_random_shapes(type_, rows, blocks, tokens, split, seed):
    """Random shapes at every level: act8 equals the integer model, and any token / row split equals the whole."""
    rng = np.random.default_rng(seed)
    cols = blocks * (BLOCK[type_] if BLOCK[type_] > 1 else 7)
    raw = make_weights(rng, type_, rows, cols, MATMUL_SCALES)
    x = act_rows(rng, tokens, cols) if cols % 256 == 0 else rng.standard_normal((tokens, cols)).astype(np.float32)
    results, before = [], _cpu.isa()
    try:
        for isa_name in _cpu.available_isas():
            _cpu.set_isa(isa_name)
            for act8 in (False, True) if BLOCK[type_] > 1 else (False,):
                full = _cpu.matmul(raw, type_, cols, x, act8=act8)
                t, r = split % tokens, split % rows
                assert_bits_equal(_cpu.matmul(raw, type_, cols, x[t:], act8=act8), full[t:])
                assert_bits_equal(_cpu.matmul(raw[r:], type_, cols, x, act8=act8), full[:, r:])
                if act8:
                    assert_bits_equal(full, model_act8(raw, type_, cols, x))
                    results.append(full)
    finally:
        _cpu.set_isa(before)
    for other in results[1:]:  # act8 is the same at every level
        assert_bits_equal(other, results[0])


# ---- configuration and bad inputs -----------------------------------------------------------------------------


def test_isa_and_threads_api():
    isas = _cpu.available_isas()
    assert isas[0] == "portable" and set(isas) <= {"portable", "avx2", "avx512"}
    assert _cpu.isa() in isas
    with pytest.raises(ValueError, match="not available"):
        _cpu.set_isa("sse9")
    with pytest.raises(ValueError):
        _cpu.set_threads(0)
    n = _cpu.threads()
    _cpu.set_threads(3)
    assert _cpu.threads() == 3
    _cpu.set_threads(n)
    assert _cpu.row_bytes(Q8_0, 4096) == 4352 and _cpu.row_bytes(IQ2_XXS_T, 4096) == 1056
    assert _cpu.row_bytes(F16, 7) == 14 and _cpu.row_bytes(Q2_K, 256) == 84 and _cpu.row_bytes(Q4_K_T, 512) == 288


def run_python(code, **env):
    import os

    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=60)


def test_isa_from_environment():
    code = "from ds4d import _cpu; print(_cpu.isa(), _cpu.threads())"
    r = run_python(code, DS4_CPU_ISA="portable", DS4_THREADS="3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["portable", "3"]
    r = run_python(code, DS4_CPU_ISA="avx1024")
    assert r.returncode != 0 and "DS4_CPU_ISA=avx1024 is not available" in r.stderr
    r = run_python("from ds4d import _cpu; print(_cpu.isa())", DS4_CPU_ISA="")
    assert r.stdout.strip() == _cpu.available_isas()[-1]


def test_matmul_in_forked_child(rng):
    """A fork()ed child has none of the parent's pool threads: its first product must not wait for them."""
    raw = make_weights(rng, Q8_0, 256, 4096, MATMUL_SCALES)
    x = rng.standard_normal((2, 4096)).astype(np.float32)
    threads = _cpu.threads()
    _cpu.set_threads(2)
    try:
        ref = _cpu.matmul(raw, Q8_0, 4096, x, act8=True)
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            ok = False
            try:
                ok = np.array_equal(_cpu.matmul(raw, Q8_0, 4096, x, act8=True), ref) and _cpu.threads() == 2
            finally:
                os._exit(0 if ok else 1)
        deadline = time.monotonic() + 30
        while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung in matmul")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status[1]) == 0
    finally:
        _cpu.set_threads(threads)


def test_bad_inputs(rng):
    raw = make_weights(rng, Q8_0, 4, 64, MATMUL_SCALES)
    x = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError, match="type code"):
        _cpu.matmul(raw, 2, 64, x)
    with pytest.raises(ValueError, match="type code"):
        _cpu.dequantize(raw, 99, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        _cpu.row_bytes(Q8_0, 48)
    with pytest.raises(ValueError, match="multiple of 256"):
        _cpu.dequantize(raw, Q2_K, 100)
    with pytest.raises(ValueError):
        _cpu.row_bytes(F16, 0)
    with pytest.raises(TypeError, match="dtype"):
        _cpu.matmul(raw.astype(np.float64), Q8_0, 64, x)
    with pytest.raises(TypeError, match="dtype"):
        _cpu.dequantize(np.zeros((2, 4), np.float16), F32, 4)
    with pytest.raises(ValueError, match="whole number"):
        _cpu.dequantize(raw.reshape(-1)[:100], Q8_0, 64)
    with pytest.raises(ValueError, match="last dimension"):
        _cpu.matmul(raw.reshape(2, 136), Q8_0, 64, x)
    with pytest.raises(ValueError, match="C-contiguous"):
        _cpu.matmul(np.zeros((4, 200), np.uint8)[:, :68], Q8_0, 64, x)
    with pytest.raises(TypeError, match="float32"):
        _cpu.matmul(raw, Q8_0, 64, x.astype(np.float64))
    with pytest.raises(ValueError, match="rows of 32 values"):
        _cpu.matmul(raw, Q8_0, 64, np.ones((2, 32), np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        _cpu.matmul(raw, Q8_0, 64, np.ones((2, 128), np.float32)[:, ::2])
    with pytest.raises(ValueError):
        _cpu.matmul(raw, Q8_0, 64, np.ones((2, 2, 64), np.float32))
    with pytest.raises(ValueError, match="out"):
        _cpu.matmul(raw, Q8_0, 64, x, out=np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="out"):
        _cpu.matmul(raw, Q8_0, 64, x, out=np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="out"):
        _cpu.matmul(raw, Q8_0, 64, x, out=np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="out"):
        _cpu.matmul(raw, Q8_0, 64, x, out=np.zeros((2, 4), np.float64))
    with pytest.raises(TypeError, match="out"):
        _cpu.matmul(raw, Q8_0, 64, x, out=[[0.0] * 4] * 2)
    frozen = np.zeros((2, 4), np.float32)
    frozen.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        _cpu.matmul(raw, Q8_0, 64, x, out=frozen)
    shared = np.ones((2, 68), np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        _cpu.matmul(raw, Q8_0, 64, shared[:, :64], out=shared[:, 60:64])
    _cpu.matmul(raw, Q8_0, 64, shared[:, :64], out=shared[:, 64:68])  # interleaved rows of one buffer are fine
    with pytest.raises(ValueError, match="kind"):
        _cpu.quantize_act(x, "q4_0")
    with pytest.raises(ValueError, match="multiple of 256"):
        _cpu.quantize_act(x, "q8_k")
    with pytest.raises(TypeError, match="float32"):
        _cpu.quantize_act(x.astype(np.float16), "q8_0")
