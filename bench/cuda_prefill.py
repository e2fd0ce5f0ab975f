"""Benchmark of the prefill products on the GPU: ds4_cuda_gemm at every product shape of a DS4 Flash layer and
ds4_cuda_moe_grouped over a chunk of tokens, full-size random weights of the q2 file's types.

Each is timed with CUDA events (median of `--reps` after 3 warm-ups) next to two floors: its multiply-adds at the
card's dense int8 (quantized weights on mma.sync), f16 (F16 weights on mma.sync, two products per weight: the
activations go in as two f16 parts) or bf16 / f16 (Hopper's wgmma path, one product; timed beside the mma.sync
path) tensor-core peak, and its weight bytes over the copy bandwidth (`--tops`, `--bw` give the peaks; the
defaults are an H200's: 1979 int8 TOPS, 989 f16 TFLOPS dense, 4.2 TB/s). Prints a markdown table; `--json`
writes it. Under Nsight Compute, `--only moe` runs the grouped MoE alone. `--small 1,2,4,8,16` instead times
each product at those few rows through both ds4_cuda_gemm and the decode kernels' ds4_cuda_matvec (weights
rotated over copies of at least 256 MB, so that neither reads them from L2): which one a decode batch should
use. Results: docs/PERFORMANCE.md.

    PYTHONPATH=daemon python bench/cuda_prefill.py --tokens 512      (or: bench/cuda_run.sh prefill)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from ds4d import _cuda
from ds4d.quants import row_bytes

Q8_0, Q2_K, IQ2_XXS, F16 = 8, 10, 16, 1
# (name, type, rows, cols, groups) of one layer's products (MODEL.md's shapes; the q2 file's types)
PRODUCTS = [("attn_q_a", Q8_0, 1024, 4096, 1), ("attn_q_b", Q8_0, 32768, 1024, 1), ("attn_kv", Q8_0, 512, 4096, 1),
            ("attn_output_a", Q8_0, 1024, 4096, 8), ("attn_output_b", Q8_0, 4096, 8192, 1),
            ("ffn_gate_shexp", Q8_0, 2048, 4096, 1), ("ffn_down_shexp", Q8_0, 4096, 2048, 1),
            ("ffn_gate_inp", F16, 256, 4096, 1), ("attn_compressor_kv (ratio 4)", F16, 1024, 4096, 1),
            ("indexer.attn_q_b", F16, 8192, 1024, 1), ("indexer.proj", F16, 64, 4096, 1)]


def timed(stream, fn, reps: int) -> float:
    """Median seconds of fn() on the stream, after 3 warm-up calls."""
    e0, e1 = _cuda.Event(), _cuda.Event()
    ts = []
    for i in range(reps + 3):
        e0.record(stream.ptr)
        fn()
        e1.record(stream.ptr)
        e1.synchronize()
        if i >= 3:
            ts.append(_cuda.elapsed_ms(e0, e1) / 1e3)
    return statistics.median(ts)


def graph_timed(stream, fn, weights: list, reps: int) -> float:
    """Median seconds per call of fn(w) over replays of one CUDA graph calling it once on each of `weights` (as in a
    decode step: no host launch gaps; the copies keep the weights out of L2)."""
    _cuda.begin_capture(stream.ptr)
    for w in weights:
        fn(w)
    g = _cuda.end_capture(stream.ptr)
    return timed(stream, lambda: g.launch(stream.ptr), reps) / len(weights)


def small_batches(counts: list[int], reps: int, bw: float, json_path: str | None) -> int:
    """Each product at a few rows: ds4_cuda_gemm against ds4_cuda_matvec, us per call and the bytes floor."""
    _cuda.init()
    stream = _cuda.Stream()
    rng = np.random.default_rng(0)
    T = max(counts)
    x = _cuda.Buffer(4 * T * 8192 * 8)
    x.upload(rng.standard_normal(T * 8192 * 8).astype(np.float32))
    y = _cuda.Buffer(4 * T * 32768)
    rows_out = []
    print("| product | rows | gemm us | matvec us | bytes floor us |")
    print("|---|---:|---:|---:|---:|")
    for name, t, rows, cols, groups in PRODUCTS:
        nbytes = groups * rows * row_bytes(t, cols)
        copies = [_cuda.Buffer(nbytes) for _ in range(max(2, -(-(256 << 20) // nbytes)))]
        for i, w in enumerate(copies):
            w.fill_random(t, i + 1, stream=stream.ptr)
        for n in counts:
            gw = _cuda.Buffer(max(1, _cuda.gemm_work_bytes(t, n, rows, cols, groups)))
            mw = _cuda.Buffer(max(1, _cuda.matvec_work_bytes(t, n, cols, groups)))

            def gemm(w):
                _cuda.gemm(stream.ptr, y.ptr, groups * rows, w.ptr, t, rows, cols, x.ptr, groups * cols, n, groups,
                           gw.ptr)

            def matvec(w):
                _cuda.matvec(stream.ptr, y.ptr, groups * rows, w.ptr, t, rows, cols, x.ptr, groups * cols, n,
                             groups, mw.ptr)

            g = graph_timed(stream, gemm, copies, reps) * 1e6 if _cuda.gemm_ok(t, cols) else float("nan")
            m = graph_timed(stream, matvec, copies, reps) * 1e6
            floor = nbytes / (bw * 1e12) * 1e6
            rows_out.append({"name": name, "rows": n, "gemm_us": g, "matvec_us": m, "floor_bytes_us": floor})
            print(f"| {name} | {n} | {g:.1f} | {m:.1f} | {floor:.1f} |")
    if json_path:
        Path(json_path).write_text(json.dumps({"card": _cuda.device_info()["name"], "rows": rows_out}, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--only", choices=["products", "moe"])
    ap.add_argument("--moe-tiles", default="0", help="comma-separated grouped MoE tile widths to time (0: auto)")
    ap.add_argument("--tops", type=float, default=1979.0, help="dense int8 tensor TOPS (f16: half of it)")
    ap.add_argument("--bw", type=float, default=4.2, help="copy bandwidth, TB/s")
    ap.add_argument("--small", help="comma-separated row counts: gemm against matvec at each")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.small:
        return small_batches([int(t) for t in args.small.split(",")], args.reps, args.bw, args.json)
    _cuda.init()
    stream = _cuda.Stream()
    rng = np.random.default_rng(0)
    T = args.tokens
    rows_out = []

    def record(name, secs, macs, wbytes, f16, wgmma=False):
        peak = args.tops * 1e12 / 2 / (2 if f16 or wgmma else 1)  # multiply-adds per second
        macs_eff = macs * (2 if f16 and not wgmma else 1)         # F16 on mma.sync: the high and the low part
        floor_c, floor_b = macs_eff / peak, wbytes / (args.bw * 1e12)
        rows_out.append({"name": name, "us": secs * 1e6, "us_per_token": secs * 1e6 / T, "tmacs": macs / secs / 1e12,
                         "floor_compute_us": floor_c * 1e6, "floor_bytes_us": floor_b * 1e6,
                         "over_floor": secs / max(floor_c, floor_b)})

    x = _cuda.Buffer(4 * T * 8192 * 8)
    x.upload(rng.standard_normal(T * 8192 * 8).astype(np.float32))
    y = _cuda.Buffer(4 * T * 32768)
    wgmma_path = _cuda.device_info()["cc"] == 90 and T >= 64 and _cuda.has_cutlass   # gemm_sm90.cu
    if args.only != "moe":
        for name, t, rows, cols, groups in PRODUCTS:
            w = _cuda.Buffer(groups * rows * row_bytes(t, cols))
            w.fill_random(t, 1, stream=stream.ptr)
            work = _cuda.Buffer(_cuda.gemm_work_bytes(t, T, rows, cols, groups))
            # the path ds4_cuda_gemm picks (on Hopper from 64 rows: wgmma, bf16 or f16 operands) and, where that
            # is wgmma, the int8 / two-part f16 mma.sync path beside it (a tile width pinned)
            for tile in (0, 64) if wgmma_path else (0,):
                secs = timed(stream, lambda: _cuda.gemm(stream.ptr, y.ptr, groups * rows, w.ptr, t, rows, cols, x.ptr,
                                                        groups * cols, T, groups, work.ptr, tile), args.reps)
                wgmma = wgmma_path and tile == 0
                record(name + (" (wgmma)" if wgmma else " (mma.sync)" if wgmma_path else ""), secs,
                       T * groups * rows * cols, w.nbytes, t == F16, wgmma)
    if args.only != "products":
        n_expert, n_used, n_embd, n_ff = 256, 6, 4096, 2048
        gate, up = (_cuda.Buffer(n_expert * n_ff * row_bytes(IQ2_XXS, n_embd)) for _ in range(2))
        down = _cuda.Buffer(n_expert * n_embd * row_bytes(Q2_K, n_ff))
        for i, b in enumerate((gate, up)):
            b.fill_random(IQ2_XXS, 10 + i, stream=stream.ptr)
        down.fill_random(Q2_K, 12, stream=stream.ptr)
        ids = np.stack([rng.choice(n_expert, n_used, replace=False) for _ in range(T)]).astype(np.int32)
        idb, wb = _cuda.Buffer(ids.nbytes), _cuda.Buffer(4 * T * n_used)
        idb.upload(ids)
        wb.upload(rng.uniform(0.1, 0.3, (T, n_used)).astype(np.float32))
        h = _cuda.Buffer(4 * T * n_embd)
        h.upload((rng.standard_normal((T, n_embd)) * 0.05).astype(np.float32))
        work = _cuda.Buffer(_cuda.moe_work_bytes(IQ2_XXS, Q2_K, T, n_used, n_embd, n_ff, n_expert))
        used = len(np.unique(ids))
        for tile in (int(t) for t in args.moe_tiles.split(",")):
            secs = timed(stream, lambda: _cuda.moe_grouped(stream.ptr, y.ptr, n_embd, h.ptr, n_embd, gate.ptr, up.ptr,
                                                            down.ptr, IQ2_XXS, Q2_K, n_ff, n_embd, n_expert, idb.ptr,
                                                            wb.ptr, n_used, T, 10.0, False, work.ptr, tile), args.reps)
            record(f"moe_grouped ({used} experts used, tiles of {tile or 'auto'})", secs,
                   T * n_used * 3 * n_ff * n_embd, used * (gate.nbytes + up.nbytes + down.nbytes) // n_expert, False)

    info = _cuda.device_info()
    print(f"\n{info['name']}, {T} tokens; floors: {args.tops:.0f} int8 TOPS (f16 half), {args.bw} TB/s\n")
    print("| product | us | us per token | TMAC/s | compute floor us | bytes floor us | measured / floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows_out:
        print(f"| {r['name']} | {r['us']:.0f} | {r['us_per_token']:.3f} | {r['tmacs']:.1f} | "
              f"{r['floor_compute_us']:.1f} | {r['floor_bytes_us']:.1f} | {r['over_floor']:.1f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"card": info["name"], "tokens": T, "rows": rows_out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
