"""Kernels of one decode layer launched one by one (no graph), for Nsight Compute to profile on the GPU machine.

`bench/cuda_run.sh profile` runs this under `ncu --clock-control none` (METHOD: the card's clocks stay as found)
and summarizes, per kernel: duration, DRAM throughput, achieved occupancy, instructions, and where the warps
stalled. The benchmark (cuda_kernels.py) says how fast each kernel is; this says why.

    ncu --clock-control none --print-units base --csv --page raw --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --metrics smsp__inst_executed.sum,\
        smsp__issue_active.avg.pct_of_peak_sustained_active python3 bench/cuda_profile.py > ncu.csv
    python3 bench/cuda_profile.py --summarize ncu.csv
"""

from __future__ import annotations

import csv
import io
import math
import sys

import numpy as np

F32, F16, Q8_0, Q2_K, Q4_K, IQ2_XXS = 0, 1, 8, 10, 12, 16
E, H, D = 4096, 64, 512

# (label, weight type, rows, cols, tokens)
MATVECS = [("kv Q8_0 512x4096", Q8_0, 512, 4096, 1), ("out_b Q8_0 4096x8192", Q8_0, 4096, 8192, 1),
           ("compressor F16 1024x4096", F16, 1024, 4096, 1), ("out_b Q8_0 B=8", Q8_0, 4096, 8192, 8),
           ("router F16 256x4096 B=8", F16, 256, 4096, 8), ("LM head Q8_0", Q8_0, 129280, 4096, 1)]


def run():
    from ds4d import _cuda
    from ds4d.ops.reference import rope_inv_freq

    _cuda.init()
    s = _cuda.Stream()
    bufs = []

    def buf(n, t=None, seed=1):
        b = _cuda.Buffer(int(n))
        if t is not None:
            b.fill_random(t, seed, stream=s.ptr)
        bufs.append(b)
        return b

    def row_bytes(t, cols):
        bw, bb = {F32: (1, 4), F16: (1, 2), Q8_0: (32, 34), Q2_K: (256, 84), Q4_K: (256, 144), IQ2_XXS: (256, 66)}[t]
        return cols // bw * bb

    for _, t, rows, cols, b in MATVECS:
        w, x, y = buf(row_bytes(t, cols) * rows, t), buf(4 * b * cols, F32), buf(4 * b * rows)
        work = buf(max(16, _cuda.matvec_work_bytes(t, b, cols)))
        for _ in range(2):
            _cuda.matvec(s.ptr, y.ptr, rows, w.ptr, t, rows, cols, x.ptr, cols, b, 1, work.ptr)
    gate, up = buf(row_bytes(IQ2_XXS, E) * 2048 * 256, IQ2_XXS), buf(row_bytes(IQ2_XXS, E) * 2048 * 256, IQ2_XXS)
    down = buf(row_bytes(Q2_K, 2048) * E * 256, Q2_K)
    rng = np.random.default_rng(0)
    for n_tok in (1, 8):  # the routed experts of one token and of a batch of 8
        ids = buf(24 * n_tok)
        ids.upload(np.concatenate([rng.choice(256, 6, replace=False) for _ in range(n_tok)]).astype(np.int32))
        wts = buf(24 * n_tok, F32)
        h, mid, out = buf(4 * E * n_tok, F32), buf(4 * 6 * 2048 * n_tok), buf(4 * E * n_tok)
        work = buf(max(16, _cuda.moe_down_work_bytes(Q2_K, n_tok, 6, 2048)))
        for _ in range(2):
            _cuda.moe_gate_up(s.ptr, mid.ptr, h.ptr, E, gate.ptr, up.ptr, IQ2_XXS, 2048, E, 256, ids.ptr, wts.ptr, 6,
                              n_tok, 10.0)
            _cuda.moe_down(s.ptr, out.ptr, E, mid.ptr, down.ptr, Q2_K, E, 2048, 256, ids.ptr, 6, n_tok, False,
                           work.ptr)
    raw, comp = buf(2 * 128 * D, F16), buf(2 * 512 * D, F16)
    q, o = buf(4 * H * D, F32), buf(4 * H * D)
    rn, cn, sinks = buf(4), buf(4), buf(4 * H, F32)
    rn.upload(np.array([128], np.int32))
    cn.upload(np.array([512], np.int32))
    scratch = buf(_cuda.attention_scratch_bytes(1, H, D, 128, 512, 0, False))
    X, x, hc, sc = buf(16 * E, F32), buf(4 * E), buf(80), buf(_cuda.hc_pre_scratch_bytes(1, E, 24))
    fn = buf(2 * 24 * 4 * E, F16)
    scale = buf(16)
    scale.upload(np.array([0.5, 0.5, 0.5, 0], np.float32))
    base = buf(96, F32)
    wn = buf(4 * E, F32)
    pos = buf(4)
    pos.upload(np.array([2000], np.int32))
    inv = buf(256)
    inv.upload(rope_inv_freq(64, 160000.0, (16.0, 65536, 32.0, 1.0)))
    for _ in range(2):
        _cuda.attention_decode(s.ptr, o.ptr, scratch.ptr, q.ptr, raw.ptr, 128 * D, rn.ptr, 128, comp.ptr, 512 * D,
                               cn.ptr, 512, 0, 0, sinks.ptr, 1, H, D, 1 / math.sqrt(D))
        _cuda.hc_pre(s.ptr, x.ptr, hc.ptr, sc.ptr, X.ptr, 4 * E, fn.ptr, F16, scale.ptr, base.ptr, 1, E, 24, 20, 1e-6,
                     1e-6)
        _cuda.rms_norm(s.ptr, x.ptr, 1024, x.ptr, 1024, wn.ptr, 1, 1024, 1e-6)
        _cuda.rms_norm(s.ptr, q.ptr, D, q.ptr, D, 0, H, D, 1e-6)
        _cuda.rope(s.ptr, q.ptr, H * D, pos.ptr, 0, inv.ptr, 1, H, D, 64, False)
    s.synchronize()


# ---- summary of ncu's raw CSV ------------------------------------------------------------------------------------

WANT = {
    "gpu__time_duration.sum": "us",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram%",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occ%",
    "launch__grid_size": "grid",
    "launch__registers_per_thread": "regs",
    "smsp__inst_executed.sum": "warp inst",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue%",
}


def summarize(path):
    text = open(path, errors="replace").read()
    start = text.find('"ID"')
    rows = list(csv.reader(io.StringIO(text[start:])))
    head, rows = rows[0], [r for r in rows[2:] if len(r) == len(rows[0])]
    col = {n: i for i, n in enumerate(head)}
    # The stall reasons of the WarpStateStats section: cycles per issued instruction spent in each state.
    stall_cols = [n for n in head if "issue_stalled_" in n and n.endswith("per_issue_active.ratio")]
    if not stall_cols:
        print("(no stall columns in this ncu output)")
    print("| kernel | " + " | ".join(WANT.values()) + " | top stalls (cycles per issued instruction) |")
    print("|---|" + "---:|" * len(WANT) + "---|")
    for r in rows:
        name = r[col["Kernel Name"]][:60]
        vals = []
        for m, label in WANT.items():
            v = r[col[m]] if m in col else ""
            try:
                f = float(v.replace(",", ""))
                vals.append(f"{f / 1000:.1f}" if label == "us" else f"{f:.0f}" if f > 100 else f"{f:.1f}")
            except ValueError:
                vals.append(v)
        stalls = []
        for c in stall_cols:
            try:
                reason = c.split("issue_stalled_")[1].replace("_per_issue_active.ratio", "")
                stalls.append((float(r[col[c]].replace(",", "")), reason))
            except ValueError:
                pass
        top = ", ".join(f"{n} {v:.1f}" for v, n in sorted(stalls, reverse=True)[:4])
        print(f"| {name} | " + " | ".join(vals) + f" | {top} |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--summarize":
        summarize(sys.argv[2])
    else:
        run()
