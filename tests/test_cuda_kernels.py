"""Tests of the CUDA decode kernels (ds4d._cuda), run on the GPU machine; skipped with a reason without one.

Every kernel is checked on fresh random inputs against an independent reference: the float64 numpy oracle
(`ds4d.ops.reference`) and `gguf.quants.dequantize` for float-activation paths and the small ops; the CPU
backend's integer act8 product (`ds4d._cpu.matmul(act8=True)`), whose 8-bit activations and exact integer block
sums the GPU reproduces, for the quantized weight types (only the order of the float sums differs). Outputs are
poisoned (NaN bytes) before each launch, so an element no kernel wrote fails, and padding past a row must stay
poisoned. Relative errors are ||got - ref|| / ||ref|| with thresholds per METHOD (f32 arithmetic: well under
1e-4); the FP8 round trip and the activation quantizer are compared bit for bit.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from ds4d import _cpu
from ds4d.ops.reference import Reference, rope_inv_freq
from ds4d.weights import HyperConn, Weight

try:
    from ds4d import _cuda
    _SKIP = None if _cuda.device_count() > 0 else "no CUDA device on this machine"
except ImportError as exc:  # built without -DDS4_CUDA=ON
    _cuda, _SKIP = None, f"ds4d._cuda is not built ({exc})"

pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

F32, F16, Q8_0, Q2_K, Q4_K, IQ2_XXS, BF16 = 0, 1, 8, 10, 12, 16, 30
FLOAT_TYPES = [F32, F16, BF16]
QUANT_TYPES = [Q8_0, Q2_K, Q4_K, IQ2_XXS]
BLOCK = {F32: 1, F16: 1, BF16: 1, Q8_0: 32, Q2_K: 256, Q4_K: 256, IQ2_XXS: 256}
SCALES = {Q8_0: (34, [0]), Q2_K: (84, [80, 82]), Q4_K: (144, [0, 2]), IQ2_XXS: (66, [0])}
REF = Reference(np.float64)
REF32 = Reference(np.float32)


@pytest.fixture(scope="module")
def stream():
    _cuda.init()
    return _cuda.Stream()


@pytest.fixture
def rng(request):
    """A generator seeded by the test's name, the same in every run (str hash() is salted per process, which made
    a failure impossible to reproduce)."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


class Dev:
    """Device buffers of one test: inputs uploaded from numpy, outputs allocated poisoned (0xff bytes: NaN for
    floats) and read back after the stream drains."""

    def __init__(self, stream):
        self.stream = stream
        self.bufs = []

    def buf(self, a):
        a = np.ascontiguousarray(a)
        b = _cuda.Buffer(max(a.nbytes, 16))
        b.upload(a)
        b.shape, b.dtype = a.shape, a.dtype
        self.bufs.append(b)
        return b

    def put(self, a) -> int:
        return self.buf(a).ptr

    def out(self, shape, dtype=np.float32, poison=0xFF):
        b = _cuda.Buffer(max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 16))
        b.memset(poison)
        b.shape, b.dtype = tuple(shape), np.dtype(dtype)
        self.bufs.append(b)
        return b

    def get(self, b):
        self.stream.synchronize()
        return b.download(b.dtype, list(b.shape))


def rel(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(got)), "non-finite output (an unwritten element?)"
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-300))


def rand_weights(rng, type_, rows, cols, lead=()):
    """uint8 rows (*lead, rows, row_bytes) of `type_`: random quants, finite f16 scales of 1e-3..1 of both signs."""
    shape = (*lead, rows)
    if type_ in FLOAT_TYPES:
        v = rng.standard_normal((*shape, cols)).astype(np.float32)
        if type_ == F32:
            return v.view(np.uint8)
        if type_ == F16:
            return v.astype(np.float16).view(np.uint8)
        return (v.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    rb = _cpu.row_bytes(type_, cols)
    raw = rng.integers(0, 256, size=(*shape, rb), dtype=np.uint8)
    bb, offs = SCALES[type_]
    blocks = raw.reshape(*shape, rb // bb, bb)
    for off in offs:
        s = (10.0 ** rng.uniform(-3, 0, blocks.shape[:-1]) * rng.choice([-1, 1], blocks.shape[:-1]))
        blocks[..., off:off + 2] = s.astype(np.float16).view(np.uint8).reshape(*blocks.shape[:-1], 2)
    return raw


def dense(raw, type_, cols):
    """float64 weights of raw rows, decoded by gguf (the independent decoder)."""
    if type_ == F32:
        return raw.view(np.float32).reshape(*raw.shape[:-1], cols).astype(np.float64)
    return gguf_dequantize(raw, Q(type_)).reshape(*raw.shape[:-1], cols).astype(np.float64)


def f16_activations(type_, n_tok, rows, cols):
    """Whether ds4_cuda_matvec may stage this float-weight product's activations as f16 (matvec.cu: 4+ tokens and
    128+ rows whose f32 rows exceed 64 KB of shared memory and whose f16 rows fit; more than 8 tokens whose f16 rows
    do not fit, as products of 8): a 1e-3 tolerance, not f32's. (Where it splits K over a cluster's blocks, each
    stages its slice as f32: the tolerance is then only looser than needed.)"""
    def f16(nb):
        return nb >= 4 and rows >= 128 and nb * cols * 4 > 65536 and nb * cols * 2 <= 65536
    nb = next(b for b in (1, 2, 4, 8, 16) if b >= n_tok)
    if nb == 16 and cols * 16 * 4 > 65536 and not f16(16) and (f16(8) or 8 * cols * 4 <= 65536):
        nb = 8
    return type_ in FLOAT_TYPES and f16(nb)


def product_ref(raw, type_, cols, x):
    """The reference of one product: f64 on gguf-decoded weights for float types, the CPU's act8 product (the
    same integer sums as the GPU's) for quantized types."""
    if type_ in FLOAT_TYPES:
        return x.astype(np.float64) @ dense(raw, type_, cols).T
    return _cpu.matmul(np.ascontiguousarray(raw), type_, cols, np.ascontiguousarray(x, np.float32), act8=True)


# ---- matrix-vector products -----------------------------------------------------------------------------------

MATVEC_SHAPES = [  # (rows, cols per type's block)
    (1, 1), (3, 1), (37, 4), (256, 16), (24, 64),   # (24, 64 blocks): few rows, long rows -> several warps per row
]


@pytest.mark.parametrize("type_", FLOAT_TYPES + QUANT_TYPES)
@pytest.mark.parametrize("n_tok", [1, 2, 3, 8, 13, 16])
def test_matvec_all_types(stream, rng, type_, n_tok):
    d = Dev(stream)
    min_cols = {F32: 8, F16: 8, BF16: 8}.get(type_, BLOCK[type_])
    for rows, nb in MATVEC_SHAPES:
        cols = nb * min_cols if type_ in FLOAT_TYPES else nb * BLOCK[type_]
        cols = max(cols, min_cols)
        w = rand_weights(rng, type_, rows, cols)
        x_stride = cols + 4  # rows of x and y with padding, which must stay untouched
        x = rng.standard_normal((n_tok, x_stride)).astype(np.float32)
        ref = product_ref(w, type_, cols, x[:, :cols])
        wp, xp = d.put(w), d.put(x)
        # Quantized types with several tokens: with a workspace (activations quantized once) and without.
        n_work = _cuda.matvec_work_bytes(type_, n_tok, cols)
        for work in ([0, d.out((n_work,), np.uint8).ptr] if n_work else [0]):
            y = d.out((n_tok, rows + 3))
            _cuda.matvec(stream.ptr, y.ptr, rows + 3, wp, type_, rows, cols, xp, x_stride, n_tok, work=work)
            got = d.get(y)
            assert np.all(np.isnan(got[:, rows:])), "wrote past the end of a row of y"
            assert rel(got[:, :rows], ref) < 2e-5, (rows, cols, work)


@pytest.mark.parametrize("type_", QUANT_TYPES)
def test_matvec_act8_close_to_exact(stream, rng, type_):
    """The 8-bit activations cost at most a few per mille against f64 on the decoded weights."""
    d = Dev(stream)
    rows, cols = 64, 2048
    w = rand_weights(rng, type_, rows, cols)
    x = rng.standard_normal((2, cols)).astype(np.float32)
    y = d.out((2, rows))
    _cuda.matvec(stream.ptr, y.ptr, rows, d.put(w), type_, rows, cols, d.put(x), cols, 2)
    assert rel(d.get(y), x.astype(np.float64) @ dense(w, type_, cols).T) < 3e-2


@pytest.mark.parametrize("type_,rows,cols", [(Q8_0, 1024, 4096), (Q8_0, 512, 4096), (F16, 24, 16384),
                                             (IQ2_XXS, 2048, 4096), (Q2_K, 4096, 2048), (Q4_K, 2048, 4096),
                                             (F16, 256, 4096), (Q8_0, 4096, 8192), (F16, 8192, 1024)])
def test_matvec_real_shapes(stream, rng, type_, rows, cols):
    """The products of the model's shapes for one token and with the workspace for 8 and 13 (Q8_0, and F16 of
    256+ rows: the tensor-core path)."""
    d = Dev(stream)
    w = rand_weights(rng, type_, rows, cols)
    wp = d.put(w)
    for n_tok in (1, 8, 13):
        x = rng.standard_normal((n_tok, cols)).astype(np.float32)
        y = d.out((n_tok, rows))
        work = d.out((max(_cuda.matvec_work_bytes(type_, n_tok, cols), 16),), np.uint8)
        _cuda.matvec(stream.ptr, y.ptr, rows, wp, type_, rows, cols, d.put(x), cols, n_tok, work=work.ptr)
        mma = n_tok > 2 and (type_ == Q8_0 or (type_ == F16 and rows >= 256))  # to f32 rounding
        tol = 1e-3 if f16_activations(type_, n_tok, rows, cols) and not mma else 2e-5
        assert rel(d.get(y), product_ref(w, type_, cols, x)) < tol


def test_matvec_contiguous_rows(stream, rng):
    """A product of 256 MB or more (the LM head's size) gives each warp one contiguous range of rows, a short one
    last: every row has the bits of the same row in two products over halves of the rows (smaller: rows strided
    over the warps), and a sample of rows matches the reference."""
    d = Dev(stream)
    rows, cols = 62_001, 4096  # Q8_0: 4,352 bytes a row, 270 MB
    rb, half = cols // 32 * 34, 31_000
    w = _cuda.Buffer(rows * rb)
    w.fill_random(Q8_0, 5, stream=stream.ptr)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    xp = d.put(x)
    y, y0, y1 = d.out((1, rows)), d.out((1, half)), d.out((1, rows - half))
    _cuda.matvec(stream.ptr, y.ptr, rows, w.ptr, Q8_0, rows, cols, xp, cols, 1)
    _cuda.matvec(stream.ptr, y0.ptr, half, w.ptr, Q8_0, half, cols, xp, cols, 1)
    _cuda.matvec(stream.ptr, y1.ptr, rows - half, w.ptr + half * rb, Q8_0, rows - half, cols, xp, cols, 1)
    got = d.get(y)
    np.testing.assert_array_equal(got.view(np.uint32), np.concatenate([d.get(y0), d.get(y1)], 1).view(np.uint32))
    raw = w.download(np.uint8, [rows, rb])
    sample = np.r_[0, rng.choice(rows, 62, replace=False), rows - 1]
    assert rel(got[:, sample], product_ref(raw[sample], Q8_0, cols, x)) < 2e-5


@pytest.mark.parametrize("type_,rows,cols,n_tok", [
    (Q8_0, 100, 4096, 8),     # activations staged whole, a short last set of rows
    (Q8_0, 4096, 8192, 16),   # 16 tokens of 8192: two products of 8 tokens (each staged whole)
    (Q8_0, 4096, 8192, 11),
    (Q8_0, 256, 12288, 8),    # too wide to stage whole: activations through the ring slots
    (F16, 2056, 4096, 8),     # the compressors' joined F16 products at 8 tokens: K split over 2 blocks (sm_90),
    (F16, 2048, 4096, 16),    # over 4 at 16 tokens; a short last set
    (F16, 4232, 4096, 16),    # clusters of 4 taking several sets each, one short
    (F16, 2048, 8192, 16),    # split over 8
    (F16, 2048, 16384, 16),   # slices too wide even for 8: ring slots (as everywhere before sm_90)
    (F16, 8192, 1024, 16),    # the indexer's query at 16 tokens: staged whole
])
def test_matvec_tensor_core_layouts(stream, rng, type_, rows, cols, n_tok):
    """The tensor-core products of 3-16 tokens (ds4_cuda_matvec with a workspace) in each of their layouts of
    the activations, against the reference; nothing written past a row of y."""
    d = Dev(stream)
    w = rand_weights(rng, type_, rows, cols)
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    y = d.out((n_tok, rows + 3))
    work = d.out((_cuda.matvec_work_bytes(type_, n_tok, cols),), np.uint8)
    _cuda.matvec(stream.ptr, y.ptr, rows + 3, d.put(w), type_, rows, cols, d.put(x), cols, n_tok, work=work.ptr)
    got = d.get(y)
    assert np.all(np.isnan(got[:, rows:]))
    assert rel(got[:, :rows], product_ref(w, type_, cols, x)) < 2e-5


@pytest.mark.parametrize("type_", FLOAT_TYPES)
def test_matvec_f16_activations_keep_their_range(stream, rng, type_):
    """8 tokens of 3072 values for float weights go through f16 rows scaled per row (three stages: no K split):
    values far beyond f16's range (1e6) and far below it (1e-6) stay within the f16 rounding of the reference."""
    d = Dev(stream)
    rows, cols, n_tok = 256, 3072, 8
    assert f16_activations(type_, n_tok, rows, cols)
    w = rand_weights(rng, type_, rows, cols)
    x = (rng.standard_normal((n_tok, cols)) * np.array([1e6, 1e-6, 1, 3e4, 1, 1, 1, 1])[:, None]).astype(np.float32)
    y = d.out((n_tok, rows))
    _cuda.matvec(stream.ptr, y.ptr, rows, d.put(w), type_, rows, cols, d.put(x), cols, n_tok)
    got, ref = d.get(y), product_ref(w, type_, cols, x)
    for t in range(n_tok):
        assert rel(got[t], ref[t]) < 1e-3, t


@pytest.mark.parametrize("type_", FLOAT_TYPES)
@pytest.mark.parametrize("n_tok,groups,rows,cols", [(2, 1, 256, 4096), (8, 1, 256, 4096), (16, 1, 100, 8192),
                                                    (5, 2, 72, 4096), (8, 1, 24, 16384)])
def test_matvec_k_split(stream, rng, type_, n_tok, groups, rows, cols):
    """Float weights with 2+ tokens over few rows of 2-8 whole stages: on sm_90 their columns split over a cluster's
    blocks, each staging its slice of the activations as f32 (matvec.cu, launch_kc): within f32's rounding of
    the reference (elsewhere f16 activations where f32 rows do not fit), each token as its own one-token product
    (no split) to another order's rounding; short last sets and groups; nothing written past a row of y."""
    d = Dev(stream)
    w = rand_weights(rng, type_, groups * rows, cols)
    x = rng.standard_normal((n_tok, groups * cols)).astype(np.float32)
    ref = np.concatenate([product_ref(w[g * rows:(g + 1) * rows], type_, cols, x[:, g * cols:(g + 1) * cols])
                          for g in range(groups)], axis=1)
    wp, xp = d.put(w), d.put(x)
    y = d.out((n_tok, groups * rows + 3))
    _cuda.matvec(stream.ptr, y.ptr, groups * rows + 3, wp, type_, rows, cols, xp, groups * cols, n_tok,
                 groups=groups)
    got = d.get(y)
    assert np.all(np.isnan(got[:, groups * rows:]))
    # f16 activations still where a slice's f32 rows leave no room beside F32 weights' stages, or with no split
    f16 = f16_activations(type_, n_tok, rows, cols) and (type_ == F32 or _cuda.device_info()["cc"] < 90)
    assert rel(got[:, :groups * rows], ref) < (1e-3 if f16 else 2e-5)
    for t in (0, n_tok - 1):
        one = d.out((1, groups * rows))
        _cuda.matvec(stream.ptr, one.ptr, groups * rows, wp, type_, rows, cols, xp + 4 * t * groups * cols,
                     groups * cols, 1, groups=groups)
        assert rel(got[t, :groups * rows], d.get(one)[0]) < (1e-3 if f16 else 2e-6)


@pytest.mark.parametrize("type_", [Q8_0, F16, Q4_K])
def test_matvec_grouped(stream, rng, type_):
    """groups > 1: the block-diagonal product of the attention output projection (attn_output_a)."""
    d = Dev(stream)
    groups, rows, cols, n_tok = 4, 96, 512, 3
    w = rand_weights(rng, type_, groups * rows, cols)
    x = rng.standard_normal((n_tok, groups * cols)).astype(np.float32)
    ref = np.concatenate([product_ref(w[g * rows:(g + 1) * rows], type_, cols, x[:, g * cols:(g + 1) * cols])
                          for g in range(groups)], axis=1)
    n_work = _cuda.matvec_work_bytes(type_, n_tok, cols, groups)
    for work in ([0, d.out((n_work,), np.uint8).ptr] if n_work else [0]):
        y = d.out((n_tok, groups * rows))
        _cuda.matvec(stream.ptr, y.ptr, groups * rows, d.put(w), type_, rows, cols, d.put(x), groups * cols, n_tok,
                     groups=groups, work=work)
        assert rel(d.get(y), ref) < 2e-5


@pytest.mark.parametrize("type_", [Q8_0, F16, IQ2_XXS])
@pytest.mark.parametrize("n_tok", [1, 3, 16])
def test_matvec_parts(stream, rng, type_, n_tok):
    """Rows of matrices stored back to back, each part's rows into its own array: the bits of the one product
    over all the rows (the same kernel and sums, only where the outputs go differs), nothing past a part."""
    d = Dev(stream)
    cols, part_rows = 512, [96, 8, 200, 33]
    w = rand_weights(rng, type_, sum(part_rows), cols)
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    wp, xp = d.put(w), d.put(x)
    n_work = _cuda.matvec_work_bytes(type_, n_tok, cols)
    work = d.out((n_work,), np.uint8).ptr if n_work else 0
    whole = d.out((n_tok, sum(part_rows)))
    _cuda.matvec(stream.ptr, whole.ptr, sum(part_rows), wp, type_, sum(part_rows), cols, xp, cols, n_tok, work=work)
    ys = [d.out((n_tok * r + 4,)) for r in part_rows]   # NaN-filled: 4 values past each part must stay so
    _cuda.matvec_parts(stream.ptr, [y.ptr for y in ys], part_rows, wp, type_, cols, xp, cols, n_tok, work)
    want, at = d.get(whole), 0
    for y, r in zip(ys, part_rows):
        got = d.get(y)
        np.testing.assert_array_equal(got[:n_tok * r].reshape(n_tok, r), want[:, at:at + r])
        assert np.all(np.isnan(got[n_tok * r:]))
        at += r
    assert rel(want, product_ref(w, type_, cols, x)) < 2e-5
    with pytest.raises(ValueError, match="parts"):
        _cuda.matvec_parts(stream.ptr, [y.ptr for y in ys] * 3, part_rows * 3, wp, type_, cols, xp, cols, n_tok)


@pytest.mark.parametrize("type_", [Q8_0, IQ2_XXS])
@pytest.mark.parametrize("n_tok,with_work", [(1, False), (2, False), (3, True), (8, True), (8, False), (16, True)])
def test_matvec_normed(stream, rng, type_, n_tok, with_work):
    """The product of RMS-normed rows in one launch: the normed rows it writes are the reference's norm, and
    the product the bits of matvec on them (both quantize the same values: in every block, or once in the
    workspace); nothing is written past either output. Rows of different magnitudes (each its own norm)."""
    d = Dev(stream)
    rows, cols, eps = 300, 1024, 1e-6
    w = rand_weights(rng, type_, rows, cols)
    x = (rng.standard_normal((n_tok, cols)) * np.logspace(-2, 2, n_tok)[:, None]).astype(np.float32)
    g = rng.uniform(0.5, 1.5, cols).astype(np.float32)
    wp = d.put(w)
    n_work = _cuda.matvec_work_bytes(type_, n_tok, cols) if with_work else 0
    work = d.out((n_work,), np.uint8).ptr if n_work else 0
    y, xn, y2 = d.out((n_tok, rows + 2)), d.out((n_tok + 1, cols)), d.out((n_tok, rows + 2))
    _cuda.matvec_normed(stream.ptr, y.ptr, rows + 2, wp, type_, rows, cols, d.put(x), cols, n_tok, d.put(g), eps,
                        xn.ptr, work)
    got_xn = d.get(xn)
    assert rel(got_xn[:n_tok], REF.rms_norm(x, g, eps)) < 1e-6
    assert np.all(np.isnan(got_xn[n_tok:]))
    _cuda.matvec(stream.ptr, y2.ptr, rows + 2, wp, type_, rows, cols, xn.ptr, cols, n_tok, work=work)
    got = d.get(y)
    np.testing.assert_array_equal(got.view(np.uint32), d.get(y2).view(np.uint32))
    assert np.all(np.isnan(got[:, rows:]))
    assert rel(got[:, :rows], product_ref(w, type_, cols, REF.rms_norm(x, g, eps).astype(np.float32))) < 2e-5
    if n_tok > 2:  # the first two rows normed in the product's blocks (two tokens): the same bits
        xn2 = d.out((2, cols))
        _cuda.matvec_normed(stream.ptr, y2.ptr, rows + 2, wp, type_, rows, cols, d.put(x[:2]), cols, 2, d.put(g), eps,
                            xn2.ptr, 0)
        np.testing.assert_array_equal(d.get(xn2).view(np.uint32), got_xn[:2].view(np.uint32))


@pytest.mark.parametrize("n_tok,cols", [(1, 4096), (2, 4096), (1, 256), (2, 1024)])
def test_matvec_pair(stream, rng, n_tok, cols):
    """A Q8_0 and an F16 product of the same rows over parts (q_a and kv; the compressors' and the indexer's
    products) in one launch: what matvec_parts computes for each, bit for bit where each row is one stage (the
    same sums in the same order whatever share of the launch each product gets), else to the rounding of another
    order; nothing written past any part's output. It takes only the pairs matvec_pair_ok names."""
    d = Dev(stream)
    rows = ([700, 300], [500, 500, 120, 120, 40])
    ws = [rand_weights(rng, t, sum(r), cols) for t, r in zip((Q8_0, F16), rows)]
    x = (rng.standard_normal((n_tok, cols)) * np.logspace(-2, 2, n_tok)[:, None]).astype(np.float32)
    wp, xp = [d.put(w) for w in ws], d.put(x)
    assert _cuda.matvec_pair_ok(Q8_0, F16, cols, n_tok)
    ys = [[d.out((n_tok * r + 4,)) for r in rs] for rs in rows]
    _cuda.matvec_pair(stream.ptr, [y.ptr for y in ys[0]], rows[0], wp[0], Q8_0, [y.ptr for y in ys[1]], rows[1],
                      wp[1], F16, cols, xp, cols, n_tok)
    one_stage = cols <= 1024
    for k, t in enumerate((Q8_0, F16)):
        wants = [d.out((n_tok, r)) for r in rows[k]]
        _cuda.matvec_parts(stream.ptr, [y.ptr for y in wants], rows[k], wp[k], t, cols, xp, cols, n_tok)
        at, ref = 0, product_ref(ws[k], t, cols, x)
        for y, want, r in zip(ys[k], wants, rows[k]):
            got, want = d.get(y), d.get(want)
            assert np.all(np.isnan(got[n_tok * r:]))
            got = got[:n_tok * r].reshape(n_tok, r)
            if one_stage:
                np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
            else:
                assert rel(got, want) < 1e-6
            assert rel(got, ref[:, at:at + r]) < 2e-5
            at += r
    for t0, t1, c, n in ((F16, Q8_0, cols, n_tok), (Q8_0, Q8_0, cols, n_tok), (Q8_0, F16, cols, 3),
                         (Q8_0, F16, 768, 1)):
        assert not _cuda.matvec_pair_ok(t0, t1, c, n)
    with pytest.raises(ValueError, match="matvec_pair_ok"):
        _cuda.matvec_pair(stream.ptr, [y.ptr for y in ys[0]], rows[0], wp[0], Q8_0, [y.ptr for y in ys[1]],
                          rows[1], wp[1], F16, cols, xp, cols, 3)


def test_matvec_rejects_bad_arguments(stream):
    d = Dev(stream)
    b = d.out((64,))
    with pytest.raises(ValueError, match="cols"):
        _cuda.matvec(stream.ptr, b.ptr, 1, b.ptr, Q8_0, 1, 33, b.ptr, 33, 1)
    with pytest.raises(ValueError, match="n_tok"):
        _cuda.matvec(stream.ptr, b.ptr, 1, b.ptr, Q8_0, 1, 32, b.ptr, 32, 17)
    with pytest.raises(ValueError, match="unsupported"):
        _cuda.matvec(stream.ptr, b.ptr, 1, b.ptr, 2, 1, 32, b.ptr, 32, 1)


@pytest.mark.parametrize("kind", [32, 256])
def test_quantize_act_bitwise(stream, rng, kind):
    """The GPU's activation quantizer equals the CPU's bit for bit (ties of |max| included)."""
    d = Dev(stream)
    n, cols = 5, 1024
    x = (rng.standard_normal((n, cols)) * 10.0 ** rng.uniform(-3, 3, (n, 1))).astype(np.float32)
    x[1, :256] = 0.0                          # an all-zero block
    x[2, 10], x[2, 200] = -3.0e3, 3.0e3       # |max| tie: the first one wins
    qs, dd = d.out((n, cols), np.int8), d.out((n, cols // kind))
    bs = d.out((n, cols // 16), np.int16)
    _cuda.quantize_act(stream.ptr, qs.ptr, dd.ptr, bs.ptr, d.put(x), cols, n, cols, kind)
    ref = _cpu.quantize_act(x, "q8_0" if kind == 32 else "q8_k")
    np.testing.assert_array_equal(d.get(qs), ref[1])
    np.testing.assert_array_equal(d.get(dd).view(np.uint32), ref[0].view(np.uint32))
    if kind == 256:
        np.testing.assert_array_equal(d.get(bs), ref[2])


# ---- prefill products on tensor cores --------------------------------------------------------------------------

GEMM_SHAPES = [(64, 256), (100, 512), (24, 1024), (129, 2048)]  # (rows, cols): partial row tiles included


GEMM_TYPES = QUANT_TYPES + [F16]


@pytest.mark.parametrize("type_", GEMM_TYPES)
@pytest.mark.parametrize("n_tok,tile", [(1, 0), (17, 16), (64, 64), (100, 32), (100, 64), (100, 0)])
def test_gemm_all_types(stream, rng, type_, n_tok, tile):
    """The prefill product equals the CPU's act8 product (the same integer sums) to f32 rounding, for partial
    tiles of rows and tokens and each tile width (F16: the f64 product; its activations go in as two f16 parts,
    ~22 bits); nothing is written past a row of y."""
    d = Dev(stream)
    for rows, cols in GEMM_SHAPES:
        assert _cuda.gemm_ok(type_, cols)
        w = rand_weights(rng, type_, rows, cols)
        x_stride = cols + 4
        x = rng.standard_normal((n_tok, x_stride)).astype(np.float32)
        y = d.out((n_tok, rows + 3))
        work = d.out((_cuda.gemm_work_bytes(type_, n_tok, rows, cols),), np.uint8)
        _cuda.gemm(stream.ptr, y.ptr, rows + 3, d.put(w), type_, rows, cols, d.put(x), x_stride, n_tok, 1, work.ptr,
                   tile)
        got = d.get(y)
        assert np.all(np.isnan(got[:, rows:])), "wrote past the end of a row of y"
        assert rel(got[:, :rows], product_ref(w, type_, cols, x[:, :cols])) < 2e-5, (rows, cols)


@pytest.mark.parametrize("type_", GEMM_TYPES)
@pytest.mark.parametrize("tile", [16, 64])
def test_gemm_close_to_exact_and_grouped(stream, rng, type_, tile):
    """Against f64 on gguf's decoding of the weights (the 8-bit activations cost a few per mille), and the
    block-diagonal product of groups > 1."""
    d = Dev(stream)
    groups, rows, cols, n_tok = 3, 128, 1024, 70
    w = rand_weights(rng, type_, groups * rows, cols)
    x = rng.standard_normal((n_tok, groups * cols)).astype(np.float32)
    y = d.out((n_tok, groups * rows))
    work = d.out((_cuda.gemm_work_bytes(type_, n_tok, rows, cols, groups),), np.uint8)
    _cuda.gemm(stream.ptr, y.ptr, groups * rows, d.put(w), type_, rows, cols, d.put(x), groups * cols, n_tok, groups,
               work.ptr, tile)
    got = d.get(y)
    parts = [(slice(g * rows, (g + 1) * rows), slice(g * cols, (g + 1) * cols)) for g in range(groups)]
    exact = np.concatenate([x[:, c].astype(np.float64) @ dense(w[r], type_, cols).T for r, c in parts], axis=1)
    act8 = np.concatenate([product_ref(w[r], type_, cols, x[:, c]) for r, c in parts], axis=1)
    assert rel(got, act8) < 2e-5
    assert rel(got, exact) < (2e-5 if type_ == F16 else 3e-2)


def bf16_round(a):
    """float32 values rounded to bf16 (to nearest, ties to even), as float32."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)


@pytest.mark.skipif(_SKIP is not None or not _cuda.has_cutlass or _cuda.device_info()["cc"] != 90,
                    reason="the wgmma path needs an sm_90 GPU and a build with CUTLASS")
@pytest.mark.parametrize("type_", [Q8_0, F16])
@pytest.mark.parametrize("rows,cols,groups,n_tok", [(64, 256, 1, 64), (100, 512, 1, 200), (1024, 4096, 1, 130),
                                                    (128, 1024, 3, 70), (4096, 2048, 1, 512)])
def test_gemm_wgmma_path(stream, rng, type_, rows, cols, groups, n_tok):
    """Q8_0 and F16 products of 64+ rows on Hopper (tile 0, y rows of a multiple of 4 floats) run on wgmma with the
    operands rounded (Q8_0: gguf's weights and the activations to bf16; F16: the activations to f16): equal to the
    f64 product of those roundings to f32 accumulation, and not to the int8 path's product (the path was taken);
    groups apart; nothing written past a row of y. Below 64 rows, or with a tile pinned, the int8 path's."""
    d = Dev(stream)
    w = rand_weights(rng, type_, groups * rows, cols)
    x = rng.standard_normal((n_tok, groups * cols)).astype(np.float32)
    parts = [(slice(g * rows, (g + 1) * rows), slice(g * cols, (g + 1) * cols)) for g in range(groups)]
    if type_ == Q8_0:
        xr, wr = bf16_round(x), [bf16_round(dense(w[r], type_, cols)) for r, _ in parts]
    else:
        xr, wr = x.astype(np.float16), [dense(w[r], type_, cols) for r, _ in parts]
    ref = np.concatenate([xr[:, c].astype(np.float64) @ wg.astype(np.float64).T for (_, c), wg in zip(parts, wr)],
                         axis=1)
    int8 = np.concatenate([product_ref(w[r], type_, cols, x[:, c]) for r, c in parts], axis=1)
    y_stride = groups * rows + 4
    for n, tile in ((n_tok, 0), (63, 0), (n_tok, 64)):
        y = d.out((n, y_stride))
        work = d.out((_cuda.gemm_work_bytes(type_, n, rows, cols, groups),), np.uint8)
        _cuda.gemm(stream.ptr, y.ptr, y_stride, d.put(w), type_, rows, cols, d.put(x[:n]), groups * cols, n, groups,
                   work.ptr, tile)
        got = d.get(y)
        assert np.all(np.isnan(got[:, groups * rows:])), "wrote past the end of a row of y"
        got = got[:, :groups * rows]
        if n >= 64 and tile == 0:
            assert rel(got, ref[:n]) < 1e-5 and rel(got, int8[:n]) > 5e-5
        else:
            assert rel(got, int8[:n]) < 2e-5


def test_gemm_rejects_bad_arguments(stream):
    d = Dev(stream)
    b = d.out((4096,))
    assert not _cuda.gemm_ok(F32, 256) and not _cuda.gemm_ok(BF16, 256) and not _cuda.gemm_ok(Q8_0, 32)
    with pytest.raises(ValueError, match="multiple of 256"):
        _cuda.gemm(stream.ptr, b.ptr, 1, b.ptr, Q8_0, 1, 32, b.ptr, 32, 20, 1, b.ptr)
    with pytest.raises(ValueError, match="aligned"):
        _cuda.gemm(stream.ptr, b.ptr, 1, b.ptr, Q8_0, 1, 256, b.ptr, 256, 20, 1, 0)
    with pytest.raises(ValueError, match="tile"):
        _cuda.gemm(stream.ptr, b.ptr, 1, b.ptr, Q8_0, 1, 256, b.ptr, 256, 20, 1, b.ptr, 8)


# ---- mixture of experts --------------------------------------------------------------------------------------

MOE_TYPES = [(IQ2_XXS, Q2_K), (Q4_K, Q4_K), (Q8_0, Q8_0), (F16, F16)]


def swiglu_ref(g, u, clamp):
    return REF.swiglu(g, u, clamp)


@pytest.mark.parametrize("gate_type,down_type", MOE_TYPES)
@pytest.mark.parametrize("n_tok,n_used", [(1, 6), (3, 6), (8, 6), (2, 3), (2, 8), (2, 4), (1, 2)])
@pytest.mark.parametrize("n_embd,n_ff", [(512, 256), (2048, 1024)])
def test_moe(stream, rng, gate_type, down_type, n_tok, n_used, n_embd, n_ff):
    """Rows of 512 / 256 weights end inside a stage of the kernels' rings; rows of 2048 / 1024 fill whole stages
    (their aligned paths for the K types and IQ2_XXS, with every row of a down stage live where n_used is 2, 4, 6
    or 8: Q2_K's quarters, IQ2_XXS's pairs)."""
    d = Dev(stream)
    n_expert, clamp = 16, 10.0
    gate = rand_weights(rng, gate_type, n_ff, n_embd, lead=(n_expert,))
    up = rand_weights(rng, gate_type, n_ff, n_embd, lead=(n_expert,))
    down = rand_weights(rng, down_type, n_embd, n_ff, lead=(n_expert,))
    # Activations scaled so that some gate/up values pass the clamp of 10.
    scale = 3.0 if gate_type in FLOAT_TYPES else 0.05
    h = (rng.standard_normal((n_tok, n_embd)) * scale).astype(np.float32)
    ids = np.stack([rng.choice(n_expert, n_used, replace=False) for _ in range(n_tok)]).astype(np.int32)
    wts = rng.uniform(0.1, 0.5, (n_tok, n_used)).astype(np.float32)
    mid = d.out((n_tok, n_used, n_ff))
    _cuda.moe_gate_up(stream.ptr, mid.ptr, d.put(h), n_embd, d.put(gate), d.put(up), gate_type, n_ff, n_embd,
                      n_expert, d.put(ids), d.put(wts), n_used, n_tok, clamp)
    got_mid = d.get(mid)
    ref_mid = np.empty((n_tok, n_used, n_ff))
    for t in range(n_tok):
        for j, e in enumerate(ids[t]):
            g = product_ref(gate[e], gate_type, n_embd, h[t:t + 1])[0]
            u = product_ref(up[e], gate_type, n_embd, h[t:t + 1])[0]
            ref_mid[t, j] = swiglu_ref(g, u, clamp) * wts[t, j]
    assert np.abs(ref_mid).max() > 0.5  # silu(g) may underflow to exactly 0 (g < -88): no test on zeros here
    assert rel(got_mid, ref_mid) < 1e-4

    # down with mid quantized once into a workspace, and by every block itself (no workspace): the same bits
    out, out_self = d.out((n_tok, n_embd + 2)), d.out((n_tok, n_embd + 2))
    nwork = _cuda.moe_down_work_bytes(down_type, n_tok, n_used, n_ff)
    assert (nwork > 0) == (down_type not in FLOAT_TYPES)
    work = d.out((max(nwork, 16),), np.uint8)
    dp, ip = d.put(down), d.put(ids)
    _cuda.moe_down(stream.ptr, out.ptr, n_embd + 2, mid.ptr, dp, down_type, n_embd, n_ff, n_expert, ip, n_used,
                   n_tok, False, work.ptr if nwork else 0)
    _cuda.moe_down(stream.ptr, out_self.ptr, n_embd + 2, mid.ptr, dp, down_type, n_embd, n_ff, n_expert, ip, n_used,
                   n_tok)
    got = d.get(out)
    assert np.all(np.isnan(got[:, n_embd:]))
    ref = np.zeros((n_tok, n_embd))
    for t in range(n_tok):
        for j, e in enumerate(ids[t]):  # from the GPU's mid, so that this checks the down kernel alone
            ref[t] += product_ref(down[e], down_type, n_ff, got_mid[t, j:j + 1])[0]
    assert rel(got[:, :n_embd], ref) < 2e-5
    assert np.array_equal(got[:, :n_embd], d.get(out_self)[:, :n_embd])


@pytest.mark.parametrize("gate_type,down_type", MOE_TYPES[:2] + [(Q2_K, Q2_K)])
def test_moe_many_rows(stream, rng, gate_type, down_type):
    """8 tokens over rows of 3,072: each warp of the gate+up takes more than 16 (expert, row) pairs, whose outputs
    it finishes 16 at a time, the last batch partly (Q2_K gate and up: the whole-stage path of a K type with
    shared activations)."""
    test_moe(stream, rng, gate_type, down_type, 8, 6, 2048, 3072)


def check_filled_down(d, stream, rng, down_type, n_tok, n_used, n_ff, fill, n_embd=512, n_expert=8):
    """moe_down over a workspace that fill(mid, work) filled with the routed mid rows quantized: the workspace
    moe_down's own quantization of mid byte for byte, and moe_down reading it (work_filled) the bits it gives
    quantizing itself; work_filled without a workspace refused. Returns mid and the workspace."""
    mid = d.buf((rng.standard_normal((n_tok, n_used, n_ff)) * 10.0 ** rng.uniform(-2, 1, (n_tok, n_used, 1)))
                .astype(np.float32))
    down = rand_weights(rng, down_type, n_embd, n_ff, lead=(n_expert,))
    ids = np.stack([rng.choice(n_expert, n_used, replace=False) for _ in range(n_tok)]).astype(np.int32)
    nwork = _cuda.moe_down_work_bytes(down_type, n_tok, n_used, n_ff)
    work, work_own = d.out((nwork,), np.uint8), d.out((nwork,), np.uint8)
    dp, ip = d.put(down), d.put(ids)
    fill(mid, work)
    out, out_own = d.out((n_tok, n_embd)), d.out((n_tok, n_embd))
    _cuda.moe_down(stream.ptr, out.ptr, n_embd, mid.ptr, dp, down_type, n_embd, n_ff, n_expert, ip, n_used, n_tok,
                   False, work.ptr, True)
    _cuda.moe_down(stream.ptr, out_own.ptr, n_embd, mid.ptr, dp, down_type, n_embd, n_ff, n_expert, ip, n_used, n_tok,
                   False, work_own.ptr)
    np.testing.assert_array_equal(d.get(work), d.get(work_own))
    np.testing.assert_array_equal(d.get(out).view(np.uint32), d.get(out_own).view(np.uint32))
    with pytest.raises(ValueError, match="work_filled"):
        _cuda.moe_down(stream.ptr, out.ptr, n_embd, mid.ptr, dp, down_type, n_embd, n_ff, n_expert, ip, n_used, 1,
                       False, 0, True)
    return mid, work


@pytest.mark.parametrize("type_,cols", [(Q8_0, 2048), (Q8_0, 512), (Q4_K, 2048)])
@pytest.mark.parametrize("down_type", [Q2_K, IQ2_XXS])
@pytest.mark.parametrize("n_tok", [1, 2])
def test_matvec_quantizing(stream, rng, type_, cols, down_type, n_tok):
    """The shared expert's down with the routed experts' mid quantized in the same launch (Q8_0 rows past half a
    stage: extra blocks; else a second launch): the product is matvec's bits, and the workspace serves moe_down
    as its own quantization would (check_filled_down)."""
    d = Dev(stream)
    rows, n_used, n_ff = 4096, 6, 2048
    w = rand_weights(rng, type_, rows, cols)
    x = (rng.standard_normal((n_tok, cols)) * 0.1).astype(np.float32)
    y, y_ref = d.out((n_tok * rows + 2,)), d.out((n_tok, rows))
    wp, xp = d.put(w), d.put(x)

    def fill(mid, work):
        _cuda.matvec_quantizing(stream.ptr, y.ptr, wp, type_, rows, cols, xp, n_tok, mid.ptr, n_used, n_ff,
                                down_type, work.ptr)

    mid, work = check_filled_down(d, stream, rng, down_type, n_tok, n_used, n_ff, fill)
    _cuda.matvec(stream.ptr, y_ref.ptr, rows, wp, type_, rows, cols, xp, cols, n_tok)
    got = d.get(y)
    np.testing.assert_array_equal(got[:n_tok * rows].view(np.uint32), d.get(y_ref).reshape(-1).view(np.uint32))
    assert np.all(np.isnan(got[n_tok * rows:]))
    with pytest.raises(ValueError, match="Q8_K"):
        _cuda.matvec_quantizing(stream.ptr, y.ptr, wp, type_, rows, cols, xp, n_tok, mid.ptr, n_used, n_ff, Q8_0,
                                work.ptr)
    with pytest.raises(ValueError, match="1 or 2 tokens"):
        _cuda.matvec_quantizing(stream.ptr, y.ptr, wp, type_, rows, cols, xp, 3, mid.ptr, n_used, n_ff, down_type,
                                work.ptr)


@pytest.mark.parametrize("hash_layer", [False, True])
@pytest.mark.parametrize("n_tok,n_expert", [(1, 256), (8, 256), (3, 40)])
def test_moe_route_gate_up(stream, rng, hash_layer, n_tok, n_expert):
    """gate+up choosing the experts itself from the router's logits: ids and weights bit for bit those of the
    route kernel (which the reference checks), and mid that of gate+up reading them, for every block of a
    token (the grid spreads each token's pairs over many blocks; one of them writes the choice). The launch also
    normalizes hc_pre's deferred combine matrices: hc_sinkhorn's bits."""
    d = Dev(stream)
    n_embd, n_ff, k, clamp = 512, 256, 6, 10.0
    gate = rand_weights(rng, IQ2_XXS, n_ff, n_embd, lead=(n_expert,))
    up = rand_weights(rng, IQ2_XXS, n_ff, n_embd, lead=(n_expert,))
    h = (rng.standard_normal((n_tok, n_embd)) * 0.05).astype(np.float32)
    logits = (rng.standard_normal((n_tok, n_expert)) * 3).astype(np.float32)
    logits[0, :4] = [25.0, -25.0, 19.0, -19.0]     # both softplus branches
    bias = (rng.standard_normal(n_expert) * 0.1).astype(np.float32)
    tid2eid = rng.integers(0, n_expert, (50, k)).astype(np.int32)
    tokens = rng.integers(0, 50, n_tok).astype(np.int32)
    lp, bp = d.put(logits), 0 if hash_layer else d.put(bias)
    tp, kp = d.put(tid2eid) if hash_layer else 0, d.put(tokens)
    gp, up_, hp = d.put(gate), d.put(up), d.put(h)
    ids, w, mid = d.out((n_tok, k), np.int32), d.out((n_tok, k)), d.out((n_tok, k, n_ff))
    hcv = (rng.standard_normal((n_tok, 20)) * 2).astype(np.float32)
    hcb, hcr = d.buf(hcv), d.buf(hcv)
    _cuda.moe_route_gate_up(stream.ptr, mid.ptr, ids.ptr, w.ptr, lp, bp, tp, kp, 1.5, True, hp, n_embd, gp, up_,
                            IQ2_XXS, n_ff, n_embd, n_expert, k, n_tok, clamp, hc=hcb.ptr, hc_n_tok=n_tok,
                            hc_n_iter=20, hc_eps=1e-6)
    _cuda.hc_sinkhorn(stream.ptr, hcr.ptr, n_tok, 20, 1e-6)
    got_hc = d.get(hcb)
    np.testing.assert_array_equal(got_hc, d.get(hcr))
    np.testing.assert_array_equal(got_hc[:, :4], hcv[:, :4])
    assert rel(got_hc[:, 4:].reshape(n_tok, 4, 4), REF.sinkhorn(hcv[:, 4:].reshape(n_tok, 4, 4), 20, 1e-6)) < 1e-5
    rids, rw, rmid = d.out((n_tok, k), np.int32), d.out((n_tok, k)), d.out((n_tok, k, n_ff))
    _cuda.route(stream.ptr, rids.ptr, rw.ptr, lp, bp, tp, kp, n_tok, n_expert, k, 1.5, True)
    _cuda.moe_gate_up(stream.ptr, rmid.ptr, hp, n_embd, gp, up_, IQ2_XXS, n_ff, n_embd, n_expert, rids.ptr, rw.ptr,
                      k, n_tok, clamp)
    want_ids, want_w = REF.route(logits, None if hash_layer else bias, tid2eid if hash_layer else None, tokens, k,
                                 1.5, True)
    np.testing.assert_array_equal(d.get(ids), want_ids)
    np.testing.assert_array_equal(d.get(w).view(np.uint32), d.get(rw).view(np.uint32))
    np.testing.assert_array_equal(d.get(mid).view(np.uint32), d.get(rmid).view(np.uint32))


@pytest.mark.parametrize("gate_type", [IQ2_XXS, Q4_K, Q8_0])
@pytest.mark.parametrize("n_embd,n_ff,sh_n_ff,n_expert,n_tok", [(512, 64, 1000, 40, 1), (4096, 2048, 2048, 8, 1),
                                                                (512, 64, 1000, 40, 3), (4096, 2048, 2048, 8, 8)])
def test_moe_route_gate_up_shared(stream, rng, gate_type, n_embd, n_ff, sh_n_ff, n_expert, n_tok):
    """gate+up with the shared expert inside (each token's blocks its token's): the routed part (ids, weights, mid)
    bit for bit that of the launch without it; the shared expert's SwiGLU against the reference (Q8_0 products,
    weight 1), and bit for bit the products path's of one token (matvec of gate and of up, then swiglu), as the
    CUDA backend ran it before. The shapes: more pairs than the grid has shared-expert warps (each takes several),
    and the real model's widths (about one pair per warp at one token, several at eight)."""
    d = Dev(stream)
    assert _cuda.moe_shared_ok(gate_type, n_embd, n_tok) and not _cuda.moe_shared_ok(F16, n_embd, 1)
    k, clamp, sh_clamp = 6, 10.0, 7.0
    gate = rand_weights(rng, gate_type, n_ff, n_embd, lead=(n_expert,))
    up = rand_weights(rng, gate_type, n_ff, n_embd, lead=(n_expert,))
    sh_gate, sh_up = rand_weights(rng, Q8_0, sh_n_ff, n_embd), rand_weights(rng, Q8_0, sh_n_ff, n_embd)
    h = (rng.standard_normal((n_tok, n_embd)) * 0.05).astype(np.float32)
    logits = (rng.standard_normal((n_tok, n_expert)) * 3).astype(np.float32)
    bias = (rng.standard_normal(n_expert) * 0.1).astype(np.float32)
    lp, bp, kp = d.put(logits), d.put(bias), d.put(np.zeros(n_tok, np.int32))
    gp, up_, hp, sgp, sup = d.put(gate), d.put(up), d.put(h), d.put(sh_gate), d.put(sh_up)
    outs = []
    hcv = (rng.standard_normal((n_tok, 20)) * 2).astype(np.float32)
    hcb, hcr = d.buf(hcv), d.buf(hcv)
    for shared in (False, True):  # the second also with a deferred combine matrix to normalize (as the model runs)
        ids, w = d.out((n_tok, k), np.int32), d.out((n_tok, k))
        mid, sh_mid = d.out((n_tok, k, n_ff)), d.out((n_tok, sh_n_ff))
        sh = dict(sh_gate=sgp, sh_up=sup, sh_n_ff=sh_n_ff, sh_clamp=sh_clamp, sh_mid=sh_mid.ptr,
                  hc=hcb.ptr, hc_n_tok=n_tok, hc_n_iter=20, hc_eps=1e-6) if shared else {}
        _cuda.moe_route_gate_up(stream.ptr, mid.ptr, ids.ptr, w.ptr, lp, bp, 0, kp, 1.5, True, hp, n_embd, gp, up_,
                                gate_type, n_ff, n_embd, n_expert, k, n_tok, clamp, **sh)
        outs.append((ids, w, mid, sh_mid))
    _cuda.hc_sinkhorn(stream.ptr, hcr.ptr, n_tok, 20, 1e-6)
    np.testing.assert_array_equal(d.get(hcb), d.get(hcr))
    for a, b in zip(outs[0][:3], outs[1][:3]):
        np.testing.assert_array_equal(d.get(a).view(np.uint32), d.get(b).view(np.uint32))
    got = d.get(outs[1][3])
    g, u = product_ref(sh_gate, Q8_0, n_embd, h), product_ref(sh_up, Q8_0, n_embd, h)
    ref = swiglu_ref(g, u, sh_clamp)
    assert np.abs(ref).max() > 0.5 and (np.abs(u) > sh_clamp).any()  # the clamp matters
    assert rel(got, ref) < 1e-4
    pg, pu, pm = d.out((1, sh_n_ff)), d.out((1, sh_n_ff)), d.out((1, sh_n_ff))
    for t in range(n_tok):
        ht = hp + 4 * t * n_embd
        _cuda.matvec(stream.ptr, pg.ptr, sh_n_ff, sgp, Q8_0, sh_n_ff, n_embd, ht, n_embd, 1)
        _cuda.matvec(stream.ptr, pu.ptr, sh_n_ff, sup, Q8_0, sh_n_ff, n_embd, ht, n_embd, 1)
        _cuda.swiglu(stream.ptr, pm.ptr, pg.ptr, pu.ptr, sh_n_ff, sh_clamp)
        np.testing.assert_array_equal(got[t].view(np.uint32), d.get(pm)[0].view(np.uint32))


@pytest.mark.parametrize("gate_type,down_type", MOE_TYPES)
@pytest.mark.parametrize("n_tok,n_used,tile", [(2, 6, 0), (40, 6, 0), (150, 4, 0), (150, 4, 16), (150, 4, 64),
                                               (300, 6, 32)])
def test_moe_grouped(stream, rng, gate_type, down_type, n_tok, n_used, tile):
    """The routed experts of many tokens in one grouped pass equal the per-pair reference: skewed routing (one
    expert takes more than a tile of pairs, some none), an id out of range (reads expert 0), and the result added
    to what out holds (the shared expert); tiles of each width (0: the kernel's choice), some of them partly
    empty."""
    d = Dev(stream)
    n_expert, n_embd, n_ff, clamp = 16, 512, 256, 10.0
    gate = rand_weights(rng, gate_type, n_ff, n_embd, lead=(n_expert,))
    up = rand_weights(rng, gate_type, n_ff, n_embd, lead=(n_expert,))
    down = rand_weights(rng, down_type, n_embd, n_ff, lead=(n_expert,))
    h = (rng.standard_normal((n_tok, n_embd)) * (3.0 if gate_type in FLOAT_TYPES else 0.05)).astype(np.float32)
    p = np.r_[8.0, np.ones(n_expert - 3), 0.0, 0.0]
    ids = np.stack([rng.choice(n_expert, n_used, replace=False, p=p / p.sum()) for _ in range(n_tok)])
    ids = ids.astype(np.int32)
    ids[0, 0] = -1
    wts = rng.uniform(0.1, 0.5, (n_tok, n_used)).astype(np.float32)
    prior = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
    ref = prior.astype(np.float64)
    for t in range(n_tok):
        for j, e in enumerate(ids[t]):
            e = max(e, 0)
            g = product_ref(gate[e], gate_type, n_embd, h[t:t + 1])[0]
            u = product_ref(up[e], gate_type, n_embd, h[t:t + 1])[0]
            mid = (swiglu_ref(g, u, clamp) * wts[t, j]).astype(np.float32)[None]
            ref[t] += product_ref(down[e], down_type, n_ff, mid)[0]
    out = d.buf(np.pad(prior, ((0, 0), (0, 2)), constant_values=np.nan))
    work = d.out((_cuda.moe_work_bytes(gate_type, down_type, n_tok, n_used, n_embd, n_ff, n_expert),), np.uint8)
    _cuda.moe_grouped(stream.ptr, out.ptr, n_embd + 2, d.put(h), n_embd, d.put(gate), d.put(up), d.put(down),
                      gate_type, down_type, n_ff, n_embd, n_expert, d.put(ids), d.put(wts), n_used, n_tok, clamp,
                      True, work.ptr, tile)
    got = d.get(out)
    assert np.all(np.isnan(got[:, n_embd:]))
    # mid rows are re-quantized to 8 bits from f32 sums in another order: a rounding may flip (1/127 of a block)
    assert rel(got[:, :n_embd] - prior, ref - prior) < 1e-3


def test_swiglu(stream, rng):
    d = Dev(stream)
    g = (rng.standard_normal(3001) * 20).astype(np.float32)
    u = (rng.standard_normal(3001) * 20).astype(np.float32)
    mid = d.out((3001,))
    _cuda.swiglu(stream.ptr, mid.ptr, d.put(g), d.put(u), 3001, 10.0)
    assert rel(d.get(mid), REF.swiglu(g, u, 10.0)) < 1e-6


@pytest.mark.parametrize("n_tok", [3, 8])
def test_swiglu_q8(stream, rng, n_tok):
    """The SwiGLU that also writes its output's Q8_0 form into the workspace of the product after it: mid bit for
    bit the plain SwiGLU's, the workspace the quantizer's bytes (an all-zero block included), and the product
    taking it (work_filled) bit for bit the product quantizing mid itself."""
    d = Dev(stream)
    cols, rows = 2048, 512
    g = (rng.standard_normal((n_tok, cols)) * 20).astype(np.float32)
    u = (rng.standard_normal((n_tok, cols)) * 20).astype(np.float32)
    u[1, 64:96] = 0.0
    gp, up_ = d.put(g), d.put(u)
    nq = _cuda.matvec_work_bytes(Q8_0, n_tok, cols)
    mid, mid_ref, xq, work = d.out((n_tok, cols)), d.out((n_tok, cols)), d.out((nq,), np.uint8), d.out((nq,), np.uint8)
    _cuda.swiglu(stream.ptr, mid.ptr, gp, up_, n_tok * cols, 10.0, xq.ptr)
    _cuda.swiglu(stream.ptr, mid_ref.ptr, gp, up_, n_tok * cols, 10.0)
    m = d.get(mid)
    np.testing.assert_array_equal(m.view(np.uint32), d.get(mid_ref).view(np.uint32))
    qs, dd = d.out((n_tok, cols), np.int8), d.out((n_tok, cols // 32))
    _cuda.quantize_act(stream.ptr, qs.ptr, dd.ptr, 0, mid.ptr, cols, n_tok, cols, 32)
    got = d.get(xq)
    n = n_tok * cols
    np.testing.assert_array_equal(got[:n].view(np.int8), d.get(qs).reshape(-1))
    np.testing.assert_array_equal(got[n:n + 4 * (n // 32)].view(np.uint32), d.get(dd).reshape(-1).view(np.uint32))
    w = rand_weights(rng, Q8_0, rows, cols)
    wp = d.put(w)
    y, y_own = d.out((n_tok, rows)), d.out((n_tok, rows))
    _cuda.matvec(stream.ptr, y.ptr, rows, wp, Q8_0, rows, cols, mid.ptr, cols, n_tok, 1, xq.ptr, True)
    _cuda.matvec(stream.ptr, y_own.ptr, rows, wp, Q8_0, rows, cols, mid.ptr, cols, n_tok, 1, work.ptr)
    np.testing.assert_array_equal(d.get(y).view(np.uint32), d.get(y_own).view(np.uint32))
    with pytest.raises(ValueError, match="multiple of 32"):
        _cuda.swiglu(stream.ptr, mid.ptr, gp, up_, n_tok * cols - 1, 10.0, xq.ptr)


@pytest.mark.parametrize("down_type", [Q2_K, IQ2_XXS, Q8_0])
def test_moe_down_quantize(stream, rng, down_type):
    """The routed mid rows quantized by a launch of their own, before moe_down: the workspace serves moe_down as its
    own quantization would (check_filled_down); float experts refused."""
    d = Dev(stream)
    n_tok, n_used, n_ff = 5, 6, 512

    def fill(mid, work):
        _cuda.moe_down_quantize(stream.ptr, work.ptr, mid.ptr, down_type, n_tok, n_used, n_ff)

    mid, work = check_filled_down(d, stream, rng, down_type, n_tok, n_used, n_ff, fill, n_embd=256)
    with pytest.raises(ValueError, match="float activations"):
        _cuda.moe_down_quantize(stream.ptr, work.ptr, mid.ptr, F16, n_tok, n_used, n_ff)


def test_moe_shared_expert_accumulates(stream, rng):
    """ids/weights null: the shared expert (one expert, weight 1), added onto the routed output."""
    d = Dev(stream)
    n_tok, n_embd, n_ff = 2, 512, 256
    gate, up = rand_weights(rng, Q8_0, n_ff, n_embd), rand_weights(rng, Q8_0, n_ff, n_embd)
    down = rand_weights(rng, Q8_0, n_embd, n_ff)
    h = (rng.standard_normal((n_tok, n_embd)) * 0.05).astype(np.float32)
    mid = d.out((n_tok, 1, n_ff))
    _cuda.moe_gate_up(stream.ptr, mid.ptr, d.put(h), n_embd, d.put(gate), d.put(up), Q8_0, n_ff, n_embd, 1, 0, 0,
                      1, n_tok, 10.0)
    got_mid = d.get(mid)[:, 0]
    ref_mid = swiglu_ref(product_ref(gate, Q8_0, n_embd, h), product_ref(up, Q8_0, n_embd, h), 10.0)
    assert rel(got_mid, ref_mid) < 1e-4
    base = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
    out = d.out((n_tok, n_embd))
    out.upload(base)
    _cuda.moe_down(stream.ptr, out.ptr, n_embd, mid.ptr, d.put(down), Q8_0, n_embd, n_ff, 1, 0, 1, n_tok, True)
    ref = base + product_ref(down, Q8_0, n_ff, np.ascontiguousarray(got_mid))
    assert rel(d.get(out), ref) < 2e-5


# ---- attention -----------------------------------------------------------------------------------------------

def attention_ref(q, raw, raw_n, comp, comp_n, sel, sinks, scale):
    """Reference.attention's formula, token by token (rows as the GPU's lists give them)."""
    T, H, D = q.shape
    out = np.empty((T, H, D))
    for t in range(T):
        c_idx = np.arange(comp_n[t]) if sel is None else sel[t][(sel[t] >= 0) & (sel[t] < comp_n[t])]
        keys = np.concatenate([raw[t, :raw_n[t]], comp[t, c_idx]]).astype(np.float64)
        s = (q[t].astype(np.float64) @ keys.T) * scale
        m = np.maximum(s.max(axis=1) if len(keys) else -np.inf, sinks)
        p = np.exp(s - m[:, None])
        out[t] = (p @ keys) / (p.sum(axis=1) + np.exp(sinks - m))[:, None]
    return out


RAW_CAP, COMP_CAP, SEL_CAP = 128, 300, 64


def attention_case(rng, raw_n, comp_n, dim, n_head, q_scale, with_sel, comp_cap=COMP_CAP):
    """Random f16 rows (raw window and compressed), queries scaled per token by q_scale, sinks, and with_sel an
    indexer selection per token: ascending rows, a few entries short of its capacity (-1)."""
    T = len(raw_n)
    raw = rng.standard_normal((T, RAW_CAP, dim)).astype(np.float16)
    comp = rng.standard_normal((T, comp_cap, dim)).astype(np.float16)
    q = (rng.standard_normal((T, n_head, dim)) * np.asarray(q_scale).reshape(-1, 1, 1)).astype(np.float32)
    sinks = rng.standard_normal(n_head).astype(np.float32)
    sel = None
    if with_sel:
        sel = np.full((T, SEL_CAP), -1, np.int32)
        for t in range(T):
            k = min(int(comp_n[t]), SEL_CAP - 3)
            sel[t, :k] = np.sort(rng.choice(max(int(comp_n[t]), 1), k, replace=False))
    return raw, comp, q, sinks, sel


@pytest.mark.parametrize("dim,n_head", [(512, 16), (128, 8), (256, 20)])
@pytest.mark.parametrize("with_sel", [False, True])
@pytest.mark.parametrize("rows", [np.float16, np.float32])
def test_attention_decode(stream, rng, dim, n_head, with_sel, rows):
    """Split rows and their combine: f16 rows on the tensor-core kernel's split mode where shared memory allows
    (Hopper), f32 rows (exact numerics) on the CUDA-core kernel; head counts not a multiple of 16 or 4."""
    d = Dev(stream)
    raw_cap, comp_cap, sel_cap = RAW_CAP, COMP_CAP, SEL_CAP
    raw_n = np.array([1, 77, 128, 0, 33, 0], np.int32)
    comp_n = np.array([0, 5, 300, 40, 129, 0], np.int32)   # the last token sees no row: only its sink
    T = len(raw_n)
    raw, comp, q, sinks, sel = attention_case(rng, raw_n, comp_n, dim, n_head, 0.15, with_sel)
    raw, comp = raw.astype(rows), comp.astype(rows)
    scale = 1.0 / math.sqrt(dim)
    out = d.out((T, n_head, dim))
    scratch = _cuda.Buffer(_cuda.attention_scratch_bytes(T, n_head, dim, raw_cap, comp_cap, sel_cap, with_sel))
    scratch.memset(0xFF)
    args = (scratch.ptr, d.put(q), d.put(raw), raw_cap * dim, d.put(raw_n), raw_cap, d.put(comp), comp_cap * dim,
            d.put(comp_n), comp_cap, d.put(sel) if with_sel else 0, sel_cap, d.put(sinks), T, n_head, dim, scale,
            0, 0, rows == np.float32)
    _cuda.attention_decode(stream.ptr, out.ptr, *args)
    ref = attention_ref(q, raw, raw_n, comp, comp_n, sel, sinks.astype(np.float64), scale)
    got = d.get(out)
    assert np.all(got[-1] == 0) and rel(got, ref) < 1e-5
    # A second launch on the same scratch gives the same bits (the graph replays it).
    out.memset(0xFF)
    _cuda.attention_decode(stream.ptr, out.ptr, *args)
    np.testing.assert_array_equal(d.get(out), got)


@pytest.mark.parametrize("front", [False, True])
def test_attention_decode_long(stream, rng, front):
    """Long lists of compressed rows (a ratio-128 layer past 256K positions): the tensor-core kernel's splits past
    the raw window take several row tiles each (4,100 rows: 3 tiles per split), against the reference; with the
    decode front, its output and ring bit for bit those of the norms, the store and the attention apart."""
    d = Dev(stream)
    dim, n_head, comp_cap = 512, 16, 4100
    pos = np.array([5000, 130, 999_999, 127, 262_143, 40], np.int32)
    raw_n = np.minimum(pos + 1, RAW_CAP).astype(np.int32)
    comp_n = np.array([4100, 2500, 2048, 3001, 77, 0], np.int32)
    T = len(pos)
    raw, comp, q, sinks, _ = attention_case(rng, raw_n, comp_n, dim, n_head, 0.15, False, comp_cap)
    scale = 1.0 / math.sqrt(dim)
    nbytes = _cuda.attention_scratch_bytes(T, n_head, dim, RAW_CAP, comp_cap, SEL_CAP, False)
    cp, cn, rn = d.put(comp), d.put(comp_n), d.put(raw_n)
    scratch = _cuda.Buffer(nbytes)
    if not front:
        out = d.out((T, n_head, dim))
        _cuda.attention_decode(stream.ptr, out.ptr, scratch.ptr, d.put(q), d.put(raw), RAW_CAP * dim,
                               rn, RAW_CAP, cp, comp_cap * dim, cn, comp_cap, 0, SEL_CAP, d.put(sinks), T, n_head,
                               dim, scale, 0, 0, False)
        ref = attention_ref(q, raw, raw_n, comp, comp_n, None, sinks.astype(np.float64), scale)
        assert rel(d.get(out), ref) < 1e-5
        return
    kv = kv_test_rows(rng, T, dim)
    kv_w = rng.uniform(0.5, 1.5, dim).astype(np.float32)
    inv = rope_inv_freq(64, 10000.0, (16.0, 65536, 32.0, 1.0))
    pp, ip, eps, n_nope = d.put(pos), d.put(inv), 1e-6, 448
    outs, ring_bits = [], []
    for fused in (False, True):
        ring = d.buf(raw)
        rows = d.put(np.array([ring.ptr + t * RAW_CAP * dim * 2 for t in range(T)], np.int64))
        out = d.out((T, n_head, dim))
        if fused:
            _cuda.attention_decode(stream.ptr, out.ptr, scratch.ptr, d.put(q), 0, 0, rn, RAW_CAP, cp,
                                   comp_cap * dim, cn, comp_cap, 0, SEL_CAP, d.put(sinks), T, n_head, dim, scale,
                                   rows, 0, False, pp, ip, 64, kv_x=d.put(kv), kv_w=d.put(kv_w), eps=eps,
                                   n_nope=n_nope)
        else:
            qn, kvn = d.out((T, n_head, dim)), d.out((T, dim))
            _cuda.rms_norm_rope(stream.ptr, qn.ptr, dim, d.put(q), dim, 0, T * n_head, dim, eps, pp, n_head, ip, 64,
                                also=(kvn.ptr, dim, d.put(kv), dim, d.put(kv_w), T, 1))
            _cuda.kv_store(stream.ptr, 0, 0, kvn.ptr, dim, pp, 0, 1, RAW_CAP, T, dim, n_nope, True, rows)
            _cuda.attention_decode(stream.ptr, out.ptr, scratch.ptr, qn.ptr, 0, 0, rn, RAW_CAP, cp,
                                   comp_cap * dim, cn, comp_cap, 0, SEL_CAP, d.put(sinks), T, n_head, dim, scale,
                                   rows, 0, False, pp, ip, 64)
        outs.append(d.get(out))
        ring_bits.append(d.get(ring).view(np.uint16))
    np.testing.assert_array_equal(ring_bits[1], ring_bits[0])
    np.testing.assert_array_equal(outs[1], outs[0])


@pytest.mark.parametrize("rows", [np.float16, np.float32])
def test_attention_decode_inverse_rope(stream, rng, rows):
    """With positions, each head's rotated tail comes back turned by the inverse RoPE (positions to 10^6, the
    model's YaRN frequencies): the reference attention then Reference.rope in float64, to f32 rounding."""
    d = Dev(stream)
    dim, n_head = 512, 16
    raw_n = np.array([1, 77, 128, 0, 33, 0], np.int32)
    comp_n = np.array([0, 5, 300, 40, 129, 0], np.int32)
    T = len(raw_n)
    raw, comp, q, sinks, _ = attention_case(rng, raw_n, comp_n, dim, n_head, 0.15, False)
    raw, comp = raw.astype(rows), comp.astype(rows)
    pos = np.array([0, 5, 1000, 65535, 999_999, 31], np.int32)
    inv_freq = rope_inv_freq(64, 10000.0, (16.0, 65536, 32.0, 1.0))
    scale = 1.0 / math.sqrt(dim)
    out = d.out((T, n_head, dim))
    scratch = _cuda.Buffer(_cuda.attention_scratch_bytes(T, n_head, dim, RAW_CAP, COMP_CAP, SEL_CAP, False))
    _cuda.attention_decode(stream.ptr, out.ptr, scratch.ptr, d.put(q), d.put(raw), RAW_CAP * dim, d.put(raw_n),
                           RAW_CAP, d.put(comp), COMP_CAP * dim, d.put(comp_n), COMP_CAP, 0, SEL_CAP, d.put(sinks), T,
                           n_head, dim, scale, 0, 0, rows == np.float32, d.put(pos), d.put(inv_freq), 64)
    att = attention_ref(q, raw, raw_n, comp, comp_n, None, sinks.astype(np.float64), scale)
    ref = Reference(np.float64).rope(att, pos, inv_freq, inverse=True)
    got = d.get(out)
    assert np.all(got[-1] == 0) and rel(got, ref) < 1e-5
    assert rel(got[..., -64:], ref[..., -64:]) < 1e-5 and rel(att[..., -64:], ref[..., -64:]) > 1e-2


@pytest.mark.parametrize("dim,n_head,n_nope", [(512, 64, 448), (128, 8, 0), (256, 20, 64)])
@pytest.mark.parametrize("with_sel", [False, True])
def test_attention_decode_front(stream, rng, dim, n_head, n_nope, with_sel):
    """The decode front (the query heads' norm and RoPE, the K=V row's norm, RoPE, FP8 round trip and store into
    its ring slot, inside the split launch) gives the bits of rms_norm_rope, kv_store and the attention after them:
    the output and every session's ring (rows reached through per-token tables, as the engine's step passes them),
    the new rows in different tiles, before and after the ring wraps, with and without compressed rows."""
    d = Dev(stream)
    pos = np.array([0, 40, 127, 128, 1000, 999_999], np.int32)
    raw_n = np.minimum(pos + 1, RAW_CAP).astype(np.int32)
    comp_n = np.array([0, 5, 300, 40, 129, 7], np.int32)
    T = len(pos)
    raw, comp, q, sinks, sel = attention_case(rng, raw_n, comp_n, dim, n_head, 3.0, with_sel)
    kv = kv_test_rows(rng, T, dim)
    kv_w = rng.uniform(0.5, 1.5, dim).astype(np.float32)
    inv = rope_inv_freq(64, 10000.0, (16.0, 65536, 32.0, 1.0))
    scale, eps = 1.0 / math.sqrt(dim), 1e-6
    pp, ip, rn, cp, cn = d.put(pos), d.put(inv), d.put(raw_n), d.put(comp), d.put(comp_n)
    sp = d.put(sel) if with_sel else 0
    nbytes = _cuda.attention_scratch_bytes(T, n_head, dim, RAW_CAP, COMP_CAP, SEL_CAP, with_sel)

    def rings():
        ring = d.buf(raw)
        return ring, d.put(np.array([ring.ptr + t * RAW_CAP * dim * 2 for t in range(T)], np.int64))

    # Apart: the norms and RoPE, the store, then the attention over the stored rows.
    ring_a, rows_a = rings()
    qn, kvn, out_a = d.out((T, n_head, dim)), d.out((T, dim)), d.out((T, n_head, dim))
    _cuda.rms_norm_rope(stream.ptr, qn.ptr, dim, d.put(q), dim, 0, T * n_head, dim, eps, pp, n_head, ip, 64,
                        also=(kvn.ptr, dim, d.put(kv), dim, d.put(kv_w), T, 1))
    _cuda.kv_store(stream.ptr, 0, 0, kvn.ptr, dim, pp, 0, 1, RAW_CAP, T, dim, n_nope, n_nope > 0, rows_a)
    scratch_a = _cuda.Buffer(nbytes)
    _cuda.attention_decode(stream.ptr, out_a.ptr, scratch_a.ptr, qn.ptr, 0, 0, rn, RAW_CAP, cp, COMP_CAP * dim, cn,
                           COMP_CAP, sp, SEL_CAP, d.put(sinks), T, n_head, dim, scale, rows_a, 0, False, pp, ip, 64)
    # The front, in one launch (and its combine).
    ring_b, rows_b = rings()
    out_b = d.out((T, n_head, dim))
    scratch_b = _cuda.Buffer(nbytes)
    _cuda.attention_decode(stream.ptr, out_b.ptr, scratch_b.ptr, d.put(q), 0, 0, rn, RAW_CAP, cp, COMP_CAP * dim, cn,
                           COMP_CAP, sp, SEL_CAP, d.put(sinks), T, n_head, dim, scale, rows_b, 0, False, pp, ip, 64,
                           kv_x=d.put(kv), kv_w=d.put(kv_w), eps=eps, n_nope=n_nope)
    got_ring = d.get(ring_b)
    np.testing.assert_array_equal(got_ring.view(np.uint16), d.get(ring_a).view(np.uint16))
    np.testing.assert_array_equal(d.get(out_b), d.get(out_a))
    # Each token alone, as a one-token step launches it (with the indexer's choice the launch also runs its query
    # phase once before the dependency wait): the same bits, its ring slot the one written.
    for t in (1, 4):
        ring_c = d.buf(raw[t:t + 1])
        out_c, scratch_c = d.out((1, n_head, dim)), _cuda.Buffer(nbytes)
        _cuda.attention_decode(stream.ptr, out_c.ptr, scratch_c.ptr, d.put(q[t:t + 1]), 0, 0, d.put(raw_n[t:t + 1]),
                               RAW_CAP, d.put(comp[t:t + 1]), COMP_CAP * dim, d.put(comp_n[t:t + 1]), COMP_CAP,
                               d.put(sel[t:t + 1]) if with_sel else 0, SEL_CAP, d.put(sinks), 1, n_head, dim, scale,
                               d.put(np.array([ring_c.ptr], np.int64)), 0, False, d.put(pos[t:t + 1]), ip, 64,
                               kv_x=d.put(kv[t:t + 1]), kv_w=d.put(kv_w), eps=eps, n_nope=n_nope)
        np.testing.assert_array_equal(d.get(out_c)[0], d.get(out_a)[t])
        np.testing.assert_array_equal(d.get(ring_c)[0].view(np.uint16), got_ring[t].view(np.uint16))
    # The new rows against the reference (norm, RoPE, FP8) and nothing else of the rings touched.
    new = REF.norm_rope(kv.astype(np.float64), kv_w, eps, pos, inv)
    new = (REF32.fp8_kv(new.astype(np.float32), n_nope) if n_nope else new).astype(np.float16)
    for t in range(T):
        slot = pos[t] % RAW_CAP
        assert rel(got_ring[t, slot].astype(np.float64), new[t].astype(np.float64)) < 1e-2
        np.testing.assert_array_equal(np.delete(got_ring[t], slot, 0), np.delete(raw[t], slot, 0))


@pytest.mark.parametrize("dim,n_head,groups,n_tok", [(512, 64, 8, 6), (512, 64, 8, 16), (128, 8, 2, 3),
                                                    (256, 20, 4, 5)])
def test_attention_decode_q8_out(stream, rng, dim, n_head, groups, n_tok):
    """With xq the decode attention also writes its output as the Q8_0 activations of the grouped product after it
    (attn_output_a: 8 groups of 8 heads): the same f32 output, the CPU quantizer's bits for each group's rows (a
    token with no row gives all-zero blocks), and ds4_cuda_matvec taking them (work_filled) gives the bits of the
    product that quantizes the output itself."""
    d = Dev(stream)
    pos = rng.integers(0, 5000, n_tok).astype(np.int32)
    raw_n = np.minimum(pos + 1, RAW_CAP).astype(np.int32)
    comp_n = rng.integers(0, COMP_CAP, n_tok).astype(np.int32)
    raw_n[-1] = comp_n[-1] = 0
    raw, comp, q, sinks, _ = attention_case(rng, raw_n, comp_n, dim, n_head, 3.0, False)
    kv, kv_w = kv_test_rows(rng, n_tok, dim), rng.uniform(0.5, 1.5, dim).astype(np.float32)
    inv = rope_inv_freq(64, 10000.0, (16.0, 65536, 32.0, 1.0))
    cols = n_head * dim // groups
    n_work = _cuda.matvec_work_bytes(Q8_0, n_tok, cols, groups)

    def run(xq):
        ring = d.buf(raw)
        rows = d.put(np.array([ring.ptr + t * RAW_CAP * dim * 2 for t in range(n_tok)], np.int64))
        out = d.out((n_tok, n_head, dim))
        scratch = _cuda.Buffer(_cuda.attention_scratch_bytes(n_tok, n_head, dim, RAW_CAP, COMP_CAP, SEL_CAP, False))
        _cuda.attention_decode(stream.ptr, out.ptr, scratch.ptr, d.put(q), 0, 0, d.put(raw_n), RAW_CAP, d.put(comp),
                               COMP_CAP * dim, d.put(comp_n), COMP_CAP, 0, SEL_CAP, d.put(sinks), n_tok, n_head, dim,
                               1.0 / math.sqrt(dim), rows, 0, False, d.put(pos), d.put(inv), 64, kv_x=d.put(kv),
                               kv_w=d.put(kv_w), eps=1e-6, n_nope=dim - 64, xq=xq, xq_groups=groups)
        return out

    xq = d.out((n_work,), np.uint8)
    out = run(xq.ptr)
    got = d.get(out)
    np.testing.assert_array_equal(got, d.get(run(0)))
    assert np.all(got[-1] == 0)
    planes = d.get(xq)
    per = n_work // groups
    for g in range(groups):
        ref_d, ref_qs = _cpu.quantize_act(np.ascontiguousarray(got.reshape(n_tok, groups, cols)[:, g]), "q8_0")[:2]
        base = planes[g * per:(g + 1) * per]
        np.testing.assert_array_equal(base[:n_tok * cols].view(np.int8).reshape(n_tok, cols), ref_qs)
        got_d = base[n_tok * cols:n_tok * cols + 4 * n_tok * cols // 32].view(np.float32).reshape(n_tok, -1)
        np.testing.assert_array_equal(got_d.view(np.uint32), ref_d.view(np.uint32))
    rows_g = 96
    w = d.put(rand_weights(rng, Q8_0, groups * rows_g, cols))
    y_own, y_pre = d.out((n_tok, groups * rows_g)), d.out((n_tok, groups * rows_g))
    work = d.out((n_work,), np.uint8)
    _cuda.matvec(stream.ptr, y_own.ptr, groups * rows_g, w, Q8_0, rows_g, cols, out.ptr, groups * cols, n_tok,
                 groups=groups, work=work.ptr)
    _cuda.matvec(stream.ptr, y_pre.ptr, groups * rows_g, w, Q8_0, rows_g, cols, out.ptr, groups * cols, n_tok,
                 groups=groups, work=xq.ptr, work_filled=True)
    np.testing.assert_array_equal(d.get(y_pre), d.get(y_own))
    # What the two entry points refuse: the Q8_0 output of 2 tokens, a filled workspace for another type.
    with pytest.raises(ValueError, match="Q8_0 output"):
        _cuda.attention_decode(stream.ptr, out.ptr, xq.ptr, d.put(q), 0, 0, d.put(raw_n), RAW_CAP, d.put(comp),
                               COMP_CAP * dim, d.put(comp_n), COMP_CAP, 0, SEL_CAP, d.put(sinks), 2, n_head, dim,
                               1.0, xq=xq.ptr, xq_groups=groups)
    with pytest.raises(ValueError, match="work_filled"):
        _cuda.matvec(stream.ptr, y_pre.ptr, groups * rows_g, w, F16, rows_g, cols, out.ptr, groups * cols, n_tok,
                     groups=groups, work=xq.ptr, work_filled=True)


@pytest.mark.parametrize("dim,n_head", [(512, 64), (128, 8), (256, 20)])
@pytest.mark.parametrize("with_sel", [False, True])
@pytest.mark.parametrize("rope", [False, True])
def test_attention_prefill(stream, rng, dim, n_head, with_sel, rope):
    """The tensor-core kernel for many queries: the reference to f32 rounding (Q and P enter as two f16 parts),
    with rows missing from the selection, tokens with no row (only the sink), head counts not a multiple of its
    32, scores large enough to need the running maximum, and the same bits on a second launch. With positions, q
    enters before its norm and RoPE (positions to 10^6, YaRN frequencies) and the output's tail comes back turned
    by the inverse RoPE."""
    assert _cuda.attention_prefill_ok(dim)  # Hopper's shared memory fits every dim
    d = Dev(stream)
    raw_cap, comp_cap, sel_cap = RAW_CAP, COMP_CAP, SEL_CAP
    raw_n = np.array([1, 77, 128, 0, 33, 0, 128, 5], np.int32)
    comp_n = np.array([0, 5, 300, 40, 129, 0, 64, 2], np.int32)   # token 5 sees no row
    T = len(raw_n)
    raw, comp, q, sinks, sel = attention_case(rng, raw_n, comp_n, dim, n_head,
                                              [0.15, 1.0, 3e-3, 0.5, 0.15, 1, 0.2, 30], with_sel)
    scale = 1.0 / math.sqrt(dim)
    out = d.out((T, n_head, dim))
    pos = np.array([0, 76, 4095, 3, 32, 9, 1_000_003, 4], np.int32)
    inv, eps = rope_inv_freq(64, 160000.0, (16.0, 65536, 32.0, 1.0)), 1e-6
    args = (d.put(q), d.put(raw), raw_cap * dim, d.put(raw_n), raw_cap, d.put(comp), comp_cap * dim, d.put(comp_n),
            comp_cap, d.put(sel) if with_sel else 0, sel_cap, d.put(sinks), T, n_head, dim, scale, 0, 0)
    if rope:
        args += (d.put(pos), d.put(inv), 64, eps)
    _cuda.attention_prefill(stream.ptr, out.ptr, *args)
    q_in = REF.norm_rope(q.astype(np.float64), None, eps, pos, inv) if rope else q
    ref = attention_ref(q_in, raw, raw_n, comp, comp_n, sel, sinks.astype(np.float64), scale)
    if rope:
        ref = REF.rope(ref, pos, inv, inverse=True)
    got = d.get(out)
    assert np.all(got[5] == 0)
    for t in range(T):
        assert rel(got[t], ref[t]) < 1e-5, t
    out.memset(0xFF)
    _cuda.attention_prefill(stream.ptr, out.ptr, *args)
    np.testing.assert_array_equal(d.get(out), got)


# ---- norms, hyper-connections ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,n,weighted", [(1, 4096, True), (64, 512, False), (7, 1024, True), (3, 16384, False)])
def test_rms_norm(stream, rng, rows, n, weighted):
    d = Dev(stream)
    x = (rng.standard_normal((rows, n)) * 10.0 ** rng.uniform(-2, 2, (rows, 1))).astype(np.float32)
    w = rng.uniform(0.5, 1.5, n).astype(np.float32) if weighted else None
    y = d.out((rows, n + 4))
    _cuda.rms_norm(stream.ptr, y.ptr, n + 4, d.put(x), n, d.put(w) if weighted else 0, rows, n, 1e-6)
    got = d.get(y)
    assert np.all(np.isnan(got[:, n:]))
    assert rel(got[:, :n], REF.rms_norm(x, w, 1e-6)) < 1e-6


def random_hc(rng, n_mix, n_embd):
    fn = (rng.standard_normal((n_mix, 4 * n_embd)) / math.sqrt(4 * n_embd) * 4).astype(np.float16)
    scale = rng.uniform(0.5, 2.0, 3 if n_mix > 4 else 1).astype(np.float32)
    base = rng.standard_normal(n_mix).astype(np.float32)
    return HyperConn(Weight("fn", Q.F16, fn.shape, fn), scale, base)


# On sm_90 up to 8 tokens take one launch (a cluster per token: 16 blocks at n_embd 4096), more the mixer + finish.
@pytest.mark.parametrize("n_tok,n_embd", [(1, 4096), (8, 4096), (2, 512), (5, 256), (16, 512), (37, 512)])
def test_hc_pre_and_post(stream, rng, n_tok, n_embd):
    d = Dev(stream)
    hc = random_hc(rng, 24, n_embd)
    X = rng.standard_normal((n_tok, 4, n_embd)).astype(np.float32)
    x, hcs = d.out((n_tok, n_embd)), d.out((n_tok, 20))
    scratch = d.out((_cuda.hc_pre_scratch_bytes(n_tok, n_embd, 24),), np.uint8)
    Xb = d.buf(X)
    Xp = Xb.ptr
    _cuda.hc_pre(stream.ptr, x.ptr, hcs.ptr, scratch.ptr, Xp, 4 * n_embd, d.put(hc.fn.raw), F16, d.put(hc.scale),
                 d.put(hc.base), n_tok, n_embd, 24, 20, 1e-6, 1e-6)
    rx, rpost, rcomb = REF.hc_pre(X, hc, 20, 1e-6, 1e-6)
    got_hc = d.get(hcs)
    assert rel(d.get(x), rx) < 1e-5
    assert rel(got_hc[:, :4], rpost) < 1e-5
    assert rel(got_hc[:, 4:].reshape(n_tok, 4, 4), rcomb) < 1e-5
    # with the sublayer's RMSNorm fused: the same post/combine, x normalized
    norm = rng.uniform(0.5, 1.5, n_embd).astype(np.float32)
    _cuda.hc_pre(stream.ptr, x.ptr, hcs.ptr, scratch.ptr, Xp, 4 * n_embd, d.put(hc.fn.raw), F16, d.put(hc.scale),
                 d.put(hc.base), n_tok, n_embd, 24, 20, 1e-6, 1e-6, d.put(norm))
    assert rel(d.get(x), REF.hc_pre(X, hc, 20, 1e-6, 1e-6, norm)[0]) < 1e-5
    np.testing.assert_array_equal(d.get(hcs), got_hc)
    # x also as Q8_0 activations (a product's workspace planes): the CPU quantizer's bits of the x it writes, and
    # the product that takes them (work_filled) the bits of the one that quantizes x itself
    want_x, n_work = d.get(x), _cuda.matvec_work_bytes(Q8_0, n_tok, n_embd)
    xq = d.out((max(n_work, n_tok * n_embd * 2),), np.uint8)
    _cuda.hc_pre(stream.ptr, x.ptr, hcs.ptr, scratch.ptr, Xp, 4 * n_embd, d.put(hc.fn.raw), F16, d.put(hc.scale),
                 d.put(hc.base), n_tok, n_embd, 24, 20, 1e-6, 1e-6, d.put(norm), xq_qs=xq.ptr,
                 xq_d=xq.ptr + n_tok * n_embd)
    np.testing.assert_array_equal(d.get(x), want_x)
    np.testing.assert_array_equal(d.get(hcs), got_hc)
    planes, (ref_d, ref_qs) = d.get(xq), _cpu.quantize_act(want_x, "q8_0")[:2]
    np.testing.assert_array_equal(planes[:n_tok * n_embd].view(np.int8).reshape(n_tok, n_embd), ref_qs)
    got_d = planes[n_tok * n_embd:n_tok * n_embd * 9 // 8].view(np.float32).reshape(n_tok, -1)  # 4 bytes per 32
    np.testing.assert_array_equal(got_d.view(np.uint32), ref_d.view(np.uint32))
    if 2 < n_tok <= 16:
        part_rows = [64, 40]
        wp = d.put(rand_weights(rng, Q8_0, sum(part_rows), n_embd))
        own, pre = [[d.out((n_tok, r)) for r in part_rows] for _ in range(2)]
        _cuda.matvec_parts(stream.ptr, [y.ptr for y in own], part_rows, wp, Q8_0, n_embd, x.ptr, n_embd, n_tok,
                           d.out((n_work,), np.uint8).ptr)
        _cuda.matvec_parts(stream.ptr, [y.ptr for y in pre], part_rows, wp, Q8_0, n_embd, x.ptr, n_embd, n_tok,
                           xq.ptr, True)
        for a, b in zip(own, pre):
            np.testing.assert_array_equal(d.get(a).view(np.uint32), d.get(b).view(np.uint32))
    elif n_tok <= 2:  # the kernels that quantize in every block take no workspace
        with pytest.raises(ValueError, match="work_filled"):
            _cuda.matvec_parts(stream.ptr, [x.ptr], [8], d.put(rand_weights(rng, Q8_0, 8, n_embd)), Q8_0, n_embd,
                               x.ptr, n_embd, n_tok, xq.ptr, True)
    # defer: the same x and post gates, the combine matrix as its logits; hc_sinkhorn then gives hc_pre's bits
    want_x = d.get(x)
    hd = d.out((n_tok, 20))
    _cuda.hc_pre(stream.ptr, x.ptr, hd.ptr, scratch.ptr, Xp, 4 * n_embd, d.put(hc.fn.raw), F16, d.put(hc.scale),
                 d.put(hc.base), n_tok, n_embd, 24, 20, 1e-6, 1e-6, d.put(norm), defer=True)
    np.testing.assert_array_equal(d.get(x), want_x)
    got_d = d.get(hd)
    np.testing.assert_array_equal(got_d[:, :4], got_hc[:, :4])
    assert rel(got_d[:, 4:].reshape(n_tok, 4, 4), REF.hc_gates(X, hc, 1e-6, 1e-6)[2]) < 1e-5
    _cuda.hc_sinkhorn(stream.ptr, hd.ptr, n_tok, 20, 1e-6)
    np.testing.assert_array_equal(d.get(hd), got_hc)

    f = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
    fp = d.put(f)
    Xo = d.out((n_tok, 4, n_embd))
    _cuda.hc_post(stream.ptr, Xo.ptr, fp, Xp, hcs.ptr, n_tok, n_embd)
    assert rel(d.get(Xo), REF.hc_post(f, X, got_hc[:, :4], got_hc[:, 4:].reshape(n_tok, 4, 4))) < 1e-6

    # hc_post fused into the next sublayer's hc_pre: the same new streams and the same outputs as the two apart,
    # bit for bit (out of place, then in place)
    hc2 = random_hc(rng, 24, n_embd)
    w2 = (d.put(hc2.fn.raw), F16, d.put(hc2.scale), d.put(hc2.base))
    x2, hcs2 = d.out((n_tok, n_embd)), d.out((n_tok, 20))
    _cuda.hc_pre(stream.ptr, x2.ptr, hcs2.ptr, scratch.ptr, Xo.ptr, 4 * n_embd, *w2, n_tok, n_embd, 24, 20, 1e-6,
                 1e-6, d.put(norm))
    want = d.get(Xo), d.get(x2), d.get(hcs2)
    for inplace in (False, True):
        Xn = Xb if inplace else d.out((n_tok, 4, n_embd))
        _cuda.hc_pre(stream.ptr, x2.ptr, hcs2.ptr, scratch.ptr, Xn.ptr, 4 * n_embd, *w2, n_tok, n_embd, 24, 20, 1e-6,
                     1e-6, d.put(norm), post_f=fp, post_X=Xp, post_hc=hcs.ptr)
        for got, ref in zip((d.get(Xn), d.get(x2), d.get(hcs2)), want):
            np.testing.assert_array_equal(got, ref)
    # hc_post in place
    Xb.upload(X)
    _cuda.hc_post(stream.ptr, Xp, fp, Xp, hcs.ptr, n_tok, n_embd)
    np.testing.assert_array_equal(d.get(Xb), want[0])


def test_hc_head(stream, rng):
    d = Dev(stream)
    n_tok, n_embd = 3, 1024
    hc = random_hc(rng, 4, n_embd)
    X = rng.standard_normal((n_tok, 4, n_embd)).astype(np.float32)
    x = d.out((n_tok, n_embd))
    scratch = d.out((_cuda.hc_pre_scratch_bytes(n_tok, n_embd, 4),), np.uint8)
    _cuda.hc_pre(stream.ptr, x.ptr, 0, scratch.ptr, d.put(X), 4 * n_embd, d.put(hc.fn.raw), F16,
                 d.put(hc.scale), d.put(hc.base), n_tok, n_embd, 4, 20, 1e-6, 1e-6)
    assert rel(d.get(x), REF.hc_head(X, hc, 1e-6, 1e-6)) < 1e-5


# ---- positions, KV rows ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("yarn", [False, True])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope(stream, rng, yarn, inverse):
    d = Dev(stream)
    inv = rope_inv_freq(64, 160000.0, (16.0, 65536, 32.0, 1.0)) if yarn else rope_inv_freq(64, 10000.0)
    pos = np.array([0, 1, 127, 4095, 65535, 1_000_003], np.int32)
    T, H, D = len(pos), 64, 512
    x = rng.standard_normal((T, H, D)).astype(np.float32)
    xb = d.buf(x)
    _cuda.rope(stream.ptr, xb.ptr, H * D, d.put(pos), -3, d.put(inv), T, H, D, 64, inverse)
    got = d.get(xb)
    ref = REF.rope(x, pos - 3, inv, inverse=inverse)
    assert np.array_equal(got[..., :D - 64], x[..., :D - 64])
    assert rel(got, ref) < 1e-6


@pytest.mark.parametrize("heads,weighted", [(64, False), (1, True)])
def test_rms_norm_rope_is_norm_then_rope(stream, rng, heads, weighted):
    """The fused kernel gives the bits of rms_norm followed by rope (query heads; the weighted K=V row)."""
    d = Dev(stream)
    inv = rope_inv_freq(64, 160000.0, (16.0, 65536, 32.0, 1.0))
    pos = np.array([0, 5, 4095, 1_000_003], np.int32)
    T, D = len(pos), 512
    x = rng.standard_normal((T, heads, D)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, D).astype(np.float32) if weighted else None
    wp, pp, ip = (d.put(w) if weighted else 0), d.put(pos), d.put(inv)
    fused, apart = d.out((T, heads, D)), d.out((T, heads, D))
    _cuda.rms_norm_rope(stream.ptr, fused.ptr, D, d.put(x), D, wp, T * heads, D, 1e-6, pp, heads, ip, 64)
    _cuda.rms_norm(stream.ptr, apart.ptr, D, d.put(x), D, wp, T * heads, D, 1e-6)
    _cuda.rope(stream.ptr, apart.ptr, heads * D, pp, 0, ip, T, heads, D, 64, False)
    np.testing.assert_array_equal(d.get(fused), d.get(apart))
    assert rel(d.get(fused), REF.norm_rope(x, w, 1e-6, pos, inv)) < 1e-6


def test_rms_norm_rope_two_sets_in_one_launch(stream, rng):
    """`also`: the query heads (unweighted) and the K=V row (weighted) in one launch, each set's bits those of its
    own launch; nothing written past either set's rows."""
    d = Dev(stream)
    inv = rope_inv_freq(64, 10000.0)
    pos = np.array([3, 70000, 12], np.int32)
    T, H, D = len(pos), 8, 512
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    kv = (rng.standard_normal((T, D)) * 100).astype(np.float32)
    w = rng.uniform(0.5, 1.5, D).astype(np.float32)
    pp, ip, wp = d.put(pos), d.put(inv), d.put(w)
    q1, kv1 = d.out((T, H, D)), d.out((T, D + 4))
    _cuda.rms_norm_rope(stream.ptr, q1.ptr, D, d.put(q), D, 0, T * H, D, 1e-6, pp, H, ip, 64,
                        also=(kv1.ptr, D + 4, d.put(kv), D, wp, T, 1))
    q2, kv2 = d.out((T, H, D)), d.out((T, D + 4))
    _cuda.rms_norm_rope(stream.ptr, q2.ptr, D, d.put(q), D, 0, T * H, D, 1e-6, pp, H, ip, 64)
    _cuda.rms_norm_rope(stream.ptr, kv2.ptr, D + 4, d.put(kv), D, wp, T, D, 1e-6, pp, 1, ip, 64)
    np.testing.assert_array_equal(d.get(q1), d.get(q2))
    np.testing.assert_array_equal(d.get(kv1)[:, :D], d.get(kv2)[:, :D])
    assert np.all(np.isnan(d.get(kv1)[:, D:]))
    assert rel(d.get(kv1)[:, :D], REF.norm_rope(kv, w, 1e-6, pos, inv)) < 1e-6


def test_hadamard_fp4_with_rope(stream, rng):
    """The indexer query's RoPE inside the Hadamard + FP4 launch gives the bits of rope then hadamard_fp4 (64
    heads of 128 per token, positions to 10^6, the compressed layers' YaRN frequencies)."""
    d = Dev(stream)
    inv = rope_inv_freq(64, 160000.0, (16.0, 65536, 32.0, 1.0))
    pos = np.array([0, 5, 4095, 1_000_003], np.int32)
    T, H = len(pos), 64
    x = (rng.standard_normal((T, H, 128)) * rng.uniform(1e-2, 1e2, (T, H, 1))).astype(np.float32)
    pp, ip = d.put(pos), d.put(inv)
    fused, apart = d.buf(x), d.buf(x)
    _cuda.hadamard_fp4(stream.ptr, fused.ptr, T * H, pp, ip, 64, H)
    _cuda.rope(stream.ptr, apart.ptr, H * 128, pp, 0, ip, T, H, 128, 64, False)
    _cuda.hadamard_fp4(stream.ptr, apart.ptr, T * H)
    got = d.get(fused)
    np.testing.assert_array_equal(got.view(np.uint32), d.get(apart).view(np.uint32))
    # Against the float64 reference: FP4 grid points, all but values on a rounding boundary equal.
    want = REF.hadamard_fp4(REF.rope(x.astype(np.float64), pos, inv))
    assert np.isclose(got, want, rtol=1e-6, atol=0).mean() > 0.999


def kv_test_rows(rng, n, dim):
    """Rows whose 64-blocks span magnitudes from below the 1e-4 floor to 1e3, with zeros and exact ties."""
    x = rng.standard_normal((n, dim)) * 10.0 ** rng.uniform(-7, 3, (n, dim // 64, 1)).repeat(64, axis=2).reshape(n, dim)
    x[0, :64] = 0.0
    x[1, 64:128] = 448.0 * 2.0 ** -5 * np.round(rng.uniform(-8, 8, 64))  # values on the E4M3 grid and halfway
    return x.astype(np.float32)


def test_fp8_kv_bitwise(stream, rng):
    d = Dev(stream)
    n, dim, n_nope = 9, 512, 448
    x = kv_test_rows(rng, n, dim)
    y = d.out((n, dim))
    _cuda.fp8_kv(stream.ptr, y.ptr, d.put(x), n, dim, n_nope)
    ref = REF32.fp8_kv(x, n_nope)
    np.testing.assert_array_equal(d.get(y).view(np.uint32), ref.view(np.uint32))


def test_kv_store_ring(stream, rng):
    d = Dev(stream)
    T, dim, n_nope, ring = 4, 512, 448, 8
    x = kv_test_rows(rng, T, dim)
    pos = np.array([5, 8, 13, 130], np.int32)   # slots 5, 0, 5, 2 of each token's own ring
    dst = d.out((T, ring, dim), np.float16)
    _cuda.kv_store(stream.ptr, dst.ptr, ring * dim, d.put(x), dim, d.put(pos), 0, 1, ring, T, dim, n_nope, True)
    got = d.get(dst).view(np.uint16)
    ref = REF32.fp8_kv(x, n_nope).astype(np.float16).view(np.uint16)
    for t in range(T):
        slot = pos[t] % ring
        np.testing.assert_array_equal(got[t, slot], ref[t])
        others = np.delete(got[t], slot, axis=0)
        assert np.all(others == 0xFFFF), "wrote outside the row's slot"
    # compressed-row placement: row (pos + 1 - ratio) / ratio, no FP8
    dst2 = d.out((T, 64, dim), np.float16)
    pos2 = np.array([3, 7, 127, 255], np.int32)
    _cuda.kv_store(stream.ptr, dst2.ptr, 64 * dim, d.put(x), dim, d.put(pos2), 1 - 4, 4, 64, T, dim, n_nope, False)
    got2 = d.get(dst2).view(np.uint16)
    for t in range(T):
        np.testing.assert_array_equal(got2[t, (pos2[t] + 1 - 4) // 4], x[t].astype(np.float16).view(np.uint16))


# ---- routing, embedding, sampling ----------------------------------------------------------------------------

@pytest.mark.parametrize("hash_layer", [False, True])
def test_route(stream, rng, hash_layer):
    d = Dev(stream)
    T, n_expert, k = 7, 256, 6
    logits = (rng.standard_normal((T, n_expert)) * 3).astype(np.float32)
    logits[0, :4] = [25.0, -25.0, 19.0, -19.0]     # both softplus branches
    bias = (rng.standard_normal(n_expert) * 0.1).astype(np.float32)
    tid2eid = rng.integers(0, n_expert, (50, k)).astype(np.int32)
    tokens = rng.integers(0, 50, T).astype(np.int32)
    ids, w = d.out((T, k), np.int32), d.out((T, k))
    _cuda.route(stream.ptr, ids.ptr, w.ptr, d.put(logits), 0 if hash_layer else d.put(bias),
                d.put(tid2eid) if hash_layer else 0, d.put(tokens), T, n_expert, k, 1.5, True)
    rids, rw = REF.route(logits, None if hash_layer else bias, tid2eid if hash_layer else None, tokens, k, 1.5, True)
    np.testing.assert_array_equal(d.get(ids), rids)
    assert rel(d.get(w), rw) < 1e-6


def test_route_ties_go_to_the_lower_index(stream):
    d = Dev(stream)
    logits = np.zeros((1, 64), np.float32)
    logits[0, [40, 7, 13]] = 2.0
    ids, w = d.out((1, 4), np.int32), d.out((1, 4))
    _cuda.route(stream.ptr, ids.ptr, w.ptr, d.put(logits), 0, 0, 0, 1, 64, 4, 1.0, True)
    np.testing.assert_array_equal(d.get(ids)[0], [7, 13, 40, 0])


def test_embed(stream, rng):
    d = Dev(stream)
    V, E, T = 100, 256, 3
    table = rng.standard_normal((V, E)).astype(np.float16)
    tokens = np.array([5, 99, 5], np.int32)
    X = d.out((T, 4, E))
    _cuda.embed(stream.ptr, X.ptr, d.put(table), F16, d.put(tokens), T, E, 4)
    np.testing.assert_array_equal(d.get(X), np.repeat(table[tokens].astype(np.float32)[:, None], 4, axis=1))


def _sample_cases(rng, n):
    """(logits, draws) rows covering sampling's paths: greedy (with a tie at the top), the default min-p, top-k
    (with ties at the k-th value), top-p with and without top-k, temperatures, rows the kernel leaves to the host
    (a NaN; more than 4096 candidates), skipped rows."""
    from ds4d.sampling import Draw, SamplingParams as P
    rows, draws = [], []

    def add(x, params, greedy=False, u=None):
        rows.append(np.asarray(x, np.float32))
        u = (0.0 if greedy else float(rng.random())) if u is None else u
        draws.append(None if params is None else Draw(params, greedy, u))

    peaked = lambda: rng.standard_normal(n) * 2.0                        # noqa: E731: ~0.1% within 3 of the top
    coarse = lambda: np.round(rng.standard_normal(n) * 8) / 4           # noqa: E731: many equal values (ties)
    tie_top = peaked()
    tie_top[[n // 3, n - 1]] = tie_top.max() + 1.0
    add(tie_top, P(), greedy=True)
    add(coarse(), P(), greedy=True)
    add(peaked(), None)
    for params in (P(), P(temperature=0.7), P(temperature=2.5, min_p=0.2), P(min_p=1.0), P(top_k=1),
                   P(top_k=40, min_p=0.0), P(top_k=1024, min_p=0.0, temperature=1.3), P(top_k=5000, min_p=0.0),
                   P(top_p=0.9), P(top_p=0.5, min_p=0.01, temperature=0.8), P(top_k=300, top_p=0.95, min_p=0.0),
                   P(top_k=40, top_p=0.7)):
        for make in (peaked, coarse):
            for _ in range(3):
                add(make(), params)
    nan = peaked()
    nan[n // 2] = np.nan
    add(nan, P())
    flat = lambda: rng.standard_normal(n) * 0.1                         # noqa: E731: every logit a candidate
    add(flat(), P(min_p=0.0))
    for u in (0.0, 1 - 2.0 ** -24):                                     # the uniforms' ends
        add(peaked(), P(), u=u)
        add(peaked(), P(top_k=40), u=u)
    add(flat(), P(min_p=0.0, top_p=0.99))
    return np.stack(rows), draws


@pytest.mark.parametrize("n", [129280, 3000, 7])
def test_sample_matches_host(stream, rng, n):
    """The sampling kernel against sampling.pick, the host's rule, row by row: the same token for every draw,
    -1 exactly where the kernel leaves the row to the host (a non-finite logit, over 4096 candidates to sort: top-p
    without top-k) or the row has no draw. The ids reach pinned host memory too, read after an event."""
    from ds4d.ops.cuda import draw_records
    from ds4d.sampling import candidates, pick
    assert _cuda.draw_bytes() == draw_records([None]).itemsize     # ds4_cuda_draw and the table's records agree
    d = Dev(stream)
    x, draws = _sample_cases(rng, n)
    ids = d.out((len(x),), np.int32)
    slot = _cuda.HostSlot(4 * len(x))
    _cuda.sample(stream.ptr, ids.ptr, d.put(draw_records(draws).view(np.uint8)), d.put(x), n, len(x), n, slot.ptr)
    slot.record(4 * len(x), stream.ptr)
    on_host = slot.wait(np.int32, [len(x)])
    got = d.get(ids)
    assert (on_host == got).all()
    host_rows = 0
    for r, (row, dr) in enumerate(zip(x, draws)):
        if dr is None:
            want = -1
        elif not np.isfinite(row).all() or (not dr.greedy and dr.params.top_k == 0 and dr.params.top_p < 1 and len(
                candidates(row, dr.params.temperature, 0, 1.0, dr.params.min_p)[0]) > 4096):
            want = -1
            host_rows += 1
        else:
            want = pick(row, dr)
        assert got[r] == want, (r, dr, got[r], want)
    assert host_rows == (2 if n > 4096 else 1)


def test_sample_draws_follow_the_distribution(stream, rng):
    """Many uniforms on one row: the kernel's tokens are the inverse CDF of the candidates' weights, so their
    frequencies match sampling.candidates' distribution (and each equals pick's token)."""
    from ds4d.ops.cuda import draw_records
    from ds4d.sampling import Draw, SamplingParams, candidates, pick
    d = Dev(stream)
    n, rows = 5000, 2000
    logit = (rng.standard_normal(n) * 1.5).astype(np.float32)
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.01)
    draws = [Draw(params, False, float(u)) for u in rng.random(rows)]
    x = np.repeat(logit[None], rows, axis=0)
    ids = d.out((rows,), np.int32)
    _cuda.sample(stream.ptr, ids.ptr, d.put(draw_records(draws).view(np.uint8)), d.put(x), n, rows, n)
    got = d.get(ids)
    assert all(g == pick(logit, dr) for g, dr in zip(got, draws))
    cand, w = candidates(logit, 0.9, 50, 0.9, 0.01)
    freq = np.array([(got == c).mean() for c in cand])
    assert set(got) <= set(cand) and np.abs(freq - w / w.sum()).max() < 0.04


# ---- graph capture ---------------------------------------------------------------------------------------------

def test_graph_replays_routing_from_device_memory(stream, rng):
    """route -> gate_up -> down captured once; each replay follows the logits now in device memory, as the decode
    graph must (and PDL on or off gives the same bits)."""
    d = Dev(stream)
    n_tok, n_expert, n_used, n_embd, n_ff = 2, 16, 6, 512, 256
    gate = rand_weights(rng, IQ2_XXS, n_ff, n_embd, lead=(n_expert,))
    up = rand_weights(rng, IQ2_XXS, n_ff, n_embd, lead=(n_expert,))
    down = rand_weights(rng, Q2_K, n_embd, n_ff, lead=(n_expert,))
    h = (rng.standard_normal((n_tok, n_embd)) * 0.05).astype(np.float32)
    logits_buf = d.out((n_tok, n_expert))
    ids, w = d.out((n_tok, n_used), np.int32), d.out((n_tok, n_used))
    mid, out = d.out((n_tok, n_used, n_ff)), d.out((n_tok, n_embd))
    ptrs = dict(h=d.put(h), gate=d.put(gate), up=d.put(up), down=d.put(down))

    def step():
        _cuda.route(stream.ptr, ids.ptr, w.ptr, logits_buf.ptr, 0, 0, 0, n_tok, n_expert, n_used, 1.5, True)
        _cuda.moe_gate_up(stream.ptr, mid.ptr, ptrs["h"], n_embd, ptrs["gate"], ptrs["up"], IQ2_XXS, n_ff, n_embd,
                          n_expert, ids.ptr, w.ptr, n_used, n_tok, 10.0)
        _cuda.moe_down(stream.ptr, out.ptr, n_embd, mid.ptr, ptrs["down"], Q2_K, n_embd, n_ff, n_expert, ids.ptr,
                       n_used, n_tok)

    _cuda.begin_capture(stream.ptr)
    step()
    graph = _cuda.end_capture(stream.ptr)
    assert graph.nodes >= 3
    results = []
    for _ in range(3):
        logits = rng.standard_normal((n_tok, n_expert)).astype(np.float32)
        logits_buf.upload(logits)
        graph.launch(stream.ptr)
        got = d.get(out)
        rids, rw = REF.route(logits, np.zeros(n_expert, np.float32), None, None, n_used, 1.5, True)
        np.testing.assert_array_equal(d.get(ids), rids)
        ref = np.zeros((n_tok, n_embd))
        for t in range(n_tok):
            for j, e in enumerate(rids[t]):
                g = product_ref(gate[e], IQ2_XXS, n_embd, h[t:t + 1])[0]
                u = product_ref(up[e], IQ2_XXS, n_embd, h[t:t + 1])[0]
                m = (swiglu_ref(g, u, 10.0) * rw[t, j]).astype(np.float32)[None]
                ref[t] += product_ref(down[e], Q2_K, n_ff, m)[0]
        assert rel(got, ref) < 1e-4
        results.append((logits, got))
    was = _cuda.pdl()
    try:
        _cuda.set_pdl(not was)
        logits_buf.upload(results[-1][0])
        step()
        np.testing.assert_array_equal(d.get(out), results[-1][1])
    finally:
        _cuda.set_pdl(was)
