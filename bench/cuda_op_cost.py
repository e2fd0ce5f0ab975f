"""What each op kind costs inside a captured decode step, by leaving it out.

For each op kind named (default: all of OPS), every call of it in the step is replaced by a cached zero array of
its output's shape (no kernel), the step is captured again and its per-layer device times are compared with the
unchanged step's, alternating in one process (machines differ by ~1% in device time; an A/B belongs on one).
The values computed are wrong; only the launches and bytes left out differ. The difference is what the op costs the
dependent chain of kernels, launch gaps and waits included: the most a fusion of it could save. With --composed,
the ops named run instead as the reference composes them from other ops (e.g. norm_matmul as rms_norm and then
matmul, moe_routed as route and then moe): what the backend's fusion of each saves, the same way.

    python3 bench/cuda_op_cost.py [--batch 8] [--ops norm_matmul,hc_post] [--composed moe_routed] [--reps 2]

Needs a GPU and the full-width 4-layer file bench/cuda_model.py writes (routed experts as holes, filled on the
device). Prints a markdown table: per layer (by compression ratio), the baseline and each variant's saving.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from cuda_model import LayerClock, open_four_layers  # noqa: E402

from ds4d.model import Segment  # noqa: E402
from ds4d.ops.reference import Reference  # noqa: E402
from ds4d.sampling import Sampler, SamplingParams  # noqa: E402

OPS = ("norm_matmul", "rope", "hc_post", "ffn", "moe_routed", "attend", "matmul", "matmul_grouped",
       "matmuls")


def skipped(ops, name, zero):
    """A stand-in for op `name` that launches nothing: its output is a zero array (or its input, for in-place-like
    ops whose output has the input's shape)."""
    if name == "norm_matmul":
        return lambda w, x, weight, eps: (zero((x.shape[0], w.rows)), x)
    if name == "rope":
        return lambda x, pos, freq, inverse=False: x
    if name == "hc_post":
        return lambda f, X, post, comb: X
    if name == "ffn":
        return lambda h, *a, **kw: zero(h.shape)
    if name == "moe_routed":
        return lambda h, *a: zero(h.shape)
    if name == "attend":
        return lambda spec, states, bounds, positions, q, *a: q
    if name == "matmul":       # the single products, not the router (its logits choose the experts)
        matmul = ops.matmul
        return lambda w, x: matmul(w, x) if w.name.endswith("ffn_gate_inp.weight") else zero((x.shape[0], w.rows))
    if name == "matmul_grouped":
        return lambda w, x, groups: zero((x.shape[0], w.rows))
    if name == "matmuls":
        return lambda ws, x: [zero((x.shape[0], w.rows)) for w in ws]
    raise SystemExit(f"unknown op {name!r}; known: {', '.join(OPS)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--file", default="/tmp/ds4-4h.gguf", help="4-layer full-width file (written if missing)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--composed", default="", help="ops to run as the reference composes them (comma-separated)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=36)
    args = ap.parse_args()
    m = open_four_layers(Path(args.file))
    rng = np.random.default_rng(0)
    m.logits(rng.integers(0, m.shape.n_vocab, 4))
    B, ops = args.batch, m.ops
    states = [m.new_state() for _ in range(B)]
    for st in states:
        m.prefill(st, rng.integers(0, m.shape.n_vocab, 2048 if B == 1 else 512), chunk=2048)
    clock = LayerClock(m)
    samplers = [Sampler(SamplingParams(temperature=1.0, seed=i)) for i in range(B)]
    names = [n for n in args.ops.split(",") if n]
    composed = [n for n in args.composed.split(",") if n]
    original = {n: getattr(ops, n) for n in names + composed}
    zeros: dict[tuple, object] = {}

    def zero(shape):
        shape = tuple(shape)
        if shape not in zeros:           # made by the eager first step, reused by the captured ones
            zeros[shape] = ops.upload(np.zeros(shape, np.float32), np.float32)
        return zeros[shape]

    def layers_us(variant: str) -> list[float]:
        for n, f in original.items():
            setattr(ops, n, f)
        how, _, n = variant.partition(" ")
        if how == "skip":
            setattr(ops, n, skipped(ops, n, zero))
        elif how == "composed":
            setattr(ops, n, types.MethodType(getattr(Reference, n), ops))
        ops.drop_graphs()
        clock.times.clear()
        for _ in range(args.steps):
            toks = [int(t) for t in rng.integers(0, m.shape.n_vocab, B)]
            m.sample([Segment(st, np.array([t])) for st, t in zip(states, toks)], [s.draw() for s in samplers])
            clock.read()
        return clock.per_layer_us(4)[:len(m.weights.layers)]

    runs: dict[str, list[list[float]]] = {}
    t0 = time.time()
    variants = [""] + [f"skip {n}" for n in names] + [f"composed {n}" for n in composed]
    for _ in range(args.reps):
        for v in variants:
            runs.setdefault(v, []).append(layers_us(v))
    mean = {k: [statistics.mean(col) for col in zip(*v)] for k, v in runs.items()}
    base = mean[""]
    ratios = " / ".join(str(L.ratio) for L in m.weights.layers)
    print(f"\nbatch {B}, {args.reps} alternations ({time.time() - t0:.0f} s); layers by ratio {ratios}")
    print("| variant | layer us | saving per layer against it, us |")
    print("|---|---|---|")
    print("| the step as it is | " + " / ".join(f"{u:.1f}" for u in base) + " | |")
    for v in variants[1:]:
        saving = [b - u for u, b in zip(mean[v], base)]
        if v.startswith("composed"):
            saving = [-x for x in saving]          # what the fusion saves: the composed step's extra time
        print(f"| {v} | " + " / ".join(f"{u:.1f}" for u in mean[v]) + " | " +
              " / ".join(f"{x:.1f}" for x in saving) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
