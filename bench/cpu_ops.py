"""Benchmark of the CPU backend on a real-width model: decode step and prefill, with the fused native ops (MoE,
attention, indexer top-k) or with their float32 numpy reference forms (what the backend ran before them).

    PYTHONPATH=daemon:client python bench/cpu_ops.py /work/models/fw4-q2.gguf [--ops native,reference]
        [--rounds 5] [--prefill 256] [--context 64] [--steps 20] [--profile] [--micro]

Both variants run in the same process, round by round interleaved, so a comparison comes from one window of this
shared machine; every round also records the share of the CPU other processes took meanwhile, and the headline
figure is the median of the undisturbed rounds. Prints the median decode step (ms) after `--context` prefilled
tokens and the prefill rate of `--prefill` tokens in one chunk. `--profile` adds, per variant, a cProfile of the
decode steps and a table of exclusive time per op (matrix products per weight), for decode and for prefill;
`--micro` times the three ops alone at the model's shapes. Timings are measured here, never asserted by tests."""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import statistics
import time
from collections import defaultdict

import ds4d  # noqa: F401  (first: sets single-threaded BLAS before numpy loads)
import numpy as np
from ds4d.model import open_model
from ds4d.ops.reference import Reference


class Quiet:
    """The share of the machine's CPU time that other processes (and the hypervisor's steal) took while a
    measurement ran: rounds above a few percent were disturbed on this shared VM."""

    def __enter__(self):
        self.start = self._ticks()
        return self

    def __exit__(self, *exc):
        (b0, s0, t0), (b1, s1, t1) = self.start, self._ticks()
        self.others = max(0.0, ((b1 - b0) - (s1 - s0)) / max(1e-9, (t1 - t0) * os.sysconf("SC_CLK_TCK") *
                                                                  os.cpu_count()))

    @staticmethod
    def _ticks():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)   # user nice system irq softirq steal
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return busy, int(fields[11]) + int(fields[12]), time.monotonic()


def use_ops(model, variant: str) -> None:
    """Point the backend's three fused ops at the native kernels or at the float32 reference."""
    ops = model.ops
    for name in ("moe", "attention", "indexer_topk"):
        if variant == "reference":
            setattr(ops, name, getattr(Reference, name).__get__(ops))
        else:
            ops.__dict__.pop(name, None)


class OpTimer:
    """Exclusive wall time per backend op (matrix products per weight name), by wrapping the op methods."""

    OPS = ("matmul", "matmul_grouped", "moe", "ffn", "attention", "indexer_topk", "embed", "rms_norm", "swiglu",
           "hc_pre", "hc_post", "hc_head", "rope", "fp8_kv", "hadamard_fp4", "compress", "route")

    def __init__(self, ops):
        self.ops, self.total, self.calls, self.stack = ops, defaultdict(float), defaultdict(int), []
        self.on, self.wall = False, 0.0
        self.saved = {n: ops.__dict__.get(n) for n in self.OPS}
        for n in self.OPS:
            setattr(ops, n, self._wrap(n, getattr(ops, n)))

    def _wrap(self, name, fn):
        def timed(*a, **kw):
            if not self.on:
                return fn(*a, **kw)
            key = name
            if name in ("matmul", "matmul_grouped"):
                key = "matmul " + re.sub(r"^blk\.\d+\.|\.weight|\[.*", "", a[0].name)
            self.stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                inner = self.stack.pop()
                self.total[key] += dt - inner
                self.calls[key] += 1
                if self.stack:
                    self.stack[-1] += dt
        return timed

    def enable(self):
        self.on, self.t0 = True, time.perf_counter()

    def disable(self):
        self.on = False
        self.wall += time.perf_counter() - self.t0

    def restore(self):
        for n, f in self.saved.items():
            if f is None:
                self.ops.__dict__.pop(n, None)
            else:
                setattr(self.ops, n, f)

    def report(self, steps: int, what: str = "decode step") -> str:
        lines = [f"mean {what} {1e3 * self.wall / steps:.1f} ms; per {what}, exclusive of nested ops:",
                 "| op | ms | calls |", "|---|---:|---:|"]
        for k, v in sorted(self.total.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {k} | {1e3 * v / steps:.2f} | {self.calls[k] / steps:.0f} |")
        glue = 1e3 * (self.wall - sum(self.total.values())) / steps
        lines.append(f"| (outside the ops: model.py glue) | {glue:.2f} | |")
        return "\n".join(lines)


def decode_ms(model, context: int, steps: int, profile=None) -> float:
    """Median decode step after `context` prefilled tokens; `profile` (enable/disable) sees the timed steps."""
    st = model.new_state()
    rng = np.random.default_rng(0)
    model.prefill(st, rng.integers(0, 1000, context))
    tok = 100
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        watched = profile is not None and i >= 2
        if watched:
            profile.enable()
        logits = model.decode([st], [tok])
        if watched:
            profile.disable()
        times.append(time.perf_counter() - t0)
        tok = int(np.argmax(logits[0]))
    return 1e3 * statistics.median(times[2:])


def prefill_tps(model, n: int, profile=None) -> float:
    st = model.new_state()
    toks = np.random.default_rng(1).integers(0, 1000, n)
    t0 = time.perf_counter()
    if profile is not None:
        profile.enable()
    model.prefill(st, toks, chunk=n)
    if profile is not None:
        profile.disable()
    return n / (time.perf_counter() - t0)


def micro(m) -> None:
    """The three ops alone at the model's shapes: native against the float32 reference, ms per call."""
    from ds4d.state import RowStore
    ops, s = m.ops, m.shape
    ref = Reference(np.float32)
    rng = np.random.default_rng(0)

    def bench(f, budget=1.0):
        f()
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < budget:
            f()
            k += 1
        return 1e3 * (time.perf_counter() - t0) / k

    H, D = s.n_head, s.head_dim
    sinks = rng.standard_normal(H).astype(np.float32)
    for T, n_comp in ((1, 16), (1, 512), (1, 4000), (64, 100)):
        q = rng.standard_normal((T, H, D)).astype(np.float32)
        raw = rng.standard_normal((s.n_swa + T, D)).astype(np.float16)
        hi = np.arange(T) + s.n_swa + 1
        lo = np.maximum(0, hi - s.n_swa)
        comp = RowStore(D, np.float16)
        comp.append(rng.standard_normal((n_comp, D)).astype(np.float16))
        n = np.full(T, n_comp)
        args = (q, raw, lo, hi, comp, None, n, sinks, 1 / np.sqrt(D))
        print(f"attention T={T} rows={s.n_swa}+{n_comp}: native {bench(lambda: ops.attention(*args)):.3f} ms, "
              f"reference {bench(lambda: ref.attention(*args)):.3f} ms")
    Hi, Di = s.n_indexer_head, s.indexer_head_dim
    for T, n in ((1, 2048), (1, 20000), (16, 4000)):
        keys = RowStore(Di, np.float16)
        keys.append(rng.standard_normal((n, Di)).astype(np.float16))
        q = rng.standard_normal((T, Hi, Di)).astype(np.float32)
        w = rng.standard_normal((T, Hi)).astype(np.float32)
        args = (q, w, keys, np.full(T, n), s.indexer_top_k, 0.01)
        print(f"indexer_topk T={T} rows={n}: native {bench(lambda: ops.indexer_topk(*args)):.3f} ms, "
              f"reference {bench(lambda: ref.indexer_topk(*args)):.3f} ms")
    L = next(layer for layer in m.weights.layers if layer.ffn_gate_tid2eid is None) if any(
        layer.ffn_gate_tid2eid is None for layer in m.weights.layers) else m.weights.layers[-1]
    experts = (L.ffn_gate_exps, L.ffn_up_exps, L.ffn_down_exps)
    shared = (L.ffn_gate_shexp, L.ffn_up_shexp, L.ffn_down_shexp)
    for T in (1, 4, 64):
        h = rng.standard_normal((T, s.n_embd)).astype(np.float32)
        ids = np.stack([rng.choice(s.n_expert, s.n_expert_used, replace=False) for _ in range(T)])
        w = rng.uniform(0.1, 1, ids.shape).astype(np.float32)
        args = (h, ids, w, experts, 10.0, shared, 10.0)
        print(f"moe T={T} (+ shared expert): native {bench(lambda: ops.moe(*args)):.2f} ms, "
              f"per-expert matmul calls {bench(lambda: Reference.moe(ops, *args)):.2f} ms")


def paired(m, variants: list[str], context: int, steps: int, prefill: int, chunks: int) -> None:
    """Variants alternated block by block (each on its own session), every block screened with Quiet: robust
    against the slow swings of load on a shared machine. Prints medians over the undisturbed steps and the
    median of the paired differences (second variant minus first)."""
    rng = np.random.default_rng(0)
    ctx = rng.integers(0, 1000, context)
    states = {}
    for v in variants:
        use_ops(m, v)
        states[v] = m.new_state()
        m.prefill(states[v], ctx)
    toks = {v: 100 for v in variants}
    dec = {v: [] for v in variants}
    block = 8   # steps per screened sample: a single step is only a few ticks of the kernel's CPU accounting
    for i in range(steps // block + 1):
        for v in (variants if i % 2 == 0 else variants[::-1]):
            use_ops(m, v)
            times = []
            with Quiet() as q:
                for _ in range(block):
                    t0 = time.perf_counter()
                    logits = m.decode([states[v]], [toks[v]])
                    times.append(time.perf_counter() - t0)
                    toks[v] = int(np.argmax(logits[0]))
            if i >= 1:
                dec[v].append((1e3 * statistics.median(times), q.others))
    pre = {v: [] for v in variants}
    for i in range(chunks):
        for v in (variants if i % 2 == 0 else variants[::-1]):
            use_ops(m, v)
            with Quiet() as q:
                tps = prefill_tps(m, prefill) if prefill else 0.0
            pre[v].append((tps, q.others))
    for name, table, unit in (("decode", dec, "ms/token"), (f"prefill {prefill}", pre, "tok/s")):
        if not table[variants[0]]:
            continue
        clean = [all(table[v][i][1] < 0.05 for v in variants) for i in range(len(table[variants[0]]))]
        if not any(clean):
            clean = [True] * len(clean)
        med = {v: statistics.median([x for (x, _), c in zip(table[v], clean) if c]) for v in variants}
        line = ", ".join(f"{v} {med[v]:.1f}" for v in variants)
        diff = ""
        if len(variants) == 2:
            d = [b[0] - a[0] for a, b, c in zip(table[variants[0]], table[variants[1]], clean) if c]
            diff = f"; paired {variants[1]} - {variants[0]}: {statistics.median(d):+.1f}"
        print(f"paired {name} ({unit}), {sum(clean)} of {len(clean)} pairs undisturbed: {line}{diff}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--ops", default="native,reference")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--numerics", default="faithful")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--micro", action="store_true", help="time the three ops alone at the model's shapes")
    ap.add_argument("--paired", type=int, default=0, metavar="STEPS",
                    help="alternate the variants: STEPS decode steps (in blocks of 8), then --chunks prefills")
    ap.add_argument("--chunks", type=int, default=6)
    args = ap.parse_args()

    m = open_model(args.model, numerics=args.numerics)
    print(f"# {os.path.basename(args.model)}, {args.numerics}, isa {m.ops._cpu.isa()}, "
          f"{m.ops._cpu.threads()} threads, load {os.getloadavg()[0]:.2f}")
    if args.micro:
        micro(m)
    variants = args.ops.split(",")
    if args.paired:
        paired(m, variants, args.context, args.paired, args.prefill, args.chunks)
    dec = {v: [] for v in variants}
    pre = {v: [] for v in variants}
    decode_ms(m, 8, 3)                                      # fault the weights in
    for _ in range(args.rounds):
        for v in variants:
            use_ops(m, v)
            with Quiet() as q:
                d = decode_ms(m, args.context, args.steps)
            dec[v].append((d, q.others))
            if args.prefill:
                with Quiet() as q:
                    p = prefill_tps(m, args.prefill)
                pre[v].append((p, q.others))

    def rounds(vals, fmt):   # each round with the CPU share other processes took meanwhile
        return ", ".join(f"{fmt.format(x)} [{100 * o:.0f}%]" for x, o in vals)

    for v in variants if args.rounds else []:
        quiet = [d for d, o in dec[v] if o < 0.05] or [d for d, _ in dec[v]]
        line = f"{v:10s} decode {statistics.median(quiet):7.1f} ms/token (rounds: {rounds(dec[v], '{:.1f}')})"
        if args.prefill:
            quiet = [p for p, o in pre[v] if o < 0.05] or [p for p, _ in pre[v]]
            line += (f"\n{'':10s} prefill {args.prefill}: {statistics.median(quiet):6.1f} tok/s "
                     f"(rounds: {rounds(pre[v], '{:.1f}')})")
        print(line)
    print("# headline: median over rounds where other processes took < 5% of the CPU (all rounds if none);"
          " [%]: their share")
    print(f"# load at end {os.getloadavg()[0]:.2f}")
    if args.profile:
        for v in variants:
            use_ops(m, v)
            prof = cProfile.Profile()
            decode_ms(m, args.context, args.steps, prof)
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
            print(f"## cProfile, {v}\n{s.getvalue()}")
            timer = OpTimer(m.ops)
            decode_ms(m, args.context, args.steps, timer)
            timer.restore()
            print(f"## ops, {v}\n{timer.report(args.steps)}\n")
            if args.prefill:
                timer = OpTimer(m.ops)
                prefill_tps(m, args.prefill, timer)
                timer.restore()
                print(f"## ops, {v}, prefill\n{timer.report(1, f'prefill of {args.prefill} tokens')}\n")


if __name__ == "__main__":
    main()
