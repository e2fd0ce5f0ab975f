"""Benchmark of the native CPU kernels (ds4d._cpu) against this machine's memory bandwidth.

Measures (1) memory bandwidth with numpy: a copy (read + written bytes) and a float64 sum (read bytes), on one
thread and on two threads taking halves; (2) matrix-vector products (T = 1) for every weight type, ISA level,
thread count and activation path, on matrices larger than the caches, rotating over enough of them (--total-mb)
that nothing is reused from L3, all passes interleaved round by round with the bandwidth passes; and (3) a
matrix-matrix number (T = --tokens). Prints markdown tables; the numbers are written down in
docs/CPU_KERNELS.md, never asserted anywhere.

    PYTHONPATH=daemon python bench/cpu_kernels.py            # everything (a few minutes on 2 cores)
    PYTHONPATH=daemon python bench/cpu_kernels.py --types Q8_0,F16 --isas avx512 --rounds 5
"""

import argparse
import statistics
import threading
import time

import numpy as np

from ds4d import _cpu

TYPES = {"F32": 0, "F16": 1, "Q8_0": 8, "Q2_K": 10, "Q4_K": 12, "IQ2_XXS": 16, "BF16": 30}
# f16 scale fields inside a block: (block bytes, byte offsets)
SCALES = {8: (34, [0]), 10: (84, [80, 82]), 12: (144, [0, 2]), 16: (66, [0])}


def random_weights(rng, type_, rows, cols):
    """Random rows of `type_` with finite f16 scales in [1e-3, 1] of both signs (the values do not matter for speed)."""
    rb = _cpu.row_bytes(type_, cols)
    if type_ in (0, 1, 30):
        vals = rng.standard_normal((rows, cols)).astype(np.float32)
        if type_ == 0:
            return vals.view(np.uint8)
        if type_ == 1:
            return vals.astype(np.float16).view(np.uint8)
        return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, size=(rows, rb), dtype=np.uint8)
    bb, offs = SCALES[type_]
    blocks = raw.reshape(rows, rb // bb, bb)
    for off in offs:
        shape = blocks.shape[:2]
        scale = (10.0 ** rng.uniform(-3, 0, shape) * rng.choice([-1, 1], shape)).astype(np.float16)
        blocks[..., off : off + 2] = scale.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return raw


def bandwidth_pass(src, dst, threads, read_only):
    """One numpy pass over src split across `threads` Python threads (numpy releases the GIL): a copy (read +
    written bytes per second) or a float64 sum (read bytes per second)."""
    bounds = [(p[0], p[-1] + 1) for p in np.array_split(np.arange(src.size), threads)]

    def work(a, b):
        if read_only:
            src[a:b].sum()
        else:
            np.copyto(dst[a:b], src[a:b])

    ts = [threading.Thread(target=work, args=ab) for ab in bounds]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return (1 if read_only else 2) * src.nbytes / (time.perf_counter() - t0) / 1e9


def product_pass(mats, type_, cols, x, out, act8):
    """Seconds per product over one pass across all matrices."""
    t0 = time.perf_counter()
    for m in mats:
        _cpu.matmul(m, type_, cols, x, out=out, act8=act8)
    return (time.perf_counter() - t0) / len(mats)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="F16,BF16,F32,Q8_0,Q2_K,Q4_K,IQ2_XXS")
    ap.add_argument("--isas", default=",".join(_cpu.available_isas()))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--total-mb", type=float, default=256, help="weights rotated over per pass (> L3)")
    ap.add_argument("--tokens", type=int, default=64, help="T of the matrix-matrix product")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--copy-mb", type=int, default=512)
    ap.add_argument("--hugepages", action="store_true",
                    help="let numpy back the arrays with transparent huge pages (default: 4 KB pages, like a "
                         "memory-mapped GGUF file in the page cache)")
    args = ap.parse_args()
    core = getattr(np, "_core", None) or np.core
    core.multiarray._set_madvise_hugepage(args.hugepages)

    rng = np.random.default_rng(0)
    threads = [int(t) for t in args.threads.split(",")]
    isas = args.isas.split(",")
    saved_isa, saved_threads = _cpu.isa(), _cpu.threads()
    rows, cols = args.rows, args.cols

    # Every measurement is one pass; the passes of all configurations (bandwidth references included) are
    # interleaved round by round, so that slow drifts of the machine (other tenants) hit them all alike.
    src = np.ones((args.copy_mb << 20) // 8, np.float64)
    dst = np.empty_like(src)
    data = {}
    for name in args.types.split(","):
        type_ = TYPES[name]
        rb = _cpu.row_bytes(type_, cols)
        n_mats = max(2, int(np.ceil(args.total_mb * 1e6 / (rb * rows))))
        data[name] = [random_weights(rng, type_, rows, cols) for _ in range(n_mats)]
    x1 = rng.standard_normal((1, cols)).astype(np.float32)
    out1 = np.empty((1, rows), np.float32)
    configs = [(name, act8, isa, n) for name in data for act8 in ([False, True] if TYPES[name] in SCALES else [False])
               for isa in isas for n in threads]
    refs = [(kind, n) for kind in ("copy", "sum") for n in threads]
    times = {c: [] for c in configs}
    rates = {r: [] for r in refs}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for kind, n in refs:
            rates[(kind, n)].append(bandwidth_pass(src, dst, n, kind == "sum"))
        for c in configs:
            name, act8, isa, n = c
            _cpu.set_isa(isa)
            _cpu.set_threads(n)
            times[c].append(product_pass(data[name], TYPES[name], cols, x1, out1, act8))
    med = lambda v: statistics.median(v[1:])  # noqa: E731

    print(f"## memory bandwidth (numpy; copy counts read + written bytes, sum counts read bytes; "
          f"{'huge' if args.hugepages else '4 KB'} pages; median of {args.rounds} passes)\n")
    print("| threads | copy GB/s | float64 sum GB/s |\n|---:|---:|---:|")
    for n in threads:
        print(f"| {n} | {med(rates[('copy', n)]):.1f} | {med(rates[('sum', n)]):.1f} |")

    print(f"\n## products, W {rows} x {cols}, median of {args.rounds} passes (best in parentheses)\n")
    print("GB/s = weight bytes read per second; Gw/s = weights (multiply-adds per token) per second; "
          "% copy / % read = GB/s over the copy / sum bandwidth of the same thread count.\n")
    print(f"| type | path | ISA | threads | T=1 GB/s | T=1 Gw/s | % copy | % read | T={args.tokens} Gw*tok/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    xt = rng.standard_normal((args.tokens, cols)).astype(np.float32)
    outt = np.empty((args.tokens, rows), np.float32)
    for c in configs:
        name, act8, isa, n = c
        rb = _cpu.row_bytes(TYPES[name], cols)
        t1, best = med(times[c]), min(times[c][1:])
        gbs = rb * rows / t1 / 1e9
        mm = "-"  # matrix-matrix: compute-bound, two matrices suffice (skipped for the slow reference level)
        if isa != "portable":
            _cpu.set_isa(isa)
            _cpu.set_threads(n)
            tt = statistics.median(product_pass(data[name][:2], TYPES[name], cols, xt, outt, act8) for _ in range(3))
            mm = f"{rows * cols * args.tokens / tt / 1e9:.0f}"
        print(f"| {name} | {'act8' if act8 else 'f32'} | {isa} | {n} | {gbs:.1f} ({rb * rows / best / 1e9:.1f}) | "
              f"{rows * cols / t1 / 1e9:.1f} | {100 * gbs / med(rates[('copy', n)]):.0f}% | "
              f"{100 * gbs / med(rates[('sum', n)]):.0f}% | {mm} |", flush=True)
    _cpu.set_isa(saved_isa)
    _cpu.set_threads(saved_threads)


if __name__ == "__main__":
    main()
