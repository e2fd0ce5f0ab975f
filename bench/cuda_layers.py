"""Per-layer device time of graph-replayed decode steps on the full-width 4-layer file, at given batch sizes.

The figure an A/B of two builds compares: `bench/cuda_run.sh ab BASE.tar` builds the tree in the tarball (`git
archive REV -o BASE.tar`, carried) beside this one and alternates this script between the two trees' daemons and
kernels (this tree's bench helpers), one process each, on one machine (machines differ by 3-4% in these times;
processes on one machine by ~0.2%). Each batch's sessions are prefilled (`--ctx` tokens at batch 1, default
2,048; 512 otherwise), then `--steps` steps sampled at temperature 1; per layer the median over the steps after the
first 4 (LayerClock: CUDA events between layers, graph nodes in a captured step). Prints one line per batch: the
layers' times and their sum.

    python3 bench/cuda_layers.py --label new --batches 1,2,8 [--file /tmp/ds4-4h.gguf] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from cuda_model import LayerClock, open_four_layers, prompt_states  # noqa: E402

from ds4d.model import Segment  # noqa: E402
from ds4d.sampling import Sampler, SamplingParams  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", default="tree", help="the name printed before each line (e.g. new, base)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=36)
    ap.add_argument("--ctx", type=int, default=2048, help="prompt length of a batch-1 session (512 per session above)")
    ap.add_argument("--long", action="store_true",
                    help="the batch-1 session made by long_state at --ctx (its rows random) instead of a prefill")
    ap.add_argument("--file", default="/tmp/ds4-4h.gguf", help="4-layer full-width file (written if missing)")
    ap.add_argument("--json", help="append the per-layer times here (one JSON object per line)")
    args = ap.parse_args()
    m = open_four_layers(Path(args.file))
    rng = np.random.default_rng(0)
    clock = LayerClock(m)
    out = {}
    for B in (int(b) for b in args.batches.split(",")):
        states = prompt_states(m, B, args.ctx if B == 1 else 512, rng, args.long and B == 1)
        samplers = [Sampler(SamplingParams(temperature=1.0, seed=i)) for i in range(B)]
        clock.times.clear()
        for _ in range(args.steps):
            toks = rng.integers(0, m.shape.n_vocab, B)
            m.sample([Segment(st, np.array([t])) for st, t in zip(states, toks)], [s.draw() for s in samplers])
            clock.read()
        us = clock.per_layer_us(4)[:len(m.weights.layers)]
        out[B] = us
        print(f"{args.label} B={B}: layers " + " / ".join(f"{u:.1f}" for u in us) + f"  sum {sum(us):.1f} us",
              flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"label": args.label, "layers_us": out}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
