"""The CUDA backend: every op of the forward pass on one NVIDIA GPU, through the kernels of `ds4d._cuda`.

Owns the device side of a model: weights uploaded on first use and resident from then on; activations as device
arrays (`DArray`) that stay on the GPU from the embedding to the LM head, whose logits are the one download of a
forward; the live per-session state in device memory (`CudaState`: raw window rings, compressor frontiers,
compressed and indexer rows) with `snapshot()` to the host `SessionState` format the engine, the prompt cache and
the session files use, and `live_state()` back; and the per-forward tables the kernels read (positions, row
counts, each token's row addresses), built on the host and uploaded once per forward.

Kernels are enqueued on one main stream, so device memory freed by Python can be handed to the next op at once
(`_Pool`, stream-ordered reuse). In a decode step two branches run on a side stream beside it (forked and joined
with events, which a captured graph keeps as edges): the compressors' products and the compressors, beside the
query path, joined before the indexer and attention; at 2-16 tokens the shared expert, beside the routed gate and
up, joined before the routed down adds onto it. While a branch is open, memory Python frees waits for the
join before it is reused. The per-forward table (token ids, positions, row addresses, sampling draws) goes
up in stream order from pinned memory, so a forward waits for the GPU only for its result: the sampled token ids
(`sample`, the engine's step), which the sampler writes into pinned host memory itself (no copy follows the
step), or the logits' download; besides, first uses upload weights and constants synchronously (never inside a
captured step). A decode key has two captured steps, replayed in turn: each replay's table goes up on a copy
stream while the step before it still runs, so that consecutive steps follow each other on the main stream with
no copy between them (`_replay`). Numerics are the CPU backend's
(docs/CUDA_KERNELS.md): f32 activations and arithmetic, the act8 path for quantized weights, K=V rows as f16 with
the FP8 / Hadamard+FP4 emulation (faithful) or as f32 (exact); only the order of float sums differs.

Forwards of up to 16 rows (decode batches) use the decode kernels, and decode steps are captured as CUDA graphs.
The products of one input that `matmuls` receives (a sublayer's q_a, kv, compressor and indexer projections; the
shared expert's gate and up) are stored back to back per weight type, so that a decode step runs each run of them
as one product. Small steps run inside the kernel that consumes them: q_a's norm inside the q_b product
(`norm_matmul`), the router's choice inside the routed experts' gate+up (`moe_routed`), and at one token the
shared expert's gate and up there too.
More rows (prefill chunks) go to the tensor-core paths: products through ds4_cuda_gemm (quantized and F16
weights), the routed experts through ds4_cuda_moe_grouped (pairs sorted by expert), attention through
ds4_cuda_attention_prefill (f16 rows), hc_pre over all rows at once, the compressors' blocks pooled in parallel;
the same numerics to f32 rounding (docs/PERFORMANCE.md, "Prefill on tensor cores"), except that on Hopper the
Q8_0 and F16 products of 64+ rows run on wgmma with bf16 / f16 operands ("Prefill, third round"). A prefill
segment's tokens attend over a staging copy of the window (the old rows, then the segment's own), since a ring of
n_swa rows cannot hold what each of them sees; decode tokens attend over their session's ring directly.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections import OrderedDict, defaultdict

import numpy as np
from gguf import GGMLQuantizationType as Q

from ..sampling import TOP_K_MAX
from ..state import LayerState, RowStore, SessionState
from ..weights import Weight

_F32, _I32, _F16 = np.dtype(np.float32), np.dtype(np.int32), np.dtype(np.float16)
MATVEC_ROWS = 16          # ds4_cuda_matvec takes at most this many activation rows
HC_ROWS = 1024            # tokens per hc_pre call: bounds its scratch (~3 KB per token)
MOE_ROWS = 64             # ds4_cuda_moe_* likewise
MOE_GROUPED_ROWS = 2048   # tokens per ds4_cuda_moe_grouped call: bounds its workspace (~215 KB per token)
ATTN_ROWS = 16            # attention queries per launch: bounds the split scratch
ROUTE_EXPERTS_MAX = 256   # ds4_cuda_route and ds4_cuda_moe_route_gate_up: experts per router
MOE_USED_MAX = 8          # ds4_cuda_moe_*: experts per token
# Tokens up to which the routed gate+up computes the shared expert's gate and up too, each token's blocks its own
# (reading its weights once per token). H200, 4-layer file, us per layer: 2 tokens -4.6 (against the products on the
# main stream first), 3 tokens +1.4, 4 +3.7, 8 +13 (the 8 tokens' 143 MB of L2 reads; their products on the side
# stream hide behind the routed gate+up's tail).
SHARED_INSIDE_ROWS = 2
ACT8_TYPES = frozenset({Q.Q8_0, Q.Q2_K, Q.Q4_K, Q.IQ2_XXS})   # weights the kernels meet with 8-bit activations


def available() -> str | None:
    """None when the CUDA backend can run here, else why not."""
    try:
        from .. import _cuda
    except ImportError as e:
        return f"ds4d._cuda is not built ({e})"
    if _cuda.device_count() < 1:
        return "no CUDA device"
    return None


WORK_RESERVE = 2 << 30    # activations, scratch and the first sessions' state, beside the weights


def memory_shortfall(g) -> str | None:
    """None when a model file's weights fit the GPU's free memory (with WORK_RESERVE to spare), else why not."""
    from .. import _cuda
    info = _cuda.device_info()
    free, total = info["free_bytes"], info["total_bytes"]
    if g.tensor_bytes + WORK_RESERVE <= free:
        return None
    gib = lambda n: f"{n / 2**30:,.1f} GiB"   # noqa: E731
    return (f"{g.path.name} does not fit the GPU: its weights need {gib(g.tensor_bytes)} of GPU memory (plus "
            f"{gib(WORK_RESERVE)} for activations and session state) and {info['name']} has {gib(free)} free of "
            f"{gib(total)}. Use a smaller file or a GPU with more memory (routed experts kept in host memory are "
            f"not implemented yet), or --backend cpu")


# --- device memory ----------------------------------------------------------------------------------------------

class _Pool:
    """Device allocations by size class, reused as soon as Python drops them: work enqueued later on a reused buffer
    runs after the work that used it before, in stream order. While a side stream runs beside the main one
    (`deferred` is a list), a dropped buffer waits there until the streams join: either may still be using it. While
    `recording` is a dict, every buffer handed out is noted in it; `hold` then keeps those buffers out of
    circulation (a captured graph's activations, whose addresses the graph replays) until `release`."""

    def __init__(self, cu):
        self.cu = cu
        self.free: dict[int, list] = defaultdict(list)
        self.recording: dict | None = None
        self.held: set = set()
        self.deferred: list | None = None

    @staticmethod
    def size_class(n: int) -> int:
        """n rounded up to a quarter-power-of-two step (at most 25% slack), at least 256 bytes."""
        n = max(int(n), 256)
        step = 1 << max(8, n.bit_length() - 3)
        return (n + step - 1) // step * step

    def take(self, nbytes: int) -> "_Mem":
        size = self.size_class(nbytes)
        spare = self.free[size]
        buf = spare.pop() if spare else self.cu.Buffer(size)
        if self.recording is not None:
            self.recording[buf] = size
        return _Mem(self, buf, size)

    def give(self, buf, size: int) -> None:
        if self.deferred is not None:
            self.deferred.append((buf, size))
        elif buf not in self.held:
            self.free[size].append(buf)

    def settle(self) -> None:
        """The streams have joined: the buffers dropped meanwhile go back into circulation."""
        deferred, self.deferred = self.deferred or [], None
        for buf, size in deferred:
            self.give(buf, size)

    def hold(self, bufs: dict) -> None:
        for buf, size in bufs.items():
            self.held.add(buf)
            if buf in self.free[size]:
                self.free[size].remove(buf)

    def release(self, bufs: dict) -> None:
        """Back into circulation (the holder's arrays must be gone first)."""
        for buf, size in bufs.items():
            self.held.discard(buf)
            self.free[size].append(buf)


class _Mem:
    """One pooled allocation; back to the pool when the last array using it goes."""
    __slots__ = ("pool", "buf", "size")

    def __init__(self, pool: _Pool, buf, size: int):
        self.pool, self.buf, self.size = pool, buf, size

    def __del__(self):
        self.pool.give(self.buf, self.size)


class DArray:
    """A dense row-major float32 or int32 array in device memory. model.py uses `.reshape` and row selection
    (`X[rows]`) on activations; everything else happens in the ops."""
    __slots__ = ("shape", "dtype", "ptr", "mem", "be")

    def __init__(self, be: "CUDA", shape: tuple[int, ...], dtype: np.dtype, ptr: int, mem: _Mem):
        self.be, self.shape, self.dtype, self.ptr, self.mem = be, tuple(int(s) for s in shape), dtype, ptr, mem

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def row(self) -> int:
        """Elements per leading index."""
        return math.prod(self.shape[1:])

    def reshape(self, *shape) -> "DArray":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = list(shape)
        if -1 in shape:
            i = shape.index(-1)
            shape[i] = self.size // math.prod(s for j, s in enumerate(shape) if j != i)
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape {self.shape} to {tuple(shape)}")
        return DArray(self.be, tuple(shape), self.dtype, self.ptr, self.mem)

    def __getitem__(self, rows) -> "DArray":
        """Rows by a slice or an index array: a view when they are consecutive, else a gathered copy."""
        idx = np.arange(self.shape[0])[rows]
        idx = np.atleast_1d(idx)
        step = self.row * self.dtype.itemsize
        if len(idx) and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
            return DArray(self.be, (len(idx),) + self.shape[1:], self.dtype, self.ptr + int(idx[0]) * step, self.mem)
        out = self.be.empty((len(idx),) + self.shape[1:], self.dtype)
        for i, r in enumerate(idx):
            self.be.cu.memcpy(out.ptr + i * step, self.ptr + int(r) * step, step, self.be.stream.ptr)
        return out

    def numpy(self) -> np.ndarray:
        return self.mem.buf.download(self.dtype, list(self.shape), self.ptr - self.mem.buf.ptr)


# --- session state ----------------------------------------------------------------------------------------------

def _align(n: int, a: int = 256) -> int:
    return (n + a - 1) // a * a


class _Layout:
    """Byte offsets of a session's device state: the fixed part (per layer the raw window ring of K=V rows and the
    compressor frontiers, f32 kv then score) and, for a capacity of C tokens, the growable part (per layer C/ratio
    compressed rows and C/4 indexer rows). Rows are f16, or f32 under exact numerics."""

    def __init__(self, shape, row_dtype: np.dtype):
        self.shape, self.row_dtype = shape, np.dtype(row_dtype)
        self.es = self.row_dtype.itemsize
        self.D, self.di, self.n_swa = shape.head_dim, shape.indexer_head_dim, shape.n_swa
        self.ratios = [shape.ratio(i) for i in range(shape.n_layer)]
        self.raw, self.comp_fr, self.idx_fr = [], [], []      # offsets; frontier: (kv offset, score offset, shape)
        off = 0
        for r in self.ratios:
            self.raw.append(off)
            off = _align(off + self.n_swa * self.D * self.es)
            fr = None
            if r:
                coff = 2 if r == 4 else 1
                fshape = (coff * r, coff * self.D)
                n = 4 * fshape[0] * fshape[1]
                fr = (off, _align(off + n), fshape)
                off = _align(fr[1] + n)
            self.comp_fr.append(fr)
            fr = None
            if r == 4:
                fshape = (8, 2 * self.di)
                n = 4 * fshape[0] * fshape[1]
                fr = (off, _align(off + n), fshape)
                off = _align(fr[1] + n)
            self.idx_fr.append(fr)
        self.fixed_bytes = off
        # the same offsets as (layers, 1) int64 columns, for the step tables (0 where a layer has none)
        col = lambda v: np.array(v, np.int64)[:, None]  # noqa: E731
        self.raw_col = col(self.raw)
        self.fr_cols = {(name, k): col([f[k] if f else 0 for f in frs])
                        for name, frs in (("comp", self.comp_fr), ("idx", self.idx_fr)) for k in (0, 1)}
        template = np.zeros(off, np.uint8)
        for fr in self.comp_fr + self.idx_fr:
            if fr is not None:
                n = 4 * fr[2][0] * fr[2][1]
                template[fr[1]:fr[1] + n] = np.full(n // 4, -np.inf, np.float32).view(np.uint8)
        self.fixed_template = template

    def rows(self, cap: int) -> tuple[list, list, int]:
        """(compressed-row offsets, indexer-row offsets, total bytes) for a capacity of cap tokens (a multiple of
        128); None where a layer has no such rows."""
        comp, idx, off = [], [], 0
        for r in self.ratios:
            comp.append(off if r else None)
            if r:
                off = _align(off + cap // r * self.D * self.es)
            idx.append(off if r == 4 else None)
            if r == 4:
                off = _align(off + cap // 4 * self.di * self.es)
        return comp, idx, max(off, 256)


class CudaLayer:
    """One layer's view of a live device state: what `attend` receives (model.py passes state.layers[i])."""
    __slots__ = ("session", "index")

    def __init__(self, session: "CudaState", index: int):
        self.session, self.index = session, index


class CudaState:
    """A session's state in device memory. `n_tokens` is advanced by model.py; `snapshot()` gives the host
    SessionState (compressed rows already copied down are kept in host row stores and shared by snapshots)."""

    def __init__(self, be: "CUDA", layout: _Layout, store_dtype: np.dtype, cap: int):
        # store_dtype: the host snapshots' row type (the model's); the device rows are layout.row_dtype
        self.be, self.layout, self.store_dtype = be, layout, np.dtype(store_dtype)
        self.n_tokens = 0
        self.layers = [CudaLayer(self, i) for i in range(len(layout.ratios))]
        self.fixed = be.cu.Buffer(layout.fixed_bytes)
        self.fixed.upload(layout.fixed_template)
        self.cap = 0
        self.rows = None
        self.comp_off = self.idx_off = None
        self._grow(cap)
        # host copies of the rows already downloaded, per layer: [compressed, indexer] row stores
        self.mirror = [[RowStore(layout.D, self.store_dtype) if r else None,
                        RowStore(layout.di, self.store_dtype) if r == 4 else None] for r in layout.ratios]

    @property
    def nbytes(self) -> int:
        return self.fixed.nbytes + self.rows.nbytes

    def ensure(self, n_tokens: int) -> None:
        """Room for the rows of n_tokens positions (doubling, so a long prefill reallocates log n times)."""
        if n_tokens > self.cap:
            self._grow(max(2 * self.cap, n_tokens))

    def _grow(self, cap: int) -> None:
        cap = _align(max(cap, 256), 128)
        comp, idx, total = self.layout.rows(cap)
        rows = self.be.cu.Buffer(total)
        if self.rows is not None:
            L = self.layout
            for i, r in enumerate(L.ratios):
                for new, old, width, n in ((comp[i], self.comp_off[i], L.D, self.n_tokens // max(r, 1)),
                                           (idx[i], self.idx_off[i], L.di, self.n_tokens // 4)):
                    if new is not None and n:
                        self.be.cu.memcpy(rows.ptr + new, self.rows.ptr + old, n * width * L.es, self.be.stream.ptr)
            self.be.stream.synchronize()   # the old buffer is freed below
        self.rows, self.cap, self.comp_off, self.idx_off = rows, cap, comp, idx
        # for the step tables: (layers,) int64 each, 0 where a layer has no such rows
        self.row_offsets = tuple(np.array([o or 0 for o in v], np.int64) for v in (comp, idx))

    def snapshot(self) -> SessionState:
        L, sd = self.layout, self.store_dtype
        host = self.fixed.download(np.uint8, [L.fixed_bytes])
        layers = []
        for i, r in enumerate(L.ratios):
            raw = host[L.raw[i]:L.raw[i] + L.n_swa * L.D * L.es].view(L.row_dtype).reshape(L.n_swa, L.D).astype(sd)
            st = LayerState(raw=raw)
            for fr, off, mirror, width, n, names in (
                    (L.comp_fr[i], self.comp_off[i], self.mirror[i][0], L.D, self.n_tokens // max(r, 1),
                     ("comp", "comp_kv", "comp_score")),
                    (L.idx_fr[i], self.idx_off[i], self.mirror[i][1], L.di, self.n_tokens // 4,
                     ("idx", "idx_kv", "idx_score"))):
                if fr is None:
                    continue
                if n > mirror.n:
                    new = self.rows.download(L.row_dtype, [n - mirror.n, width], off + mirror.n * width * L.es)
                    mirror.append(new.astype(sd))
                count = fr[2][0] * fr[2][1]
                kv = host[fr[0]:fr[0] + 4 * count].view(np.float32).reshape(fr[2]).copy()
                score = host[fr[1]:fr[1] + 4 * count].view(np.float32).reshape(fr[2]).copy()
                setattr(st, names[0], mirror.snapshot())
                setattr(st, names[1], kv)
                setattr(st, names[2], score)
            layers.append(st)
        return SessionState(layers, self.n_tokens)

    def load(self, snap: SessionState) -> None:
        """Take a host snapshot's content (a fresh state only)."""
        L = self.layout
        self.ensure(snap.n_tokens)
        host = L.fixed_template.copy()
        for i, (r, ls) in enumerate(zip(L.ratios, snap.layers)):
            raw = np.ascontiguousarray(ls.raw, L.row_dtype)
            host[L.raw[i]:L.raw[i] + raw.nbytes] = raw.view(np.uint8).reshape(-1)
            for fr, off, k, store, kv, score in ((L.comp_fr[i], self.comp_off[i], 0, ls.comp, ls.comp_kv,
                                                  ls.comp_score),
                                                 (L.idx_fr[i], self.idx_off[i], 1, ls.idx, ls.idx_kv, ls.idx_score)):
                if fr is None:
                    continue
                for at, a in ((fr[0], kv), (fr[1], score)):
                    a = np.ascontiguousarray(a, np.float32)
                    host[at:at + a.nbytes] = a.view(np.uint8).reshape(-1)
                if store.n:
                    self.rows.upload(np.ascontiguousarray(store.array(), L.row_dtype), off)
                if store.dtype == self.store_dtype:
                    self.mirror[i][k] = store.snapshot()      # shares the snapshot's full pages
                else:
                    self.mirror[i][k].append(store.array().astype(self.store_dtype))
        self.fixed.upload(host)
        self.n_tokens = snap.n_tokens


# --- per-forward tables -----------------------------------------------------------------------------------------

class _Step:
    """What the kernels of one forward read besides activations: token ids, positions and row counts per token, the
    segments, and per layer each token's K=V destination, raw-row array, compressed-row and indexer-row arrays
    and each segment's frontiers. One int64 table built on the host; `place` uploads it and fixes the device
    addresses the ops pass to the kernels (a captured graph keeps those addresses: each later step's table is
    uploaded to the same place).

    `bucket` bounds the positions the kernels are sized for (compressed-row capacities, scratch): for a decode
    step the next power of two, so that one captured graph serves every position up to it; else the exact
    largest position."""

    def __init__(self, be: "CUDA", sessions: list, bounds: np.ndarray, positions: np.ndarray, tokens: np.ndarray,
                 draws: list | None = None, follow: np.ndarray | None = None, prev: int = 0):
        L = be.layout
        N, S, n_swa = len(positions), len(sessions), L.n_swa
        self.n_tok, self.n_seg, self.decode = N, S, N == S
        row = L.D * L.es
        pos = np.asarray(positions, np.int64)
        seg_of = np.repeat(np.arange(S), np.diff(bounds))
        for st, b in zip(sessions, bounds[1:]):
            st.ensure(int(pos[b - 1]) + 1)
        top = int(pos.max()) + 1
        self.bucket = max(256, 1 << (top - 1).bit_length()) if self.decode else top
        self.comp_cap = {r: self.bucket // r for r in (4, 128)}
        # Prefill segments (more than one token) attend over a staging copy of their window.
        self.linear = []                                       # (session, pos0, T, n_old, staging byte offset)
        raw_rows = np.zeros(N, np.int64)
        raw_n = np.minimum(pos + 1, n_swa)
        kv_dst_rel = np.zeros(N, np.int64)                     # staging offsets for prefill tokens
        staged = np.zeros(N, bool)
        at = 0
        for st, a, b in zip(sessions, bounds[:-1], bounds[1:]):
            if b - a == 1:
                continue
            pos0 = int(pos[a])
            first = max(0, pos0 - n_swa + 1)
            self.linear.append((st, pos0, b - a, pos0 - first, at))
            p = pos[a:b]
            lo = np.maximum(p - n_swa + 1, first) - first
            raw_rows[a:b] = at + lo * row
            raw_n[a:b] = p - first + 1 - lo
            kv_dst_rel[a:b] = at + (p - first) * row
            staged[a:b] = True
            at += (pos0 - first + b - a) * row
        self.staging = be.empty((max(at, 256),), np.dtype(np.uint8)) if at else None
        base = self.staging.ptr if at else 0

        # follow: per token, the row of the previous step whose sampled id it is (-1: its id is in `tokens`), read
        # with the previous step's ids address (prev) by the embedding (ds4_cuda_embed).
        follow = np.full(N, -1) if follow is None else follow
        ints = np.concatenate([pos, raw_n, (pos + 1) // 4, (pos + 1) // 128, bounds[:-1], np.diff(bounds), tokens,
                               follow])
        ints = ints.astype(np.int32)
        if len(ints) % 2:
            ints = np.append(ints, np.int32(0))
        # Per field, one (layers, count) block for every layer at once (a field a layer lacks is computed and left
        # unused): a host table for 43 layers costs a few dozen numpy operations, not a few per layer.
        fixed_s = np.array([st.fixed.ptr for st in sessions], np.int64)
        rows_s = np.array([st.rows.ptr for st in sessions], np.int64)
        comp_off = np.stack([st.row_offsets[0] for st in sessions], axis=1)           # (layers, S)
        idx_off = np.stack([st.row_offsets[1] for st in sessions], axis=1)
        fr = L.fr_cols
        ring = L.raw_col + fixed_s[seg_of][None, :]                                   # (layers, N)
        fields = {
            "kv_dst": np.where(staged, base + kv_dst_rel, ring + pos % n_swa * row),
            "raw_rows": np.where(staged, base + raw_rows, ring),
            "comp_rows": (rows_s[None, :] + comp_off)[:, seg_of],
            "comp_fr_kv": fixed_s[None, :] + fr["comp", 0],
            "comp_fr_sc": fixed_s[None, :] + fr["comp", 1],
            "idx_rows": (rows_s[None, :] + idx_off)[:, seg_of],
            "idx_fr_kv": fixed_s[None, :] + fr["idx", 0],
            "idx_fr_sc": fixed_s[None, :] + fr["idx", 1],
        }
        self.prev_at = len(ints) * 4
        table, cursor, start = [ints.view(np.int64), np.array([prev], np.int64)], len(ints) // 2 + 1, {}
        self.draws_at = None
        if draws is not None:                                  # ds4_cuda_draw records, one per segment
            self.draws_at = cursor * 8
            table.append(draw_records(draws).view(np.int64))
            cursor += len(draws) * _DRAW.itemsize // 8
        for name, block in fields.items():
            table.append(block.reshape(-1))
            start[name] = cursor * 8
            cursor += block.size
        self._start, self._count = start, {k: v.shape[1] for k, v in fields.items()}
        self._ratios = L.ratios
        self.host = np.concatenate(table)

    def place(self, be: "CUDA", mem: DArray | None = None, stream=None, slot=None) -> "_Step":
        """Upload the table (into `mem`, a captured graph's table, or a new array) on `stream` (the backend's
        main stream by default) and set the addresses; `ids_host`, where the sampler writes the ids in pinned host
        memory, is the HostSlot `slot`'s (0: nowhere)."""
        self.ids_host = slot.ptr if slot is not None else 0
        self.mem = mem if mem is not None else be.empty((len(self.host),), np.dtype(np.int64))
        self.mem.mem.buf.upload_async(self.host, self.mem.ptr - self.mem.mem.buf.ptr, (stream or be.stream).ptr)
        t, N, S = self.mem.ptr, self.n_tok, self.n_seg
        self.pos, self.raw_n = t, t + 4 * N
        self.comp_n = {4: t + 8 * N, 128: t + 12 * N}
        self.seg_first, self.seg_len = t + 16 * N, t + 16 * N + 4 * S
        self.tokens = t + 16 * N + 8 * S
        self.follow, self.prev = self.tokens + 4 * N, t + self.prev_at
        self.draws = None if self.draws_at is None else t + self.draws_at
        self.__dict__.pop("layers", None)         # `layers` follows this placement's addresses
        return self

    @functools.cached_property
    def layers(self) -> list[dict]:
        """Per layer, the device addresses of its fields by name (what the ops of an eager or captured step pass to
        the kernels; a replayed graph has them baked in, so a replay never builds these)."""
        t, out = self.mem.ptr, []
        for i, r in enumerate(self._ratios):
            names = ["kv_dst", "raw_rows"] + (["comp_rows", "comp_fr_kv", "comp_fr_sc"] if r else []) + \
                (["idx_rows", "idx_fr_kv", "idx_fr_sc"] if r == 4 else [])
            out.append({k: t + self._start[k] + i * self._count[k] * 8 for k in names})
        return out


# ds4_cuda_draw (ds4_cuda.h): a row's sampling knobs and uniform, read by the sampling kernel from the step's table.
_DRAW = np.dtype([("temperature", "<f8"), ("top_p", "<f8"), ("t_log_min_p", "<f8"), ("u", "<f8"), ("top_k", "<i4"),
                  ("mode", "<i4")])
_DRAW_SAMPLE, _DRAW_GREEDY, _DRAW_SKIP = 0, 1, 2


def draw_records(draws: list) -> np.ndarray:
    """The ds4_cuda_draw records of sampling.Draw objects (None: a row without a token)."""
    rec = np.zeros(len(draws), _DRAW)
    for r, d in zip(rec, draws):
        if d is None or d.greedy:
            r["mode"] = _DRAW_SKIP if d is None else _DRAW_GREEDY
            continue
        p = d.params
        r["temperature"], r["top_p"], r["u"] = p.temperature, p.top_p, d.u
        r["t_log_min_p"] = p.temperature * math.log(p.min_p) if p.min_p > 0 else -math.inf
        r["top_k"] = min(p.top_k, TOP_K_MAX)
    return rec


class _Ids:
    """A step's sampled ids: on the device (`dev`, which a step following this one reads) and in pinned host memory
    (`slot`), where the sampler writes them too; an event behind the step marks them there, so that the host can
    launch the next step before it waits for them (`wait`). A pooled slot goes back to the backend's pool once
    read; a captured graph's own is written again by its next replay, which reads these first (`CUDA._launch`)."""

    def __init__(self, be: "CUDA", dev: DArray, slot, pooled: bool):
        self.dev, self._be, self._host, self._slot, self._pooled = dev, be, None, slot, pooled
        slot.record(dev.size * 4, be.stream.ptr)

    def wait(self) -> np.ndarray:
        if self._host is None:
            self._host = self._slot.wait(np.int32, list(self.dev.shape))
            if self._pooled:
                self._be.slots.append(self._slot)
            self._slot = None
        return self._host


class _Graph:
    """A captured decode step: the graph, the buffers it owns (its table and activations), what its pass returned
    (the logits, or the sampled ids and the logits), the weight-kernel launches one replay makes, the pinned
    memory its sampler writes the ids into (`slot`, or None), the last replay's ids (`ids`) and an event behind
    its last launch (`done`)."""

    def __init__(self, be: "CUDA", graph, table: DArray, out, owned: dict, weight_calls: int, slot):
        self.graph, self.table, self.out, self.owned, self.weight_calls = graph, table, out, owned, weight_calls
        self.slot, self.ids, self.done = slot, None, be.cu.Event()


# --- the backend ------------------------------------------------------------------------------------------------

class CUDA:
    """Every op of the backend interface (ops/__init__.py) on the GPU. See the module docstring."""

    name = "cuda"
    dtype = _F32
    follows_on_device = True   # step(follow=, prev=): a token can be the previous step's sampled id, never on the host

    def __init__(self, numerics: str = "faithful", device: int = 0):
        from .. import _cuda
        why = available()
        if why:
            raise RuntimeError(f"the CUDA backend cannot run: {why}")
        self.cu = _cuda
        _cuda.set_device(device)
        _cuda.init()
        self.faithful = numerics == "faithful"
        self.stream = _cuda.Stream()
        # A decode step's branches beside the main path run on `side`: the compressors' work (their products of h,
        # then the compressors) from the fork in `matmuls` to the join in `attend`, the shared expert from `ffn` to
        # the join before the routed down (`_moe_tokens`). The indexer's scores wait only for the side stream's work
        # up to its rows (`_mark_ev`), the attention for all of it.
        self.side = _cuda.Stream()
        self._fork_ev, self._join_ev, self._mark_ev = _cuda.Event(), _cuda.Event(), _cuda.Event()
        self._forked = False
        # A decode step's hc_pre leaves the combine matrix's Sinkhorn iterations (~1.6 us of one thread at the end
        # of its launch) to a kernel on `aux`, beside the sublayer; its reader, the next hc_post, joins it first
        # (at one token the side stream's join takes it along where one comes earlier: `_join`).
        # At one token the FFN entry's iterations go to a warp of the routed gate+up instead (`_sk_job` until
        # moe_routed takes it): no launch and no join.
        self.aux = _cuda.Stream()
        self._aux_fork_ev, self._aux_join_ev = _cuda.Event(), _cuda.Event()
        self._aux_open = False
        self._sk_job: dict | None = None      # moe_route_gate_up's hc arguments, left for moe_routed
        self._query_in_order = False
        self._x_q8 = None          # (address, groups, workspace): an activation already quantized for the Q8_0
        #                            product that reads it next (attend's output for out_a, written by the combine;
        #                            the attention entry's x for q_a and kv, by hc_pre), taken by `_quantized`
        self.concurrent = True
        self.pool = _Pool(_cuda)
        self._weights: dict[tuple, int] = {}           # weight key -> device address
        self.uploaded = 0                               # bytes of weights made resident so far
        self.on_upload = None                           # called with `uploaded` after each weight (progress)
        self._buffers: list = []                        # the device buffers behind those addresses
        self._joins: dict[tuple, int] = {}              # keys of weights stored back to back -> their address
        self._consts: dict[int, tuple] = {}
        self._step: _Step | None = None                 # the forward being run or captured
        self.layout: _Layout | None = None
        self.weight_calls = 0      # weight-kernel launches, for the engine's counters
        self.graphs = os.environ.get("DS4_CUDA_GRAPHS", "1") != "0"
        self.join = True           # matmuls: a decode batch's products of one input as one product per type
        # (batch, bucket, sampled) -> its captured decode steps: two, replayed in turn (`pingpong`), so that a
        # step's table goes up on `copy` while the step before it still runs; one without `pingpong`.
        self._graphs: OrderedDict[tuple, list[_Graph]] = OrderedDict()
        self._seen: set[tuple] = set()                  # decode keys run once eagerly (uploads done)
        self._capturing = False
        self.pingpong = True
        self.copy = _cuda.Stream()
        self._copied = _cuda.Event()
        self.slots: list = []                           # free HostSlots of 4 KB or more (an eager step's ids: _Ids)

    # --- device memory ----------------------------------------------------------------------------------------
    def empty(self, shape, dtype=_F32) -> DArray:
        dtype = np.dtype(dtype)
        mem = self.pool.take(max(1, math.prod(shape)) * dtype.itemsize)
        return DArray(self, shape, dtype, mem.buf.ptr, mem)

    def upload(self, a: np.ndarray, dtype) -> DArray:
        a = np.ascontiguousarray(a, dtype)
        out = self.empty(a.shape, dtype)
        out.mem.buf.upload(a.reshape(-1).view(np.uint8) if a.size else np.zeros(1, np.uint8))
        return out

    def weight(self, w: Weight) -> int:
        """Device address of a weight's bytes, uploaded on first use (keyed by the mapped data, so views of the
        same bytes share one copy)."""
        key = self._key(w)
        ptr = self._weights.get(key)
        if ptr is None:
            ptr = self._weights[key] = self._upload_weights([w])
        return ptr

    def _upload_weights(self, ws: list[Weight]) -> int:
        """Uploads weights back to back into one new buffer; returns its address."""
        self._not_capturing(ws[0].name)
        buf = self.cu.Buffer(sum(w.raw.nbytes for w in ws))
        off = 0
        for w in ws:
            buf.upload(np.ascontiguousarray(w.raw).reshape(-1).view(np.uint8), off)
            off += w.raw.nbytes
        self._buffers.append(buf)
        self._made_resident(off)
        return buf.ptr

    def _made_resident(self, nbytes: int) -> None:
        self.uploaded += nbytes
        if self.on_upload is not None:
            self.on_upload(self.uploaded)

    def _joined(self, ws: list[Weight]) -> int | None:
        """Address of weights stored back to back (one product over all their rows), uploading them so on first
        use; None when one of them is already resident on its own or a weight's bytes are not whole 16-byte pieces
        (each must stay aligned for products of its own)."""
        keys = tuple(self._key(w) for w in ws)
        base = self._joins.get(keys)
        if base is None:
            if any(k in self._weights for k in keys) or any(w.raw.nbytes % 16 for w in ws):
                return None
            base = at = self._joins[keys] = self._upload_weights(ws)
            for k, w in zip(keys, ws):
                self._weights[k] = at
                at += w.raw.nbytes
        return base

    @staticmethod
    def _key(w: Weight) -> tuple:
        return w.raw.__array_interface__["data"][0], w.raw.nbytes, int(w.type)

    def fill_random(self, w: Weight, seed: int) -> None:
        """Make a weight resident as valid random blocks generated on the device, never reading its bytes: for
        benchmarks of full-size models whose routed experts are holes in a sparse file."""
        buf = self.cu.Buffer(w.raw.nbytes)
        buf.fill_random(int(w.type), seed, stream=self.stream.ptr)
        self._buffers.append(buf)
        self._weights[self._key(w)] = buf.ptr
        self._made_resident(w.raw.nbytes)

    def const(self, a: np.ndarray, dtype) -> int:
        """Device address of a small host array (norm weights, biases, RoPE tables), uploaded once per array."""
        hit = self._consts.get(id(a))
        if hit is None or hit[0] is not a:
            self._not_capturing("a constant")
            hit = self._consts[id(a)] = (a, self.upload(a, dtype))
        return hit[1].ptr

    def _not_capturing(self, what: str) -> None:
        if self._capturing:
            raise RuntimeError(f"{what} would be uploaded while a graph is being captured (a synchronous copy)")

    # --- a whole forward --------------------------------------------------------------------------------------
    MAX_GRAPHS = 32          # captured decode steps kept; the least recently used goes first

    def step(self, states: list, tokens: np.ndarray, bounds: np.ndarray, positions: np.ndarray, run,
             draws: list | None = None, follow: np.ndarray | None = None, prev: _Ids | None = None):
        """One forward; returns the logits as a numpy array (the forward's one download), or with draws the
        sampled ids (`_Ids`: the host waits for them when it asks) and the logits left on the device. Tokens
        whose `follow` is a row r >= 0 are the ids the step `prev` sampled in row r, read on the device.

        A decode step (one token per session) replays the graph captured for its (batch, bucket): the first step
        of a key runs eagerly (uploading whatever weights and constants the pass uses), the second is captured,
        and each later one only uploads its table (tokens, positions, row addresses) and launches the graph.
        Prefill chunks and mixed batches run eagerly. DS4_CUDA_GRAPHS=0 turns graphs off."""
        if follow is not None and prev is None:
            raise ValueError("a step that follows another needs its ids")
        step = _Step(self, states, bounds, positions, tokens, draws, follow, 0 if prev is None else prev.dev.ptr)
        key = (len(states), step.bucket, draws is not None)
        graphed = step.decode and self.graphs
        pair = self._graphs.get(key) if graphed else None
        if pair is not None and (len(pair) == 2 or not self.pingpong):
            g = self._replay(key, pair, step)
        elif pair is None and (not graphed or key not in self._seen):
            if graphed:
                self._seen.add(key)
            slot = self._slot(len(draws)) if draws is not None else None
            self._step = step.place(self, slot=slot)
            try:
                return self._result(self._joined_after(run), slot)
            finally:
                self._step = None
        else:
            g = self._capture(key, step, run)
            self._launch(g)
        self.weight_calls += g.weight_calls
        return self._result(g.out, g.slot, g)

    def _slot(self, n_rows: int):
        """Pinned host memory for a step's n_rows ids, from the free ones (`slots`) or new (4 KB or more)."""
        fit = next((i for i, c in enumerate(self.slots) if c.nbytes >= 4 * n_rows), None)
        return self.slots.pop(fit) if fit is not None else self.cu.HostSlot(max(4 * n_rows, 4096))

    def _replay(self, key: tuple, pair: list, step: "_Step") -> "_Graph":
        """Launches the key's next captured step with this step's table. Of a pair, the graph whose last replay
        came first: its table goes up on the copy stream behind that replay, while the other graph (the step
        before) may still run, and the main stream waits for the copy, not for a copy engine's start."""
        self._graphs.move_to_end(key)
        g = pair[0]
        if len(pair) == 2:
            pair.reverse()
            g.done.wait(self.copy.ptr)
            step.place(self, g.table, self.copy)
            self._copied.record(self.copy.ptr)
            self._copied.wait(self.stream.ptr)
        else:
            step.place(self, g.table)
        self._launch(g)
        return g

    def _launch(self, g: "_Graph") -> None:
        if g.ids is not None:
            g.ids.wait()    # the replay writes their pinned memory again: the last replay's ids are read first
            g.ids = None
        g.graph.launch(self.stream.ptr)
        g.done.record(self.stream.ptr)

    def _result(self, out, slot, g: "_Graph | None" = None):
        """A pass's result: the logits on the host, or of (ids, logits) the ids on their way there (the logits
        stay on the device). slot: the pinned memory the sampler wrote the ids into, pooled unless a graph's."""
        if not isinstance(out, tuple):
            return out.numpy()
        ids = _Ids(self, out[0], slot, pooled=g is None)
        if g is not None:
            g.ids = ids
        return ids, out[1]

    def _joined_after(self, run):
        """run(), with no side-stream work left unjoined after it (attend joins; this is the safety net)."""
        try:
            return run()
        finally:
            self._join()
            self._join_aux()

    # --- the side stream --------------------------------------------------------------------------------------
    def _branches(self) -> bool:
        """Whether work may run beside the main stream (on `side` or `aux`): in a decode step of up to
        MATVEC_ROWS tokens."""
        return self.concurrent and self._step.decode and self._step.n_tok <= MATVEC_ROWS

    def _fork(self) -> bool:
        """Opens the side stream where a branch may run there (`_branches`), with none open. Work enqueued on it
        from here runs after everything enqueued on the main stream so far, beside what the main stream does next,
        until `_join`. Whether it opened."""
        if not self._branches() or self._forked:
            return False
        self._fork_ev.record(self.stream.ptr)
        self._fork_ev.wait(self.side.ptr)
        self.pool.deferred = []
        self._forked = True
        return True

    def _join(self) -> None:
        """The main stream's next work runs after everything enqueued on the side stream (no-op without a fork)."""
        if self._forked:
            self._join_ev.record(self.side.ptr)
            self._join_ev.wait(self.stream.ptr)
            self._forked = False
            self.pool.settle()
            if self._step.n_tok == 1:
                # At one token the pending Sinkhorn joins here, where the next kernel waits for a join anyway,
                # rather than at its reader, which then starts only once the kernel before it ends (H200, 4-layer
                # file: ratio-4 layers -3 us; at 8 tokens this cost ratio-4 and ratio-128 layers 8-11 us).
                self._join_aux()

    @contextlib.contextmanager
    def _in_order(self, on: bool):
        """Kernels launched inside start only once the kernel before them has finished (when `on`): no programmatic
        early launch, whose resident blocks would hold the SMs that another stream's kernels wait for."""
        was = on and self.cu.pdl()
        if was:
            self.cu.set_pdl(False)
        try:
            yield
        finally:
            if was:
                self.cu.set_pdl(True)

    @contextlib.contextmanager
    def _on_side(self, on: bool = True):
        """The ops inside enqueue on the side stream (when `on` and a fork is open)."""
        main = self.stream
        if on and self._forked:
            self.stream = self.side
        try:
            yield
        finally:
            self.stream = main

    def _capture(self, key: tuple, step: _Step, run) -> _Graph:
        self.pool.recording = {}
        calls = self.weight_calls
        slot = self._slot(step.n_seg) if step.draws_at is not None else None   # the graph's own from now on
        try:
            self._step = step.place(self, slot=slot)
            self.cu.begin_capture(self.stream.ptr)
            self._capturing = True
            try:
                out = self._joined_after(run)
            finally:
                self._capturing = False
                graph = self.cu.end_capture(self.stream.ptr)
            owned = self.pool.recording
        finally:
            self.pool.recording = None
            self._step = None
        self.pool.hold(owned)
        g = _Graph(self, graph, step.mem, out, owned, self.weight_calls - calls, slot)
        self._graphs.setdefault(key, []).append(g)
        self._graphs.move_to_end(key)
        self.weight_calls = calls
        while len(self._graphs) > self.MAX_GRAPHS:
            for old in self._graphs.popitem(last=False)[1]:
                self._drop(old)
        return g

    def _drop(self, g: _Graph) -> None:
        g.table = g.out = g.ids = None                 # their arrays first, then the buffers back to the pool
        self.pool.release(g.owned)

    def drop_graphs(self) -> None:
        """Forget every captured step (the next decode steps run eagerly once and are captured again)."""
        for pair in self._graphs.values():
            for g in pair:
                self._drop(g)
        self._graphs.clear()
        self._seen.clear()

    # --- matrices ---------------------------------------------------------------------------------------------
    def matmul(self, w: Weight, x: DArray) -> DArray:
        """y = x · Wᵀ."""
        return self._matvec(w, x, 1)

    def matmul_grouped(self, w: Weight, x: DArray, groups: int) -> DArray:
        return self._matvec(w, x, groups)

    def matmuls(self, ws, x: DArray) -> list[DArray]:
        """x times each of several weights. Each run of weights of one type and width is stored back to back, so
        that for up to MATVEC_ROWS tokens it is one product writing each weight's rows to its own array
        (ds4_cuda_matvec_parts: a decode step's small products of one input in fewer, fuller launches), and two
        runs that ds4_cuda_matvec_pair takes (at 1-2 tokens a Q8_0 run, q_a and kv, and an F16 run, the
        compressors' and the indexer's products) are one launch; for more tokens, one product per weight."""
        out, runs, i = [], [], 0
        while i < len(ws):
            j = i + 1
            while j < len(ws) and (ws[j].type, ws[j].cols) == (ws[i].type, ws[i].cols) and j - i < 8:  # 8 parts
                j += 1
            runs.append(list(ws[i:j]))
            i = j
        if len(runs) == 2 and self.join and self.cu.matvec_pair_ok(int(runs[0][0].type), int(runs[1][0].type),
                                                                   x.row, x.shape[0]):
            pair = self._pair(runs, x)
            if pair is not None:
                # One launch for both: the F16 run's launch apart (on the side stream) held the SMs beside q_a's,
                # so that q_b, next on the chain, started only as it drained (H200, 4-layer file at one token:
                # ratio-4 layers -6 us, ratio-128 -7.5). The compressors, which read the F16 products, go on the
                # side stream from here, beside the query path.
                self._fork()
                self._query_in_order = False
                return pair
        # Else (3-16 tokens; runs the pair does not take) a decode step's runs after the first (the compressors'
        # and the indexer's F16 products, which only `attend` reads) go on the side stream, beside the first (q_a
        # and kv) and the query path after it.
        side = len(runs) > 1 and self._fork()
        for k, run in enumerate(runs):
            with self._on_side(side and k > 0):
                out += self._products(run, x)
        # With that branch open, the query path's next product (q_b, `norm_matmul`) waits for q_a and kv to finish
        # instead of launching early: early-launched, its blocks fill every SM and keep the branch's products off
        # them until they drain, so the branch ends after q_b (H200, 4-layer file: ratio-128 layers -2 us per layer
        # at one token, -12 at 8 tokens; ratio-4 -7 at 8). Not at one token where the branch also carries the
        # indexer's products (ratio 4): there the query path (q_b, then the indexer's query) is the longer one and
        # q_b's early start pays (+2.4 us per layer without it).
        self._query_in_order = side and (x.shape[0] > 1 or len(ws) - len(runs[0]) <= 2)
        return out

    def norm_matmul(self, w: Weight, x: DArray, weight: np.ndarray, eps: float) -> tuple[DArray, DArray]:
        """(W · rms_norm(x), rms_norm(x)); for up to MATVEC_ROWS tokens and 8-bit activations, one launch that
        norms the rows as it quantizes them (ds4_cuda_matvec_normed: no norm launch before the product)."""
        T = x.shape[0]
        if T > MATVEC_ROWS or w.type not in ACT8_TYPES:
            xn = self.rms_norm(x, weight, eps)
            return self.matmul(w, xn), xn
        y, xn = self.empty((T, w.rows)), self.empty(x.shape)
        work = self._work(self.cu.matvec_work_bytes(int(w.type), T, w.cols, 1))
        with self._in_order(self._query_in_order):
            self.cu.matvec_normed(self.stream.ptr, y.ptr, w.rows, self.weight(w), int(w.type), w.rows, w.cols,
                                  x.ptr, x.row, T, self.const(weight, _F32), float(eps), xn.ptr,
                                  work.ptr if work is not None else 0)
        self._query_in_order = False
        self.weight_calls += 1
        return y, xn

    def _pair(self, runs: list[list[Weight]], x: DArray) -> list[DArray] | None:
        """x times two runs of weights in one launch (ds4_cuda_matvec_pair), or None where a run's weights are not
        stored back to back."""
        T = x.shape[0]
        bases = [self._joined(run) if len(run) > 1 else self.weight(run[0]) for run in runs]
        if None in bases:
            return None
        ys = [[self.empty((T, w.rows)) for w in run] for run in runs]
        self.cu.matvec_pair(self.stream.ptr, [y.ptr for y in ys[0]], [w.rows for w in runs[0]], bases[0],
                            int(runs[0][0].type), [y.ptr for y in ys[1]], [w.rows for w in runs[1]], bases[1],
                            int(runs[1][0].type), x.row, x.ptr, x.row, T)
        self.weight_calls += 1
        return ys[0] + ys[1]

    def _products(self, run: list[Weight], x: DArray) -> list[DArray]:
        """x times weights of one type and width: one product over all their rows (stored back to back) for up to
        MATVEC_ROWS tokens, else one product per weight."""
        T = x.shape[0]
        base = self._joined(run) if len(run) > 1 else None
        if base is None or T > MATVEC_ROWS or not self.join:
            return [self._matvec(w, x, 1) for w in run]
        ys = [self.empty((T, w.rows)) for w in run]
        wtype, cols = int(run[0].type), run[0].cols
        pre = self._quantized(x, 1, wtype)
        work = pre if pre is not None else self._work(self.cu.matvec_work_bytes(wtype, T, cols, 1))
        self.cu.matvec_parts(self.stream.ptr, [y.ptr for y in ys], [w.rows for w in run], base, wtype, cols,
                             x.ptr, x.row, T, work.ptr if work is not None else 0, pre is not None)
        self.weight_calls += 1
        return ys

    def _quantized(self, x: DArray, groups: int, wtype: int) -> DArray | None:
        """The workspace holding x already quantized for a Q8_0 product of `groups` column groups (`_x_q8`, left by
        x's producer: the attention's entry or its combine), or None. Taken either way: it serves the next product
        only."""
        pre, self._x_q8 = self._x_q8, None
        return pre[2] if pre is not None and pre[:2] == (x.ptr, groups) and wtype == Q.Q8_0 else None

    def _matvec(self, w: Weight, x: DArray, groups: int) -> DArray:
        T, cols = x.shape[0], x.row
        y = self.empty((T, w.rows))
        wp, s = self.weight(w), self.stream.ptr
        per = w.rows // groups
        pre = self._quantized(x, groups, w.type)
        if pre is not None and T <= MATVEC_ROWS:
            self.cu.matvec(s, y.ptr, w.rows, wp, int(w.type), per, w.cols, x.ptr, cols, T, groups, pre.ptr, True)
            self.weight_calls += 1
            return y
        if T > MATVEC_ROWS and self.cu.gemm_ok(int(w.type), w.cols):  # prefill: tensor cores
            work = self.empty((self.cu.gemm_work_bytes(int(w.type), T, per, w.cols, groups),), np.uint8)
            self.cu.gemm(s, y.ptr, w.rows, wp, int(w.type), per, w.cols, x.ptr, cols, T, groups, work.ptr)
            self.weight_calls += 1
            return y
        for t0 in range(0, T, MATVEC_ROWS):
            n = min(MATVEC_ROWS, T - t0)
            work = self._work(self.cu.matvec_work_bytes(int(w.type), n, w.cols, groups))
            self.cu.matvec(s, y.ptr + 4 * t0 * w.rows, w.rows, wp, int(w.type), per, w.cols, x.ptr + 4 * t0 * cols,
                           cols, n, groups, work.ptr if work is not None else 0)
            self.weight_calls += 1
        return y

    def embed(self, w: Weight, tokens: np.ndarray, n_hc: int) -> DArray:
        N = len(tokens)
        X = self.empty((N, n_hc, w.cols))
        self.cu.embed(self.stream.ptr, X.ptr, self.weight(w), int(w.type), self._step.tokens, N, w.cols, n_hc,
                      self._step.follow, self._step.prev)
        return X

    # --- norms and hyper-connections --------------------------------------------------------------------------
    def rms_norm(self, x: DArray, weight: np.ndarray | None, eps: float) -> DArray:
        n = x.shape[-1]
        y = self.empty(x.shape)
        self.cu.rms_norm(self.stream.ptr, y.ptr, n, x.ptr, n, self.const(weight, _F32) if weight is not None else 0,
                         x.size // n, n, float(eps))
        return y

    def _hc(self, X: DArray, hc, n_mix: int, n_iter: int, hc_eps: float, rms_eps: float, norm=None, upd=None,
            moe_next: bool = False):
        """hc_pre's kernels; with upd = (f, old streams, post) they first compute X (written) from the update.
        At the attention's entry for 3 to MATVEC_ROWS tokens they also write x as the Q8_0 activations of a
        product's workspace, which its first products (q_a and kv) take instead of a quantize launch (`_x_q8`).
        Not at the FFN's: its product of x (the shared expert's) runs on the side stream, off the chain, and from 9
        tokens on, where hc_pre is not one cluster launch, the quantizing would be a launch on the chain."""
        N, S, E = X.shape
        x = self.empty((N, E))
        h = self.empty((N, 20)) if n_mix > S else None
        q8 = {}
        attention = h is not None and not moe_next and E % 32 == 0
        nq = self.cu.matvec_work_bytes(int(Q.Q8_0), N, E, 1) if attention and 2 < N <= MATVEC_ROWS else 0
        if nq:
            xq = self.empty((nq,), np.uint8)
            q8 = dict(xq_qs=xq.ptr, xq_d=xq.ptr + N * E)
        scratch = self.empty((self.cu.hc_pre_scratch_bytes(min(N, HC_ROWS), E, n_mix),), np.uint8)
        fn, sc, base = self.weight(hc.fn), self.const(hc.scale, _F32), self.const(hc.base, _F32)
        defer = h is not None and self._branches()
        self._join_aux()                           # upd's combine matrix, normalized on `aux`
        for t0 in range(0, N, HC_ROWS):
            n = min(HC_ROWS, N - t0)
            post = {}
            if upd is not None:
                f, X0, p = upd
                post = dict(post_f=f.ptr + 4 * t0 * E, post_X=X0.ptr + 4 * t0 * S * E, post_hc=p.ptr + 80 * t0)
            self.cu.hc_pre(self.stream.ptr, x.ptr + 4 * t0 * E, h.ptr + 80 * t0 if h is not None else 0, scratch.ptr,
                           X.ptr + 4 * t0 * S * E, S * E, fn, int(hc.fn.type), sc, base, n, E, n_mix, n_iter,
                           float(hc_eps), float(rms_eps), self.const(norm, _F32) if norm is not None else 0,
                           defer=defer, **post, **q8)   # q8: one call (N <= MATVEC_ROWS < HC_ROWS)
        if q8:
            self._x_q8 = (x.ptr, 1, xq)
        if defer:
            job = dict(hc=h.ptr, hc_n_tok=N, hc_n_iter=n_iter, hc_eps=float(hc_eps))
            if moe_next and N == 1:
                self._sk_job = job
            else:
                self._sinkhorn_aside(job)
        return x, h

    def _sinkhorn(self, stream: int, job: dict) -> None:
        """The Sinkhorn iterations of a job (moe_route_gate_up's hc arguments) as a launch of their own."""
        self.cu.hc_sinkhorn(stream, job["hc"], job["hc_n_tok"], job["hc_n_iter"], job["hc_eps"])

    def _sinkhorn_aside(self, job: dict) -> None:
        self._aux_fork_ev.record(self.stream.ptr)
        self._aux_fork_ev.wait(self.aux.ptr)
        self._sinkhorn(self.aux.ptr, job)
        self._aux_join_ev.record(self.aux.ptr)
        self._aux_open = True

    def _join_aux(self) -> None:
        """The main stream's next work runs after the pending Sinkhorn iterations: the kernel on `aux`, or one
        that nothing took (no-op without either)."""
        if self._aux_open:
            self._aux_join_ev.wait(self.stream.ptr)
            self._aux_open = False
        if self._sk_job is not None:
            self._sinkhorn(self.stream.ptr, self._sk_job)
            self._sk_job = None

    def hc_pre(self, X: DArray, hc, n_iter: int, hc_eps: float, rms_eps: float, norm=None, moe_next: bool = False):
        """Sublayer input x (normalized in the same kernel with `norm`) and the post gates + combine matrix in one
        (N, 20) array, handed to hc_post as `post` (`comb` is None)."""
        x, h = self._hc(X, hc, 24, n_iter, hc_eps, rms_eps, norm, moe_next=moe_next)
        return x, h, None

    def hc_post(self, f: DArray, X: DArray, post: DArray, comb) -> DArray:
        N, _, E = X.shape
        out = self.empty(X.shape)
        self._join_aux()
        self.cu.hc_post(self.stream.ptr, out.ptr, f.ptr, X.ptr, post.ptr, N, E)
        return out

    def hc_post_pre(self, f: DArray, X: DArray, post: DArray, comb, hc, n_iter: int, hc_eps: float, rms_eps: float,
                    norm=None, moe_next: bool = False):
        """hc_post inside the next hc_pre's mixer kernel: each of its blocks computes the new streams at the
        positions it multiplies (one launch and one memory trip fewer per sublayer)."""
        Xn = self.empty(X.shape)
        x, h = self._hc(Xn, hc, 24, n_iter, hc_eps, rms_eps, norm, upd=(f, X, post), moe_next=moe_next)
        return Xn, x, h, None

    def hc_head(self, X: DArray, hc, hc_eps: float, rms_eps: float) -> DArray:
        return self._hc(X, hc, X.shape[1], 1, hc_eps, rms_eps)[0]

    def norm_rope(self, x: DArray, weight: np.ndarray | None, eps: float, positions: np.ndarray,
                  inv_freq: np.ndarray) -> DArray:
        """rms_norm then rope in one kernel (rows of the last axis; a token's rows share its position)."""
        return self.norm_ropes([(x, weight)], eps, positions, inv_freq)[0]

    def norm_ropes(self, items, eps: float, positions: np.ndarray, inv_freq: np.ndarray) -> list[DArray]:
        """norm_rope of two arrays of one row length (the query heads and the K=V row) in one launch: 3-4 us per
        decode layer less than one launch each (H200)."""
        if len(items) > 2 or len({x.shape[-1] for x, _ in items}) > 1:
            return [self.norm_rope(x, w, eps, positions, inv_freq) for x, w in items]
        n = items[0][0].shape[-1]
        ys, rows = [], []
        for x, w in items:
            ys.append(self.empty(x.shape))
            rows.append((ys[-1].ptr, n, x.ptr, n, self.const(w, _F32) if w is not None else 0, x.size // n,
                         x.row // n))
        also = rows[1] if len(rows) > 1 else None
        self.cu.rms_norm_rope(self.stream.ptr, *rows[0][:6], n, float(eps), self._step.pos, rows[0][6],
                              self.const(inv_freq, np.float64), 2 * len(inv_freq), also)
        return ys

    # --- positions --------------------------------------------------------------------------------------------
    def rope(self, x: DArray, positions: np.ndarray, inv_freq: np.ndarray, inverse: bool = False) -> DArray:
        """Rotates x in place and returns it: model.py never reads a tensor again after rotating it."""
        d = x.shape[-1]
        heads = x.row // d
        self.cu.rope(self.stream.ptr, x.ptr, x.row, self._step.pos, 0, self.const(inv_freq, np.float64),
                     x.shape[0], heads, d, 2 * len(inv_freq), bool(inverse))
        return x

    # --- session state ----------------------------------------------------------------------------------------
    def new_state(self, shape, store_dtype) -> CudaState:
        if self.layout is None or self.layout.shape != shape:
            self.layout = _Layout(shape, _F16 if self.faithful else _F32)
        return CudaState(self, self.layout, store_dtype, 256)

    def live_state(self, snapshot: SessionState) -> CudaState:
        if self.layout is None:
            raise RuntimeError("live_state before new_state: the backend learns the model's shape from new_state")
        st = CudaState(self, self.layout, snapshot.layers[0].raw.dtype, snapshot.n_tokens)
        st.load(snapshot)
        return st

    # --- the stateful core of an attention sublayer ----------------------------------------------------------
    def attend(self, spec, states: list, bounds: np.ndarray, positions: np.ndarray, q: DArray, kv: DArray,
               comp: tuple | None, idx: tuple | None, out_proj: tuple | None = None) -> DArray:
        """reference.attend on the device: K=V rows into the rings (or the prefill staging), the compressors and
        their emitted rows, the indexer's choice past top_k rows (its query's product only then: a step whose
        tokens see at most top_k compressed rows, every context up to 2K, skips it), then attention, for every
        session at once (the inverse RoPE of its output inside the attention's last kernel). A decode step with f16
        rows (one token per session) norms and rotates the query heads and the K=V row and stores the row inside the
        attention's first kernel (the decode front: two launches fewer on the chain); a prefill with f16 rows norms
        and rotates the query heads inside its attention launch; otherwise `norm_ropes` runs first. `kv_store`
        stores the rows of all but the decode front. For a Q8_0 out_proj at 3-16 decode tokens the combine also
        writes the output as that product's quantized activations, which `_matvec` then takes (no quantize launch
        between them)."""
        cu, s = self.cu, self.stream.ptr
        self._x_q8 = None
        step = self._step
        li = states[0].index
        tab = step.layers[li]
        L = self.layout
        N, H, D = q.shape
        n_swa, row, f32 = L.n_swa, L.D * L.es, L.es == 4
        for st, pos0, T, n_old, at in step.linear:    # the old window rows into the staging copy
            self._ring_copy(st, li, pos0 - n_old, n_old, step.staging.ptr + at, to_ring=False)
        tc = not f32 and cu.attention_prefill_ok(D)            # f16 rows on the tensor-core kernels
        prefill = tc and N > ATTN_ROWS                         # all queries at once
        front = tc and not prefill and step.decode             # the split launches' decode front
        freq = self.const(spec.rope, np.float64)
        if prefill:                                # the query's norm and RoPE: inside the attention's launch
            kv = self.norm_rope(kv, spec.kv_norm, spec.rms_eps, positions, spec.rope)
        elif not front:
            q, kv = self.norm_ropes([(q, None), (kv, spec.kv_norm)], spec.rms_eps, positions, spec.rope)
        if not front:
            cu.kv_store(s, 0, 0, kv.ptr, D, step.pos, 0, 1, 1, N, D, spec.n_nope, spec.faithful, tab["kv_dst"], f32)
        sel = None
        comp_cap = 0
        with self._on_side():                      # where matmuls left the compressors' products
            if idx is not None:
                # The indexer's rows first, then a mark for its scores to wait on: the attention compressor's launches
                # then run beside the indexer's chain instead of before its scores (H200, 4-layer file at 2K:
                # ratio-4 layers -4.6 us).
                self._compress(spec, step, tab, idx, "idx", 4, L.di, spec.idx_ape, spec.idx_norm,
                               2 if spec.faithful else 0)
                if self._forked:
                    self._mark_ev.record(self.side.ptr)
            if comp is not None:
                self._compress(spec, step, tab, comp, "comp", spec.ratio, L.D, spec.comp_ape, spec.comp_norm,
                               1 if spec.faithful else 0)
                comp_cap = step.comp_cap[spec.ratio]
        if idx is not None and step.comp_cap[4] > spec.top_k:      # some token may see more rows than top_k
            iq = self.matmul(*idx[2]).reshape(N, -1, L.di)
            sel = self._indexer(spec, step, tab, iq, idx[3], positions)
        elif idx is not None:                      # every row chosen: no query; its weight resident all the same
            self.weight(idx[2][0])
        self._join()
        out = self.empty((N, H, D))
        sinks = self.const(spec.sinks, _F32)
        comp_n = step.comp_n.get(spec.ratio, step.raw_n)
        if prefill:
            cu.attention_prefill(s, out.ptr, q.ptr, 0, 0, step.raw_n, n_swa, 0, 0, comp_n, comp_cap,
                                 sel.ptr if sel is not None else 0, spec.top_k, sinks, N, H, D, float(spec.scale),
                                 tab["raw_rows"], tab["comp_rows"] if comp is not None else 0, step.pos, freq,
                                 2 * len(spec.rope), float(spec.rms_eps))
        xq, groups = None, 0
        if front and out_proj is not None and out_proj[0].type == Q.Q8_0 and N <= min(ATTN_ROWS, MATVEC_ROWS):
            n_work = cu.matvec_work_bytes(int(Q.Q8_0), N, H * D // out_proj[1], out_proj[1])  # 0 at 1-2 rows
            if n_work:
                groups, xq = out_proj[1], self.empty((n_work,), np.uint8)
                self._x_q8 = (out.ptr, groups, xq)
        for t0 in range(0, 0 if prefill else N, ATTN_ROWS):
            n = min(ATTN_ROWS, N - t0)
            nbytes = cu.attention_scratch_bytes(n, H, D, n_swa, comp_cap, spec.top_k, sel is not None)
            scratch = self.empty((nbytes,), np.uint8)
            cu.attention_decode(s, out.ptr + 4 * t0 * H * D, scratch.ptr, q.ptr + 4 * t0 * H * D, 0, 0,
                                step.raw_n + 4 * t0, n_swa, 0, 0, comp_n + 4 * t0,
                                comp_cap, sel.ptr + 4 * t0 * spec.top_k if sel is not None else 0, spec.top_k,
                                sinks, n, H, D, float(spec.scale), tab["raw_rows"] + 8 * t0,
                                tab["comp_rows"] + 8 * t0 if comp is not None else 0, f32, step.pos + 4 * t0, freq,
                                2 * len(spec.rope), kv.ptr + 4 * t0 * D if front else 0,
                                self.const(spec.kv_norm, _F32) if front else 0, float(spec.rms_eps),
                                spec.n_nope if spec.faithful else 0, xq.ptr if xq is not None else 0, groups)
        for st, pos0, T, n_old, at in step.linear:    # the segment's last n_swa rows into the ring
            keep = min(T, n_swa)
            self._ring_copy(st, li, pos0 + T - keep, keep, step.staging.ptr + at + (n_old + T - keep) * row,
                            to_ring=True)
        return out

    def _ring_copy(self, st: CudaState, li: int, p0: int, n: int, staging: int, to_ring: bool) -> None:
        """Rows of positions p0 .. p0 + n - 1 between a session's ring (slot p mod n_swa) and consecutive staging
        rows: at most two copies (the ring wraps once)."""
        L = self.layout
        row, ring = L.D * L.es, st.fixed.ptr + L.raw[li]
        done = 0
        while done < n:
            slot = (p0 + done) % L.n_swa
            k = min(n - done, L.n_swa - slot)
            a, b = ring + slot * row, staging + done * row
            self.cu.memcpy(a if to_ring else b, b if to_ring else a, k * row, self.stream.ptr)
            done += k

    def _compress(self, spec, step: _Step, tab: dict, proj: tuple, kind: str, ratio: int, d: int, ape, norm,
                  mode: int) -> None:
        kvp, gate = proj[0], proj[1]
        pooled = self.empty((step.n_tok, d))
        self.cu.compress(self.stream.ptr, pooled.ptr, kvp.ptr, kvp.row, gate.ptr, gate.row, self.const(ape, _F32),
                         step.pos, step.seg_first, step.seg_len, tab[kind + "_fr_kv"], tab[kind + "_fr_sc"],
                         step.n_seg, d, ratio, step.n_tok)
        self.cu.comp_finish(self.stream.ptr, tab[kind + "_rows"], pooled.ptr, self.const(norm, _F32), step.pos,
                            self.const(spec.rope_comp, np.float64), step.n_tok, d, ratio, 2 * len(spec.rope_comp),
                            mode, spec.n_nope if mode == 1 else 0, float(spec.rms_eps), self.layout.es == 4)

    def _indexer(self, spec, step: _Step, tab: dict, iq: DArray, w: DArray, positions: np.ndarray) -> DArray:
        """The top_k compressed rows per token by indexer score (every row where a token sees at most top_k); iq
        before its RoPE."""
        N, Hi, di = iq.shape
        if spec.faithful:                          # its RoPE inside the Hadamard launch
            self.cu.hadamard_fp4(self.stream.ptr, iq.ptr, N * Hi, step.pos, self.const(spec.rope_comp, np.float64),
                                 2 * len(spec.rope_comp), Hi)
        else:
            self.rope(iq, positions, spec.rope_comp)
        if self._forked:                           # the indexer's rows, compressed first on the side stream
            self._mark_ev.wait(self.stream.ptr)    # (attend's mark after them; the attention joins the rest)
        cap = step.comp_cap[4]
        scores = self.empty((N, cap))
        f32_rows = self.layout.es == 4
        work = self._work(self.cu.indexer_scores_work_bytes(N, Hi, f32_rows))
        self.cu.indexer_scores(self.stream.ptr, scores.ptr, cap, iq.ptr, w.ptr, float(spec.idx_w_scale),
                               tab["idx_rows"], step.comp_n[4], N, Hi, di, cap, spec.top_k, f32_rows,
                               work.ptr if work is not None else 0)
        sel = self.empty((N, spec.top_k), _I32)
        self.cu.topk(self.stream.ptr, sel.ptr, scores.ptr, cap, step.comp_n[4], N, spec.top_k)
        return sel

    # --- sampling ---------------------------------------------------------------------------------------------
    def sample(self, logits: DArray, draws: list) -> DArray:
        """Each row's next token on the device, by the draws in the step's table (the draws argument is this
        step's: a replayed graph samples with each step's own); -1 where the host must pick (model.py does)."""
        ids = self.empty((len(draws),), _I32)
        self.cu.sample(self.stream.ptr, ids.ptr, self._step.draws, logits.ptr, logits.row, len(draws), logits.row,
                       self._step.ids_host)
        return ids

    def host(self, x: DArray) -> np.ndarray:
        return x.numpy()

    # --- mixture of experts -----------------------------------------------------------------------------------
    def route(self, logits: DArray, bias, tid2eid, tokens: np.ndarray, k: int, scale: float, normalize: bool):
        N, n_expert = logits.shape
        ids, w = self.empty((N, k), _I32), self.empty((N, k))
        self.cu.route(self.stream.ptr, ids.ptr, w.ptr, logits.ptr, self.const(bias, _F32) if bias is not None else 0,
                      self.const(tid2eid, _I32) if tid2eid is not None else 0, self._step.tokens, N, n_expert,
                      k, float(scale), bool(normalize))
        return ids, w

    def ffn(self, h: DArray, gate: Weight, up: Weight, down: Weight, clamp: float, side: bool = False) -> DArray:
        """The shared expert, down · swiglu(gate · h, up · h): gate and up as one product of two parts, a SwiGLU
        and down. (At one token this beat the fused MoE kernels as an expert of one by ~2 us per layer, 1.3% of a
        decode step, on an H200; at several they read the weights once per token, the products once per block of
        rows.) With `side`, in a decode step on the side stream, beside what the main stream does next (the routed
        experts' gate and up); `_moe_tokens` joins before the routed down adds onto the result. Where down's
        product would quantize mid in a launch of its own (Q8_0, 3 to MATVEC_ROWS tokens), the SwiGLU writes that
        form too (`_x_q8`)."""
        with self._on_side(side and self._fork()):
            mid, u = self.matmuls([gate, up], h)
            N, F = mid.shape
            nq = (self.cu.matvec_work_bytes(int(down.type), N, F, 1)
                  if down.type == Q.Q8_0 and 2 < N <= MATVEC_ROWS else 0)   # Q8_0 rows: F is whole blocks of 32
            xq = self.empty((nq,), np.uint8) if nq else None
            self.cu.swiglu(self.stream.ptr, mid.ptr, mid.ptr, u.ptr, mid.size, float(clamp),
                           xq.ptr if xq is not None else 0)
            if xq is not None:
                self._x_q8 = (mid.ptr, 1, xq)
            return self._matvec(down, mid, 1)

    def moe_routed(self, h: DArray, router: Weight, route, tokens: np.ndarray,
                   experts: tuple[Weight, Weight, Weight], clamp: float, shared: tuple[Weight, Weight, Weight],
                   shared_clamp: float) -> DArray:
        """The shared expert (`ffn`, first; on the side stream from 3 tokens on), the router's logits, then `route`
        and `moe` onto the shared expert's output; up to MATVEC_ROWS tokens (a decode step), the routed gate+up
        kernel chooses each token's experts itself from the logits (ds4_cuda_moe_route_gate_up: one launch fewer
        per layer), and up to SHARED_INSIDE_ROWS tokens it computes the shared expert's gate and up too: their
        weights stream while the kernel's first warp chooses the experts (on the side stream, the shared expert
        waited for the routed gate+up's blocks to leave the SMs: ~13 us per layer on an H200), and its down runs
        before the routed down adds onto it."""
        N = h.shape[0]
        sh_gate, sh_up, sh_down = shared
        in_kernel = N <= MATVEC_ROWS and router.rows <= ROUTE_EXPERTS_MAX and route.k <= MOE_USED_MAX
        inside = (in_kernel and N <= SHARED_INSIDE_ROWS and sh_gate.type == Q.Q8_0 and sh_up.type == Q.Q8_0 and
                  self.cu.moe_shared_ok(int(experts[0].type), h.shape[1], N))
        # Else the shared expert's products: on the side stream from 3 tokens on, first on the main stream below
        # that (the one-token kernels' blocks fill every SM: beside them the router's product and gate+up only wait).
        # (Also measured: at 8 tokens the router's product first, then the fork; the router then added 13 us
        # instead of 29, and the layers -1 us in one run, +1 in another: not kept.)
        job, self._sk_job = self._sk_job, None   # the entry's Sinkhorn iterations (one token), for gate+up
        if job is not None and not inside:
            self._sinkhorn_aside(job)
        out = None if inside else self.ffn(h, *shared, shared_clamp, side=N > 2)
        logits = self.matmul(router, h)
        if not in_kernel:
            ids, w = self.route(logits, route.bias, route.tid2eid, tokens, route.k, route.scale, route.normalize)
            return self.moe(h, ids, w, experts, clamp, out)
        ids, w = self.empty((N, route.k), _I32), self.empty((N, route.k))
        bias = self.const(route.bias, _F32) if route.bias is not None else 0
        tid2eid = self.const(route.tid2eid, _I32) if route.tid2eid is not None else 0
        gate_up = functools.partial(self.cu.moe_route_gate_up, logits=logits.ptr, bias=bias, tid2eid=tid2eid,
                                    tokens=self._step.tokens, scale=float(route.scale),
                                    normalize=bool(route.normalize))
        if not inside:
            return self._moe_tokens(h, ids, w, experts, clamp, out, gate_up)
        self._joined([sh_gate, sh_up])           # stored back to back for the products of a prefill, if not yet
        sh_mid = self.empty((N, sh_gate.rows))
        gate_up = functools.partial(gate_up, sh_gate=self.weight(sh_gate), sh_up=self.weight(sh_up),
                                    sh_n_ff=sh_gate.rows, sh_clamp=float(shared_clamp), sh_mid=sh_mid.ptr)
        if job is not None:
            gate_up = functools.partial(gate_up, **job)
        return self._moe_tokens(h, ids, w, experts, clamp, functools.partial(self._shared_down, sh_down, sh_mid),
                                gate_up)

    def _shared_down(self, w: Weight, x: DArray, mid: DArray, down_type: int, work: DArray | None):
        """The shared expert's down product, w · x, and whether it also quantized the routed experts' mid rows into
        `work` (the routed down's workspace, for experts of down_type) in the same launch: the routed down then
        waits on one launch instead of two (ds4_cuda_matvec_quantizing, 1-2 tokens)."""
        N = x.shape[0]
        if work is None or N > 2:
            return self._matvec(w, x, 1), False
        y = self.empty((N, w.rows))
        self.cu.matvec_quantizing(self.stream.ptr, y.ptr, self.weight(w), int(w.type), w.rows, w.cols, x.ptr, N,
                                  mid.ptr, mid.shape[1], mid.shape[2], down_type, work.ptr)
        self.weight_calls += 1
        return y, True

    def moe(self, h: DArray, ids: DArray, weights: DArray, experts: tuple[Weight, Weight, Weight], clamp: float,
            shared: DArray) -> DArray:
        """Routed experts (gate+up+SwiGLU·weight, then down summed over each token's experts) accumulated onto
        `shared`, the shared expert's output (in place: model.py reads it only through the result). Up to
        MATVEC_ROWS tokens: the fused MoE kernels per token; more (prefill): one grouped product per matrix over
        the tokens sorted by expert."""
        cu, s = self.cu, self.stream.ptr
        N, E = h.shape
        k = ids.shape[1]
        gate, up, down = experts
        if not (N > MATVEC_ROWS and cu.gemm_ok(int(gate.type), E) and cu.gemm_ok(int(down.type), gate.rows)):
            return self._moe_tokens(h, ids, weights, experts, clamp, shared, None)
        g, u, dn = self.weight(gate), self.weight(up), self.weight(down)
        for t0 in range(0, N, MOE_GROUPED_ROWS):
            n = min(MOE_GROUPED_ROWS, N - t0)
            work = self.empty((cu.moe_work_bytes(int(gate.type), int(down.type), n, k, E, gate.rows,
                                                 gate.n_expert),), np.uint8)
            cu.moe_grouped(s, shared.ptr + 4 * t0 * E, E, h.ptr + 4 * t0 * E, E, g, u, dn, int(gate.type),
                           int(down.type), gate.rows, E, gate.n_expert, ids.ptr + 4 * t0 * k, weights.ptr + 4 * t0 * k,
                           k, n, float(clamp), True, work.ptr)
        self.weight_calls += 1
        return shared

    def _moe_tokens(self, h: DArray, ids: DArray, weights: DArray, experts: tuple[Weight, Weight, Weight],
                    clamp: float, shared, route_gate_up) -> DArray:
        """The fused MoE kernels per chunk of MOE_ROWS tokens: gate+up (with route_gate_up, the bound
        ds4_cuda_moe_route_gate_up, which chooses the experts and writes ids and weights; else reading them),
        then down onto `shared` (or onto what shared(mid, down type, work) makes after gate+up, with whether it
        filled the down's workspace)."""
        cu, s = self.cu, self.stream.ptr
        N, E = h.shape
        k = ids.shape[1]
        gate, up, down = experts
        g, u, dn = self.weight(gate), self.weight(up), self.weight(down)
        for t0 in range(0, N, MOE_ROWS):
            n = min(MOE_ROWS, N - t0)
            mid = self.empty((n, k, gate.rows))
            work = self._work(cu.moe_down_work_bytes(int(down.type), n, k, gate.rows))
            at_ids, at_w, at_h = ids.ptr + 4 * t0 * k, weights.ptr + 4 * t0 * k, h.ptr + 4 * t0 * E
            if route_gate_up is None:
                cu.moe_gate_up(s, mid.ptr, at_h, E, g, u, int(gate.type), gate.rows, E, gate.n_expert, at_ids,
                               at_w, k, n, float(clamp))
            else:                                # one chunk: N <= MATVEC_ROWS
                route_gate_up(stream=s, mid=mid.ptr, ids=at_ids, weights=at_w, h=at_h, h_stride=E, gate=g, up=u,
                              type=int(gate.type), n_ff=gate.rows, n_embd=E, n_expert=gate.n_expert, n_used=k,
                              n_tok=n, clamp=float(clamp))
            filled = False
            if self._forked and work is not None and not callable(shared):
                # mid quantized before the join: beside the shared expert's products on the side stream, which
                # start only as gate+up's blocks leave the SMs, rather than after them (its down quantizes mid
                # itself where it comes after gate+up: `_shared_down`)
                cu.moe_down_quantize(s, work.ptr, mid.ptr, int(down.type), n, k, gate.rows)
                filled = True
            self._join()                         # `shared`, made on the side stream by ffn
            if callable(shared):
                shared, filled = shared(mid, int(down.type), work)
            cu.moe_down(s, shared.ptr + 4 * t0 * E, E, mid.ptr, dn, int(down.type), E, gate.rows, gate.n_expert,
                        at_ids, k, n, True, work.ptr if work is not None else 0, filled)
        self.weight_calls += 1
        return shared

    def _work(self, nbytes: int) -> DArray | None:
        """A kernel's workspace of nbytes (None when it needs none); the caller keeps it until after the launch."""
        return self.empty((nbytes,), np.uint8) if nbytes else None
