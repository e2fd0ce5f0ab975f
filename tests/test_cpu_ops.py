"""Tests of the fused native CPU ops of ds4d._cpu: the routed experts (`moe`), attention with sinks (`attention`)
and the indexer's top-k (`indexer_topk`), and their wiring into the CPU backend (ds4d.ops.cpu).

References: the float64 numpy oracle `Reference(np.float64)` (within float32 error bounds, or for the act8 path
within the 8-bit activations' error); for `moe`, bit for bit, the composition of single-expert `_cpu.matmul`
calls with a numpy model of the documented float32 SwiGLU (native/cpu/moe.cpp, simd.h's vf_exp); for
`indexer_topk`, the oracle's exact choice wherever scores tie exactly (the many zero scores of ReLU'd dots).
Bitwise batch invariance (one token at a time against all together) and thread invariance (1 against 2) for
every op; every ISA level this machine supports; bad arguments raise TypeError / ValueError, never crash.
"""

import numpy as np
import pytest

from ds4d import _cpu
from ds4d.ops.cpu import CPU
from ds4d.ops.reference import Reference
from ds4d.quants import random_blocks
from ds4d.state import PAGE_ROWS, RowStore
from ds4d.weights import Weight
from gguf import GGMLQuantizationType as Q
from test_cpu_kernels import assert_bits_equal, make_weights

F32, F16, Q8_0, Q2_K, Q4_K, IQ2_XXS = 0, 1, 8, 10, 12, 16
EXPERT_TYPES = [F32, F16, Q8_0, Q2_K, Q4_K, IQ2_XXS]
QUANT = {Q8_0, Q2_K, Q4_K, IQ2_XXS}
SCALES = (-3, 0)   # weight scales: finite, moderate products


@pytest.fixture
def rng():
    return np.random.default_rng(4321)


@pytest.fixture
def threads():
    """Restores the pool size after a test that changes it."""
    before = _cpu.threads()
    yield
    _cpu.set_threads(before)


f32 = np.float32


# ---- the float32 elementwise model (simd.h vf_exp, isa/swiglu.cpp) -----------------------------------------------

def exp_model(x):
    """vf_exp, operation for operation in float32 (no fused multiply-add anywhere)."""
    x = np.asarray(x, f32)
    x = np.where(f32(-87) > x, f32(-87), x)
    x = np.where(f32(88) < x, f32(88), x)
    t = x * f32(1.44269504088896341) + f32(12582912.0)
    n = t - f32(12582912.0)
    r = (x - n * f32(0.693359375)) - n * f32(-2.12194440e-4)
    p = f32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + f32(c)
    p = (p * (r * r) + r) + f32(1.0)
    pow2 = ((t.view(np.uint32) + np.uint32((127 - 0x4B400000) & 0xFFFFFFFF)) << np.uint32(23)).view(f32)
    return (p * pow2).astype(f32)


def swiglu_model(g, u, clamp, weight):
    c = f32(clamp)
    g = np.where(c < g, c, g).astype(f32)
    u = np.where(c < u, c, np.where(-c > u, -c, u)).astype(f32)
    s = g / (f32(1.0) + exp_model(f32(0.0) - g))
    return ((s * u) * f32(weight)).astype(f32)


def test_exp_model_is_accurate():
    x = np.linspace(-87, 88, 200001, dtype=f32)
    got = exp_model(x).astype(np.float64)
    ref = np.exp(x.astype(np.float64))
    assert np.all(np.abs(got - ref) <= 3 * 2.0**-23 * ref)


# ---- moe ------------------------------------------------------------------------------------------------------

def expert_set(rng, types, n_expert, n_ff, n_embd):
    """Random (gate, up, down) expert tensors as the GGUF stores them, for types (gate, up, down)."""
    tg, tu, td = types
    return (make_weights(rng, tg, n_ff, n_embd, SCALES, lead=(n_expert,)),
            make_weights(rng, tu, n_ff, n_embd, SCALES, lead=(n_expert,)),
            make_weights(rng, td, n_embd, n_ff, SCALES, lead=(n_expert,)))


def natural(raw, type_):
    """The dtype Weight.raw has for F32 / F16 tensors (float values), raw bytes otherwise."""
    return raw.view(np.float32) if type_ == F32 else raw.view(np.float16) if type_ == F16 else raw


def moe_composed(h, ids, weights, ex, types, n_ff, clamp, act8):
    """The contract of ds4_cpu_moe from single-expert matmul calls and the float32 SwiGLU model."""
    (g, u, d), (tg, tu, td) = ex, types
    N, K = ids.shape
    E = h.shape[1]
    y = np.zeros((N, K, E), f32)
    for e in np.unique(ids):
        t_idx, k_idx = np.nonzero(ids == e)
        x = h[t_idx]
        gg = _cpu.matmul(g[e], tg, E, x, act8=act8)
        uu = _cpu.matmul(u[e], tu, E, x, act8=act8)
        mid = np.stack([swiglu_model(gg[i], uu[i], clamp, weights[t, k]) for i, (t, k) in enumerate(zip(t_idx, k_idx))])
        y[t_idx, k_idx] = _cpu.matmul(d[e], td, n_ff, mid, act8=act8)
    out = y[:, 0].copy()
    for k in range(1, K):
        out = out + y[:, k]
    return out


def routing(rng, N, K, n_expert, skew=False):
    if skew:   # most tokens on expert 0: more than one 64-token chunk of one expert
        ids = np.stack([np.zeros(N, np.int64)] + [rng.integers(1, n_expert, N) for _ in range(K - 1)], axis=1)
    else:
        ids = np.stack([rng.choice(n_expert, K, replace=False) for _ in range(N)])
    w = rng.uniform(0.05, 1.0, (N, K)).astype(f32)
    return ids, w


@pytest.mark.parametrize("types", [(t, t, t) for t in EXPERT_TYPES] + [(IQ2_XXS, IQ2_XXS, Q2_K), (Q8_0, Q4_K, F16)])
@pytest.mark.parametrize("act8", [False, True])
def test_moe_equals_composed_matmuls(isa, rng, types, act8):
    n_expert, n_ff, E = 6, 256, 512
    ex = expert_set(rng, types, n_expert, n_ff, E)
    for N, K, skew in ((1, 1, False), (5, 3, False), (70, 3, True)):
        h = rng.standard_normal((N, E)).astype(f32)
        ids, w = routing(rng, N, K, n_expert, skew)
        # a big gate clamps some values, a small one most of them
        for clamp in (10.0, 0.05):
            got = _cpu.moe(h, ids, w, ex[0], types[0], ex[1], types[1], ex[2], types[2], n_ff, clamp, act8)
            assert_bits_equal(got, moe_composed(h, ids, w, ex, types, n_ff, clamp, act8))


def test_moe_repeated_expert_in_a_token(rng):
    types = (Q4_K, Q4_K, Q4_K)
    ex = expert_set(rng, types, 3, 256, 256)
    h = rng.standard_normal((2, 256)).astype(f32)
    ids = np.array([[1, 1, 2], [0, 2, 0]])
    w = rng.uniform(0.1, 1, (2, 3)).astype(f32)
    for act8 in (False, True):
        got = _cpu.moe(h, ids, w, *[a for pair in zip(ex, types) for a in pair], 256, 10.0, act8)
        assert_bits_equal(got, moe_composed(h, ids, w, ex, types, 256, 10.0, act8))


def test_moe_act8_same_bits_at_every_level(rng):
    types = (IQ2_XXS, IQ2_XXS, Q2_K)
    ex = expert_set(rng, types, 4, 256, 512)
    h = rng.standard_normal((9, 512)).astype(f32)
    ids, w = routing(rng, 9, 3, 4)
    before = _cpu.isa()
    try:
        outs = []
        for level in _cpu.available_isas():
            _cpu.set_isa(level)
            outs.append(_cpu.moe(h, ids, w, ex[0], IQ2_XXS, ex[1], IQ2_XXS, ex[2], Q2_K, 256, 10.0, True))
    finally:
        _cpu.set_isa(before)
    for o in outs[1:]:
        assert_bits_equal(o, outs[0])


def as_weight(name, raw, type_):
    """A Weight over expert tensors, as weights.py builds it from a GGUF."""
    if type_ in (F32, F16):
        cols = raw.shape[-1] // (4 if type_ == F32 else 2)
    else:
        block, nbytes = {Q8_0: (32, 34), Q2_K: (256, 84), Q4_K: (256, 144), IQ2_XXS: (256, 66)}[type_]
        cols = raw.shape[-1] // nbytes * block
    return Weight(name, Q(type_), raw.shape[:-1] + (cols,), natural(raw, type_))


def model_like(rng, type_, n_expert, rows, cols):
    """Expert tensors with zero-mean weights of RMS 1/sqrt(cols), as a model has (ds4d.quants.random_blocks)."""
    raw = random_blocks(n_expert * rows, cols, type_, rng, 1.0 / np.sqrt(cols))
    return raw.reshape(n_expert, rows, -1)


@pytest.mark.parametrize("type_", EXPERT_TYPES)
def test_cpu_backend_moe_matches_oracle(isa, rng, type_):
    """The backend's moe (routed experts + shared expert) against the float64 oracle: the f32 path to float32
    precision, act8 within the error of 8-bit activations (1-2% RMS of the output here: h and mid quantized)."""
    n_expert, n_ff, E, N, K = 8, 256, 512, 7, 3
    raws = (model_like(rng, type_, n_expert, n_ff, E), model_like(rng, type_, n_expert, n_ff, E),
            model_like(rng, type_, n_expert, E, n_ff))
    experts = tuple(as_weight(n, r, type_) for n, r in zip(("gate", "up", "down"), raws))
    sh = (model_like(rng, F16, 1, n_ff, E)[0], model_like(rng, F16, 1, n_ff, E)[0], model_like(rng, F16, 1, E, n_ff)[0])
    shared = tuple(as_weight(n, r, F16) for n, r in zip(("gs", "us", "ds"), sh))
    h = (rng.standard_normal((N, E)) * 3).astype(f32)
    ids, w = routing(rng, N, K, n_expert)
    for clamp in (10.0, 0.5):
        R = Reference(np.float64)
        ref = R.moe(h, ids, w, experts, clamp, R.ffn(h, *shared, clamp))
        for act8 in (False, True):
            cpu = CPU(act8=act8)
            got = cpu.moe(h, ids, w, experts, clamp, cpu.ffn(h, *shared, clamp))
            assert got.dtype == np.float32 and got.shape == (N, E)
            if act8 and type_ in QUANT:
                assert np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2)) < 0.03, (clamp, act8)
            else:
                assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), (clamp, act8)


@pytest.mark.parametrize("types", [(IQ2_XXS, IQ2_XXS, Q2_K), (F16, F16, F16), (Q8_0, Q8_0, Q8_0)])
@pytest.mark.parametrize("act8", [False, True])
def test_moe_batch_and_thread_invariance(isa, rng, threads, types, act8):
    n_expert, n_ff, E, N, K = 5, 256, 256, 80, 4
    ex = expert_set(rng, types, n_expert, n_ff, E)
    args = (ex[0], types[0], ex[1], types[1], ex[2], types[2], n_ff, 10.0, act8)
    h = rng.standard_normal((N, E)).astype(f32)
    ids, w = routing(rng, N, K, n_expert)
    _cpu.set_threads(2)
    full = _cpu.moe(h, ids, w, *args)
    for t in (0, 1, 41, 79):
        assert_bits_equal(_cpu.moe(h[t:t + 1], ids[t:t + 1], w[t:t + 1], *args), full[t:t + 1])
    assert_bits_equal(_cpu.moe(h[10:13], ids[10:13], w[10:13], *args), full[10:13])
    _cpu.set_threads(1)
    assert_bits_equal(_cpu.moe(h, ids, w, *args), full)


def test_moe_reads_readonly_memmapped_experts(rng, tmp_path):
    types = (IQ2_XXS, IQ2_XXS, Q2_K)
    ex = expert_set(rng, types, 4, 256, 256)
    maps = []
    for i, raw in enumerate(ex):
        path = tmp_path / f"e{i}.bin"
        raw.tofile(path)
        maps.append(np.memmap(path, dtype=np.uint8, mode="r", shape=raw.shape))
    h = rng.standard_normal((3, 256)).astype(f32)
    ids, w = routing(rng, 3, 2, 4)
    want = _cpu.moe(h, ids, w, ex[0], IQ2_XXS, ex[1], IQ2_XXS, ex[2], Q2_K, 256, 10.0, True)
    assert_bits_equal(_cpu.moe(h, ids.astype(np.int32), w, maps[0], IQ2_XXS, maps[1], IQ2_XXS, maps[2], Q2_K, 256,
                               10.0, True), want)


def test_moe_empty_shapes(rng):
    ex = expert_set(rng, (F16, F16, F16), 2, 32, 64)
    args = (ex[0], F16, ex[1], F16, ex[2], F16, 32, 10.0, False)
    out = _cpu.moe(np.zeros((0, 64), f32), np.zeros((0, 2), np.int64), np.zeros((0, 2), f32), *args)
    assert out.shape == (0, 64)
    out = _cpu.moe(np.ones((3, 64), f32), np.zeros((3, 0), np.int64), np.zeros((3, 0), f32), *args)
    assert out.shape == (3, 64) and not out.any()


def test_moe_bad_arguments(rng):
    ex = expert_set(rng, (Q4_K, Q4_K, Q4_K), 3, 256, 512)
    h = rng.standard_normal((2, 512)).astype(f32)
    ids = np.array([[0, 1], [2, 0]])
    w = np.ones((2, 2), f32)

    def call(h=h, ids=ids, w=w, g=ex[0], gt=Q4_K, u=ex[1], ut=Q4_K, d=ex[2], dt=Q4_K, n_ff=256, clamp=10.0):
        return _cpu.moe(h, ids, w, g, gt, u, ut, d, dt, n_ff, clamp, True)

    call()
    for kw, err in [
        (dict(h=h.astype(np.float64)), TypeError),
        (dict(h=h[0]), ValueError),
        (dict(h=np.asfortranarray(np.ones((2, 512), f32))), ValueError),
        (dict(h="x"), TypeError),
        (dict(ids=ids.astype(np.float32)), TypeError),
        (dict(ids=np.array([[0, 3], [1, 2]])), ValueError),
        (dict(ids=np.array([[0, -1], [1, 2]])), ValueError),
        (dict(ids=np.array([[0, 2**63 + 5], [1, 2]], dtype=np.uint64)), ValueError),
        (dict(ids=ids[:1]), ValueError),
        (dict(w=np.ones((2, 3), f32)), ValueError),
        (dict(w=np.ones((2, 2))), TypeError),
        (dict(n_ff=512), ValueError),
        (dict(n_ff=0), ValueError),
        (dict(clamp=0.0), ValueError),
        (dict(clamp=float("nan")), ValueError),
        (dict(gt=99), ValueError),
        (dict(gt=Q8_0), ValueError),                       # Q4_K rows are not Q8_0 rows
        (dict(g=ex[0][0]), ValueError),                    # one expert, 2-D
        (dict(u=ex[1][:2]), ValueError),                   # expert counts differ
        (dict(d=ex[0]), ValueError),                       # down of the wrong shape
        (dict(g=ex[0].astype(np.int16)), TypeError),
        (dict(h=np.ones((2, 100), f32)), ValueError),      # not whole Q4_K blocks
    ]:
        with pytest.raises(err):
            call(**kw)


# ---- attention ------------------------------------------------------------------------------------------------

def store(rng, n, D, dtype, scale=1.0):
    s = RowStore(D, dtype)
    if n:
        s.append((rng.standard_normal((n, D)) * scale).astype(dtype))
    return s


def attention_case(rng, T, H, D, dtype, n_raw, n_comp, sel_width=None, qscale=1.0):
    """Random queries over a raw window of n_raw rows (token t sees a different range) and n_comp compressed
    rows, chosen by comp_n or by a -1-padded selection."""
    q = (rng.standard_normal((T, H, D)) * qscale).astype(f32)
    raw = rng.standard_normal((n_raw, D)).astype(dtype)
    hi = np.minimum(n_raw, np.arange(T) + max(1, n_raw - T + 1)) if n_raw else np.zeros(T, np.int64)
    lo = np.maximum(0, hi - 4 - rng.integers(0, n_raw + 1, T)) if n_raw else np.zeros(T, np.int64)
    comp = store(rng, n_comp, D, dtype)
    comp_n = rng.integers(0, n_comp + 1, T)
    sel = None
    if sel_width is not None:
        sel = np.full((T, sel_width), -1, np.int64)
        for t in range(T):
            m = int(rng.integers(0, min(sel_width, n_comp) + 1))
            sel[t, :m] = np.sort(rng.choice(n_comp, m, replace=False)) if m else []
    sinks = rng.standard_normal(H).astype(f32)
    return q, raw, lo.astype(np.int64), hi.astype(np.int64), comp, sel, comp_n.astype(np.int64), sinks


def run_attention(case, scale):
    q, raw, lo, hi, comp, sel, n, sinks = case
    return _cpu.attention(q, raw, lo, hi, comp.pages, comp.n, sel, n, sinks, scale)


ATTN_SHAPES = [
    # T, H, D, n_raw, n_comp, sel_width
    (1, 64, 512, 128, 0, None),        # decode, no compressed rows
    (1, 8, 512, 1, 100, 16),           # window of one row, selection with -1 padding
    (4, 16, 512, 20, 150, None),       # pages partly filled, some tokens see none
    (3, 3, 40, 7, 70, 8),              # odd head count, dim not a vector multiple
    (2, 9, 128, 0, 64, None),          # no raw rows, exactly one full page
    (1, 64, 512, 128, 3000, None),     # long context
]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape", ATTN_SHAPES)
def test_attention_matches_oracle(isa, rng, shape, dtype):
    T, H, D, n_raw, n_comp, sel_width = shape
    case = attention_case(rng, T, H, D, dtype, n_raw, n_comp, sel_width, qscale=3.0)
    scale = 1.0 / np.sqrt(D)
    got = run_attention(case, scale)
    q, raw, lo, hi, comp, sel, n, sinks = case
    ref = Reference(np.float64).attention(q, raw, lo, hi, comp, sel, n, sinks, scale)
    assert got.shape == (T, H, D) and got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(raw).max(initial=0), np.abs(comp.array()).max(initial=0))


def test_attention_extreme_scores_and_sinks(isa, rng):
    """A sink far above the scores (output ~ 0), scores far above the sink, and scores far below each other."""
    D, H = 64, 4
    comp = store(rng, 30, D, np.float16)
    raw = rng.standard_normal((5, D)).astype(np.float16)
    q = (rng.standard_normal((1, H, D)) * 40).astype(f32)
    lo, hi, n = np.array([0]), np.array([5]), np.array([30])
    ref_ops = Reference(np.float64)
    for sinks in (np.full(H, 200.0, f32), np.full(H, -200.0, f32), np.array([0, 1e4, -1e4, 3], f32)):
        got = _cpu.attention(q, raw, lo, hi, comp.pages, comp.n, None, n, sinks, 1.0)
        ref = ref_ops.attention(q, raw, lo, hi, comp, None, n, sinks, 1.0)
        assert np.all(np.isfinite(got))
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(initial=1e-30) + 1e-30


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_attention_batch_head_and_thread_invariance(isa, rng, threads, dtype):
    T, H, D = 7, 20, 256
    case = attention_case(rng, T, H, D, dtype, 30, 200, 24)
    q, raw, lo, hi, comp, sel, n, sinks = case
    _cpu.set_threads(2)
    full = run_attention(case, 0.05)
    for t in range(T):
        one = _cpu.attention(q[t:t + 1], raw, lo[t:t + 1], hi[t:t + 1], comp.pages, comp.n, sel[t:t + 1], n[t:t + 1],
                             sinks, 0.05)
        assert_bits_equal(one, full[t:t + 1])
    few = _cpu.attention(np.ascontiguousarray(q[:, :3]), raw, lo, hi, comp.pages, comp.n, sel, n, sinks[:3], 0.05)
    assert_bits_equal(few, full[:, :3])
    _cpu.set_threads(1)
    assert_bits_equal(run_attention(case, 0.05), full)


def test_attention_bad_arguments(rng):
    q, raw, lo, hi, comp, sel, n, sinks = attention_case(rng, 2, 4, 64, np.float16, 10, 70, 5)

    def call(q=q, raw=raw, lo=lo, hi=hi, pages=comp.pages, count=comp.n, sel=sel, n=n, sinks=sinks):
        return _cpu.attention(q, raw, lo, hi, pages, count, sel, n, sinks, 0.1)

    call()
    for kw, err in [
        (dict(q=q.astype(np.float64)), TypeError),
        (dict(q=q[0]), ValueError),
        (dict(q=q[:, :, ::2]), ValueError),
        (dict(raw=raw.astype(np.float64)), TypeError),
        (dict(raw=raw.astype(f32)), TypeError),                   # pages are float16
        (dict(raw=raw[:, :32]), ValueError),
        (dict(lo=np.array([3, 0]), hi=np.array([2, 5])), ValueError),
        (dict(hi=np.array([5, 11])), ValueError),
        (dict(lo=np.array([-1, 0])), ValueError),
        (dict(lo=lo[:1]), ValueError),
        (dict(lo=lo.astype(f32)), TypeError),
        (dict(pages=np.stack(comp.pages)), TypeError),
        (dict(pages=comp.pages[:1]), ValueError),                 # 70 rows do not fit one page
        (dict(pages=[p[:, :32] for p in comp.pages]), ValueError),
        (dict(pages=[comp.pages[0], comp.pages[1].astype(f32)]), ValueError),
        (dict(pages=[comp.pages[0], "x"]), TypeError),
        (dict(count=-1), ValueError),
        (dict(sel=np.array([[0, 70, -1, -1, -1], [1, 2, -1, -1, -1]])), ValueError),
        (dict(sel=sel.astype(f32)), TypeError),
        (dict(sel=sel[:1]), ValueError),
        (dict(n=np.array([0, 71])), ValueError),
        (dict(n=np.array([-1, 0])), ValueError),
        (dict(sinks=sinks[:3]), ValueError),
        (dict(sinks=sinks.astype(np.float64)), TypeError),
    ]:
        with pytest.raises(err):
            call(**kw)


def test_cpu_backend_attention_and_indexer_accept_the_model_inputs(rng):
    """The backend wrappers take RowStores (empty ones included) and strided query views, as model.py passes."""
    ops = CPU()
    q = rng.standard_normal((3, 4, 64)).astype(f32)
    raw = rng.standard_normal((6, 64)).astype(np.float16)
    lo, hi = np.array([0, 1, 2]), np.array([4, 5, 6])
    sinks = rng.standard_normal(4).astype(f32)
    empty = RowStore(64, np.float16)
    got = ops.attention(q, raw, lo, hi, empty, None, np.zeros(3, np.int64), sinks, 0.125)
    ref = Reference(np.float64).attention(q, raw, lo, hi, empty, None, np.zeros(3, np.int64), sinks, 0.125)
    assert np.abs(got - ref).max() < 1e-5
    wide = rng.standard_normal((3, 4, 128)).astype(f32)[:, :, :64]
    keys = store(rng, 40, 64, np.float64)
    sel = ops.indexer_topk(wide, rng.standard_normal((3, 4)).astype(f32), keys, np.array([5, 40, 33]), 16, 0.1)
    assert sel.shape == (3, 16) and sel.dtype == np.int64


# ---- indexer top-k --------------------------------------------------------------------------------------------

def check_topk(sel, q, w, keys, n_visible, top_k, w_scale):
    """sel against the float64 oracle's scores: right count, ascending, and only near-ties may differ."""
    ref = Reference(np.float64)
    exact = ref.indexer_topk(q, w, keys, n_visible, top_k, w_scale)
    allk = keys.array().astype(np.float64)
    for t in range(len(q)):
        n = int(n_visible[t])
        if n <= top_k:
            assert np.array_equal(sel[t], exact[t])
            continue
        s = sel[t]
        assert np.all(np.diff(s) > 0) and s[0] >= 0 and s[-1] < n
        score = (np.asarray(w[t], np.float64) * w_scale) @ np.maximum(q[t].astype(np.float64) @ allk[:n].T, 0)
        kth = np.sort(score)[::-1][top_k - 1]
        tol = 1e-5 * np.abs(score).max()
        chosen = np.zeros(n, bool)
        chosen[s] = True
        assert np.all(score[chosen] >= kth - tol) and np.all(score[~chosen] <= kth + tol)
        near = np.abs(score - kth) <= tol
        assert np.array_equal(chosen[~near], (score > kth)[~near])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_indexer_topk_matches_oracle(isa, rng, dtype):
    T, H, D = 5, 64, 128
    keys = store(rng, 1500, D, dtype)
    q = rng.standard_normal((T, H, D)).astype(f32)
    w = rng.standard_normal((T, H)).astype(f32)
    for top_k, n_visible in ((512, [0, 511, 512, 513, 1500]), (64, [1, 65, 700, 1499, 1200]), (1, [2, 3, 1500, 9, 1])):
        n_visible = np.array(n_visible, np.int64)
        sel = _cpu.indexer_topk(q, w, keys.pages, keys.n, n_visible, top_k, 0.01)
        assert sel.shape == (T, top_k) and sel.dtype == np.int64
        check_topk(sel, q, w, keys, n_visible, top_k, 0.01)


@pytest.mark.parametrize("heads", [4, 64])
def test_indexer_topk_exact_ties_go_to_the_lower_index(isa, rng, heads):
    """Rows whose every dot is negative score exactly 0 (ReLU): most rows tie, and the choice among them must be
    the oracle's, lowest index first. Duplicated rows tie exactly too: the lower copy must be preferred."""
    D, n = 128, 900
    rows = -np.abs(rng.standard_normal((n, D)))                       # dots with a positive q: negative
    pos = np.sort(rng.choice(n - 1, 40, replace=False))
    rows[pos] = np.abs(rng.standard_normal((40, D)))
    zero_rows = np.setdiff1d(np.arange(n), pos)
    dup_src = pos[:3]
    dup_dst = np.array([zero_rows[zero_rows > a][0] for a in dup_src])
    rows[dup_dst] = rows[dup_src]                                     # exact copies at higher indices
    for dtype in (np.float16, np.float32):
        keys = RowStore(D, dtype)
        keys.append(rows.astype(dtype))
        q = np.abs(rng.standard_normal((2, heads, D))).astype(f32)
        w = np.abs(rng.standard_normal((2, heads))).astype(f32) + 0.1
        for top_k in (16, 100):
            nv = np.array([n, 700])
            sel = _cpu.indexer_topk(q, w, keys.pages, keys.n, nv, top_k, 0.5)
            exact = Reference(np.float64).indexer_topk(q, w, keys, nv, top_k, 0.5)
            if top_k == 100:   # all positive rows are in, then the lowest-index zeros
                assert np.array_equal(sel, exact)
            for t in range(2):
                chosen = set(sel[t].tolist())
                for a, b in zip(dup_src, dup_dst):
                    if b in chosen:
                        assert a in chosen


def test_indexer_topk_small_counts_and_zero_k(rng):
    keys = store(rng, 10, 128, np.float16)
    q = rng.standard_normal((3, 4, 128)).astype(f32)
    w = rng.standard_normal((3, 4)).astype(f32)
    sel = _cpu.indexer_topk(q, w, keys.pages, keys.n, np.array([0, 3, 8]), 8, 1.0)
    assert np.array_equal(sel, [[-1] * 8, [0, 1, 2] + [-1] * 5, list(range(8))])
    assert _cpu.indexer_topk(q, w, keys.pages, keys.n, np.array([0, 3, 10]), 0, 1.0).shape == (3, 0)
    assert _cpu.indexer_topk(q[:0], w[:0], [], 0, np.zeros(0, np.int64), 4, 1.0).shape == (0, 4)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_indexer_topk_batch_and_thread_invariance(isa, rng, threads, dtype):
    T, H, D = 6, 16, 128
    keys = store(rng, 3000, D, dtype)
    q = rng.standard_normal((T, H, D)).astype(f32)
    w = rng.standard_normal((T, H)).astype(f32)
    nv = np.array([3000, 2999, 100, 1025, 2048, 600])
    _cpu.set_threads(2)
    full = _cpu.indexer_topk(q, w, keys.pages, keys.n, nv, 256, 0.1)
    for t in range(T):
        assert np.array_equal(_cpu.indexer_topk(q[t:t + 1], w[t:t + 1], keys.pages, keys.n, nv[t:t + 1], 256, 0.1),
                              full[t:t + 1])
    _cpu.set_threads(1)
    assert np.array_equal(_cpu.indexer_topk(q, w, keys.pages, keys.n, nv, 256, 0.1), full)


def test_indexer_topk_bad_arguments(rng):
    keys = store(rng, 100, 128, np.float16)
    q = rng.standard_normal((2, 4, 128)).astype(f32)
    w = rng.standard_normal((2, 4)).astype(f32)
    nv = np.array([50, 100])

    def call(q=q, w=w, pages=keys.pages, count=keys.n, nv=nv, top_k=16):
        return _cpu.indexer_topk(q, w, pages, count, nv, top_k, 0.1)

    call()
    for kw, err in [
        (dict(q=q.astype(np.float64)), TypeError),
        (dict(q=q[0]), ValueError),
        (dict(w=w[:, :3]), ValueError),
        (dict(w=w.astype(np.float64)), TypeError),
        (dict(pages=keys.pages[0]), TypeError),
        (dict(pages=[p[:, :64] for p in keys.pages]), ValueError),
        (dict(pages=[p.astype(np.float64) for p in keys.pages]), TypeError),
        (dict(count=200), ValueError),
        (dict(nv=np.array([50, 101])), ValueError),
        (dict(nv=np.array([50])), ValueError),
        (dict(nv=np.array([50.0, 3.0])), TypeError),
        (dict(top_k=-1), ValueError),
    ]:
        with pytest.raises(err):
            call(**kw)


def test_pages_are_read_in_place(rng):
    """A page changed after the store was built is what the ops see (no cached or copied rows)."""
    keys = store(rng, 2 * PAGE_ROWS, 64, np.float32)
    q = rng.standard_normal((1, 2, 64)).astype(f32)
    args = (np.zeros((0, 64), f32), np.array([0]), np.array([0]))
    before = _cpu.attention(q, *args, keys.pages, keys.n, None, np.array([keys.n]), np.zeros(2, f32), 1.0)
    keys.pages[1][5] += 1.0
    after = _cpu.attention(q, *args, keys.pages, keys.n, None, np.array([keys.n]), np.zeros(2, f32), 1.0)
    assert not np.array_equal(before, after)
