"""Kernel timeline of graph-replayed decode steps on the full-width 4-layer file, through CUPTI.

PyTorch's profiler (on the GPU machine only; ds4d does not use PyTorch) records every kernel the process runs,
replayed graph nodes included, with its start and end on the device. For the last profiled step this prints each
kernel in order of start with its stream, duration and what it adds to the step's end (its end minus the latest
end before it: the chain's cost of that kernel, overlap with the kernels before it excluded), then per kernel name
the median over the profiled steps of both, summed per step. The times come from CUPTI's records with no event
nodes in the graph, unlike LayerClock / OpClock.

With --prefill CHUNK it profiles one prefill of a --ctx prompt in chunks of CHUNK tokens (after an unprofiled one)
and prints per kernel name its launches, device time and what it adds to the prefill's end, summed.

With --pipelined the steps run as the engine runs them (`Model.launch`: each launched before the last one's tokens
are read, its sessions taking them on the device), and it prints the step's edges instead: from the last kernel of
one step to the first hyper-connection entry of the next, each kernel or copy with the device's idle time before
it (medians over the profiled steps).

    python3 bench/cuda_timeline.py [--batch 1] [--ctx 2048 [--long]] [--steps 8] [--file /tmp/ds4-4h.gguf]
                                   [--json out] [--pipelined | --prefill CHUNK]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from cuda_model import open_four_layers, prompt_states  # noqa: E402

from ds4d.model import Segment  # noqa: E402
from ds4d.sampling import Sampler, SamplingParams  # noqa: E402


def short(name: str) -> str:
    """A kernel's name without namespaces, return type and parameters (template arguments kept)."""
    name = name.replace("(anonymous namespace)::", "").replace("ds4::cuda::", "").replace("ds4::", "")
    return name.removeprefix("void ").split("(")[0][:70]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=2048, help="prompt length of each session")
    ap.add_argument("--long", action="store_true",
                    help="sessions made by long_state at --ctx (their rows random) instead of a prefill")
    ap.add_argument("--steps", type=int, default=8, help="profiled steps (after 6 unprofiled ones)")
    ap.add_argument("--file", default="/tmp/ds4-4h.gguf", help="4-layer full-width file (written if missing)")
    ap.add_argument("--json", help="write the last step's kernels here")
    ap.add_argument("--trace", default="/tmp/ds4-timeline.json", help="the profiler's Chrome trace (written)")
    ap.add_argument("--pipelined", action="store_true", help="steps launched as the engine does; print their edges")
    ap.add_argument("--prefill", type=int, default=0, metavar="CHUNK",
                    help="profile a prefill of --ctx tokens in chunks of CHUNK instead of decode steps")
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    m = open_four_layers(Path(args.file))
    rng = np.random.default_rng(0)
    if args.prefill:
        return prefill_kernels(m, args, rng, profile, ProfilerActivity)
    states = prompt_states(m, args.batch, args.ctx, rng, args.long)
    samplers = [Sampler(SamplingParams(temperature=1.0, seed=i)) for i in range(args.batch)]

    prev = None

    def step():
        nonlocal prev
        draws = [s.draw() for s in samplers]
        if not args.pipelined:
            toks = rng.integers(0, m.shape.n_vocab, args.batch)
            m.sample([Segment(st, np.array([t])) for st, t in zip(states, toks)], draws)
            return
        segs = [Segment(st, np.zeros(1, np.int64), follow=i) if prev is not None else
                Segment(st, np.array([int(rng.integers(0, m.shape.n_vocab))])) for i, st in enumerate(states)]
        launched = m.launch(segs, draws, after=prev)
        if prev is not None:
            prev.result()
        prev = launched

    for _ in range(6):
        step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        if prev is not None:
            prev.result()
    trace = Path(args.trace)
    prof.export_chrome_trace(str(trace))
    kernels = device_events(trace)
    if args.pipelined:
        return edges(kernels)
    # Steps: a gap of more than 50 us between one kernel's end and the next start (the host's part of the step).
    steps, cur, last_end = [], [], None
    for e in kernels:
        if last_end is not None and e["ts"] - last_end > 50:
            steps.append(cur)
            cur = []
        cur.append(e)
        last_end = max(last_end or 0, e["ts"] + e["dur"])
    steps.append(cur)
    print(f"{len(kernels)} kernels in {len(steps)} steps ({[len(s) for s in steps]})")

    full = [s for s in steps if len(s) == max(len(x) for x in steps)]
    last = rows(full[-1])
    print(f"\nlast step: {len(last)} kernels, {last[-1]['start'] + last[-1]['dur']:.1f} us from first start to last "
          f"end")
    print(f"{'start':>8} {'dur':>7} {'adds':>7}  stream  kernel")
    for r in last:
        print(f"{r['start']:8.1f} {r['dur']:7.1f} {r['add']:7.1f}  {r['stream']:>6}  {r['name']} {r['grid']}")
    agg = defaultdict(lambda: ([], [], []))
    for s in full:
        per = defaultdict(lambda: [0, 0.0, 0.0])
        for r in rows(s):
            p = per[r["name"]]
            p[0] += 1
            p[1] += r["dur"]
            p[2] += r["add"]
        for k, (n, d, a) in per.items():
            agg[k][0].append(n)
            agg[k][1].append(d)
            agg[k][2].append(a)
    print(f"\nper kernel, medians over {len(full)} steps (us per step)")
    print(f"{'calls':>5} {'dur':>8} {'adds':>8}  kernel")
    total_d = total_a = 0.0
    for k, (n, d, a) in sorted(agg.items(), key=lambda kv: -statistics.median(kv[1][2])):
        md, ma = statistics.median(d), statistics.median(a)
        total_d += md
        total_a += ma
        print(f"{statistics.median(n):5.0f} {md:8.1f} {ma:8.1f}  {k}")
    print(f"{'':5} {total_d:8.1f} {total_a:8.1f}  total")
    if args.json:
        Path(args.json).write_text(json.dumps(last))
    return 0


def device_events(trace: Path) -> list:
    """The kernels, copies and memsets of a profiler's Chrome trace, in order of start."""
    kinds = ("kernel", "gpu_memcpy", "gpu_memset")
    acts = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") in kinds]
    return sorted(acts, key=lambda e: e["ts"])


def rows(kernels) -> list:
    """Each activity with its start from the first one's, duration, and what it adds: its end minus the latest end
    before it (0 when something before it ends later)."""
    out, end = [], kernels[0]["ts"]
    t0 = end
    for e in kernels:
        add = max(0.0, e["ts"] + e["dur"] - end)
        end = max(end, e["ts"] + e["dur"])
        a = e.get("args", {})
        out.append({"name": short(e["name"]), "stream": a.get("stream", e.get("tid")), "grid": a.get("grid"),
                    "start": e["ts"] - t0, "dur": e["dur"], "add": add})
    return out


def prefill_kernels(m, args, rng, profile, activity) -> int:
    """Per kernel name over one prefill of args.ctx tokens in chunks of args.prefill: launches, device time, what
    it adds to the prefill's span (us, summed; the last lines: totals, and per token)."""
    for rep in range(2):
        st = m.new_state()
        ids = rng.integers(0, m.shape.n_vocab, args.ctx)
        if rep == 0:
            m.prefill(st, ids, chunk=args.prefill)
            continue
        with profile(activities=[activity.CUDA]) as prof:
            m.prefill(st, ids, chunk=args.prefill)
    trace = Path(args.trace)
    prof.export_chrome_trace(str(trace))
    per = defaultdict(lambda: [0, 0.0, 0.0])
    acts = rows(device_events(trace))
    for r in acts:
        p = per[r["name"]]
        p[0] += 1
        p[1] += r["dur"]
        p[2] += r["add"]
    print(f"prefill of {args.ctx} tokens in chunks of {args.prefill}, {len(m.weights.layers)} layers: {len(acts)} "
          f"activities, {acts[-1]['start'] + acts[-1]['dur']:.0f} us from first start to last end")
    print(f"{'calls':>6} {'dur':>10} {'adds':>10}  kernel")
    for k, (n, d, a) in sorted(per.items(), key=lambda kv: -kv[1][2]):
        print(f"{n:6d} {d:10.1f} {a:10.1f}  {k}")
    d, a = sum(p[1] for p in per.values()), sum(p[2] for p in per.values())
    print(f"{'':6} {d:10.1f} {a:10.1f}  total\n{'':6} {d / args.ctx:10.2f} {a / args.ctx:10.2f}  per token")
    return 0


def edges(acts) -> int:
    """The pipelined steps' edges: for every step after the first (it starts at the embedding), the activities
    from the last kernel before its copies to its first hyper-connection entry, each with the idle time before it
    (its start minus the latest end of everything before it on the device)."""
    names = [short(e["name"]) if e["cat"] == "kernel" else e["name"].split(" (")[0] for e in acts]
    ends, end = [], 0.0
    for e in acts:
        ends.append(end)
        end = max(end, e["ts"] + e["dur"])
    per, totals = defaultdict(list), []
    starts = [i for i, n in enumerate(names) if n.startswith("embed")][1:]
    for i in starts:
        a = i - 1
        while a > 0 and acts[a]["cat"] != "kernel":
            a -= 1
        b = next((j for j in range(i, len(acts)) if "hc_pre" in names[j] or "hc_mix" in names[j]), None)
        if b is None:
            continue
        for j in range(a + 1, b + 1):
            per[(j - i, f"{names[j - 1][:34]} -> {names[j][:34]}")].append(acts[j]["ts"] - ends[j])
        totals.append(sum(max(0.0, acts[j]["ts"] - ends[j]) for j in range(a + 1, b + 1)))
    if not totals:
        print("no step edges found")
        return 1
    print(f"{len(totals)} step edges; the device's idle time before each activity, us (median, min, max)")
    for (_, label), gaps in sorted(per.items()):
        print(f"{statistics.median(gaps):7.1f} {min(gaps):7.1f} {max(gaps):7.1f}  {label}  ({len(gaps)})")
    print(f"{statistics.median(totals):7.1f} {min(totals):7.1f} {max(totals):7.1f}  idle per step, in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
