"""A numpy stand-in for `ds4d._cuda`, so the CUDA backend's host logic can be tested on a machine without a GPU.

Emulates the calls `ds4d/ops/cuda.py` makes, with the semantics ds4_cuda.h states: device memory is a set of numpy
byte arrays at fake addresses (pointers stay integers, pointer tables work), streams run everything at once, and
each kernel is its float32 reference (the CPU's act8 products for quantized weights, as the GPU computes them).
It checks what the GPU cannot tell apart from a kernel bug: table layouts, offsets, strides, the state's layout
and its conversion to host snapshots. Graph capture is emulated too: between begin_capture and end_capture the
stream operations are recorded, not run, and Graph.launch runs them again with the same arguments (addresses baked
in, as on the GPU), while a synchronous upload or download during capture fails as it does there. `install()` puts
it in place of the real module; tests/test_cuda_model.py uses it where there is no GPU. It knows nothing of
speed, and a kernel bug never shows here.
"""

from __future__ import annotations

import bisect
import functools
import math
import sys
import weakref

import numpy as np

from ds4d import _cpu
from ds4d.ops.reference import Reference, fp8_e4m3_roundtrip
from ds4d.quants import row_bytes
from ds4d.sampling import Draw, SamplingParams, candidates, pick
from ds4d.weights import HyperConn, Weight

REF = Reference(np.float32)
F32, F16, BF16 = 0, 1, 30

_bases: list[int] = []
_arrays: dict[int, np.ndarray] = {}
_next = [1 << 36]


def _at(addr: int, dtype, count: int) -> np.ndarray:
    """A writable typed view of `count` elements at a device address."""
    i = bisect.bisect_right(_bases, addr) - 1
    if i < 0:
        raise ValueError(f"address {addr:#x} is not device memory")
    base = _bases[i]
    arr = _arrays[base]
    off = addr - base
    n = count * np.dtype(dtype).itemsize
    if off + n > len(arr):
        raise ValueError(f"{n} bytes at {addr:#x} run past an allocation of {len(arr)} bytes")
    return arr[off:off + n].view(dtype)


def _ptrs(addr: int, n: int) -> np.ndarray:
    return _at(addr, np.int64, n)


class Buffer:
    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        size = (self.nbytes + 255) // 256 * 256 + 256
        self.ptr = _next[0]
        _next[0] += size + 4096
        arr = np.frombuffer(np.random.default_rng(self.ptr).bytes(size), np.uint8).copy()  # garbage, like cudaMalloc
        _arrays[self.ptr] = arr
        bisect.insort(_bases, self.ptr)

    def __del__(self):
        _bases.remove(self.ptr)
        del _arrays[self.ptr]

    def upload(self, array, offset=0):
        _not_capturing("upload")
        a = np.ascontiguousarray(array)
        _at(self.ptr + offset, np.uint8, a.nbytes)[:] = a.reshape(-1).view(np.uint8)

    def upload_async(self, array, offset, stream):
        _not_capturing("upload_async")   # ops/cuda.py uploads tables before a capture, never into one
        self.upload(array, offset)

    def download(self, dtype, shape, offset=0):
        _not_capturing("download")
        n = int(np.prod(shape))
        return _at(self.ptr + offset, dtype, n).reshape(shape).copy()

    def memset(self, value, offset=0, nbytes=None):
        _at(self.ptr + offset, np.uint8, self.nbytes - offset if nbytes is None else nbytes)[:] = value


class HostSlot(Buffer):
    """Pinned host memory at a device address (kernels write it: memory like a Buffer's); record() marks how many
    bytes the work so far wrote, wait() hands them back."""

    def __init__(self, nbytes):
        super().__init__(nbytes)
        self.n = 0

    def record(self, nbytes, stream):
        _not_capturing("record")
        if nbytes > self.nbytes:
            raise ValueError(f"record: {nbytes} bytes in a slot of {self.nbytes}")
        self.n = int(nbytes)

    def wait(self, dtype, shape):
        n = int(np.prod(shape))
        if n * np.dtype(dtype).itemsize > self.n:
            raise ValueError("wait: more bytes than were recorded")
        return _at(self.ptr, dtype, n).reshape(shape).copy()


class Stream:
    ptr = 1         # one stream: every operation runs at once, in the order it is enqueued

    def synchronize(self):
        pass


class Event:
    """Ordering between streams: nothing to do where every operation runs at once. Recorded as external while a
    graph is captured (the benchmarks' clocks), the record becomes a node of the graph that holds the event weakly,
    as CUDA holds its handle: replaying it after the event is gone raises, where CUDA's use of a destroyed event
    crashes. Each record takes the next tick of a clock that elapsed_ms reads (1 us a tick)."""
    _ticks = [0]
    at = 0

    def record(self, stream=0, external=False):
        if external and _recording is not None:
            _recording.append((_record_event, (weakref.ref(self),), {}))
        self._ticks[0] += 1
        self.at = self._ticks[0]

    def wait(self, stream):
        pass

    def synchronize(self):
        pass


def _record_event(ref):
    event = ref()
    if event is None:
        raise RuntimeError("a graph records an event that was destroyed")
    event.record()


def elapsed_ms(start, end):
    return (end.at - start.at) * 1e-3


def device_count():
    return 1


def set_device(device):
    pass


def init():
    pass


_recording: list | None = None      # the stream operations of a graph being captured


def _not_capturing(what):
    if _recording is not None:
        raise RuntimeError(f"{what}: operation not permitted when stream is capturing")


class Graph:
    def __init__(self, calls):
        self.calls = calls

    @property
    def nodes(self):
        return len(self.calls)

    def launch(self, stream):
        for fn, args, kw in self.calls:
            fn(*args, **kw)


def begin_capture(stream):
    global _recording
    _recording = []


def end_capture(stream):
    global _recording
    g, _recording = Graph(_recording), None
    return g


def memcpy(dst, src, nbytes, stream=0):
    _at(dst, np.uint8, nbytes)[:] = _at(src, np.uint8, nbytes).copy()


def install():
    """Make `from ds4d import _cuda` return this module."""
    import ds4d
    sys.modules["ds4d._cuda"] = sys.modules[__name__]
    ds4d._cuda = sys.modules[__name__]


def uninstall():
    import ds4d
    sys.modules.pop("ds4d._cuda", None)
    ds4d.__dict__.pop("_cuda", None)


# --- kernels --------------------------------------------------------------------------------------------------

def _weights(w, type, rows, cols):
    if type == F32:
        return _at(w, np.float32, rows * cols).reshape(rows, cols)
    if type == F16:
        return _at(w, np.float16, rows * cols).reshape(rows, cols)
    rb = row_bytes(type, cols)
    return _at(w, np.uint8, rows * rb).reshape(rows, rb)


def _rows(addr, stride, n, width, dtype=np.float32):
    return np.stack([_at(addr + i * stride * np.dtype(dtype).itemsize, dtype, width) for i in range(n)])


def _product(wv, type, cols, x):
    return _cpu.matmul(wv, type, cols, np.ascontiguousarray(x, np.float32), act8=type not in (F32, F16, BF16))


def matvec_work_bytes(type, n_tok, cols, groups=1):
    return 0


def matvec_parts(stream, ys, part_rows, w, type, cols, x, x_stride, n_tok, work=0, work_filled=False):
    assert 1 <= n_tok <= 16 and 1 <= len(ys) == len(part_rows) <= 8 and not work_filled  # never filled, as matvec
    out = _product(_weights(w, type, sum(part_rows), cols), type, cols, _rows(x, x_stride, n_tok, cols))
    at = 0
    for y, r in zip(ys, part_rows):
        _at(y, np.float32, n_tok * r)[:] = out[:, at:at + r].reshape(-1)
        at += r


def matvec(stream, y, y_stride, w, type, rows, cols, x, x_stride, n_tok, groups=1, work=0, work_filled=False):
    assert 1 <= n_tok <= 16 and not work_filled  # no workspace here (matvec_work_bytes): never filled
    W = _weights(w, type, rows * groups, cols)
    X = _rows(x, x_stride, n_tok, cols * groups)
    for g in range(groups):
        out = _product(W[g * rows:(g + 1) * rows], type, cols, X[:, g * cols:(g + 1) * cols])
        for t in range(n_tok):
            _at(y + 4 * (t * y_stride + g * rows), np.float32, rows)[:] = out[t]


_filled: dict[int, tuple] = {}  # moe_down workspaces that matvec_quantizing filled: what with


def matvec_quantizing(stream, y, w, type, rows, cols, x, n_tok, q_x, q_rows, q_cols, q_type, q_work):
    assert 1 <= n_tok <= 2
    matvec.__wrapped__(stream, y, rows, w, type, rows, cols, x, cols, n_tok)
    _filled[q_work] = (q_x, n_tok, q_rows, q_cols, q_type)  # moe_down(work_filled=True) checks it reads these


def matvec_normed(stream, y, y_stride, w, type, rows, cols, x, x_stride, n_tok, norm_w, eps, xn=0, work=0):
    assert 1 <= n_tok <= 16 and type not in (F32, F16, BF16)
    X = REF.rms_norm(_rows(x, x_stride, n_tok, cols), _at(norm_w, np.float32, cols).copy(), eps)
    if xn:
        _at(xn, np.float32, n_tok * cols)[:] = X.reshape(-1)
    out = _product(_weights(w, type, rows, cols), type, cols, X)
    for t in range(n_tok):
        _at(y + 4 * t * y_stride, np.float32, rows)[:] = out[t]


def matvec_pair(stream, ys0, rows0, w0, type0, ys1, rows1, w1, type1, cols, x, x_stride, n_tok):
    assert matvec_pair_ok(type0, type1, cols, n_tok)
    matvec_parts.__wrapped__(stream, ys0, rows0, w0, type0, cols, x, x_stride, n_tok)
    matvec_parts.__wrapped__(stream, ys1, rows1, w1, type1, cols, x, x_stride, n_tok)


def matvec_pair_ok(type0, type1, cols, n_tok):
    # At one token both products take the same kernel (one token slot: over 1024 columns for Q8_0's 2048-weight
    # stages, over 512 for F16's 1024), and the F16 rows fit in shared memory as f32.
    return (type0, type1) == (_Q8_0, F16) and 1 <= n_tok <= 2 and cols % 32 == 0 and cols <= 8192 and (
        n_tok == 2 or (cols <= 512) == (cols <= 1024))


_Q8_0 = 8
_GEMM_TYPES = (_Q8_0, 10, 12, 16, F16)  # Q8_0, Q2_K, Q4_K, IQ2_XXS, F16
has_cutlass = False                  # no bf16 wgmma path: gemm is the act8 product for every type


def gemm_ok(type, cols):
    return type in _GEMM_TYPES and cols > 0 and cols % 256 == 0


def gemm_work_bytes(type, n_tok, rows, cols, groups=1):
    return 16 if gemm_ok(type, cols) else 0


def gemm(stream, y, y_stride, w, type, rows, cols, x, x_stride, n_tok, groups, work, tile=0):
    assert gemm_ok(type, cols) and work and n_tok >= 1
    for t0 in range(0, n_tok, 16):
        n = min(16, n_tok - t0)
        matvec.__wrapped__(stream, y + 4 * t0 * y_stride, y_stride, w, type, rows, cols, x + 4 * t0 * x_stride,
                           x_stride, n, groups)


def moe_work_bytes(gate_type, down_type, n_tok, n_used, n_embd, n_ff, n_expert):
    return 16


def moe_grouped(stream, out, out_stride, h, h_stride, gate, up, down, gate_type, down_type, n_ff, n_embd, n_expert,
                ids, weights, n_used, n_tok, clamp, accumulate, work, tile=0):
    assert gemm_ok(gate_type, n_embd) and gemm_ok(down_type, n_ff) and ids and weights and work
    assert tile in (0, 16, 32, 64)
    H = _rows(h, h_stride, n_tok, n_embd)
    G = _weights(gate, gate_type, n_expert * n_ff, n_embd)
    U = _weights(up, gate_type, n_expert * n_ff, n_embd)
    Dw = _weights(down, down_type, n_expert * n_embd, n_ff)
    I = _at(ids, np.int32, n_tok * n_used).reshape(n_tok, n_used)
    W = _at(weights, np.float32, n_tok * n_used).reshape(n_tok, n_used)
    for t in range(n_tok):
        acc = np.zeros(n_embd, np.float32)
        for j in range(n_used):
            e = int(I[t, j]) if 0 <= I[t, j] < n_expert else 0
            g = _product(G[e * n_ff:(e + 1) * n_ff], gate_type, n_embd, H[t:t + 1])
            u = _product(U[e * n_ff:(e + 1) * n_ff], gate_type, n_embd, H[t:t + 1])
            mid = REF.swiglu(g, u, clamp) * np.float32(W[t, j])
            acc += _product(Dw[e * n_embd:(e + 1) * n_embd], down_type, n_ff, mid)[0]
        row = _at(out + 4 * t * out_stride, np.float32, n_embd)
        row[:] = row + acc if accumulate else acc


def embed(stream, X, table, type, tokens, n_tok, n_embd, n_hc, follow=0, prev=0):
    toks = _at(tokens, np.int32, n_tok)
    if follow:
        rows = _at(follow, np.int32, n_tok)
        for t in np.flatnonzero(rows >= 0):
            toks[t] = max(0, int(_at(int(_ptrs(prev, 1)[0]) + 4 * int(rows[t]), np.int32, 1)[0]))
    for t, tok in enumerate(toks):
        row = _weights(table + int(tok) * row_bytes(type, n_embd), type, 1, n_embd)
        _at(X + 4 * t * n_hc * n_embd, np.float32, n_hc * n_embd)[:] = np.tile(
            _cpu.dequantize(np.ascontiguousarray(row), type, n_embd)[0], n_hc)


def rms_norm(stream, y, y_stride, x, x_stride, w, n_rows, n, eps):
    X = _rows(x, x_stride, n_rows, n)
    out = REF.rms_norm(X, _at(w, np.float32, n).copy() if w else None, eps)
    for r in range(n_rows):
        _at(y + 4 * r * y_stride, np.float32, n)[:] = out[r]


def rms_norm_rope(stream, y, y_stride, x, x_stride, w, n_rows, n, eps, pos, rows_per_tok, inv_freq, n_rot,
                  also=None):
    if also is not None:
        y2, y2_stride, x2, x2_stride, w2, n_rows2, rows_per_tok2 = also
        rms_norm_rope(stream, y2, y2_stride, x2, x2_stride, w2, n_rows2, n, eps, pos, rows_per_tok2, inv_freq, n_rot)
    rms_norm(stream, y, y_stride, x, x_stride, w, n_rows, n, eps)
    p = _at(pos, np.int32, n_rows // rows_per_tok).astype(np.int64)
    inv = _at(inv_freq, np.float64, n_rot // 2).copy()
    for r in range(n_rows):
        v = _at(y + 4 * r * y_stride, np.float32, n)
        v[:] = _rope_rows(v.copy().reshape(1, 1, n), p[r // rows_per_tok:r // rows_per_tok + 1], inv).reshape(-1)


def hc_pre_scratch_bytes(n_tok, n_embd, n_mix):
    return 16


def _hyperconn(fn, fn_type, scale, base, n_mix, cols):
    n_scale = 3 if n_mix > 4 else 1
    return HyperConn(Weight("fn", fn_type, (n_mix, cols), _weights(fn, fn_type, n_mix, cols)),
                     _at(scale, np.float32, n_scale).copy(), _at(base, np.float32, n_mix).copy())


def hc_pre(stream, x, hc, scratch, X, x_stride, fn, fn_type, scale, base, n_tok, n_embd, n_mix, n_iter, hc_eps,
           rms_eps, norm_w=0, post_f=0, post_X=0, post_hc=0, defer=False):
    assert n_tok >= 1
    if post_f or post_X or post_hc:
        assert post_f and post_X and post_hc
        h = _at(post_hc, np.float32, n_tok * 20).reshape(n_tok, 20)
        new = REF.hc_post(_at(post_f, np.float32, n_tok * n_embd).reshape(n_tok, n_embd),
                          _rows(post_X, x_stride, n_tok, 4 * n_embd).reshape(n_tok, 4, n_embd), h[:, :4],
                          h[:, 4:].reshape(n_tok, 4, 4))
        for t in range(n_tok):
            _at(X + 4 * t * x_stride, np.float32, 4 * n_embd)[:] = new[t].reshape(-1)
    Xs = _rows(X, x_stride, n_tok, 4 * n_embd).reshape(n_tok, 4, n_embd)
    h = _hyperconn(fn, fn_type, scale, base, n_mix, 4 * n_embd)
    if n_mix == 4:
        _at(x, np.float32, n_tok * n_embd)[:] = REF.hc_head(Xs, h, hc_eps, rms_eps).reshape(-1)
        return
    norm = _at(norm_w, np.float32, n_embd).copy() if norm_w else None
    xo, post, comb = REF.hc_pre(Xs, h, n_iter, hc_eps, rms_eps, norm)
    if defer:
        comb = REF.hc_gates(Xs, h, hc_eps, rms_eps)[2]
    _at(x, np.float32, n_tok * n_embd)[:] = xo.reshape(-1)
    _at(hc, np.float32, n_tok * 20)[:] = np.concatenate([post, comb.reshape(n_tok, 16)], axis=1).reshape(-1)


def hc_sinkhorn(stream, hc, n_tok, n_iter, hc_eps):
    c = _at(hc, np.float32, n_tok * 20).reshape(n_tok, 20)[:, 4:]
    c[:] = REF.sinkhorn(c.reshape(n_tok, 4, 4).copy(), n_iter, hc_eps).reshape(n_tok, 16)


def hc_post(stream, X_out, f, X, hc, n_tok, n_embd):
    Xs = _at(X, np.float32, n_tok * 4 * n_embd).reshape(n_tok, 4, n_embd).copy()
    h = _at(hc, np.float32, n_tok * 20).reshape(n_tok, 20)
    out = REF.hc_post(_at(f, np.float32, n_tok * n_embd).reshape(n_tok, n_embd), Xs, h[:, :4],
                      h[:, 4:].reshape(n_tok, 4, 4))
    _at(X_out, np.float32, n_tok * 4 * n_embd)[:] = out.reshape(-1)


def _rope_rows(v, positions, inv_freq, inverse=False):
    """The kernels' RoPE: float64 angles, float32 rotation, on the last 2 len(inv_freq) dims of rows v (T, ..., d)."""
    n_rot = 2 * len(inv_freq)
    ang = np.asarray(positions, np.float64)[:, None] * inv_freq[None, :]
    c, s = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    if inverse:
        s = -s
    shape = (len(ang),) + (1,) * (v.ndim - 2) + (n_rot // 2,)
    c, s = c.reshape(shape), s.reshape(shape)
    out = v.copy()
    x0, x1 = v[..., -n_rot::2], v[..., -n_rot + 1::2]
    out[..., -n_rot::2] = x0 * c - x1 * s
    out[..., -n_rot + 1::2] = x0 * s + x1 * c
    return out


def rope(stream, x, tok_stride, pos, pos_delta, inv_freq, n_tok, n_head, head_dim, n_rot, inverse=False):
    p = _at(pos, np.int32, n_tok).astype(np.int64) + pos_delta
    inv = _at(inv_freq, np.float64, n_rot // 2).copy()
    for t in range(n_tok):
        v = _at(x + 4 * t * tok_stride, np.float32, n_head * head_dim).reshape(1, n_head, head_dim)
        v[:] = _rope_rows(v.copy(), p[t:t + 1], inv, inverse)


def kv_store(stream, dst, dst_stride, x, x_stride, pos, pos_add, pos_div, ring, n_tok, dim, n_nope, fp8=True,
             dst_rows=0, f32_rows=False):
    rt = np.float32 if f32_rows else np.float16
    p = _at(pos, np.int32, n_tok)
    bases = _ptrs(dst_rows, n_tok) if dst_rows else None
    for t in range(n_tok):
        v = _at(x + 4 * t * x_stride, np.float32, dim).copy()
        if fp8:
            v[:n_nope] = fp8_e4m3_roundtrip(v[:n_nope])
        slot = (int(p[t]) + pos_add) // pos_div % ring
        es = np.dtype(rt).itemsize
        base = int(bases[t]) if bases is not None else dst + es * t * dst_stride
        _at(base + es * slot * dim, rt, dim)[:] = v.astype(rt)


def attention_scratch_bytes(n_tok, n_head, dim, raw_cap, comp_cap, sel_cap, has_sel):
    return 16


def attention_decode(stream, out, scratch, q, raw, raw_stride, raw_n, raw_cap, comp, comp_stride, comp_n, comp_cap,
                     sel, sel_cap, sinks, n_tok, n_head, dim, scale, raw_rows=0, comp_rows=0, f32_rows=False,
                     rope_pos=0, rope_freq=0, n_rot=0, kv_x=0, kv_w=0, eps=0.0, n_nope=0, xq=0, xq_groups=0):
    assert not xq  # the Q8_0 output fills a matvec workspace, which this module's products never ask for
    if kv_x:   # the decode front: the query heads' and the K=V row's norm and RoPE, the row into its ring slot
        assert not f32_rows and rope_pos
        qn, kvn = Buffer(4 * n_tok * n_head * dim), Buffer(4 * n_tok * dim)
        rms_norm_rope.__wrapped__(stream, qn.ptr, dim, q, dim, 0, n_tok * n_head, dim, eps, rope_pos, n_head,
                                  rope_freq, n_rot)
        rms_norm_rope.__wrapped__(stream, kvn.ptr, dim, kv_x, dim, kv_w, n_tok, dim, eps, rope_pos, 1, rope_freq,
                                  n_rot)
        kv_store.__wrapped__(stream, raw, raw_stride, kvn.ptr, dim, rope_pos, 0, 1, raw_cap, n_tok, dim, n_nope,
                             n_nope > 0, raw_rows)
        q = qn.ptr
    rt = np.float32 if f32_rows else np.float16
    es = np.dtype(rt).itemsize
    rn, cn = _at(raw_n, np.int32, n_tok), _at(comp_n, np.int32, n_tok)
    rr = _ptrs(raw_rows, n_tok) if raw_rows else None
    cr = _ptrs(comp_rows, n_tok) if comp_rows else None
    sk = _at(sinks, np.float32, n_head).astype(np.float32)
    for t in range(n_tok):
        nr = min(max(int(rn[t]), 0), raw_cap)
        rbase = int(rr[t]) if rr is not None else raw + es * t * raw_stride
        keys = [_at(rbase, rt, nr * dim).reshape(nr, dim).astype(np.float32)]
        nc = min(int(cn[t]), comp_cap)
        cbase = int(cr[t]) if cr is not None else comp + es * t * comp_stride
        picked = (_at(sel + 4 * t * sel_cap, np.int32, sel_cap) if sel else np.arange(nc))
        picked = [int(c) for c in picked if 0 <= c < nc]
        if picked:
            keys.append(np.stack([_at(cbase + es * c * dim, rt, dim).astype(np.float32) for c in picked]))
        k = np.concatenate(keys)
        qt = _at(q + 4 * t * n_head * dim, np.float32, n_head * dim).reshape(n_head, dim)
        s = (qt @ k.T) * np.float32(scale)
        m = np.maximum(s.max(axis=1) if len(k) else sk, sk)
        p = np.exp(s - m[:, None])
        den = p.sum(axis=1) + np.exp(sk - m)
        _at(out + 4 * t * n_head * dim, np.float32, n_head * dim)[:] = ((p @ k) / den[:, None]).reshape(-1)
    if rope_pos:
        rope.__wrapped__(stream, out, n_head * dim, rope_pos, 0, rope_freq, n_tok, n_head, dim, n_rot, True)


def attention_prefill_ok(dim):
    return dim in (128, 256, 512)


def attention_prefill(stream, out, q, raw, raw_stride, raw_n, raw_cap, comp, comp_stride, comp_n, comp_cap, sel,
                      sel_cap, sinks, n_tok, n_head, dim, scale, raw_rows=0, comp_rows=0, rope_pos=0, rope_freq=0,
                      n_rot=0, eps=0.0):
    if rope_pos:   # q before its norm and RoPE; the output's tail turned back by the decode path's combine
        qn = Buffer(4 * n_tok * n_head * dim)
        rms_norm_rope.__wrapped__(stream, qn.ptr, dim, q, dim, 0, n_tok * n_head, dim, eps, rope_pos, n_head,
                                  rope_freq, n_rot)
        q = qn.ptr
    attention_decode.__wrapped__(stream, out, 0, q, raw, raw_stride, raw_n, raw_cap, comp, comp_stride, comp_n,
                                 comp_cap, sel, sel_cap, sinks, n_tok, n_head, dim, scale, raw_rows, comp_rows,
                                 False, rope_pos, rope_freq, n_rot)


def route(stream, ids, weights, logits, bias, tid2eid, tokens, n_tok, n_expert, n_used, scale, normalize=True):
    lg = _at(logits, np.float32, n_tok * n_expert).reshape(n_tok, n_expert).copy()
    toks = _at(tokens, np.int32, n_tok).copy()
    b = _at(bias, np.float32, n_expert).copy() if bias else None
    table = None
    if tid2eid:
        table = _at(tid2eid, np.int32, (int(toks.max()) + 1) * n_used).reshape(-1, n_used)
    i, w = REF.route(lg, b, table, toks, n_used, scale, normalize)
    _at(ids, np.int32, n_tok * n_used)[:] = i.reshape(-1)
    _at(weights, np.float32, n_tok * n_used)[:] = w.reshape(-1)


def sample(stream, ids, draws, x, x_stride, n_rows, n, ids_host=0):
    """The kernel's rule through sampling.pick (min_p recovered from T ln(min_p)), including the rows it leaves to
    the host: a non-finite logit, more than 4096 candidates to sort (top-p without top-k); the ids also at
    ids_host (a HostSlot's address) when set."""
    from ds4d.ops.cuda import _DRAW, _DRAW_GREEDY, _DRAW_SKIP
    recs = _at(draws, np.uint8, n_rows * _DRAW.itemsize).view(_DRAW)
    out = _at(ids, np.int32, n_rows)
    for r, rec in enumerate(recs):
        row = _at(x + 4 * r * x_stride, np.float32, n).copy()
        if rec["mode"] == _DRAW_SKIP or not np.isfinite(row).all():
            out[r] = -1
            continue
        T = float(rec["temperature"])
        params = SamplingParams(temperature=T if rec["mode"] != _DRAW_GREEDY else 0.0, top_k=int(rec["top_k"]),
                                top_p=float(rec["top_p"]) if rec["mode"] != _DRAW_GREEDY else 1.0,
                                min_p=math.exp(rec["t_log_min_p"] / T) if rec["mode"] != _DRAW_GREEDY else 0.0)
        d = Draw(params, rec["mode"] == _DRAW_GREEDY, float(rec["u"]))
        over = not d.greedy and params.top_k == 0 and params.top_p < 1 and \
            len(candidates(row, T, 0, 1.0, params.min_p)[0]) > 4096
        out[r] = -1 if over else pick(row, d)
    if ids_host:
        _at(ids_host, np.int32, n_rows)[:] = out


def moe_gate_up(stream, mid, h, h_stride, gate, up, type, n_ff, n_embd, n_expert, ids, weights, n_used, n_tok, clamp):
    H = _rows(h, h_stride, n_tok, n_embd)
    G = _weights(gate, type, n_expert * n_ff, n_embd)
    U = _weights(up, type, n_expert * n_ff, n_embd)
    I = _at(ids, np.int32, n_tok * n_used).reshape(n_tok, n_used) if ids else np.tile(np.arange(n_used), (n_tok, 1))
    W = _at(weights, np.float32, n_tok * n_used).reshape(n_tok, n_used) if weights else np.ones((n_tok, n_used))
    out = _at(mid, np.float32, n_tok * n_used * n_ff).reshape(n_tok, n_used, n_ff)
    for t in range(n_tok):
        for j in range(n_used):
            e = int(I[t, j])
            g = _product(G[e * n_ff:(e + 1) * n_ff], type, n_embd, H[t:t + 1])
            u = _product(U[e * n_ff:(e + 1) * n_ff], type, n_embd, H[t:t + 1])
            out[t, j] = REF.swiglu(g, u, clamp)[0] * np.float32(W[t, j])


def moe_route_gate_up(stream, mid, ids, weights, logits, bias, tid2eid, tokens, scale, normalize, h, h_stride, gate,
                      up, type, n_ff, n_embd, n_expert, n_used, n_tok, clamp, sh_gate=0, sh_up=0, sh_n_ff=0,
                      sh_clamp=0.0, sh_mid=0, hc=0, hc_n_tok=0, hc_n_iter=0, hc_eps=0.0):
    if hc:
        hc_sinkhorn.__wrapped__(stream, hc, hc_n_tok, hc_n_iter, hc_eps)
    route.__wrapped__(stream, ids, weights, logits, bias, tid2eid, tokens, n_tok, n_expert, n_used, scale, normalize)
    moe_gate_up.__wrapped__(stream, mid, h, h_stride, gate, up, type, n_ff, n_embd, n_expert, ids, weights, n_used,
                            n_tok, clamp)
    if sh_gate:
        assert moe_shared_ok(type, n_embd, n_tok)
        H = _rows(h, h_stride, n_tok, n_embd)
        g = _product(_weights(sh_gate, _Q8_0, sh_n_ff, n_embd), _Q8_0, n_embd, H)
        u = _product(_weights(sh_up, _Q8_0, sh_n_ff, n_embd), _Q8_0, n_embd, H)
        _at(sh_mid, np.float32, n_tok * sh_n_ff).reshape(n_tok, sh_n_ff)[:] = REF.swiglu(g, u, sh_clamp)


def moe_shared_ok(type, n_embd, n_tok):
    # routed experts with 8-bit activations
    return 1 <= n_tok <= 64 and n_embd % 32 == 0 and type in (_Q8_0, 10, 12, 16)


def swiglu(stream, mid, g, u, n, clamp, xq=0):
    assert not xq  # the Q8_0 form is for matvec's workspace, which matvec_work_bytes never asks for here
    _at(mid, np.float32, n)[:] = REF.swiglu(_at(g, np.float32, n), _at(u, np.float32, n), clamp)


def moe_down_quantize(stream, work, mid, type, n_tok, n_used, n_ff):
    assert type not in (F32, F16, BF16)
    _filled[work] = (mid, n_tok, n_used, n_ff, type)


def moe_down_work_bytes(type, n_tok, n_used, n_ff):
    return 0 if type in (F32, F16, BF16) else 16  # the kernels here need none


def moe_down(stream, out, out_stride, mid, down, type, n_embd, n_ff, n_expert, ids, n_used, n_tok, accumulate=False,
             work=0, work_filled=False):
    if work_filled:
        assert _filled.pop(work) == (mid, n_tok, n_used, n_ff, type), "moe_down: work not filled with this mid"
    M = _at(mid, np.float32, n_tok * n_used * n_ff).reshape(n_tok, n_used, n_ff)
    Dw = _weights(down, type, n_expert * n_embd, n_ff)
    I = _at(ids, np.int32, n_tok * n_used).reshape(n_tok, n_used) if ids else np.tile(np.arange(n_used), (n_tok, 1))
    for t in range(n_tok):
        acc = np.zeros(n_embd, np.float32)
        for j in range(n_used):
            e = int(I[t, j])
            acc += _product(Dw[e * n_embd:(e + 1) * n_embd], type, n_ff, M[t, j:j + 1])[0]
        row = _at(out + 4 * t * out_stride, np.float32, n_embd)
        row[:] = row + acc if accumulate else acc


def compress(stream, pooled, kv, kv_stride, gate, gate_stride, ape, pos, seg_first, seg_len, state_kv, state_score,
             n_seg, d, ratio, n_tok, path=0):
    r, two = ratio, ratio == 4
    width = 2 * d if two else d
    first, lens = _at(seg_first, np.int32, n_seg), _at(seg_len, np.int32, n_seg)
    skv, ssc = _ptrs(state_kv, n_seg), _ptrs(state_score, n_seg)
    A = _at(ape, np.float32, r * width).reshape(r, width)
    rows = 2 * r if two else r
    for s in range(n_seg):
        fk = _at(int(skv[s]), np.float32, rows * width).reshape(rows, width)
        fs = _at(int(ssc[s]), np.float32, rows * width).reshape(rows, width)
        for t in range(int(first[s]), int(first[s] + lens[s])):
            p = int(_at(pos + 4 * t, np.int32, 1)[0])
            row = (r if two else 0) + p % r
            fk[row] = _at(kv + 4 * t * kv_stride, np.float32, width)
            fs[row] = _at(gate + 4 * t * gate_stride, np.float32, width) + A[p % r]
            if p % r != r - 1:
                continue
            if two:   # lane A of the previous block's rows, lane B of the current block's
                ck = np.concatenate([fk[:4, :d], fk[4:, d:]])
                cs = np.concatenate([fs[:4, :d], fs[4:, d:]])
            else:
                ck, cs = fk, fs
            _at(pooled + 4 * t * d, np.float32, d)[:] = REF._softmax_pool(ck[None], cs[None])[0]
            if two:
                fk[:4], fs[:4] = fk[4:].copy(), fs[4:].copy()
                fk[4:], fs[4:] = 0, -np.inf
            else:
                fk[:], fs[:] = 0, -np.inf


def comp_finish(stream, dst, pooled, norm, pos, inv_freq, n_tok, d, ratio, n_rot, mode, n_nope, eps, f32_rows=False):
    rt = np.float32 if f32_rows else np.float16
    P = _at(pos, np.int32, n_tok)
    bases = _ptrs(dst, n_tok)
    w = _at(norm, np.float32, d).copy()
    inv = _at(inv_freq, np.float64, n_rot // 2).copy()
    for t in range(n_tok):
        p = int(P[t])
        if (p + 1) % ratio:
            continue
        v = REF.rms_norm(_at(pooled + 4 * t * d, np.float32, d).copy()[None], w, eps)
        v = _rope_rows(v.astype(np.float32), [p + 1 - ratio], inv)
        if mode == 1:
            v = REF.fp8_kv(v, n_nope)
        elif mode == 2:
            v = REF.hadamard_fp4(v)
        _at(int(bases[t]) + np.dtype(rt).itemsize * ((p + 1) // ratio - 1) * d, rt, d)[:] = v[0].astype(rt)


_pdl = [True]


def pdl():
    return _pdl[0]


def set_pdl(on):
    _pdl[0] = bool(on)


def hadamard_fp4(stream, x, n_vec, pos=0, inv_freq=0, n_rot=0, vec_per_tok=1):
    if pos:
        rope.__wrapped__(stream, x, 128 * vec_per_tok, pos, 0, inv_freq, n_vec // vec_per_tok, vec_per_tok, 128,
                         n_rot)
    v = _at(x, np.float32, n_vec * 128).reshape(n_vec, 128)
    v[:] = REF.hadamard_fp4(v.copy())


def indexer_scores_work_bytes(n_tok, n_head, f32_rows=False):
    return 16 if n_tok > 16 and n_head <= 64 and not f32_rows else 0


def indexer_scores(stream, scores, score_stride, q, w, w_scale, keys, n_vis, n_tok, n_head, dim, cap, top_k,
                   f32_rows=False, work=0):
    assert work or not indexer_scores_work_bytes(n_tok, n_head, f32_rows)
    rt = np.float32 if f32_rows else np.float16
    nv = _at(n_vis, np.int32, n_tok)
    kb = _ptrs(keys, n_tok)
    for t in range(n_tok):
        n = int(nv[t])
        if n <= top_k:
            continue
        K = _at(int(kb[t]), rt, n * dim).reshape(n, dim).astype(np.float32)
        Q = _at(q + 4 * t * n_head * dim, np.float32, n_head * dim).reshape(n_head, dim)
        W = _at(w + 4 * t * n_head, np.float32, n_head) * np.float32(w_scale)
        _at(scores + 4 * t * score_stride, np.float32, n)[:] = W @ np.maximum(Q @ K.T, 0)


def topk(stream, sel, scores, score_stride, n_vis, n_tok, k, cluster=0):
    nv = _at(n_vis, np.int32, n_tok)
    for t in range(n_tok):
        n = int(nv[t])
        out = _at(sel + 4 * t * k, np.int32, k)
        if n <= k:
            out[:] = np.where(np.arange(k) < n, np.arange(k), -1)
            continue
        s = _at(scores + 4 * t * score_stride, np.float32, n)
        out[:] = np.sort(np.argsort(-s, kind="stable")[:k])


def _enqueued(fn):
    """A stream operation: runs at once, or is recorded while a graph is being captured."""
    @functools.wraps(fn)
    def call(*args, **kw):
        if _recording is not None:
            _recording.append((fn, args, kw))
        else:
            fn(*args, **kw)
    return call


for _name in ("memcpy", "matvec", "matvec_normed", "matvec_pair", "matvec_parts", "matvec_quantizing", "embed",
              "rms_norm", "rms_norm_rope", "hc_pre", "hc_sinkhorn", "hc_post", "rope", "kv_store", "attention_decode",
              "route", "moe_gate_up", "moe_route_gate_up", "moe_down", "moe_down_quantize", "swiglu", "compress",
              "comp_finish", "hadamard_fp4", "indexer_scores", "topk", "gemm", "moe_grouped", "attention_prefill", "sample"):
    globals()[_name] = _enqueued(globals()[_name])
