"""Benchmark of the CUDA decode kernels (ds4d._cuda) on the GPU, against the card's measured copy bandwidth.

For every kernel the bytes it must move (each weight and activation read once, each output written once) and
its FLOPs are counted first; the floor is bytes / (measured device-to-device copy bandwidth, read + written
bytes). Times come from CUDA events around replays of a captured graph of many launches (so launch gaps are
those of a decode graph, with programmatic dependent launch on), after warm-up, median of the replays; inputs
rotate over copies larger than L2. Full-size random weights of the real DS4 Flash shapes and types are made on
the device (`Buffer.fill_random`), no model file. Last, one full decode layer (a ratio-4 layer of the q2 file,
the heaviest kind) is captured as one graph at batch 1 and 8 and compared with its floor and with the peers of
docs/PERFORMANCE.md. Prints markdown tables; `--json` writes every number. Results go to docs/CUDA_KERNELS.md.

    PYTHONPATH=daemon python bench/cuda_kernels.py --json out.json        # all (about 2 minutes on an H100)
    PYTHONPATH=daemon python bench/cuda_kernels.py --only matvec,layer
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np

from ds4d import _cuda
from ds4d.ops.cuda import draw_records
from ds4d.ops.reference import rope_inv_freq
from ds4d.sampling import Draw, SamplingParams

F32, F16, Q8_0, Q2_K, Q4_K, IQ2_XXS, BF16 = 0, 1, 8, 10, 12, 16, 30
NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q8_0: "Q8_0", Q2_K: "Q2_K", Q4_K: "Q4_K", IQ2_XXS: "IQ2_XXS"}
BLOCK = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q8_0: (32, 34), Q2_K: (256, 84), Q4_K: (256, 144),
         IQ2_XXS: (256, 66)}
ROTATE_BYTES = 256 << 20   # inputs rotate over at least this much memory (5x the H100's 50 MB L2)


def row_bytes(t, cols):
    bw, bb = BLOCK[t]
    return cols // bw * bb


def mib(n):
    return n / 2**20


class Gpu:
    """The stream, timing events, device buffers and the measured copy bandwidth."""

    def __init__(self):
        _cuda.init()
        self.info = _cuda.device_info()
        self.s = _cuda.Stream()
        self.e0, self.e1 = _cuda.Event(), _cuda.Event()
        self.keep = []
        self.copy_bw = None

    def buf(self, nbytes, fill=None, seed=1):
        b = _cuda.Buffer(int(nbytes))
        if fill is not None:
            b.fill_random(fill, seed, stream=self.s.ptr)
        return b

    def put(self, a):
        a = np.ascontiguousarray(a)
        b = _cuda.Buffer(max(a.nbytes, 16))
        b.upload(a)
        self.keep.append(b)
        return b

    def time_graph(self, enqueue, n, replays=20):
        """Median and best seconds per enqueue(i), i < n, over replays of one captured graph of all n."""
        _cuda.begin_capture(self.s.ptr)
        for i in range(n):
            enqueue(i)
        g = _cuda.end_capture(self.s.ptr)
        for _ in range(3):
            g.launch(self.s.ptr)
        self.s.synchronize()
        ts = []
        for _ in range(replays):
            self.e0.record(self.s.ptr)
            g.launch(self.s.ptr)
            self.e1.record(self.s.ptr)
            self.e1.synchronize()
            ts.append(_cuda.elapsed_ms(self.e0, self.e1) * 1e-3 / n)
        return statistics.median(ts), min(ts)

    def measure_copy(self, nbytes=2 << 30, reps=10):
        a, b = self.buf(nbytes, F32, 3), self.buf(nbytes)
        _cuda.memcpy(b.ptr, a.ptr, nbytes, self.s.ptr)
        self.s.synchronize()
        ts = []
        for _ in range(reps):
            self.e0.record(self.s.ptr)
            _cuda.memcpy(b.ptr, a.ptr, nbytes, self.s.ptr)
            self.e1.record(self.s.ptr)
            self.e1.synchronize()
            ts.append(_cuda.elapsed_ms(self.e0, self.e1) * 1e-3)
        self.copy_bw = 2 * nbytes / statistics.median(ts)
        return self.copy_bw, 2 * nbytes / min(ts)


def row(rows_out, name, kind, shape, b, nbytes, flops, t_med, t_best, wbytes, gpu):
    floor = nbytes / gpu.copy_bw
    r = dict(name=name, type=kind, shape=shape, B=b, bytes=nbytes, flops=flops, floor_us=floor * 1e6,
             us=t_med * 1e6, best_us=t_best * 1e6, gbs=wbytes / t_med / 1e9, of_floor=floor / t_med)
    rows_out.append(r)
    print(f"| {name} | {kind} | {shape} | {b} | {mib(nbytes):.1f} | {floor * 1e6:.1f} | {t_med * 1e6:.1f} "
          f"| {wbytes / t_med / 1e9:.0f} | {100 * floor / t_med:.0f}% |", flush=True)


def header(title):
    print(f"\n### {title}\n")
    print("| kernel | type | shape (rows x cols) | B | MiB moved | floor us | measured us | weight GB/s "
          "| floor/measured |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")


# ---- matrix-vector -------------------------------------------------------------------------------------------

MATVEC_REAL = [  # name, type, rows (per group), cols, groups
    ("attn_q_a", Q8_0, 1024, 4096, 1),
    ("attn_kv", Q8_0, 512, 4096, 1),
    ("attn_q_b", Q8_0, 32768, 1024, 1),
    ("attn_output_a (8 groups)", Q8_0, 1024, 4096, 8),
    ("attn_output_b", Q8_0, 4096, 8192, 1),
    ("ffn_gate_shexp", Q8_0, 2048, 4096, 1),
    ("ffn_down_shexp", Q8_0, 4096, 2048, 1),
    ("4096 -> 32768", Q8_0, 32768, 4096, 1),
    ("output (LM head)", Q8_0, 129280, 4096, 1),
    ("attn_compressor_kv (r4)", F16, 1024, 4096, 1),
    ("indexer.attn_q_b", F16, 8192, 1024, 1),
    ("indexer_compressor_kv", F16, 256, 4096, 1),
    ("ffn_gate_inp (router)", F16, 256, 4096, 1),
    ("hc_attn_fn", F16, 24, 16384, 1),
]


def bench_matvec(gpu, out, batches):
    header("Matrix-vector products (real shapes; 4096 x 4096 for every type)")
    cases = MATVEC_REAL + [(f"square {NAMES[t]}", t, 4096, 4096, 1)
                           for t in (F32, F16, BF16, Q8_0, Q2_K, Q4_K, IQ2_XXS)]
    for name, t, rows, cols, groups in cases:
        wb = row_bytes(t, cols) * rows * groups
        copies = max(1, min(64, math.ceil(ROTATE_BYTES / wb)))
        w = gpu.buf(wb * copies, t, seed=7)
        for b in batches:
            x = gpu.buf(4 * b * cols * groups * copies, F32, seed=9)
            y = gpu.buf(4 * b * rows * groups * copies)
            xs, ys = 4 * b * cols * groups, 4 * b * rows * groups
            work = gpu.buf(max(16, _cuda.matvec_work_bytes(t, b, cols, groups)))

            def enqueue(i, w=w, x=x, y=y, xs=xs, ys=ys, b=b, work=work):
                c = i % copies
                _cuda.matvec(gpu.s.ptr, y.ptr + c * ys, rows * groups, w.ptr + c * wb, t, rows, cols,
                             x.ptr + c * xs, cols * groups, b, groups, work.ptr)

            med, best = gpu.time_graph(enqueue, max(copies, 8) if wb > 8 << 20 else 64)
            row(out, name, NAMES[t], f"{rows * groups} x {cols}", b, wb + xs + ys, 2 * b * rows * groups * cols,
                med, best, wb, gpu)
            del x, y
        del w


# ---- mixture of experts ----------------------------------------------------------------------------------------

def random_ids(rng, n_tok, n_expert, k, n_sets):
    return np.stack([np.stack([rng.choice(n_expert, k, replace=False) for _ in range(n_tok)])
                     for _ in range(n_sets)]).astype(np.int32)


def bench_moe(gpu, out, batches):
    header("Fused MoE (256 experts of 2048 x 4096, 6 per token; random routing)")
    rng = np.random.default_rng(0)
    n_expert, k, E, F = 256, 6, 4096, 2048
    for gt, dt in ((IQ2_XXS, Q2_K), (Q4_K, Q4_K)):
        gb, db = row_bytes(gt, E) * F, row_bytes(dt, F) * E           # one expert's gate (= up) and down
        gate, up = gpu.buf(gb * n_expert, gt, 11), gpu.buf(gb * n_expert, gt, 12)
        down = gpu.buf(db * n_expert, dt, 13)
        for b in batches:
            n_sets = 32
            ids = gpu.put(random_ids(rng, b, n_expert, k, n_sets))
            wts = gpu.put(rng.uniform(0.1, 0.3, (n_sets, b, k)).astype(np.float32))
            h = gpu.buf(4 * b * E, F32, 5)
            mid = gpu.buf(4 * b * k * F)
            y = gpu.buf(4 * b * E)
            work = gpu.buf(max(16, _cuda.moe_down_work_bytes(dt, b, k, F)))

            def gate_up(i, b=b, ids=ids, wts=wts, h=h, mid=mid, gate=gate, up=up, gt=gt):
                c = i % n_sets
                _cuda.moe_gate_up(gpu.s.ptr, mid.ptr, h.ptr, E, gate.ptr, up.ptr, gt, F, E, n_expert,
                                  ids.ptr + 4 * c * b * k, wts.ptr + 4 * c * b * k, k, b, 10.0)

            def down_(i, b=b, ids=ids, mid=mid, y=y, down=down, dt=dt, work=work):
                c = i % n_sets
                _cuda.moe_down(gpu.s.ptr, y.ptr, E, mid.ptr, down.ptr, dt, E, F, n_expert, ids.ptr + 4 * c * b * k,
                               k, b, False, work.ptr)

            med, best = gpu.time_graph(gate_up, n_sets)
            nb = b * k * 2 * gb + 4 * b * (E + k * F)
            row(out, "moe_gate_up", NAMES[gt], f"{b}x6 x (2 x {F} x {E})", b, nb, 4 * b * k * F * E, med, best,
                b * k * 2 * gb, gpu)
            # The same with each token's experts chosen inside the launch from router logits (the decode step's
            # moe_route_gate_up): what the choice adds before the first weight stage.
            logits = gpu.put(rng.normal(0, 2, (n_sets, b, n_expert)).astype(np.float32))
            bias = gpu.put(rng.normal(0, 0.1, n_expert).astype(np.float32))

            def route_gate_up(i, b=b, logits=logits, bias=bias, ids=ids, wts=wts, h=h, mid=mid, gate=gate, up=up,
                              gt=gt):
                c = i % n_sets
                _cuda.moe_route_gate_up(gpu.s.ptr, mid.ptr, ids.ptr + 4 * c * b * k, wts.ptr + 4 * c * b * k,
                                        logits.ptr + 4 * c * b * n_expert, bias.ptr, 0, 0, 1.5, True, h.ptr, E,
                                        gate.ptr, up.ptr, gt, F, E, n_expert, k, b, 10.0)

            med, best = gpu.time_graph(route_gate_up, n_sets)
            row(out, "moe_route_gate_up (routing inside)", NAMES[gt], f"{b}x6 x (2 x {F} x {E})", b,
                nb + 4 * b * n_expert, 4 * b * k * F * E, med, best, b * k * 2 * gb, gpu)
            med, best = gpu.time_graph(down_, n_sets)
            nb = b * k * db + 4 * b * (E + k * F)
            row(out, "moe_down", NAMES[dt], f"{b}x6 x ({E} x {F})", b, nb, 2 * b * k * F * E, med, best, b * k * db,
                gpu)
        del gate, up, down


# ---- attention -------------------------------------------------------------------------------------------------

def bench_attention(gpu, out, batches):
    header("Decode attention (64 heads x 512, 128 raw + 512 compressed rows per token)")
    H, D, raw_cap, comp_n = 64, 512, 128, 512
    for b in batches:
        per = (raw_cap + comp_n) * D * 2 * b                         # f16 rows of all b tokens
        copies = max(2, math.ceil(ROTATE_BYTES / per))
        raw = gpu.buf(raw_cap * D * 2 * b * copies, F16, 21)
        comp = gpu.buf(comp_n * D * 2 * b * copies, F16, 22)
        q = gpu.buf(4 * b * H * D, F32, 23)
        o = gpu.buf(4 * b * H * D)
        rn = gpu.put(np.full(b, raw_cap, np.int32))
        cn = gpu.put(np.full(b, comp_n, np.int32))
        sinks = gpu.put(np.zeros(H, np.float32) + 0.5)
        scratch = gpu.buf(_cuda.attention_scratch_bytes(b, H, D, raw_cap, comp_n, 0, False))

        def enqueue(i, b=b, raw=raw, comp=comp, q=q, o=o, rn=rn, cn=cn, sinks=sinks, scratch=scratch):
            c = i % copies
            _cuda.attention_decode(gpu.s.ptr, o.ptr, scratch.ptr, q.ptr, raw.ptr + c * raw_cap * D * 2 * b,
                                   raw_cap * D, rn.ptr, raw_cap, comp.ptr + c * comp_n * D * 2 * b, comp_n * D,
                                   cn.ptr, comp_n, 0, 0, sinks.ptr, b, H, D, 1 / math.sqrt(D))

        med, best = gpu.time_graph(enqueue, copies)
        nb = per + 2 * 4 * b * H * D
        row(out, "attention_decode", "f16 rows", f"{b} x 640 rows", b, nb, 4 * b * H * D * (raw_cap + comp_n), med,
            best, per, gpu)


# ---- the indexer at long contexts -------------------------------------------------------------------------------

def bench_indexer(gpu, out, batches):
    header("Indexer scores over n compressed rows (64 heads x 128, f16 rows in L2; queries of FP4 values as the "
           "faithful path's) and their top 512: one block per token, and the blocks per token the capacity picks")
    H, Di, k = 64, 128, 512
    rng = np.random.default_rng(41)
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
    for b in [*batches, 2048]:
        for n in (514, 4096, 16384, 40000, 65536, 262144):
            if b * n > 2048 * 16384 or (n > 40000 and b > 8):
                continue
            keys = gpu.put(rng.standard_normal((n, Di)).astype(np.float16))
            table = gpu.put(np.full(b, keys.ptr, np.uint64))
            n_vis = gpu.put(np.full(b, n, np.int32))
            q = gpu.put(rng.choice(grid, (b, H, Di)) * np.float32(0.25))
            w = gpu.buf(4 * b * H, F32, 43)
            scores, sel = gpu.buf(4 * b * n, F32, 44), gpu.buf(4 * b * k)
            reps = 20 if b * n <= 16 * 40000 else 2
            work = gpu.buf(max(16, _cuda.indexer_scores_work_bytes(b, H)))
            med, best = gpu.time_graph(
                lambda i: _cuda.indexer_scores(gpu.s.ptr, scores.ptr, n, q.ptr, w.ptr, 0.01, table.ptr, n_vis.ptr, b,
                                               H, Di, n, k, False, work.ptr), reps)
            nb = n * Di * 2 + 4 * b * (H * Di + H + n)
            row(out, "indexer_scores", "f16 rows", f"{b} x {n} rows", b, nb, 2 * b * n * H * Di, med, best, nb, gpu)
            for cluster, name in ((1, "topk 512, a block per token"), (0, "topk 512")):
                med, best = gpu.time_graph(
                    lambda i: _cuda.topk(gpu.s.ptr, sel.ptr, scores.ptr, n, n_vis.ptr, b, k, cluster), reps)
                row(out, name, "f32", f"{b} x {n}", b, 4 * b * n, 0, med, best, 4 * b * n, gpu)


# ---- small ops -------------------------------------------------------------------------------------------------

def bench_small(gpu, out, batches):
    header("Small ops (activations in L2; latency-bound)")
    E, H, D = 4096, 64, 512
    for b in batches:
        X = gpu.buf(4 * b * 4 * E, F32, 31)
        x, h = gpu.buf(4 * b * E, F32, 32), gpu.buf(4 * b * E)
        y = gpu.buf(4 * b * H * D, F32, 33)
        w = gpu.buf(4 * E, F32, 34)
        hc = gpu.buf(4 * b * 20)
        scratch = gpu.buf(_cuda.hc_pre_scratch_bytes(b, E, 24))
        fn = gpu.buf(2 * 24 * 4 * E, F16, 35)
        sc = gpu.put(np.array([0.5, 0.5, 0.5], np.float32))
        base = gpu.put(np.zeros(24, np.float32))
        pos = gpu.put(np.arange(b, dtype=np.int32) + 2000)
        inv = gpu.put(rope_inv_freq(64, 160000.0, (16.0, 65536, 32.0, 1.0)))
        ring = gpu.buf(2 * b * 128 * D)
        logits = gpu.buf(4 * b * 256, F32, 36)
        ids, wts = gpu.buf(4 * b * 6), gpu.buf(4 * b * 6)
        bias = gpu.buf(4 * 256, F32, 37)
        # LM-like logits (~0.1% within 3 of the top) and the sampler's default knobs, or greedy
        vocab = gpu.put((np.random.default_rng(38).standard_normal((b, 129280)) * 2).astype(np.float32))
        flat = gpu.put((np.random.default_rng(39).standard_normal((b, 129280)) * 0.1).astype(np.float32))
        sampled = gpu.buf(4 * b)
        greedy, default = (gpu.put(draw_records([Draw(SamplingParams(), g, 0.5)] * b).view(np.uint8))
                           for g in (True, False))
        ops = [
            ("rms_norm", "4096", 8 * b * E,
             lambda: _cuda.rms_norm(gpu.s.ptr, h.ptr, E, x.ptr, E, w.ptr, b, E, 1e-6)),
            ("rms_norm in place", "4096", 8 * b * E,
             lambda: _cuda.rms_norm(gpu.s.ptr, x.ptr, E, x.ptr, E, w.ptr, b, E, 1e-6)),
            ("rms_norm per head", "64 x 512", 8 * b * H * D,
             lambda: _cuda.rms_norm(gpu.s.ptr, y.ptr, D, y.ptr, D, 0, b * H, D, 1e-6)),
            ("hc_pre (2 launches)", "24 x 16384 F16", 2 * 24 * 4 * E + 4 * b * (4 * E + E),
             lambda: _cuda.hc_pre(gpu.s.ptr, x.ptr, hc.ptr, scratch.ptr, X.ptr, 4 * E, fn.ptr, F16, sc.ptr, base.ptr,
                                  b, E, 24, 20, 1e-6, 1e-6)),
            ("hc_post", "4 x 4096", 4 * b * (9 * E),
             lambda: _cuda.hc_post(gpu.s.ptr, X.ptr, x.ptr, X.ptr, hc.ptr, b, E)),
            ("rope (64 heads)", "64 x 64 of 512", 8 * b * H * 64,
             lambda: _cuda.rope(gpu.s.ptr, y.ptr, H * D, pos.ptr, 0, inv.ptr, b, H, D, 64, False)),
            ("kv_store (fp8)", "512", 6 * b * D,
             lambda: _cuda.kv_store(gpu.s.ptr, ring.ptr, 128 * D, y.ptr, H * D, pos.ptr, 0, 1, 128, b, D, 448, True)),
            ("route", "256 -> 6", 4 * b * 256,
             lambda: _cuda.route(gpu.s.ptr, ids.ptr, wts.ptr, logits.ptr, bias.ptr, 0, 0, b, 256, 6, 1.5, True)),
            ("sample greedy", "129280", 4 * b * 129280,
             lambda: _cuda.sample(gpu.s.ptr, sampled.ptr, greedy.ptr, vocab.ptr, 129280, b, 129280)),
            ("sample T=1 min_p=0.05", "129280", 4 * b * 129280,
             lambda: _cuda.sample(gpu.s.ptr, sampled.ptr, default.ptr, vocab.ptr, 129280, b, 129280)),
            ("sample T=1 min_p=0.05, flat logits (every one a candidate)", "129280", 4 * b * 129280,
             lambda: _cuda.sample(gpu.s.ptr, sampled.ptr, default.ptr, flat.ptr, 129280, b, 129280)),
        ]
        for name, shape, nb, fn_ in ops:
            med, best = gpu.time_graph(lambda i, f=fn_: f(), 50)
            row(out, name, "f32", shape, b, nb, 0, med, best, nb, gpu)


# ---- one decode layer ------------------------------------------------------------------------------------------

class Layer:
    """One ratio-4 layer of the q2 file (the heaviest layer kind: 182 MB of non-routed weights), random weights of
    the real shapes and types, and the activation buffers of a decode step of B sessions."""

    SPECS = [  # name, type, rows, cols (F16 HC mixers and compressor/indexer matrices, Q8_0 projections)
        ("hc_attn_fn", F16, 24, 16384), ("attn_q_a", Q8_0, 1024, 4096), ("attn_q_b", Q8_0, 32768, 1024),
        ("attn_kv", Q8_0, 512, 4096), ("attn_output_a", Q8_0, 8192, 4096), ("attn_output_b", Q8_0, 4096, 8192),
        ("attn_compressor_kv", F16, 1024, 4096), ("attn_compressor_gate", F16, 1024, 4096),
        ("indexer.attn_q_b", F16, 8192, 1024), ("indexer.proj", F16, 64, 4096),
        ("indexer_compressor_kv", F16, 256, 4096), ("indexer_compressor_gate", F16, 256, 4096),
        ("hc_ffn_fn", F16, 24, 16384), ("ffn_gate_inp", F16, 256, 4096),
        ("ffn_gate_shexp", Q8_0, 2048, 4096), ("ffn_up_shexp", Q8_0, 2048, 4096), ("ffn_down_shexp", Q8_0, 4096, 2048),
    ]
    EXPERTS = [("ffn_gate_exps", IQ2_XXS, 2048, 4096), ("ffn_up_exps", IQ2_XXS, 2048, 4096),
               ("ffn_down_exps", Q2_K, 4096, 2048)]

    def __init__(self, gpu, seed):
        self.gpu = gpu
        self.w = {}
        self.nonrouted = 0
        for i, (name, t, rows, cols) in enumerate(self.SPECS):
            nb = row_bytes(t, cols) * rows
            self.w[name] = gpu.buf(nb, t, seed * 100 + i)
            self.nonrouted += nb
        for i, (name, t, rows, cols) in enumerate(self.EXPERTS):
            self.w[name] = gpu.buf(row_bytes(t, cols) * rows * 256, t, seed * 100 + 50 + i)
        self.expert_bytes = sum(row_bytes(t, c) * r for _, t, r, c in self.EXPERTS)   # one expert, 3 matrices
        rng = np.random.default_rng(seed)
        vec = lambda n, lo=0.5, hi=1.5: gpu.put(rng.uniform(lo, hi, n).astype(np.float32))  # noqa: E731
        self.v = dict(attn_norm=vec(4096), q_a_norm=vec(1024), kv_norm=vec(512), ffn_norm=vec(4096),
                      sinks=vec(64, -1, 1), hc_scale=vec(3, 0.1, 0.3), hc_base=vec(24, -1, 1),
                      bias=vec(256, -0.1, 0.1))
        self.nonrouted += 4 * (4096 + 1024 + 512 + 4096 + 64 + 256 + 2 * 27)


class Acts:
    """Activation buffers and the session state (raw ring, compressed rows) of B sessions."""

    def __init__(self, gpu, b, comp_rows):
        E, H, D = 4096, 64, 512
        f = lambda n, seed=None: gpu.buf(4 * n, None if seed is None else F32, seed or 1)  # noqa: E731
        self.b = b
        self.X = gpu.buf(4 * b * 4 * E)
        self.X.fill_random(F32, 3, stream=gpu.s.ptr)
        self.x, self.h, self.qa = f(b * E), f(b * E), f(b * 1024)
        self.q, self.o = f(b * H * D), f(b * H * D)
        self.kv, self.low, self.y = f(b * D), f(b * 8192), f(b * E)
        self.ckv, self.cgate = f(b * 1024), f(b * 1024)
        self.iq, self.iw, self.ikv, self.igate = f(b * 8192), f(b * 64), f(b * 256), f(b * 256)
        self.logits, self.ids, self.wts = f(b * 256), f(b * 6), f(b * 6)
        self.mid, self.smid, self.moe = f(b * 6 * 2048), f(b * 2048), f(b * E)
        self.hc_a, self.hc_f = f(b * 20), f(b * 20)
        self.scratch = gpu.buf(_cuda.hc_pre_scratch_bytes(b, E, 24))
        self.raw = gpu.buf(2 * b * 128 * D, F16, 41)
        self.comp = gpu.buf(2 * b * comp_rows * D, F16, 42)
        self.comp_rows = comp_rows
        self.pos = gpu.put(np.arange(b, dtype=np.int32) + 4 * comp_rows)
        self.raw_n = gpu.put(np.full(b, 128, np.int32))
        self.comp_n = gpu.put(np.full(b, comp_rows, np.int32))
        self.att_scratch = gpu.buf(_cuda.attention_scratch_bytes(b, H, D, 128, comp_rows, 0, False))
        self.qn, self.kvn = f(b * 1024), f(b * D)   # norms write beside their input (in place measured slower)
        self.inv = gpu.put(rope_inv_freq(64, 160000.0, (16.0, 65536, 32.0, 1.0)))
        self.work = gpu.buf(max(16, _cuda.moe_down_work_bytes(Q2_K, b, 6, 2048),
                                max(_cuda.matvec_work_bytes(Q8_0, b, c, g) for c, g in ((E, 1), (1024, 1), (8192, 1),
                                                                                        (E, 8)))))


def layer_steps(gpu, L, A):
    """One layer's decode step as (name, weight bytes, enqueue) in MODEL.md 3.4 order, for A.b sessions.
    Compressor pooling and the indexer's scoring are not kernels yet: their matrix products are here, their small
    pooling/top-k work is not (at a 2K context the indexer keeps every compressed row and needs no scoring)."""
    s, b, w, v = gpu.s.ptr, A.b, L.w, L.v
    E, H, D = 4096, 64, 512
    steps = []

    def mv(name, t, rows, cols, x, y, groups=1):
        steps.append((name, row_bytes(t, cols) * rows * groups,
                      lambda: _cuda.matvec(s, y.ptr, rows * groups, w[name].ptr, t, rows, cols, x.ptr, cols * groups,
                                           b, groups, A.work.ptr)))

    def op(name, fn, nbytes=0):
        steps.append((name, nbytes, fn))

    op("hc_pre (attn)", lambda: _cuda.hc_pre(s, A.x.ptr, A.hc_a.ptr, A.scratch.ptr, A.X.ptr, 4 * E,
                                             w["hc_attn_fn"].ptr, F16, v["hc_scale"].ptr, v["hc_base"].ptr, b, E, 24,
                                             20, 1e-6, 1e-6), 2 * 24 * 4 * E)
    op("rms_norm attn_norm", lambda: _cuda.rms_norm(s, A.h.ptr, E, A.x.ptr, E, v["attn_norm"].ptr, b, E, 1e-6))
    mv("attn_q_a", Q8_0, 1024, E, A.h, A.qa)
    op("rms_norm q_a_norm", lambda: _cuda.rms_norm(s, A.qn.ptr, 1024, A.qa.ptr, 1024, v["q_a_norm"].ptr, b, 1024,
                                                   1e-6))
    mv("attn_q_b", Q8_0, H * D, 1024, A.qn, A.q)
    op("rms_norm per head", lambda: _cuda.rms_norm(s, A.q.ptr, D, A.q.ptr, D, 0, b * H, D, 1e-6))
    op("rope q", lambda: _cuda.rope(s, A.q.ptr, H * D, A.pos.ptr, 0, A.inv.ptr, b, H, D, 64, False))
    mv("attn_kv", Q8_0, D, E, A.h, A.kv)
    op("rms_norm kv_norm", lambda: _cuda.rms_norm(s, A.kvn.ptr, D, A.kv.ptr, D, v["kv_norm"].ptr, b, D, 1e-6))
    op("rope kv", lambda: _cuda.rope(s, A.kvn.ptr, D, A.pos.ptr, 0, A.inv.ptr, b, 1, D, 64, False))
    op("kv_store (fp8)", lambda: _cuda.kv_store(s, A.raw.ptr, 128 * D, A.kvn.ptr, D, A.pos.ptr, 0, 1, 128, b, D,
                                                448, True))
    mv("attn_compressor_kv", F16, 1024, E, A.h, A.ckv)
    mv("attn_compressor_gate", F16, 1024, E, A.h, A.cgate)
    mv("indexer_compressor_kv", F16, 256, E, A.h, A.ikv)
    mv("indexer_compressor_gate", F16, 256, E, A.h, A.igate)
    mv("indexer.attn_q_b", F16, 8192, 1024, A.qn, A.iq)
    mv("indexer.proj", F16, 64, E, A.h, A.iw)
    op("attention", lambda: _cuda.attention_decode(
        s, A.o.ptr, A.att_scratch.ptr, A.q.ptr, A.raw.ptr, 128 * D, A.raw_n.ptr, 128, A.comp.ptr, A.comp_rows * D,
        A.comp_n.ptr, A.comp_rows, 0, 0, v["sinks"].ptr, b, H, D, 1 / math.sqrt(D)), b * (128 + A.comp_rows) * D * 2)
    op("rope out (inverse)", lambda: _cuda.rope(s, A.o.ptr, H * D, A.pos.ptr, 0, A.inv.ptr, b, H, D, 64, True))
    mv("attn_output_a", Q8_0, 1024, E, A.o, A.low, groups=8)
    mv("attn_output_b", Q8_0, E, 8192, A.low, A.y)
    op("hc_post (attn)", lambda: _cuda.hc_post(s, A.X.ptr, A.y.ptr, A.X.ptr, A.hc_a.ptr, b, E))
    op("hc_pre (ffn)", lambda: _cuda.hc_pre(s, A.x.ptr, A.hc_f.ptr, A.scratch.ptr, A.X.ptr, 4 * E,
                                            w["hc_ffn_fn"].ptr, F16, v["hc_scale"].ptr, v["hc_base"].ptr, b, E, 24,
                                            20, 1e-6, 1e-6), 2 * 24 * 4 * E)
    op("rms_norm ffn_norm", lambda: _cuda.rms_norm(s, A.h.ptr, E, A.x.ptr, E, v["ffn_norm"].ptr, b, E, 1e-6))
    mv("ffn_gate_inp", F16, 256, E, A.h, A.logits)
    op("route", lambda: _cuda.route(s, A.ids.ptr, A.wts.ptr, A.logits.ptr, v["bias"].ptr, 0, 0, b, 256, 6, 1.5,
                                    True))
    op("moe gate+up (IQ2_XXS)", lambda: _cuda.moe_gate_up(
        s, A.mid.ptr, A.h.ptr, E, w["ffn_gate_exps"].ptr, w["ffn_up_exps"].ptr, IQ2_XXS, 2048, E, 256, A.ids.ptr,
        A.wts.ptr, 6, b, 10.0), 6 * b * 2 * row_bytes(IQ2_XXS, E) * 2048)
    op("moe down (Q2_K)", lambda: _cuda.moe_down(s, A.moe.ptr, E, A.mid.ptr, w["ffn_down_exps"].ptr, Q2_K, E, 2048,
                                                 256, A.ids.ptr, 6, b, False, A.work.ptr),
       6 * b * row_bytes(Q2_K, 2048) * E)
    op("shared gate+up (Q8_0)", lambda: _cuda.moe_gate_up(
        s, A.smid.ptr, A.h.ptr, E, w["ffn_gate_shexp"].ptr, w["ffn_up_shexp"].ptr, Q8_0, 2048, E, 1, 0, 0, 1, b,
        10.0), 2 * row_bytes(Q8_0, E) * 2048)
    op("shared down (Q8_0)", lambda: _cuda.moe_down(s, A.moe.ptr, E, A.smid.ptr, w["ffn_down_shexp"].ptr, Q8_0, E,
                                                    2048, 1, 0, 1, b, True, A.work.ptr), row_bytes(Q8_0, 2048) * E)
    op("hc_post (ffn)", lambda: _cuda.hc_post(s, A.X.ptr, A.moe.ptr, A.X.ptr, A.hc_f.ptr, b, E))
    return steps


def bench_layer(gpu, out, batches, peers):
    layers = [Layer(gpu, 1), Layer(gpu, 2)]   # two copies alternate so that no replay finds the last in L2
    comp_rows = 512                             # a 2K context at ratio 4
    acts = {b: Acts(gpu, b, comp_rows) for b in batches}
    print("\n### One decode layer, step by step (each step alone, 20 launches per graph)\n")
    print("| step | " + " | ".join(f"B={b} us | B={b} floor us" for b in batches) + " |")
    print("|---|" + "---:|---:|" * len(batches))
    per_b = {b: layer_steps(gpu, layers[0], acts[b]) for b in batches}
    other = {b: layer_steps(gpu, layers[1], acts[b]) for b in batches}
    names = [n for n, _, _ in per_b[batches[0]]]
    for k, name in enumerate(names):
        cells = []
        for b in batches:
            _, nb, _ = per_b[b][k]
            fns = (per_b[b][k][2], other[b][k][2])
            med, _ = gpu.time_graph(lambda i, fns=fns: fns[i % 2](), 20, replays=10)
            cells.append(f"{med * 1e6:.1f} | {nb / gpu.copy_bw * 1e6:.1f}")
            out.append(dict(name="layer step", step=name, B=b, bytes=nb, us=med * 1e6,
                            floor_us=nb / gpu.copy_bw * 1e6))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)

    print("\n### One decode layer (ratio-4 layer, q2 file), one CUDA graph per replay\n")
    print("| B | PDL | launches | layer bytes MiB | floor us | measured us | floor/measured | tok/s (43 such layers) "
          "| vs llama.cpp 323 us | vs ds4 680 us |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in batches:
        A = acts[b]
        # Bytes that must move: the non-routed weights, each token's 6 experts (distinct tokens rarely share
        # one at random routing), the attention rows; activations are small and not counted.
        nb = layers[0].nonrouted + 6 * b * layers[0].expert_bytes + b * (128 + comp_rows) * 512 * 2
        seqs = [layer_steps(gpu, layers[0], A), layer_steps(gpu, layers[1], A)]

        def enqueue(i):
            for _, _, fn in seqs[i % 2]:
                fn()

        for pdl in (True, False):
            _cuda.set_pdl(pdl)
            _cuda.begin_capture(gpu.s.ptr)
            enqueue(0)
            launches = _cuda.end_capture(gpu.s.ptr).nodes
            med, best = gpu.time_graph(enqueue, 4, replays=15)
            floor = nb / gpu.copy_bw
            out.append(dict(name="layer", B=b, pdl=pdl, launches=launches, bytes=nb, floor_us=floor * 1e6,
                            us=med * 1e6, best_us=best * 1e6, of_floor=floor / med, tok_s=b / (43 * med)))
            print(f"| {b} | {'on' if pdl else 'off'} | {launches} | {mib(nb):.0f} | {floor * 1e6:.1f} | "
                  f"{med * 1e6:.1f} | {100 * floor / med:.0f}% | {b / (43 * med):.0f} | "
                  f"{peers[0] / (med * 1e6):.1f}x | {peers[1] / (med * 1e6):.1f}x |", flush=True)
        _cuda.set_pdl(True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="copy,matvec,moe,attention,small,indexer,layer")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    parts = args.only.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    gpu = Gpu()
    info = gpu.info
    print(f"# {info['name']} (cc {info['cc']}, {info['sms']} SMs, L2 {info['l2_bytes'] >> 20} MB, "
          f"{info['total_bytes'] / 2**30:.0f} GiB), {time.strftime('%Y-%m-%d %H:%M')}, "
          f"PDL {'on' if _cuda.pdl() else 'off'}")
    med, best = gpu.measure_copy()
    print(f"device-to-device copy of 2 GiB (read + written bytes): {med / 1e12:.2f} TB/s median, "
          f"{best / 1e12:.2f} best")
    results = dict(device=info, copy_bw=med, copy_bw_best=best, rows=[])
    try:
        if "matvec" in parts:
            bench_matvec(gpu, results["rows"], batches)
        if "moe" in parts:
            bench_moe(gpu, results["rows"], batches)
        if "attention" in parts:
            bench_attention(gpu, results["rows"], batches)
        if "small" in parts:
            bench_small(gpu, results["rows"], batches)
        if "indexer" in parts:
            bench_indexer(gpu, results["rows"], batches)
        if "layer" in parts:
            bench_layer(gpu, results["rows"], batches, (323.0, 680.0))
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
