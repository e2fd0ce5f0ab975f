"""The whole model on the CUDA backend: logits equal to the CPU backend's, prefill/decode/batching/snapshots
self-consistent, the engine on top; plus the compressor and indexer kernels against their references.

On a GPU machine it runs the real kernels. Without one (or with DS4_CUDA_EMULATE=1) it runs against the numpy
stand-in of ds4d._cuda (tests/cuda_emulator.py): that checks the backend's host side (step tables, state layout,
snapshots, graph capture and replay) on any machine, not the kernels, whose own tests then skip.
DS4_CUDA_EMULATE=0 skips the whole file instead.

Thresholds (measured on the GPU, docs/PERFORMANCE.md): exact numerics on the f32 model differ from the CPU only by
the order of float sums (f32 activations, f32 K=V rows on both); faithful numerics on the q2 model differ by the
order of sums too, but there a sum that rounds differently flips 8-bit activations, FP8/FP4 values and router or
indexer choices, so they are compared with the CPU's own sensitivity to such a change (see the test).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from ds4d.model import Segment, open_model
from ds4d.sampling import pick

from ds4d.ops.cuda import available  # noqa: E402

_MODE = os.environ.get("DS4_CUDA_EMULATE", "auto")
EMULATED = _MODE == "1" or (_MODE == "auto" and available() is not None)
_SKIP = None if EMULATED else available()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"CUDA backend unavailable: {_SKIP}")
gpu_only = pytest.mark.skipif(EMULATED, reason="a kernel test: the emulator's kernels are the references")


@pytest.fixture(scope="module", autouse=True)
def cuda_module():
    """The emulator stands in for ds4d._cuda during this module only (other tests must not see a CUDA backend)."""
    if not EMULATED:
        yield
        return
    import cuda_emulator
    cuda_emulator.install()
    try:
        yield
    finally:
        cuda_emulator.uninstall()

NO_TIES = dict(n_indexer_head=64)      # as test_model.py: no exact indexer-score ties at the top-k boundary
N_TOKENS = 320                          # 80 ratio-4 rows: the indexer chooses (top-k 16) for most positions


def prompt(n=N_TOKENS, seed=0):
    return np.random.default_rng(seed).integers(0, 129280, n)


def per_position(got, ref):
    return np.abs(got - ref).max(axis=1) / np.abs(ref).max()


@pytest.fixture(scope="module")
def models(tiny_model):
    cache = {}

    def get(variant, backend, numerics):
        key = (variant, backend, numerics)
        if key not in cache:
            cache[key] = open_model(tiny_model(variant, **NO_TIES), backend=backend, numerics=numerics)
        return cache[key]
    return get


def test_exact_logits_match_cpu(models):
    ids = prompt()
    ref = models("f32", "cpu", "exact").logits(ids, chunk=100)
    got = models("f32", "cuda", "exact").logits(ids, chunk=100)
    d = per_position(got, ref)
    print(f"exact f32: max {d.max():.3g}, median {np.median(d):.3g} of the logit scale {np.abs(ref).max():.3g}")
    assert d.max() < 1e-3


def test_faithful_logits_match_cpu(models, tiny_model):
    """Faithful numerics on the q2 model are chaotic at the level of float rounding: an 8-bit activation or an
    FP8/FP4 value that rounds the other way moves a product by 1/127 of its block, and a router or indexer choice
    with it. So the measure is the CPU's own sensitivity: its logits when every attention output is scaled by
    1 + 1e-6 (a change of the size of a different sum order). CUDA must stay within a few times that."""
    ids = prompt()
    ref = models("q2", "cpu", "faithful").logits(ids, chunk=100)
    got = models("q2", "cuda", "faithful").logits(ids, chunk=100)
    shaken = open_model(tiny_model("q2", **NO_TIES), backend="cpu", numerics="faithful")
    attention = shaken.ops.attention
    shaken.ops.attention = lambda *a, **kw: attention(*a, **kw) * np.float32(1 + 1e-6)
    noise = shaken.logits(ids, chunk=100)
    d, dn = per_position(got, ref), per_position(noise, ref)
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) / np.abs(ref).max() > 0.05
    agree, agree_n = got.argmax(1) == ref.argmax(1), noise.argmax(1) == ref.argmax(1)
    print(f"faithful q2, cuda vs cpu: median {np.median(d):.3g}, 90th percentile {np.quantile(d, 0.9):.3g}, max "
          f"{d.max():.3g}; argmax agreement {agree.mean():.3f}, {agree[clear].mean():.3f} on {clear.sum()} clear "
          f"positions. CPU vs CPU shaken by 1e-6: median {np.median(dn):.3g}, 90th percentile "
          f"{np.quantile(dn, 0.9):.3g}, argmax agreement {agree_n.mean():.3f}, {agree_n[clear].mean():.3f}")
    assert np.median(d) < 3 * np.median(dn) + 1e-3
    assert clear.sum() > 0.2 * len(ids) and agree[clear].mean() > 0.9


def compare(got, want, what):
    """Max and median per-position difference over the logit scale, and argmax agreement: printed, returned."""
    d = per_position(np.asarray(got), np.asarray(want))
    agree = (np.asarray(got).argmax(-1) == np.asarray(want).argmax(-1)).mean()
    print(f"{what}: max {d.max():.3g}, median {np.median(d):.3g} of the logit scale; argmax agreement {agree:.3f}")
    return d.max(), np.median(d), agree


# Self-consistency: tight under exact numerics on the f32 model (the GPU's sums differ between a prefill chunk and
# a decode step only in order: raw rows in position order from a staging copy versus ring order); under faithful
# numerics such differences flip FP8/FP4 roundings, so a median and the argmax.
LIMITS = {"exact": dict(max=1e-4), "faithful": dict(median=1e-3, agree=0.9)}


def check(got, want, numerics, what):
    worst, median, agree = compare(got, want, f"{what} ({numerics})")
    lim = LIMITS[numerics]
    assert worst < lim.get("max", np.inf) and median < lim.get("median", np.inf) and agree >= lim.get("agree", 0)


@pytest.mark.parametrize("numerics", ["exact", "faithful"])
def test_prefill_then_decode_equals_prefill_all(models, numerics):
    m = models("f32", "cuda", numerics)
    ids = prompt(200, seed=1)
    full = m.logits(ids, chunk=64)
    got, want = [], []
    for split in (1, 31, 32, 33, 127, 128, 129):
        st = m.new_state()
        got.append(m.prefill(st, ids[:split], chunk=50))
        want.append(full[split - 1])
        for t in range(split, min(split + 4, len(ids))):
            got.append(m.decode([st], [ids[t]])[0])
            want.append(full[t])
    check(got, want, numerics, "prefill + decode vs prefill of all")


def sessions_alone_and_batched(m):
    lengths = [5, 40, 130]
    prompts = [prompt(n + 6, seed=10 + i) for i, n in enumerate(lengths)]
    alone = []
    for p, n in zip(prompts, lengths):
        st = m.new_state()
        m.prefill(st, p[:n])
        alone.append([m.decode([st], [p[n + k]])[0] for k in range(6)])
    states = [m.new_state() for _ in lengths]
    for st, p, n in zip(states, prompts, lengths):
        m.prefill(st, p[:n])
    batched = [m.decode(states, [p[n + k] for p, n in zip(prompts, lengths)]) for k in range(6)]
    return np.array([[b[i] for b in batched] for i in range(3)]), np.array(alone)


@pytest.mark.parametrize("numerics", ["exact", "faithful"])
def test_batch_equals_each_session_alone(models, numerics):
    got, want = sessions_alone_and_batched(models("f32", "cuda", numerics))
    check(got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1]), numerics, "3 sessions batched vs alone")


def test_decode_step_wider_than_an_attention_launch(models):
    """A decode step of more sessions than one split-attention launch takes (ATTN_ROWS: all its queries then go
    through the prefill kernel, so not through the decode front) gives each session's logits alone."""
    from ds4d.ops.cuda import ATTN_ROWS
    m = models("f32", "cuda", "faithful")
    prompts = [prompt(8 + i, seed=40 + i) for i in range(ATTN_ROWS + 1)]
    alone = []
    for p in prompts:
        st = m.new_state()
        m.prefill(st, p[:-1])
        alone.append(m.decode([st], [p[-1]])[0])
    states = [m.new_state() for _ in prompts]
    for st, p in zip(states, prompts):
        m.prefill(st, p[:-1])
    batched = m.decode(states, [p[-1] for p in prompts])
    check(np.asarray(batched), np.asarray(alone), "faithful", f"{len(prompts)} sessions in one decode step vs alone")


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_joins_the_products_of_one_input(models, batch):
    """A decode step runs the products of one input as one product per weight type (attn_q_a with attn_kv; the
    compressors' and the indexer's projections; the shared expert's gate and up): fewer weight kernels than one
    product per weight, and the same logits."""
    m = models("f32", "cuda", "exact")
    logits, calls = [], []
    for join in (False, True):
        states = [m.new_state() for _ in range(batch)]
        for i, st in enumerate(states):
            m.prefill(st, prompt(30 + i, seed=7 + i))
        m.ops.join, m.ops.graphs = join, False
        try:
            before = m.ops.weight_calls
            for k in range(4):
                logits.append(m.decode(states, prompt(batch, seed=20 + k)))
            calls.append(m.ops.weight_calls - before)
        finally:
            m.ops.join, m.ops.graphs = True, True
    layers = m.weights.layers
    apart = sum(2 + 2 * (L.compressor is not None) + 3 * (L.indexer is not None) for L in layers)
    saved = apart     # the f32 model: one weight type; q_a + kv, compressors + indexer, the shared gate + up
    assert calls[0] - calls[1] == 4 * saved
    vocab = m.shape.n_vocab
    got, want = np.concatenate(logits[4:]).reshape(-1, vocab), np.concatenate(logits[:4]).reshape(-1, vocab)
    check(got, want, "exact", f"products joined vs apart, batch {batch}")


def test_mixed_batch_prefill_and_decode(models):
    m = models("f32", "cuda", "exact")
    a, b = prompt(70, seed=20), prompt(50, seed=21)
    ref_a, ref_b = m.new_state(), m.new_state()
    m.prefill(ref_a, a[:60])
    m.prefill(ref_b, b[:10])
    want = [m.prefill(ref_a, a[60:]), m.decode([ref_b], [b[10]])[0]]
    sa, sb = m.new_state(), m.new_state()
    m.prefill(sa, a[:60])
    m.prefill(sb, b[:10])
    got_a, got_b = m.forward([Segment(sa, a[60:]), Segment(sb, b[10:11])])
    check([got_a[0], got_b[0]], want, "exact", "prefill chunk + decode token in one batch vs apart")


def test_graph_replay_equals_eager(models):
    """Decode steps replayed from captured graphs give the bits of the same steps launched one kernel at a time,
    across a bucket boundary (positions past 256: a second graph) and with every session's table changing."""
    m = models("q2", "cuda", "faithful")
    ids = prompt(300, seed=6)

    def run(graphs):
        m.ops.graphs = graphs
        states = [m.new_state() for _ in range(2)]
        m.prefill(states[0], ids[:230])
        m.prefill(states[1], ids[:100])
        return np.array([m.decode(states, [ids[230 + k], ids[100 + k]]) for k in range(40)])
    try:
        eager = run(False)
        calls = m.ops.weight_calls
        graphed = run(True)
    finally:
        m.ops.graphs = True
    assert {(2, 256, False), (2, 512, False)} <= set(m.ops._graphs)
    np.testing.assert_array_equal(graphed, eager)
    assert m.ops.weight_calls - calls > 0


@pytest.mark.parametrize("kind", ["LayerClock", "OpClock"])
def test_bench_clocks_follow_the_replayed_graphs(tiny_model, kind):
    """The benchmarks' clocks (bench/cuda_model.py) mark a step with events, recorded into a captured step's graph;
    a decode key's two captured steps are replayed in turn. Each graph's events must outlive the steps after its
    capture (on the emulator a graph whose event is gone raises; CUDA crashed in the launch), and each reading is
    the step just run: a clock's events after a step are those of the graph that ran."""
    import importlib
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    cuda_model = importlib.import_module("cuda_model")
    from ds4d.sampling import Sampler, SamplingParams
    m = open_model(tiny_model("f32", **NO_TIES), backend="cuda")
    clock = getattr(cuda_model, kind)(m)
    st = m.new_state()
    m.prefill(st, prompt(40))
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0))
    read = []
    for _ in range(8):
        m.sample([Segment(st, prompt(1, seed=len(read)))], [sampler.draw()])
        clock.read()
        read.append(id(clock.events))          # (the ids only: holding the events here would keep them alive)
    assert len(m.ops._graphs) == 1 and len(next(iter(m.ops._graphs.values()))) == 2
    assert read[3] == read[1] and read[4] == read[2] and read[1] != read[2]   # captured A, B; A, B replayed
    assert all(len(t) == len(clock.times[0]) > 0 for t in clock.times)


def test_sampling_step(models):
    """Model.sample, the engine's step, on CUDA: decode steps replayed from a graph that samples on the device (a
    prefill chunk's row too) give pick's token on the logits they leave on the device, whatever each step's draws
    (greedy, default, top-k, top-p, a draw the kernel leaves to the host), and those logits are the bits of the
    forward without sampling on the same states."""
    from ds4d.sampling import Draw, SamplingParams as P
    m = models("q2", "cuda", "faithful")
    ids, rng = prompt(200, seed=8), np.random.default_rng(8)
    kinds = [P(), P(temperature=0.8, top_k=40), P(top_p=0.9, min_p=0.0, top_k=200), P(top_p=0.999, min_p=0.0)]
    a, b = m.new_state(), m.new_state()
    m.prefill(a, ids[:120])
    res = m.sample([Segment(b, ids[:90])], [Draw(P(), False, 0.5)])
    assert res.tokens[0] == pick(res.logits(0), Draw(P(), False, 0.5))
    twins = [m.live_state(a.snapshot()), m.live_state(b.snapshot())]
    for k in range(12):
        draws = [Draw(kinds[k % 4], False, float(rng.random())), Draw(P(), k % 3 == 0, 0.25)]
        toks = [ids[120 + k], ids[90 + k]]
        res = m.sample([Segment(st, np.array([t])) for st, t in zip((a, b), toks)], draws)
        want = m.decode(twins, toks)
        for i, d in enumerate(draws):
            np.testing.assert_array_equal(res.logits(i), want[i])
            assert res.tokens[i] == pick(want[i], d), (k, i)
    assert any(key[2] for key in m.ops._graphs)


def test_steps_that_follow_equal_steps_fed_by_the_host(models):
    """The engine's pipelined decode: each step launched before the previous one's tokens reach the host, its
    segments taking them on the device (`Segment.follow`, rows in another order every other step, a third session
    fed by the host beside them), across the first eager step, the capture and the replays, gives the tokens and
    the states of steps fed each token by the host."""
    from ds4d.sampling import Draw, SamplingParams as P
    m = models("q2", "cuda", "faithful")
    ids = prompt(300, seed=9)
    starts = [m.new_state() for _ in range(3)]
    for st, n in zip(starts, (40, 250, 120)):
        m.prefill(st, ids[:n])
    snaps = [st.snapshot() for st in starts]
    host_fed = [int(t) for t in ids[200:216]]               # the third session's tokens, from the host
    kinds = [P(temperature=0.8, top_k=40), P(), P(temperature=0)]
    rng = np.random.default_rng(9)
    draws = [[Draw(kinds[i], kinds[i].temperature == 0, float(rng.random())) for i in range(3)] for _ in range(16)]
    order = lambda k: (0, 1, 2) if k % 2 == 0 else (1, 0, 2)   # noqa: E731

    def chain(pipelined):
        states = [m.live_state(s) for s in snaps]
        fed, out, prev = [7, 8], [], None
        for k in range(16):
            segs = []
            for i in order(k):
                if i == 2:
                    segs.append(Segment(states[i], np.array([host_fed[k]])))
                elif pipelined and prev is not None:
                    segs.append(Segment(states[i], np.array([0]), follow=order(k - 1).index(i)))
                else:
                    segs.append(Segment(states[i], np.array([fed[i]])))
            launched = m.launch(segs, [draws[k][i] for i in order(k)], after=prev)
            if pipelined and prev is not None:
                got = prev.result().tokens
                out.append([got[order(k - 1).index(i)] for i in range(3)])
            if pipelined:
                prev = launched
            else:
                got = launched.result().tokens
                out.append([got[order(k).index(i)] for i in range(3)])
                fed = out[-1][:2]
        if pipelined:
            got = prev.result().tokens
            out.append([got[order(15).index(i)] for i in range(3)])
        return out, m.decode(states, [1, 2, 3])

    host, host_logits = chain(False)
    piped, piped_logits = chain(True)
    assert piped == host
    np.testing.assert_array_equal(piped_logits, host_logits)   # the states too: the same bits after a step


@pytest.mark.parametrize("pingpong", [True, False])
def test_steps_read_late_keep_their_ids(models, pingpong):
    """Steps launched one after another, each following the last on the device, whose tokens the host reads only
    after the last launch: every step's tokens are those of the same chain read step by step (a captured step's
    ids live in its graph's pinned memory, which a later replay of that graph writes again), with a decode key's
    two graphs replayed in turn or one replayed every step."""
    from ds4d.sampling import Draw, SamplingParams as P
    m = models("q2", "cuda", "faithful")
    ids = prompt(200, seed=10)
    starts = [m.new_state() for _ in range(2)]
    for st, n in zip(starts, (60, 130)):
        m.prefill(st, ids[:n])
    snaps = [st.snapshot() for st in starts]
    draws = [Draw(P(temperature=0.8, top_k=40), False, u) for u in (0.3, 0.7)]

    def chain(read_late):
        states = [m.live_state(s) for s in snaps]
        steps, out, prev = [], [], None
        for k in range(10):
            segs = [Segment(st, np.array([5 + i]) if prev is None else np.array([0]), follow=None if prev is None
                            else i) for i, st in enumerate(states)]
            prev = m.launch(segs, draws, after=prev)
            steps.append(prev)
            if not read_late and len(steps) > 1:
                out.append(steps[-2].result().tokens)
        if read_late:
            return [s.result().tokens for s in steps]
        return out + [steps[-1].result().tokens]

    m.ops.drop_graphs()
    m.ops.pingpong = pingpong
    try:
        assert chain(True) == chain(False)
    finally:
        m.ops.pingpong = True
        m.ops.drop_graphs()


def test_snapshot_restore_continue(models):
    m = models("q2", "cuda", "faithful")
    ids = prompt(160, seed=3)
    st = m.new_state()
    m.prefill(st, ids[:130])
    snap = st.snapshot()
    assert snap.n_tokens == 130 and st.nbytes > 0
    cont = [m.decode([st], [t])[0] for t in ids[130:140]]
    restored = m.live_state(snap)
    again = [m.decode([restored], [t])[0] for t in ids[130:140]]
    np.testing.assert_array_equal(np.array(cont), np.array(again))       # same kernels, same state: same bits
    snap2 = restored.snapshot()                                          # shares the first one's full row pages
    assert all(a is b for a, b in zip(snap2.layers[2].comp.pages[:-1], snap.layers[2].comp.pages[:-1]))


def test_weight_upload_reports_its_progress(tiny_model):
    """What the daemon logs while the weights go to the GPU: `on_upload` sees the resident bytes grow with each
    weight up to `uploaded`, which covers at least the model's big matrices (experts, embedding, output head) and
    at most the file's tensors; a second forward uploads nothing."""
    m = open_model(tiny_model("q2", **NO_TIES), backend="cuda")
    seen = []
    m.ops.on_upload = seen.append
    m.logits([0, 1])
    assert len(seen) > 10 and all(a < b for a, b in zip(seen, seen[1:])) and seen[-1] == m.ops.uploaded
    w = m.weights
    big = w.token_embd.nbytes + w.output.nbytes + sum(
        L.ffn_gate_exps.nbytes + L.ffn_up_exps.nbytes + L.ffn_down_exps.nbytes for L in w.layers)
    assert big < m.ops.uploaded <= m.gguf.tensor_bytes
    n = len(seen)
    m.logits([2])
    assert len(seen) == n


def test_snapshot_is_the_host_format(models):
    """A CUDA snapshot continues on the CPU backend and a CPU snapshot on CUDA (exact numerics, f32 model)."""
    gpu, cpu = models("f32", "cuda", "exact"), models("f32", "cpu", "exact")
    ids = prompt(150, seed=4)
    g, c = gpu.new_state(), cpu.new_state()
    gpu.prefill(g, ids[:140])
    cpu.prefill(c, ids[:140])
    g_on_cpu, c_on_gpu = cpu.live_state(g.snapshot()), gpu.live_state(c.snapshot())
    got = [cpu.decode([g_on_cpu], [t])[0] for t in ids[140:]] + [gpu.decode([c_on_gpu], [t])[0] for t in ids[140:]]
    want = [cpu.decode([c], [t])[0] for t in ids[140:]]
    check(got, want + want, "exact", "continued across backends")


def test_engine_generate_and_chat(models, tmp_path):
    from ds4d.engine import Engine
    m = models("q2", "cuda", "faithful")
    e = Engine(m, cache_dir=tmp_path / "cache", ctx=4096).start()
    try:
        r = e.call("generate", tokens=[int(t) for t in prompt(40, seed=5)], max_tokens=8, temperature=0)
        assert len(r["tokens"]) == 8
        user = lambda text: [{"role": "user", "content": text}]   # noqa: E731
        r1 = e.call("chat", session="talk", messages=user("Hello there"), thinking="none", max_tokens=6,
                    temperature=0)
        r2 = e.call("chat", session="talk", messages=user("And again?"), thinking="none", max_tokens=6,
                    temperature=0)
        assert r1["usage"]["completion_tokens"] > 0 and r2["usage"]["cached_tokens"] >= r1["usage"]["prompt_tokens"]
    finally:
        e.stop()
    cpu = Engine(models("q2", "cpu", "faithful"), cache_dir=tmp_path / "cache2", ctx=4096).start()
    try:
        want = cpu.call("generate", tokens=[int(t) for t in prompt(40, seed=5)], max_tokens=8, temperature=0)
    finally:
        cpu.stop()
    print(f"greedy tokens: cuda {r['tokens']}, cpu {want['tokens']}")


# --- kernels of the compressed attention, on their own ----------------------------------------------------------

@pytest.fixture(scope="module")
def cu():
    from ds4d import _cuda
    _cuda.init()
    return _cuda


@gpu_only
def test_topk_ties_to_lower_index(cu):
    rng = np.random.default_rng(7)
    stream = cu.Stream()
    for n, k in ((5000, 512), (600, 512), (513, 512), (100, 512), (3000, 16)):
        scores = np.round(rng.standard_normal((3, n)) * 4).astype(np.float32)   # few values: many ties
        scores[1, : n // 2] = 0.0
        scores[2] = -0.0
        n_vis = np.array([n, n - 7, n], np.int32)
        s_buf, v_buf, sel = cu.Buffer(scores.nbytes), cu.Buffer(12), cu.Buffer(3 * k * 4)
        s_buf.upload(scores)
        v_buf.upload(n_vis)
        cu.topk(stream.ptr, sel.ptr, s_buf.ptr, n, v_buf.ptr, 3, k)
        got = sel.download(np.int32, [3, k])
        for t in range(3):
            m = int(n_vis[t])
            want = np.full(k, -1) if m <= k else np.sort(np.argsort(-scores[t, :m], kind="stable")[:k])
            if m <= k:
                want[:m] = np.arange(m)
            np.testing.assert_array_equal(got[t], want, err_msg=f"n={n} k={k} token {t}")


@gpu_only
@pytest.mark.parametrize("ratio", [4, 128])
def test_compress_parallel_blocks_equal_the_walk(cu, ratio):
    """The prefill's compressor (every block that ends in a segment pooled at once, then the frontier rewritten)
    gives the bits of the decode's in-order walk, pooled rows and frontier both, over three sessions fed in three
    calls of segments that start and end anywhere in a block; both match the reference's compressor."""
    from ds4d.ops.reference import NEG_INF, Reference
    rng = np.random.default_rng(11)
    ref = Reference(np.float32)
    d, coff = 160, 2 if ratio == 4 else 1                  # 160: a partial block of 128 dims
    width, rows = coff * d, coff * ratio
    ape = rng.standard_normal((ratio, width)).astype(np.float32)
    stream, bufs = cu.Stream(), []

    def put(a):
        b = cu.Buffer(max(a.nbytes, 16))
        b.upload(np.ascontiguousarray(a))
        bufs.append(b)
        return b

    host = [(np.zeros((rows, width), np.float32), np.full((rows, width), NEG_INF, np.float32)) for _ in range(3)]
    states = {path: [(put(k), put(s)) for k, s in host] for path in (1, 2)}
    pos0 = [0, 0, 0]
    for lens in ((5, 130, 3), (300, 77, 1), (64, 200, 9)):
        n_tok = sum(lens)
        kv = rng.standard_normal((n_tok, width)).astype(np.float32)
        gate = rng.standard_normal((n_tok, width)).astype(np.float32)
        first = np.cumsum((0,) + lens[:-1]).astype(np.int32)
        pos = np.concatenate([p + np.arange(n) for p, n in zip(pos0, lens)]).astype(np.int32)
        args = [put(a).ptr for a in (kv, gate, ape, pos, first, np.array(lens, np.int32))]
        got = {}
        for path in (1, 2):
            pooled = put(np.full((n_tok, d), np.nan, np.float32))
            tk = put(np.array([k.ptr for k, _ in states[path]], np.uint64))
            ts = put(np.array([s.ptr for _, s in states[path]], np.uint64))
            cu.compress(stream.ptr, pooled.ptr, args[0], width, args[1], width, args[2], args[3], args[4], args[5],
                        tk.ptr, ts.ptr, 3, d, ratio, n_tok, path)
            got[path] = (pooled.download(np.float32, [n_tok, d]),
                         [(k.download(np.float32, [rows, width]), s.download(np.float32, [rows, width]))
                          for k, s in states[path]])
        ends = (pos + 1) % ratio == 0
        np.testing.assert_array_equal(got[1][0][ends], got[2][0][ends])
        for (k1, s1), (k2, s2) in zip(got[1][1], got[2][1]):
            np.testing.assert_array_equal(k1, k2)
            np.testing.assert_array_equal(s1, s2)
        for s, (p0, n, f) in enumerate(zip(pos0, lens, first)):
            want, _ = ref.compress(host[s][0], host[s][1], kv[f:f + n], gate[f:f + n], ape, p0, ratio)
            np.testing.assert_allclose(got[2][0][f:f + n][ends[f:f + n]], want, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got[2][1][s][0], host[s][0], rtol=0, atol=0)
            np.testing.assert_allclose(got[2][1][s][1], host[s][1], rtol=1e-6, atol=1e-6)
            pos0[s] += n


@gpu_only
@pytest.mark.parametrize("n_head,f32_rows,n_tok,fp4,cap", [
    (64, False, 3, "none", 1024), (64, True, 3, "none", 1024),   # the FMA kernel (few tokens, at most 1,024 keys)
    (64, False, 3, "none", 1200), (5, False, 3, "none", 1200), (64, False, 3, "all", 1200),  # the decode kernel
    (64, False, 70, "none", 1200), (13, False, 70, "none", 1200), (64, False, 70, "all", 1200),  # the prefill one
    (64, False, 300, "some", 3100), (64, True, 70, "none", 1200)])
def test_indexer_scores(cu, n_head, f32_rows, n_tok, fp4, cap):
    """Each key's score, sum_h w_h * scale * relu(q_h . key), against float64 for tokens that see more keys than
    top_k (the others' scores are not written, nor any past a token's own keys). Three tokens of their own sessions;
    or more (a prefill chunk), runs of 5 from two sessions in turn, each seeing 11 (or 9) rows more than the last.
    Queries of any float, or of FP4 values times powers of two per 32 (the faithful path's, exact in f16): for all
    tokens, or every third. The prefill kernel's scores have the decode kernel's bits (the same tokens 16 at a
    time)."""
    rng = np.random.default_rng(9)
    dim, top_k, scale = 128, 512, 0.3
    if n_tok == 3:
        n_vis, session = np.array([700, 300, 1000], np.int32), np.arange(3)
    else:
        n_vis = (400 + (11 if n_tok < 100 else 9) * np.arange(n_tok)).astype(np.int32)
        session = np.arange(n_tok) // 5 % 2
    rt = np.float32 if f32_rows else np.float16
    q = rng.standard_normal((n_tok, n_head, dim)).astype(np.float32)
    if fp4 != "none":
        grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
        block_scale = 2.0 ** rng.integers(-6, 4, (n_tok, n_head, dim // 32)).repeat(32, -1)
        q4 = (rng.choice(grid, q.shape) * np.sign(q) * block_scale).astype(np.float32)
        q = q4 if fp4 == "all" else np.where((np.arange(n_tok) % 3 == 0)[:, None, None], q4, q)
    w = rng.standard_normal((n_tok, n_head)).astype(np.float32)
    keys = [rng.standard_normal((int(n_vis[session == s].max()), dim)).astype(rt) for s in range(session.max() + 1)]
    stream = cu.Stream()
    bufs = []

    def put(a):
        b = cu.Buffer(max(a.nbytes, 16))
        b.upload(np.ascontiguousarray(a))
        bufs.append(b)
        return b.ptr

    rows = [put(k) for k in keys]
    table = np.array([rows[s] for s in session], np.uint64)

    def scores_of(t0, n):
        scores = cu.Buffer(n * cap * 4)
        scores.upload(np.full((n, cap), np.nan, np.float32))
        work = cu.Buffer(max(16, cu.indexer_scores_work_bytes(n, n_head, f32_rows)))
        cu.indexer_scores(stream.ptr, scores.ptr, cap, put(q[t0:t0 + n]), put(w[t0:t0 + n]), scale,
                          put(table[t0:t0 + n]), put(n_vis[t0:t0 + n]), n, n_head, dim, cap, top_k, f32_rows, work.ptr)
        return scores.download(np.float32, [n, cap])

    got = scores_of(0, n_tok)
    for t, n in enumerate(n_vis):
        if n <= top_k:
            assert np.isnan(got[t]).all()
            continue
        dots = q[t].astype(np.float64) @ keys[session[t]][:n].astype(np.float64).T
        want = (w[t].astype(np.float64) * scale) @ np.maximum(dots, 0)
        np.testing.assert_allclose(got[t, :n], want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=f"token {t}")
        assert np.isnan(got[t, n:]).all()
    if n_tok > 16 and not f32_rows:
        step = np.concatenate([scores_of(t0, min(16, n_tok - t0)) for t0 in range(0, n_tok, 16)])
        np.testing.assert_array_equal(got, step)


@gpu_only
def test_indexer_scores_needs_its_work_area(cu):
    """A prefill chunk's scores split its queries into the caller's work area: without one, a clear error."""
    assert cu.indexer_scores_work_bytes(3, 64) == 0 and cu.indexer_scores_work_bytes(17, 64, True) == 0
    assert cu.indexer_scores_work_bytes(70, 64) >= 70 * 64 * 128 * 4
    b, stream = cu.Buffer(70 * 64 * 128 * 4), cu.Stream()
    with pytest.raises(ValueError, match="work area"):
        cu.indexer_scores(stream.ptr, b.ptr, 1200, b.ptr, b.ptr, 0.3, b.ptr, b.ptr, 70, 64, 128, 1200, 512)


@gpu_only
@pytest.mark.parametrize("cluster", [0, 1, 4, 8, 16])
def test_topk(cu, cluster):
    """Each token's top_k of its n scores (ties to the lower index, -0 equal to +0) in index order, against numpy:
    n at most k (0 .. n - 1, then -1), scores held in registers (up to 16,384 per block) and read from memory past
    that, with many ties at the k-th value; by one block per token or a thread block cluster of 4, 8 or 16 (the
    ties then spread over its blocks; 0: the size the capacity picks)."""
    rng = np.random.default_rng(10)
    k, cap = 512, 262144
    n_vis = np.array([300, 513, 5000, 16384, 16385, 40000, 262144], np.int32)
    scores = rng.standard_normal((len(n_vis), cap)).astype(np.float32)
    scores[2, ::3] = 1.5                                  # 1,667 ties; 249 scores above: the 512th is a tie
    scores[3, :9000] = np.where(rng.random(9000) < 0.5, 0.0, -0.0)   # the largest: 9,000 ties
    scores[3, 9000:] = -rng.random(cap - 9000).astype(np.float32) - 0.01
    scores[4] = np.round(scores[4], 1)                    # few distinct values
    stream = cu.Stream()
    sbuf, nbuf = cu.Buffer(scores.nbytes), cu.Buffer(n_vis.nbytes)
    sbuf.upload(scores)
    nbuf.upload(n_vis)
    sel = cu.Buffer(len(n_vis) * k * 4)
    cu.topk(stream.ptr, sel.ptr, sbuf.ptr, cap, nbuf.ptr, len(n_vis), k, cluster)
    got = sel.download(np.int32, [len(n_vis), k])
    for t, n in enumerate(n_vis):
        if n <= k:
            want = np.r_[np.arange(n), np.full(k - n, -1)]
        else:
            s = scores[t, :n].astype(np.float64) + 0.0        # -0 as +0
            want = np.sort(np.lexsort((np.arange(n), -s))[:k])
        np.testing.assert_array_equal(got[t], want, err_msg=f"token {t}, n {n}")


@gpu_only
def test_hadamard_fp4_matches_reference(cu):
    from ds4d.ops.reference import Reference
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((257, 128)) * rng.uniform(1e-3, 1e3, (257, 1))).astype(np.float32)
    buf = cu.Buffer(x.nbytes)
    buf.upload(x)
    stream = cu.Stream()
    cu.hadamard_fp4(stream.ptr, buf.ptr, len(x))
    got = buf.download(np.float32, list(x.shape))
    want = Reference(np.float64).hadamard_fp4(x.astype(np.float64))
    # The butterfly and the float64 matrix product round differently; a value on an FP4 rounding boundary may
    # go either way, so compare the grid points: almost all equal, the rest one FP4 step apart.
    same = np.isclose(got, want, rtol=1e-6, atol=0)
    print(f"hadamard+fp4: {1 - same.mean():.2e} of the values one grid step off")
    assert same.mean() > 0.999


def test_pool_keeps_what_is_dropped_beside_a_side_stream():
    """While a side stream runs beside the main one, a dropped buffer is not handed out again (either stream may
    still be using it) until the streams join; before and after, it is at once."""
    from ds4d import _cuda
    from ds4d.ops.cuda import _Pool
    pool = _Pool(_cuda)
    a = pool.take(1000)
    buf = a.buf
    del a
    b = pool.take(1000)
    assert b.buf is buf
    pool.deferred = []                # forked
    del b
    c = pool.take(1000)
    assert c.buf is not buf
    pool.settle()                     # joined
    assert pool.take(1000).buf is buf
