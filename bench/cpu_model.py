"""Whole-model CPU benchmark: decode and prefill tokens/s of ds4d's CPU backend on a full-width file, side by side
with llama.cpp's `llama-bench` on the same file in the same run (rounds interleaved).

    make the file:  ds4d make-tiny fw4-q2.gguf --full-width --layers 4 --variant q2
    run:            PYTHONPATH=daemon:client python bench/cpu_model.py -m fw4-q2.gguf \\
                        [--llama-bench /path/to/llama-bench] [--threads 2] [--out docs/CPU_MODEL.md]

llama.cpp is not part of this project: build its `llama-bench` yourself (any recent llama.cpp with the
deepseek4 architecture) and pass its path. Prints a markdown report; timings are never asserted by tests.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import ds4d  # noqa: F401  (first: single-threaded BLAS before numpy loads)
import numpy as np
from ds4d.model import open_model


def ours(model, prompt_len: int, gen: int) -> tuple[float, float]:
    """(prefill tok/s over prompt_len tokens in one chunk, decode tok/s: median step over `gen` steps)."""
    ids = np.random.default_rng(0).integers(0, model.shape.n_vocab, prompt_len)
    state = model.new_state()
    t0 = time.perf_counter()
    model.prefill(state, ids, chunk=prompt_len)
    prefill = prompt_len / (time.perf_counter() - t0)
    steps, tok = [], int(ids[-1])
    for _ in range(gen):
        t0 = time.perf_counter()
        logits = model.decode([state], [tok])[0]
        steps.append(time.perf_counter() - t0)
        tok = int(np.argmax(logits))
    return prefill, 1.0 / statistics.median(steps)


def llama(bench: str, path: str, prompt_len: int, gen: int, threads: int) -> tuple[float, float]:
    out = subprocess.run([bench, "-m", path, "-p", str(prompt_len), "-n", str(gen), "-t", str(threads), "-r", "1"],
                         capture_output=True, text=True, check=True).stdout
    pp = float(re.search(rf"\|\s+pp{prompt_len}\s+\|\s+([\d.]+)", out).group(1))
    tg = float(re.search(rf"\|\s+tg{gen}\s+\|\s+([\d.]+)", out).group(1))
    return pp, tg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--llama-bench", help="path to llama.cpp's llama-bench (omit to measure ds4d alone)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    model = open_model(args.model, threads=args.threads)
    ours(model, 16, 2)                                   # warm up: page the weights in
    runs: dict[str, list[tuple[float, float]]] = {"ds4d": [], "llama.cpp": []}
    for r in range(args.rounds):
        runs["ds4d"].append(ours(model, args.prompt, args.gen))
        if args.llama_bench:
            runs["llama.cpp"].append(llama(args.llama_bench, args.model, args.prompt, args.gen, args.threads))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f} / {v[-1][1]:.2f}" for k, v in runs.items() if v),
              file=sys.stderr)
    s = model.shape
    rows = []
    for name, v in runs.items():
        if v:
            pp, tg = statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)
            rows.append(f"| {name} | {pp:,.1f} | {tg:,.2f} | {1000 / tg:,.1f} |")
    load = os.getloadavg()
    report = "\n".join([
        f"# Whole-model CPU benchmark ({date.today().isoformat()})", "",
        f"File: `{Path(args.model).name}`, {s.n_layer} layers of the real width "
        f"({s.n_embd} hidden, {s.n_expert} experts, routed type {model.weights.routed_type.name}), real vocabulary. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads; load average at the end "
        f"{load[0]:.2f}. Prompt {args.prompt} tokens (one chunk), then {args.gen} greedy decode steps; median of "
        f"{args.rounds} interleaved rounds. ds4d: CPU backend, faithful numerics (8-bit activations).", "",
        "| engine | prefill tok/s | decode tok/s | ms per decode token |", "|---|---:|---:|---:|", *rows, "",
    ])
    print(report)
    if args.out:
        Path(args.out).write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
