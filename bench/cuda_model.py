"""Benchmark of the whole forward pass on the CUDA backend: the engine's step (`Model.sample`), full-width layers.

Writes a q2 model of N full-width layers (the real shapes and types; random values: valid random blocks for every
quantized or large float tensor, the generator's values for norms, biases and small tables, so routing spreads
over the experts), opens it with backend="cuda" and times, after a warm-up that uploads the weights:

* prefill of a prompt of each `--ctx` length (tokens/s, chunks of `--chunk` tokens: tensor-core products, the
  routed experts grouped by expert, tensor-core attention; `--no-gemm`: the products and experts through the
  decode kernels, 16 rows at a time, for comparison) and, with `--prefill-ops`, its device time per op;
* decode at batch 1 after each prompt and at each `--batches` size (default 8: 8 sessions of `--ctx8` tokens; eager
  steps at 8 only): wall time per step of `Model.sample`, the engine's step (sampling on the device with the default
  knobs at `--temperature`; the ids' download ends each step; rows the kernel leaves to the host are counted), median
  of `--steps`, with the step replayed as a CUDA graph, and at the first length also run eagerly (every kernel
  launched from Python) for comparison; per layer from CUDA events recorded between the layers (graph nodes when
  captured), by layer kind (ratio 0 / 4 / 128); then the same steps pipelined as the engine runs them (`Model.launch`:
  each step launched before the last one's tokens are read, taking them on the device), the period between two steps'
  tokens; with `--long`, the same at batch 1 for contexts whose prefill would take too long, made by `long_state` (the
  compressed and indexer rows random);
* the floor per layer: the layer's bytes (non-routed weights, 6 routed experts per token that random routing
  rarely shares, the K=V rows read) over the measured device-to-device copy bandwidth;
* with `--socket`, one end-to-end figure: `ds4d serve --backend cuda` on the file, a client streaming a greedy
  generation over the Unix socket, tokens/s as the client sees them.

Prints a markdown table last; `--json` writes every number. Results: docs/PERFORMANCE.md.

    PYTHONPATH=daemon:client python bench/cuda_model.py --layers 4 --file /tmp/fw4.gguf --json out.json --socket
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import weakref
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # daemon_harness
from ds4d import _cuda  # noqa: E402
from ds4d.model import Model, Segment, open_model
from ds4d.quants import random_blocks
from ds4d.sampling import Sampler, SamplingParams
from ds4d.shape import flash_shape
from ds4d.tiny import _encode, _rng, _values, plan, tensor_nbytes, write_model

PEERS_US = {"llama.cpp": 323.0, "ds4": 680.0}      # PERFORMANCE.md, per layer at batch 1 on an H200
FLOOR_US_H200 = 49.0                              # PERFORMANCE.md: the average layer at 4.24 TB/s


def fast_chunks(shape, seed, expert_holes=False):
    """Tensor bytes for write_model: random valid blocks for every large matrix (quantizing gigabytes of random
    floats in numpy would take hours; kernels don't care about values), the generator's values elsewhere; with
    expert_holes, holes for the routed experts (filled on the device after loading)."""
    def chunks(spec, qt):
        if expert_holes and spec.kind == "experts":
            yield tensor_nbytes(spec.dims, qt)
            return
        rng = _rng(seed, spec.name)
        dims = tuple(reversed(spec.dims))
        if spec.kind in ("vector", "index", "table") or np.prod(dims) < (1 << 22):
            yield _encode(_values(spec, shape, rng), qt)
            return
        scale = 1.0 if spec.name == "token_embd.weight" else 1.0 / np.sqrt(dims[-1])
        if spec.kind == "experts":
            for _ in range(dims[0]):
                yield random_blocks(dims[1], dims[2], int(qt), rng, scale)
        else:
            yield random_blocks(dims[0], dims[1], int(qt), rng, scale)
    return chunks


def write_full_width(path: Path, n_layer: int, expert_holes: bool, seed: int = 0) -> None:
    shape = flash_shape(n_layer)
    write_model(path, plan(shape, "q2"), seed, chunks=fast_chunks(shape, seed, expert_holes),
                name=f"ds4 random full-width q2 model, {n_layer} layers (benchmark)")


def fill_expert_holes(m: Model) -> None:
    """Random blocks on the device for the routed experts that a file written with expert_holes leaves out."""
    for i, L in enumerate(m.weights.layers):
        for k, w in enumerate((L.ffn_gate_exps, L.ffn_up_exps, L.ffn_down_exps)):
            m.ops.fill_random(w, 1000 * i + k)


def long_state(m: Model, ctx: int, rng, seed: int = 7):
    """A session at position ctx without a prefill of that length (a 1M-token prompt would take minutes): a real
    prompt of 2,048 tokens (the window ring and the compressors' frontiers), then room for ctx + 256 positions, every
    compressed and indexer row filled with uniform random f16 values, and the position set to ctx. A decode step
    reads what it would after a real prompt of that length; only the rows' values differ."""
    st = m.new_state()
    m.prefill(st, rng.integers(0, m.shape.n_vocab, 2048), chunk=2048)
    st.ensure(ctx + 256)
    st.rows.fill_random(int(GGMLQuantizationType.F16), seed, stream=m.ops.stream.ptr)
    m.ops.stream.synchronize()
    st.n_tokens = ctx
    return st


def prompt_states(m: Model, n: int, ctx: int, rng, long: bool = False) -> list:
    """n sessions at position ctx: each after a prefill of ctx random tokens (chunks of 2048), or with `long` made by
    long_state (its rows random)."""
    if long:
        return [long_state(m, ctx, rng) for _ in range(n)]
    states = [m.new_state() for _ in range(n)]
    for st in states:
        m.prefill(st, rng.integers(0, m.shape.n_vocab, ctx), chunk=2048)
    return states


def open_four_layers(path: Path) -> Model:
    """The 4-layer full-width file with expert holes (written first if missing) on the CUDA backend, experts
    filled: the model of the per-layer A/Bs (cuda_layers.py, cuda_op_cost.py)."""
    if not path.exists():
        write_full_width(path, 4, True)
    m = open_model(path, backend="cuda")
    fill_expert_holes(m)
    return m


def copy_bandwidth(stream, nbytes=2 << 30, reps=10) -> float:
    """Device-to-device copy, read + written bytes per second, median of reps."""
    a, b = _cuda.Buffer(nbytes), _cuda.Buffer(nbytes)
    a.memset(1)
    e0, e1 = _cuda.Event(), _cuda.Event()
    ts = []
    for _ in range(reps + 2):
        e0.record(stream.ptr)
        _cuda.memcpy(b.ptr, a.ptr, nbytes, stream.ptr)
        e1.record(stream.ptr)
        e1.synchronize()
        ts.append(_cuda.elapsed_ms(e0, e1) / 1e3)
    return 2 * nbytes / statistics.median(ts[2:])


def follow_graphs(clock, m: Model) -> None:
    """Keeps the events a clock records while a step is captured with the step's graph (each replay of the graph
    records them again, so they must outlive the steps after it), and makes them the clock's events again at each
    launch of that graph: a decode key's two captured steps are replayed in turn (`CUDA.pingpong`), so that read()
    reads the step just launched. (Before, the second capture's marks dropped the first's events while its graph
    still recorded them: a use after free that crashed graph launches at 64K contexts.)"""
    kept = weakref.WeakKeyDictionary()
    capture, launch = m.ops._capture, m.ops._launch

    def captured(*a, **kw):
        g = capture(*a, **kw)
        kept[g] = clock.events
        return g

    def launched(g):
        clock.events = kept.get(g, clock.events)
        launch(g)

    m.ops._capture, m.ops._launch = captured, launched


class LayerClock:
    """CUDA events recorded on the backend's stream before every layer and before the output head, by wrapping
    Model._attention and the head's hc_head. While a step is captured they are recorded as external events, so
    the graph holds them as nodes and every replay records them again; `read()` after a step keeps that step's
    per-layer device times (idle gaps included: an eager step whose launches come slower than the GPU runs them
    shows that)."""

    def __init__(self, m: Model):
        self.events: list = []
        self.times: list[list[float]] = []
        stream = m.ops.stream
        attention, hc_head = m._attention, m.ops.hc_head

        def mark():
            e = _cuda.Event()
            e.record(stream.ptr, external=m.ops._capturing)   # external: only legal (and needed) in a capture
            self.events.append(e)

        def timed_attention(L, *a, **kw):
            if L.index == 0:
                self.events = []
            mark()
            return attention(L, *a, **kw)

        def timed_head(*a, **kw):
            mark()
            return hc_head(*a, **kw)
        m._attention = timed_attention
        m.ops.hc_head = timed_head
        follow_graphs(self, m)

    def read(self) -> None:
        ev = self.events
        self.times.append([_cuda.elapsed_ms(ev[i], ev[i + 1]) * 1e3 for i in range(len(ev) - 1)])

    def per_layer_us(self, skip: int) -> list[float]:
        """Median over the steps read (after the first `skip`) of each layer's time."""
        steps = self.times[skip:]
        return [statistics.median(s[i] for s in steps) for i in range(len(steps[0]))]


class OpClock:
    """Events before every op of a step and after its last (external events while the step is captured): device
    time per op, products named by their weights (attn_q_a, attn_q_a+attn_kv+..., ffn_gate_inp, ...), summed over
    the layers. An op's time runs to the next mark, also one inside it: a prefill's `attend` is mostly under
    `norm_ropes` (its first inner op: the K=V store, compressors, indexer and attention follow unmarked), and
    `moe_routed` is split into the shared expert (`ffn`, its products), the router's product, `route` and `moe`."""
    OPS = ("embed", "rms_norm", "norm_rope", "norm_ropes", "hc_pre", "hc_post", "hc_head", "rope", "attend",
           "ffn", "moe_routed", "route", "moe", "matmul", "norm_matmul", "matmuls", "matmul_grouped")

    def __init__(self, m: Model):
        self.m, self.events, self.times = m, [], []
        ops = m.ops

        def short(w) -> str:
            parts = w.name.split(".")                                                 # blk.N.<name>.weight
            return ".".join(parts[2:-1]) or parts[0]

        for name in self.OPS:
            def wrapped(*a, _fn=getattr(ops, name), _name=name, **kw):
                if _name == "matmuls":
                    self.mark("+".join(short(w) for w in a[0]))
                else:
                    self.mark(short(a[0]) if "matmul" in _name else _name)
                return _fn(*a, **kw)
            setattr(ops, name, wrapped)
        step = ops.step

        def timed_step(states, tokens, bounds, positions, run, draws=None):
            def run_marked():
                out = run()
                self.mark("end")
                return out
            return step(states, tokens, bounds, positions, run_marked, draws)
        ops.step = timed_step
        follow_graphs(self, m)
        ops.drop_graphs()                          # the next capture records the events

    def mark(self, label: str) -> None:
        if label == "embed":
            self.events = []
        e = _cuda.Event()
        e.record(self.m.ops.stream.ptr, external=self.m.ops._capturing)
        self.events.append((label, e))

    def read(self) -> None:
        ev, acc = self.events, {}
        for (label, a), (_, b) in zip(ev, ev[1:]):
            acc[label] = acc.get(label, 0.0) + _cuda.elapsed_ms(a, b) * 1e3
        self.times.append(acc)

    def median_us(self, skip: int) -> dict[str, float]:
        steps = self.times[skip:]
        return {k: statistics.median(s[k] for s in steps) for k in steps[0]}


def layer_bytes(m: Model, ctx: int, batch: int) -> list[int]:
    """Bytes a decode step must read per layer: non-routed weights, min(batch * n_used, n_expert) experts, and
    per token its K=V rows (raw window plus compressed rows; f16)."""
    s = m.shape
    out = []
    for L in m.weights.layers:
        fixed = routed = 0
        for name, w in vars(L).items():
            if hasattr(w, "raw"):
                if name.endswith("_exps"):
                    routed += w.nbytes // w.n_expert
                else:
                    fixed += w.nbytes
        for sub in (L.compressor, L.indexer):
            if sub is not None:
                for w in vars(sub).values():
                    if hasattr(w, "raw"):
                        fixed += w.nbytes
                    elif hasattr(w, "kv"):
                        fixed += w.kv.nbytes + w.gate.nbytes
        fixed += L.hc_attn.fn.nbytes + L.hc_ffn.fn.nbytes
        rows = min(ctx, s.n_swa) + (ctx // L.ratio if L.ratio else 0)
        kv = batch * rows * s.head_dim * 2
        out.append(fixed + min(batch * s.n_expert_used, s.n_expert) * routed + kv)
    return out


def through_socket(path: Path, prompt_len: int, gen: int, backend: str = "cuda", env: dict | None = None) -> dict:
    """`ds4d serve --backend cuda` on the file (tests/daemon_harness.py) and one client streaming a greedy
    generation of `gen` tokens after a `prompt_len`-token prompt: tokens/s from the first streamed token to the
    result, as the client sees them, and the prompt's tokens/s up to the first streamed token (after a short
    warm-up request). env: the daemon's extra environment (DS4_PIPELINE=0: steps not pipelined)."""
    from daemon_harness import Daemon, short_home

    from ds4c.client import Event, connect
    d = Daemon(short_home(), str(path), "--backend", backend, "--log-level", "info", wait=False, env=env)
    try:
        d.wait_ready(timeout=300)                        # reading and uploading gigabytes of weights
        c = connect(d.socket, timeout=600)
        c.call("generate", tokens=[1, 2, 3, 4], max_tokens=2, temperature=0)
        ids = [int(t) for t in np.random.default_rng(1).integers(0, 129280, prompt_len)]
        t_first = n = None
        t0 = time.perf_counter()
        for ev in c.generate(tokens=ids, max_tokens=gen, temperature=0, stream=True):
            if isinstance(ev, Event) and ev.tokens:             # not the Result at the end: it has them all
                if t_first is None:
                    t_first, n = time.perf_counter(), 0
                n += len(ev.tokens)
        t_end = time.perf_counter()
        c.close()
        return {"prompt": prompt_len, "tokens": n, "tok_s": (n - 1) / (t_end - t_first),
                "prefill_tok_s": prompt_len / (t_first - t0)}
    finally:
        d.stop(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--file", default="/tmp/ds4-full-width.gguf")
    ap.add_argument("--ctx", default="2048,8192,16384,65536", help="prompt lengths before the batch-1 decodes")
    ap.add_argument("--long", default="",
                    help="contexts decoded at batch 1 without their prefill (long_state: the rows random values), "
                         "e.g. 262144,1048000")
    ap.add_argument("--ctx8", type=int, default=2048, help="prompt length of each session of the batched decodes")
    ap.add_argument("--batches", default="8", help="sessions per batched decode, comma-separated (e.g. 2,8)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=512,
                    help="prefill chunk (the engine's: 512 beside other jobs, 2048 for a prompt alone)")
    ap.add_argument("--socket", action="store_true", help="also the end-to-end figure through the daemon")
    ap.add_argument("--expert-holes", action="store_true",
                    help="write the routed experts as holes and fill them with random blocks on the GPU (the "
                         "whole 43-layer q2 model in 10 GB of disk; not with --socket: the daemon would see zeros)")
    ap.add_argument("--ops", action="store_true", help="also device time per op of a batch-1 graph step")
    ap.add_argument("--prefill-ops", action="store_true",
                    help="also device time per op of a prefill of the first --ctx length, per token")
    ap.add_argument("--no-decode", action="store_true", help="prefill figures only")
    ap.add_argument("--no-gemm", action="store_true",
                    help="prefill products and experts through the decode kernels (the comparison)")
    ap.add_argument("--no-join", action="store_true",
                    help="one product per weight also for one token (not the sublayer input's joined products)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="decode steps sample with the default knobs at this temperature (0: greedy)")
    ap.add_argument("--json")
    args = ap.parse_args()
    ctxs = [int(c) for c in args.ctx.split(",")]
    if args.no_gemm:
        _cuda.gemm_ok = lambda type_, cols: False
    path = Path(args.file)
    t0 = time.time()
    if not path.exists():
        write_full_width(path, args.layers, args.expert_holes)
    print(f"model file: {path.stat().st_size / 2**30:.2f} GiB ({time.time() - t0:.0f} s)", flush=True)

    m = open_model(path, backend="cuda", numerics="faithful")
    m.ops.join = not args.no_join
    if args.expert_holes:
        fill_expert_holes(m)
    info = _cuda.device_info()
    bw = copy_bandwidth(m.ops.stream)
    print(f"{info['name']}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rng = np.random.default_rng(0)
    t0 = time.time()
    m.logits(rng.integers(0, m.shape.n_vocab, 4))       # uploads every weight
    upload_s = time.time() - t0
    res = {"card": info["name"], "copy_tb_s": bw / 1e12, "layers": args.layers, "upload_s": upload_s,
           "ratios": [L.ratio for L in m.weights.layers], "runs": []}
    clock = LayerClock(m)

    def decode(states, ctx, graphs, label):
        m.ops.graphs = graphs
        clock.times.clear()
        walls = []
        host_rows = 0
        samplers = [Sampler(SamplingParams(temperature=args.temperature, seed=i)) for i in range(len(states))]
        for _ in range(args.steps):
            toks = [int(t) for t in rng.integers(0, m.shape.n_vocab, len(states))]
            draws = [s.draw() for s in samplers]
            t0 = time.perf_counter()
            got = m.sample([Segment(st, np.array([t])) for st, t in zip(states, toks)], draws)
            walls.append(time.perf_counter() - t0)
            clock.read()
            assert all(0 <= t < m.shape.n_vocab for t in got.tokens)
            host_rows += got.host_rows
        B, wall, per_layer = len(states), statistics.median(walls[4:]), clock.per_layer_us(4)
        floors = [b / bw * 1e6 for b in layer_bytes(m, ctx, B)]
        run = {"label": label, "B": B, "ctx": ctx, "graphs": graphs, "step_ms": wall * 1e3, "tok_s": B / wall,
               "layer_us": per_layer, "floor_us": floors, "head_us": wall * 1e6 - sum(per_layer[:args.layers]), "host_rows": host_rows}
        res["runs"].append(run)
        print(f"decode {label}: {wall * 1e3:.2f} ms per step, {B / wall:.1f} tok/s; per layer "
              + ", ".join(f"{u:.0f}" for u in per_layer[:args.layers]) + f" us; {host_rows} tokens sampled on the "
              "host", flush=True)

    def decode_pipelined(states, ctx, label):
        """Steps as the engine pipelines them: each launched before the last one's tokens are read, its sessions
        taking them on the device; the period between two steps' tokens reaching the host."""
        m.ops.graphs = True
        samplers = [Sampler(SamplingParams(temperature=args.temperature, seed=i)) for i in range(len(states))]
        prev, walls = None, []
        t0 = time.perf_counter()
        for k in range(args.steps):
            draws = [s.draw() for s in samplers]
            segs = [Segment(st, np.zeros(1, np.int64), follow=i) if prev is not None else
                    Segment(st, np.array([int(rng.integers(0, m.shape.n_vocab))])) for i, st in enumerate(states)]
            launched = m.launch(segs, draws, after=prev)
            if prev is not None:
                assert all(0 <= t < m.shape.n_vocab for t in prev.result().tokens)
                t1 = time.perf_counter()
                walls.append(t1 - t0)
                t0 = t1
            prev = launched
        prev.result()
        B, wall = len(states), statistics.median(walls[4:])
        res["runs_pipelined"].append({"label": label, "B": B, "ctx": ctx, "step_ms": wall * 1e3, "tok_s": B / wall})
        print(f"decode {label}, pipelined: {wall * 1e3:.2f} ms per step, {B / wall:.1f} tok/s", flush=True)

    res["runs_pipelined"] = []
    for i, ctx in enumerate(ctxs):
        st = m.new_state()
        ids = rng.integers(0, m.shape.n_vocab, ctx)
        t0 = time.perf_counter()
        m.prefill(st, ids, chunk=args.chunk)
        res[f"prefill_{ctx}"] = ctx / (time.perf_counter() - t0)
        print(f"prefill {ctx} tokens: {res[f'prefill_{ctx}']:.0f} tok/s", flush=True)
        if args.no_decode:
            continue
        if i == 0:
            decode([st], ctx, False, f"B=1 at {ctx}, eager")
        decode([st], ctx, True, f"B=1 at {ctx}, graph")
        decode_pipelined([st], ctx, f"B=1 at {ctx}")
        del st
    for ctx in ([int(c) for c in args.long.split(",")] if args.long and not args.no_decode else []):
        st = long_state(m, ctx, rng)
        decode([st], ctx, True, f"B=1 at {ctx} (rows random), graph")
        decode_pipelined([st], ctx, f"B=1 at {ctx} (rows random)")
        del st
    for B in ([int(b) for b in args.batches.split(",")] if not args.no_decode else []):
        states = [m.new_state() for _ in range(B)]
        for sb in states:
            m.prefill(sb, rng.integers(0, m.shape.n_vocab, args.ctx8), chunk=512)
        if B == 8:
            decode(states, args.ctx8, False, f"B=8 at {args.ctx8}, eager")
        decode(states, args.ctx8, True, f"B={B} at {args.ctx8}, graph")
        decode_pipelined(states, args.ctx8, f"B={B} at {args.ctx8}")
        del states
    if args.prefill_ops:
        ops_clock = OpClock(m)
        st, ids = m.new_state(), rng.integers(0, m.shape.n_vocab, ctxs[0])
        for c0 in range(0, ctxs[0], args.chunk):
            m.prefill(st, ids[c0:c0 + args.chunk], chunk=args.chunk)
            ops_clock.read()
        per = {k: sum(t.get(k, 0.0) for t in ops_clock.times) / ctxs[0] for k in ops_clock.times[0]}
        res["prefill_ops_us_per_token"] = per
        total = sum(per.values())
        print(f"\ndevice time per op and token, prefill of {ctxs[0]} in chunks of {args.chunk}, summed over "
              f"{args.layers} layers (total {total:.1f} us per token, {1e6 / total:.0f} tok/s):")
        for k, v in sorted(per.items(), key=lambda kv: -kv[1]):
            print(f"  {k:24s} {v:8.2f} us  {100 * v / total:5.1f}%")
    if args.ops:
        ops_clock = OpClock(m)
        st = m.new_state()
        m.prefill(st, rng.integers(0, m.shape.n_vocab, ctxs[0]), chunk=512)
        for _ in range(args.steps):
            m.decode([st], [int(rng.integers(0, m.shape.n_vocab))])
            ops_clock.read()
        res["ops_us"] = ops_clock.median_us(4)
        total = sum(res["ops_us"].values())
        print(f"\ndevice time per op, B=1 at {ctxs[0]}, graph, summed over {args.layers} layers "
              f"(total {total:.0f} us):")
        for k, v in sorted(res["ops_us"].items(), key=lambda kv: -kv[1]):
            print(f"  {k:24s} {v:8.1f} us  {100 * v / total:5.1f}%")
    if args.socket:
        res["socket"] = through_socket(path, ctxs[0], 256)
        res["socket_unpipelined"] = through_socket(path, ctxs[0], 256, env={"DS4_PIPELINE": "0"})
        for k in ("socket", "socket_unpipelined"):
            print(f"through the socket ({k}): {res[k]['tok_s']:.1f} tok/s, prompt {res[k]['prefill_tok_s']:.0f} "
                  "tok/s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))

    print(f"\n| {res['card']} | ratio | measured us | floor us | measured/floor | per token vs llama.cpp 323 us |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in res["runs"]:
        for i, (u, f) in enumerate(zip(r["layer_us"], r["floor_us"])):
            print(f"| {r['label']}, layer {i} | {res['ratios'][i]} | {u:.0f} | {f:.0f} | {u / f:.1f}x | "
                  f"{PEERS_US['llama.cpp'] * r['B'] / u:.2f}x |")
    for r in res["runs"]:
        print(f"decode {r['label']}: {r['step_ms']:.2f} ms/step, {r['tok_s']:.1f} tok/s ({args.layers} layers; "
              f"embedding, head and host work {r['head_us']:.0f} us)")
    for r in res["runs_pipelined"]:
        print(f"decode {r['label']}, pipelined: {r['step_ms']:.2f} ms/step, {r['tok_s']:.1f} tok/s")
    print("prefill: " + ", ".join(f"{res[f'prefill_{c}']:.0f} tok/s at {c}" for c in ctxs) +
          f"; upload {upload_s:.1f} s")
    if "socket" in res:
        print(f"through the socket: {res['socket']['tok_s']:.1f} tok/s (greedy, after a {ctxs[0]}-token prompt "
              f"at {res['socket']['prefill_tok_s']:.0f} tok/s); steps not pipelined (DS4_PIPELINE=0): "
              f"{res['socket_unpipelined']['tok_s']:.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
